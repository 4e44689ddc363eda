"""``edgecap doctor``: missing device, wrong permissions, full disk, unreachable server,
refused key — each a FAIL with a fix hint and a non-zero exit.

Tests run as root, for which ``os.access`` says yes to everything. Permission checks for
the service user are therefore tested as another principal (a uid that owns nothing)
against real files and a real character device node with real ownership and modes."""

from __future__ import annotations

import grp
import hashlib
import os
import socket
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from agent.cli import main
from agent.config import parse_config
from agent.doctor import (Level, Principal, Probe, check_chrony, check_clock, check_devices,
                          check_disk, check_models, check_sync, estimate_load_bps, mode_allows,
                          run_checks, stream_paths)

DIALOUT = grp.getgrnam("dialout").gr_gid
SVC = Principal("svc", 54321, {54321})  # a service user that owns nothing here


def rig(tmp_path: Path, **extra) -> object:
    data = {"device_id": "doc-test",
            "streams": [{"name": "/gps", "driver": "gps.synthetic", "rate_hz": 5}],
            "recorder": {"out_dir": str(tmp_path / "rec")}}
    data.update(extra)
    return parse_config(data, str(tmp_path / "rig.toml"), check_drivers=False)


def levels(checks) -> list[str]:
    return [c.level.value for c in checks]


# -- devices ------------------------------------------------------------------------------
def test_stream_paths_from_uris_and_options():
    def sc(uri, driver="gps.nmea", **opts):
        return SimpleNamespace(uri=uri, driver=driver, options=opts)

    rw, r = os.R_OK | os.W_OK, os.R_OK
    assert stream_paths(sc("serial:///dev/ttyUSB0?baud=9600")) == [("/dev/ttyUSB0", rw)]
    assert stream_paths(sc("/dev/video2", "camera.opencv")) == [("/dev/video2", rw)]
    assert stream_paths(sc("0", "camera.opencv")) == [("/dev/video0", rw)]
    assert stream_paths(sc("udp://0.0.0.0:7502", "lidar.ouster")) == []
    assert stream_paths(sc("replay:/data/s1", "replay.mcap")) == [("/data/s1", r)]
    assert stream_paths(sc("serial:///dev/ttyACM0", pps="/dev/pps0")) == [
        ("/dev/ttyACM0", rw), ("/dev/pps0", r)]
    assert stream_paths(sc("")) == []


def test_missing_device_fails_with_hint(tmp_path):
    cfg = rig(tmp_path, streams=[
        {"name": "/gps", "driver": "gps.nmea", "uri": "serial:///dev/ttyEDGECAPTEST99"},
        {"name": "/cam", "driver": "camera.opencv", "uri": "/dev/video97", "required": False}])
    checks = check_devices(cfg, SVC)
    assert levels(checks) == ["FAIL", "WARN"]  # an optional stream only warns
    assert checks[0].detail == "/gps: /dev/ttyEDGECAPTEST99: missing"
    assert "/dev/serial/by-id" in checks[0].hint
    assert "v4l2-ctl" in checks[1].hint


@pytest.fixture
def tty(tmp_path):
    """A real character device node (same numbers as /dev/null) owned by root:dialout."""
    p = tmp_path / "ttyFAKE0"
    try:
        os.mknod(p, 0o660 | 0o020000, os.makedev(1, 3))
    except PermissionError:
        p.write_text("")  # no CAP_MKNOD: a plain file has the same permission semantics
    os.chown(p, 0, DIALOUT)
    os.chmod(p, 0o660)
    return p


def test_wrong_permissions_user_not_in_group(tmp_path, tty):
    cfg = rig(tmp_path, streams=[{"name": "/gps", "driver": "gps.nmea",
                                  "uri": f"serial://{tty}"}])
    bad = check_devices(cfg, SVC)
    assert levels(bad) == ["FAIL"]
    assert "svc may not rw it" in bad[0].detail and "user not in group dialout" in bad[0].detail
    assert bad[0].hint.startswith("usermod -aG dialout svc")
    good = check_devices(cfg, Principal("svc", 54321, {54321, DIALOUT}))
    assert levels(good) == ["OK"] and "as svc" in good[0].detail


