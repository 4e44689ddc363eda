"""Lint the systemd units as CI does: ``systemd-analyze verify`` with any output treated as a
failure, and ``systemd-analyze security --offline=yes`` exposure ≤ 2.5 for the agent.

How verify is made honest: verify checks that ExecStart's binary exists and is executable,
and resolves the units a service depends on (sysinit.target, …). The units are therefore
installed by ``systemd/install.sh --destdir ROOT`` into a scratch root, the host's unit
library is copied beside them, ``ROOT/opt/edgecap/.venv/bin/edgecap`` is a two-line
wrapper that execs this checkout's real ``.venv/bin/edgecap``, and other Exec*= programs
(``/bin/kill``) get the same kind of stand-in for the host's own binary. The unit files themselves
are verified byte-for-byte as installed (``--root=ROOT``), not rewritten copies.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
UNITS = ["edgecap-agent.service", "edgecap-sync.service", "edgecap-ingest.service"]
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed "
                                   "(apt-get install systemd)")
EDGECAP = Path(sys.executable).parent / "edgecap"


def unit_settings(path: Path) -> dict[str, list[str]]:
    """``key → [values]`` of a unit file (systemd allows repeated keys)."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        k, _, v = line.partition("=")
        out.setdefault(k.strip(), []).append(v.strip())
    return out