def test_wrong_permissions_mode_000_needs_udev_rule(tmp_path, tty):
    os.chmod(tty, 0)
    cfg = rig(tmp_path, streams=[{"name": "/gps", "driver": "gps.nmea", "uri": str(tty)}])
    checks = check_devices(cfg, Principal("svc", 54321, {54321, DIALOUT}))
    assert levels(checks) == ["FAIL"] and "svc may not rw it" in checks[0].detail
    assert "--------- owner 0 group dialout" in checks[0].detail
    assert "udev rule" in checks[0].hint and 'MODE="0660"' in checks[0].hint
    # root (the current process) may open it anyway, and the doctor says so honestly
    me = check_devices(cfg, Principal.me())
    assert levels(me) == ["OK", "WARN"] and "--service" in me[1].hint


def test_mode_allows_owner_group_other_order(tmp_path):
    p = tmp_path / "f"
    p.write_text("")
    os.chown(p, 54321, DIALOUT)
    os.chmod(p, 0o046)  # owner nothing, group r, other rw
    st = os.stat(p)
    assert not mode_allows(st, SVC, os.R_OK)  # owner bits win even if others may
    assert mode_allows(st, Principal("g", 1, {DIALOUT}), os.R_OK)
    assert not mode_allows(st, Principal("g", 1, {DIALOUT}), os.W_OK)
    assert mode_allows(st, Principal("o", 2, {2}), os.R_OK | os.W_OK)
    assert mode_allows(st, Principal("root", 0, {0}), os.R_OK | os.W_OK)


def test_principal_user_adds_unit_groups():
    p = Principal.user("nobody", ["dialout"])
    assert p.uid == 65534 and DIALOUT in p.gids and not p.current
    with pytest.raises(KeyError):
        Principal.user("no-such-user-edgecap")


# -- disk -----------------------------------------------------------------------------------
def fake_statvfs(free: int, total: int = 100 << 30):
    return lambda _p: SimpleNamespace(f_bavail=free // 4096, f_frsize=4096,
                                      f_blocks=total // 4096)


def test_full_disk_simulated(tmp_path):
    cfg = rig(tmp_path)
    checks = check_disk(cfg, Principal.me(),
                        Probe(statvfs=fake_statvfs(10 << 20), write_test_mb=4))
    assert levels(checks) == ["FAIL", "SKIP"]
    assert "10.0 MiB free" in checks[0].detail and "quota_gb" in checks[0].hint
    assert "write test of 4 MiB skipped" in checks[1].detail


@pytest.fixture
def tiny_tmpfs(tmp_path):
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_full_disk_real_tmpfs(tmp_path, tiny_tmpfs):
    cfg = rig(tmp_path, recorder={"out_dir": str(tiny_tmpfs / "rec")})
    checks = check_disk(cfg, Principal.me(), Probe(write_test_mb=4))
    assert levels(checks) == ["FAIL", "SKIP"]
    assert "1.0 MiB free of 1.0 MiB" in checks[0].detail
    # the filesystem claims plenty of room but the write hits ENOSPC: measured, not assumed
    lying = check_disk(cfg, Principal.me(), Probe(statvfs=fake_statvfs(50 << 30),
                                                  write_test_mb=4))
    assert lying[-1].level is Level.FAIL
    assert "No space left on device" in lying[-1].detail
    assert not list(tiny_tmpfs.iterdir())  # the test file is cleaned up


def test_write_speed_against_load(tmp_path):
    ok = check_disk(rig(tmp_path), Principal.me(), Probe(write_test_mb=4))
    assert levels(ok) == ["OK", "OK"] and "× the configured load" in ok[1].detail
    # eight raw 8K cameras at 1 kHz: no disk keeps up, and the doctor measures that
    heavy = rig(tmp_path, streams=[
        {"name": f"/cam{i}", "driver": "camera.opencv", "rate_hz": 1000,
         "options": {"width": 7680, "height": 4320, "encoding": "bgr8"}} for i in range(8)])
    checks = check_disk(heavy, Principal.me(),
                        Probe(statvfs=fake_statvfs(1 << 60, 1 << 61), write_test_mb=4))
    assert checks[-1].level is Level.FAIL and "cannot keep up" in checks[-1].hint


def test_out_dir_not_writable_for_service_user(tmp_path):
    d = tmp_path / "rec"
    d.mkdir()
    os.chmod(d, 0o755)
    checks = check_disk(rig(tmp_path), SVC, Probe(write_test_mb=0))
    assert levels(checks) == ["FAIL"] and checks[0].hint.startswith("chown svc")


def test_load_estimate():
    cfg = parse_config({"device_id": "x", "streams": [
        {"name": "/mic", "driver": "audio.synthetic",
         "options": {"sample_rate": 48000, "channels": 2}},
        {"name": "/cam", "driver": "camera.synthetic", "rate_hz": 10,
         "options": {"width": 640, "height": 480}}]})
    load = estimate_load_bps(cfg)
    assert load["/mic"] == 48000 * 2 * 2
    assert load["/cam"] == pytest.approx(640 * 480 * 0.15 * 10)


# -- clock ----------------------------------------------------------------------------------
def test_clock_devices_and_chrony(tmp_path):
    dev = tmp_path / "dev"
    dev.mkdir()
    (dev / "pps0").write_text("")
    os.chmod(dev / "pps0", 0o600)
    tracking = ("A9FEA97B,169.254.169.123,4,1700000000.1,0.000012,0.000001,0.000020,"
                "-1.2,0.001,0.02,0.0005,0.0001,64.0,Normal\n")
    run = lambda *a, **k: SimpleNamespace(returncode=0, stdout=tracking, stderr="")
    cfg = rig(tmp_path, clock={"timebase": "ptp", "ptp_device": "/dev/ptp0"})
    checks = check_clock(cfg, SVC, Probe(dev_dir=str(dev), run=run,
                                         which=lambda _: "/usr/bin/chronyc"))
    by = [(c.level.value, c.detail) for c in checks]
    assert by[0][0] == "WARN" and "pps0" in by[0][1]  # present but not readable for svc
    assert by[1] == ("FAIL", f"no PTP device in {dev}")  # timebase = ptp needs one
    assert by[2][0] == "FAIL" and "/dev/ptp0" in by[2][1]  # the configured one is absent
    assert by[3][0] == "OK" and "+0.012 ms" in by[3][1] and "stratum 4" in by[3][1]


def test_chrony_states():
    def probe(out, rc=0, which="/usr/bin/chronyc"):
        return Probe(run=lambda *a, **k: SimpleNamespace(returncode=rc, stdout=out,
                                                         stderr="506 Cannot talk to daemon"),
                     which=lambda _: which)

    unsync = "00000000,,0,0.0,0.0,0.0,0.0,0.0,0.0,0.0,1.0,1.0,0.0,Not synchronised\n"
    assert check_chrony(probe(unsync)).level is Level.WARN
    assert check_chrony(probe("garbage")).level is Level.WARN
    down = check_chrony(probe("", rc=1))
    assert down.level is Level.WARN and "506" in down.detail
    assert check_chrony(probe("", which=None)).level is Level.SKIP


# -- models ---------------------------------------------------------------------------------
def test_model_files_and_hashes(tmp_path):
    model = tmp_path / "det.onnx"
    model.write_bytes(b"onnx-bytes")
    cfg = rig(tmp_path, labelers=[{"kind": "camera.yolo", "streams": ["/gps"],
                                   "model": "det.onnx"},
                                  {"kind": "camera.yolo", "streams": ["/gps"],
                                   "model": str(tmp_path / "gone.onnx")}])
    checks = check_models(cfg, Principal.me())
    assert levels(checks) == ["OK", "FAIL"]
    assert hashlib.sha256(b"onnx-bytes").hexdigest() in checks[0].detail  # beside rig.toml
    assert "missing" in checks[1].detail and "labelers[1].model" in checks[1].hint


# -- sync -----------------------------------------------------------------------------------
def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_unreachable_server(tmp_path):
    cfg = rig(tmp_path, sync={"server": f"tcp://127.0.0.1:{closed_port()}", "insecure": True})
    checks = check_sync(cfg, Principal.me(), Probe(timeout_s=1))
    assert levels(checks) == ["FAIL", "OK"]
    assert "unreachable" in checks[0].detail and "sync serve" in checks[0].hint
    bad = check_sync(rig(tmp_path, sync={"server": "http://x"}), Principal.me(), Probe())
    assert levels(bad) == ["FAIL"] and "tcp://host:port" in bad[0].detail


@pytest.fixture
def curve_server(tmp_path):
    """A real CURVE ROUTER on loopback with a ZAP allow-list of one client key."""
    import zmq
    import zmq.auth
    from zmq.auth.thread import ThreadAuthenticator

    keys, allowed = tmp_path / "keys", tmp_path / "allowed"
    keys.mkdir()
    allowed.mkdir()
    spub, ssec = zmq.auth.create_certificates(keys, "server")
    cpub, csec = zmq.auth.create_certificates(keys, "client")
    _, osec = zmq.auth.create_certificates(keys, "other")
    os.chmod(csec, 0o600)
    os.chmod(osec, 0o600)
    os.link(cpub, allowed / "client.key")
    ctx = zmq.Context()
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(allowed))
    srv = ctx.socket(zmq.ROUTER)
    srv.curve_publickey, srv.curve_secretkey = zmq.auth.load_certificate(ssec)
    srv.curve_server = True
    port = srv.bind_to_random_port("tcp://127.0.0.1")
    yield SimpleNamespace(port=port, server_pub=spub, client=csec, other=osec)
    srv.close(0)
    auth.stop()
    ctx.term()