@pytest.fixture(scope="module")
def sysroot(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sysroot")
    r = subprocess.run(["sh", str(ROOT / "systemd/install.sh"), "--destdir", str(root),
                        "--units-only", "--no-user"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for lib in ("/usr/lib/systemd/system", "/lib/systemd/system"):
        if os.path.isdir(lib):
            shutil.copytree(lib, root / "usr/lib/systemd/system", symlinks=True,
                            dirs_exist_ok=True)
            break
    stand_in(root, "/opt/edgecap/.venv/bin/edgecap", EDGECAP)
    # other Exec*= programs (ExecReload=/bin/kill …) as they exist on this host
    for unit in UNITS:
        for k, vals in unit_settings(root / "etc/systemd/system" / unit).items():
            for v in vals if k.startswith("Exec") else []:
                exe = v.lstrip("-@:+!").split()[0]
                if not (root / exe.lstrip("/")).exists() and os.access(exe, os.X_OK):
                    stand_in(root, exe, Path(exe))
    return root


def stand_in(root: Path, path: str, real: Path) -> None:
    """``ROOT/path``: a two-line script that execs ``real`` on this host."""
    w = root / path.lstrip("/")
    w.parent.mkdir(parents=True, exist_ok=True)
    w.write_text(f'#!/bin/sh\nexec "{real}" "$@"\n')
    w.chmod(0o755)


def verify(root: Path, unit: str) -> subprocess.CompletedProcess:
    return subprocess.run([ANALYZE, "verify", f"--root={root}", unit],
                          capture_output=True, text=True, timeout=60)


@needs_analyze
@pytest.mark.parametrize("unit", UNITS)
def test_verify_has_no_output(sysroot, unit):
    r = verify(sysroot, unit)
    assert (r.returncode, r.stdout + r.stderr) == (0, "")


@needs_analyze
def test_verify_would_catch_problems(sysroot):
    """The lint can fail: an unknown key and a missing binary both print something."""
    d = sysroot / "etc/systemd/system"
    text = (d / "edgecap-agent.service").read_text()
    (d / "broken-typo.service").write_text(text.replace("WatchdogSec=", "WatchDogSec="))
    (d / "broken-exec.service").write_text(text.replace("/opt/edgecap/", "/opt/nowhere/"))
    try:
        typo = verify(sysroot, "broken-typo.service")
        assert "Unknown key" in typo.stderr and "WatchDogSec" in typo.stderr
        exe = verify(sysroot, "broken-exec.service")
        assert exe.returncode != 0 and "is not executable" in exe.stderr
    finally:
        (d / "broken-typo.service").unlink()
        (d / "broken-exec.service").unlink()


def exposure(unit_path: Path) -> float:
    r = subprocess.run([ANALYZE, "security", "--offline=yes", str(unit_path)],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout)
    assert m, r.stdout[-500:] + r.stderr
    return float(m.group(1))


@needs_analyze
@pytest.mark.parametrize("unit", UNITS)
def test_security_exposure(unit):
    level = exposure(ROOT / "systemd" / unit)
    assert level <= 2.5, f"{unit}: exposure {level} > 2.5"


@pytest.mark.parametrize("unit", UNITS)
def test_units_keep_the_required_settings(unit):
    s = unit_settings(ROOT / "systemd" / unit)
    one = {k: v[-1] for k, v in s.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert one["WatchdogSec"].endswith("s") and one["Restart"] == "on-failure"
    assert int(one["StartLimitBurst"]) >= 1 and int(one["StartLimitIntervalSec"]) > 0
    assert one["User"] == "edgecap" and one["NoNewPrivileges"] == "yes"
    assert one["ProtectSystem"] == "strict" and one["ReadWritePaths"].startswith("/var/lib/")
    assert one["PrivateTmp"] == one["ProtectHome"] == "yes"
    assert one["DevicePolicy"] == "closed" and one["CapabilityBoundingSet"] == ""
    assert one["RestrictAddressFamilies"] == "AF_UNIX AF_INET AF_INET6 AF_NETLINK"
    assert s["SystemCallFilter"][0] == "@system-service"
    assert one["SystemCallArchitectures"] == "native" and one["LockPersonality"] == "yes"
    assert one["ExecStart"].startswith("/opt/edgecap/.venv/bin/edgecap ")
    if unit == "edgecap-agent.service":
        assert one["SupplementaryGroups"] == "video audio dialout"
        assert set(s["DeviceAllow"]) == {
            "char-video4linux rw", "char-ttyS rw", "char-ttyUSB rw", "char-ttyACM rw",
            "char-alsa rw", "char-pps r", "char-ptp r"}
        assert one["ReadWritePaths"] == "/var/lib/edgecap"
    else:
        assert one["PrivateDevices"] == "yes" and "DeviceAllow" not in s


def _subcommand(unit: str) -> list[str]:
    """The subcommand words of ExecStart (up to the first option)."""
    words = []
    for a in unit_settings(ROOT / "systemd" / unit)["ExecStart"][-1].split()[1:]:
        if a.startswith("-"):
            break
        words.append(a)
    return words


@pytest.mark.parametrize("unit", UNITS)
def test_exec_start_names_a_real_command(unit):
    cmd = _subcommand(unit)
    r = subprocess.run([str(EDGECAP), *cmd, "--help"], capture_output=True, text=True,
                       timeout=60)
    if r.returncode != 0 and cmd[0] == "sync":
        pytest.skip(f"`edgecap {' '.join(cmd)}` is not built yet (issue 8): {r.stderr[-200:]}")
    assert r.returncode == 0, r.stderr
    opts = [a for a in unit_settings(ROOT / "systemd" / unit)["ExecStart"][-1].split()
            if a.startswith("--")]
    for opt in opts:  # every option the unit passes exists
        assert opt in r.stdout, f"{unit}: edgecap {' '.join(cmd)} has no {opt}"


def test_install_prefix_rewrites_exec_start(tmp_path):
    r = subprocess.run(["sh", str(ROOT / "systemd/install.sh"), "--destdir", str(tmp_path),
                        "--units-only", "--no-user", "--prefix", "/srv/ec"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    for unit in UNITS:
        es = unit_settings(tmp_path / "etc/systemd/system" / unit)["ExecStart"]
        assert es[-1].startswith("/srv/ec/.venv/bin/edgecap ")
    assert (tmp_path / "etc/edgecap/rig.toml.example").exists()
    bad = subprocess.run(["sh", str(ROOT / "systemd/install.sh"), "--prefix", "rel"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "absolute" in bad.stderr


def test_install_creates_service_user_in_private_namespace(tmp_path):
    """Runs install.sh for real (user, groups, ownership) against a copy of /etc mounted
    over /etc in a private mount namespace, so the host is not touched."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("needs root and unshare(1) to isolate /etc")
    etc = tmp_path / "etc-copy"
    shutil.copytree("/etc", etc, symlinks=True, ignore_dangling_symlinks=True)
    stage = tmp_path / "root"
    script = textwrap.dedent(f"""
        mount --bind {etc} /etc || exit 77
        sh {ROOT}/systemd/install.sh --destdir {stage} --units-only >/dev/null || exit 1
        sh {ROOT}/systemd/install.sh --destdir {stage} --units-only >/dev/null || exit 1
        id -nG edgecap
        stat -c '%U:%G %a' {stage}/var/lib/edgecap {stage}/etc/edgecap
        getent passwd edgecap | cut -d: -f6,7
    """)
    r = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True,
                       text=True, timeout=60)
    if r.returncode == 77 or "unshare failed" in r.stderr:
        pytest.skip(f"cannot isolate /etc here: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr
    groups, state, conf, home = r.stdout.split("\n")[:4]
    assert set(groups.split()) == {"edgecap", "video", "audio", "dialout"}
    assert state == "edgecap:edgecap 750" and conf == "root:edgecap 750"
    assert home == "/var/lib/edgecap:/usr/sbin/nologin"
    assert subprocess.run(["id", "edgecap"], capture_output=True).returncode != 0 or \
        Path("/etc/passwd").read_text().count("\nedgecap:") == 1  # host untouched


MDWE_PROBE = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
    sys.exit(77)
import zmq, zmq.auth, msgpack, boto3
ctx = zmq.Context()
spub, ssec = zmq.curve_keypair(); cpub, csec = zmq.curve_keypair()
srv = ctx.socket(zmq.ROUTER); srv.curve_server = True
srv.curve_publickey, srv.curve_secretkey = spub, ssec
port = srv.bind_to_random_port("tcp://127.0.0.1")
cli = ctx.socket(zmq.DEALER)
cli.curve_serverkey, cli.curve_publickey, cli.curve_secretkey = spub, cpub, csec
cli.connect(f"tcp://127.0.0.1:{port}")
cli.send(msgpack.packb({"v": 1}))
assert srv.poll(5000), "no message over CURVE"
print("sync-side ok", msgpack.unpackb(srv.recv_multipart()[1]))
import cffi
try:
    ffi = cffi.FFI()
    ffi.callback("int(int)")(lambda x: x)
    print("cffi callback ok")
except MemoryError:
    print("cffi callback refused")
"""


def test_memory_deny_write_execute_choices():
    """MemoryDenyWriteExecute=yes on sync/ingest is safe (zmq CURVE, msgpack, boto3 work
    under the kernel's equivalent, PR_SET_MDWE); it stays off for the agent because cffi
    callbacks (sounddevice's audio callback) need W+X memory."""
    r = subprocess.run([sys.executable, "-c", MDWE_PROBE], capture_output=True, text=True,
                       timeout=60)
    if r.returncode == 77:
        pytest.skip("kernel lacks PR_SET_MDWE (Linux < 6.3)")
    assert r.returncode == 0, r.stderr
    assert "sync-side ok {'v': 1}" in r.stdout
    assert "cffi callback refused" in r.stdout
    agent = unit_settings(ROOT / "systemd/edgecap-agent.service")
    assert "MemoryDenyWriteExecute" not in agent
    for unit in ("edgecap-sync.service", "edgecap-ingest.service"):
        assert unit_settings(ROOT / "systemd" / unit)["MemoryDenyWriteExecute"] == ["yes"]