def test_curve_keys_accepted_and_refused(tmp_path, curve_server):
    def sync(secret, pub=curve_server.server_pub):
        return {"server": f"tcp://127.0.0.1:{curve_server.port}", "server_public_key": str(pub),
                "client_secret_key_file": str(secret)}

    ok = check_sync(rig(tmp_path, sync=sync(curve_server.client)), Principal.me(), Probe())
    assert levels(ok) == ["OK", "OK", "OK", "OK"] and ok[-1].detail == "CURVE handshake accepted"
    refused = check_sync(rig(tmp_path, sync=sync(curve_server.other)), Principal.me(), Probe())
    assert refused[-1].level is Level.FAIL and "client key refused" in refused[-1].detail
    # inline z85 server key works too; a group-readable secret key is flagged
    import zmq.auth

    inline = zmq.auth.load_certificate(curve_server.server_pub)[0].decode()
    os.chmod(curve_server.client, 0o640)
    loose = check_sync(rig(tmp_path, sync=sync(curve_server.client, inline)), Principal.me(),
                       Probe())
    assert "WARN" in levels(loose) and loose[-1].detail == "CURVE handshake accepted"


def test_missing_and_unreadable_keys(tmp_path):
    port = closed_port()
    secret = tmp_path / "client.key_secret"
    secret.write_text("not a key")
    os.chmod(secret, 0o600)
    cfg = rig(tmp_path, sync={"server": f"tcp://127.0.0.1:{port}",
                              "client_secret_key_file": str(secret)})
    checks = check_sync(cfg, SVC, Probe(timeout_s=0.5))
    assert levels(checks) == ["FAIL", "FAIL", "FAIL"]
    assert "server_public_key is not set" in checks[1].detail
    assert "svc may not r it" in checks[2].detail  # root-owned 0600: not for svc
    mine = check_sync(cfg, Principal.me(), Probe(timeout_s=0.5))
    assert "not a CURVE key" in mine[-1].detail


# -- the command ----------------------------------------------------------------------------
def test_cli_exit_codes_and_output(tmp_path):
    rig_file = tmp_path / "rig.toml"
    rig_file.write_text(f"""
device_id = "cli-test"
[[streams]]
name = "/gps"
driver = "gps.synthetic"
uri = "serial:///dev/ttyEDGECAPTEST98"
[recorder]
out_dir = "{tmp_path / 'rec'}"
[sync]
server = "tcp://127.0.0.1:{closed_port()}"
insecure = true
""")
    r = CliRunner().invoke(main, ["doctor", "-c", str(rig_file), "--write-test-mb", "2",
                                  "--timeout", "0.5"])
    assert r.exit_code == 1, r.output
    assert "FAIL devices  /gps: /dev/ttyEDGECAPTEST98: missing" in r.output
    assert "fix: plug the serial device in" in r.output
    assert "FAIL sync     ingest server 127.0.0.1" in r.output
    ok = CliRunner().invoke(main, ["doctor", "-c", str(rig_file), "--write-test-mb", "0",
                                   "--skip", "devices", "--skip", "sync"])
    assert ok.exit_code == 0, ok.output
    rig_file.write_text('device_id = "x"\nstreams = []\n')
    bad = CliRunner().invoke(main, ["doctor", "-c", str(rig_file)])
    assert bad.exit_code == 2 and "streams" in bad.output


def test_run_checks_survives_a_crashing_area(tmp_path, monkeypatch):
    import agent.doctor as d

    monkeypatch.setattr(d, "check_models", lambda *a: 1 / 0)
    checks = run_checks(rig(tmp_path), Principal.me(), Probe(write_test_mb=0),
                        areas=["models", "clock"])
    assert checks[0].level is Level.FAIL and "ZeroDivisionError" in checks[0].detail
    assert any(c.area == "clock" for c in checks)
