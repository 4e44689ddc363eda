"""``edgecap doctor``: is this machine ready to run this rig? Each check answers OK, WARN,
FAIL or SKIP with one line of detail and, when not OK, a one-line fix.

Checks (each a function returning a list of :class:`Check`):
- devices: every device path a stream names exists and the service user may read/write it;
- clock: PPS and PTP devices, ``chronyc tracking`` where chrony runs;
- disk: free space and a measured fsync'ed write speed in ``out_dir`` against the load the
  configured streams produce;
- models: every labeler's model file is readable, with its sha256;
- sync: the ingest server accepts a TCP connection, the CURVE keys are present and readable,
  and a CURVE handshake with them succeeds (the server's ZAP allow-list accepts the key).

Permission checks run for a :class:`Principal` (uid + groups). For the current user they
use ``os.access`` (ACLs included; root passes everything, as it would at run time); for
another user (``--as-user``) they apply the mode bits owner → group → other, which ignores
ACLs. Everything that touches the outside world is injectable (:class:`Probe`) so tests can
fake what they cannot make real. All functions block (I/O, subprocess, sockets) with
bounded timeouts; call them from the CLI thread.
"""

from __future__ import annotations

import enum
import glob
import grp
import hashlib
import os
import pwd
import shutil
import socket
import stat
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable
from urllib.parse import urlsplit

from .cli.render import human_bytes
from .config import RigConfig, StreamConfig


class Level(str, enum.Enum):
    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"
    SKIP = "SKIP"


@dataclass
class Check:
    area: str
    level: Level
    detail: str
    hint: str = ""


# -- who is asking ----------------------------------------------------------------------
@dataclass
class Principal:
    """A user and the groups it acts with. ``current`` is True for this process."""

    name: str
    uid: int
    gids: set[int]
    current: bool = False

    @classmethod
    def me(cls) -> "Principal":
        uid = os.geteuid()
        try:
            name = pwd.getpwuid(uid).pw_name
        except KeyError:
            name = str(uid)
        return cls(name, uid, set(os.getgroups()) | {os.getegid()}, current=True)

    @classmethod
    def user(cls, name: str, extra_groups: Iterable[str] = ()) -> "Principal":
        """``name`` with its groups from the user database plus ``extra_groups`` (what a
        unit's SupplementaryGroups= adds). Raises KeyError for an unknown user/group."""
        pw = pwd.getpwnam(name)
        gids = set(os.getgrouplist(name, pw.pw_gid))
        gids |= {grp.getgrnam(g).gr_gid for g in extra_groups}
        return cls(name, pw.pw_uid, gids)


def mode_allows(st: os.stat_result, who: Principal, want: int) -> bool:
    """Would the kernel's mode-bit check let ``who`` open a file with ``st`` for ``want``
    (``os.R_OK | os.W_OK``)? Root (uid 0) bypasses read/write checks."""
    if who.uid == 0:
        return True
    if st.st_uid == who.uid:
        bits = (st.st_mode >> 6) & 7
    elif st.st_gid in who.gids:
        bits = (st.st_mode >> 3) & 7
    else:
        bits = st.st_mode & 7
    need = (4 if want & os.R_OK else 0) | (2 if want & os.W_OK else 0)
    return bits & need == need


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _want_str(want: int) -> str:
    return ("r" if want & os.R_OK else "") + ("w" if want & os.W_OK else "")


def access_problem(path: str, want: int, who: Principal) -> tuple[str, str] | None:
    """``(detail, hint)`` when ``who`` cannot use ``path`` for ``want``, else None."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return f"{path}: missing", _missing_hint(path)
    except OSError as e:
        return f"{path}: cannot stat: {e.strerror}", "check the parent directory's permissions"
    ok = os.access(path, want) if who.current else mode_allows(st, who, want)
    if ok:
        return None
    gname = _group_name(st.st_gid)
    mode = stat.filemode(st.st_mode)
    detail = (f"{path}: {who.name} may not {_want_str(want)} it "
              f"({mode} owner {st.st_uid} group {gname})")
    group_would = ((st.st_mode >> 3) & 7) & (6 if want & os.W_OK else 4)
    if group_would and st.st_gid not in who.gids:
        return (detail + f"; user not in group {gname}",
                f"usermod -aG {gname} {who.name} (the systemd units already add "
                f"SupplementaryGroups=video audio dialout)")
    return detail, (f"give the device group access with a udev rule, e.g. "
                    f"'KERNEL==\"{Path(path).name}\", GROUP=\"{_default_group(path)}\", "
                    f"MODE=\"0660\"'")


def _default_group(path: str) -> str:
    name = Path(path).name
    if name.startswith("video"):
        return "video"
    if name.startswith(("tty", "pps", "ptp")):
        return "dialout"
    if "snd" in path:
        return "audio"
    return "plugdev"


def _missing_hint(path: str) -> str:
    name = Path(path).name
    if name.startswith("video"):
        return "plug the camera in and list cameras: edgecap devices (or v4l2-ctl --list-devices)"
    if name.startswith("tty"):
        return ("plug the serial device in; prefer a stable /dev/serial/by-id/... path "
                "(edgecap devices lists ports)")
    if name.startswith("pps"):
        return "load the PPS driver (modprobe pps_ldisc / pps-gpio) and check the wiring"
    if name.startswith("ptp"):
        return "the NIC exposes no PTP clock here; check `ethtool -T <iface>`"
    if "snd" in path:
        return "no such sound device; list inputs with `arecord -l`"
    return "fix the path in the rig file or create the file"


# -- probes (injectable) ----------------------------------------------------------------
@dataclass
class Probe:
    """What the checks use to look at the machine; tests replace parts of it."""

    statvfs: Callable[[str], Any] = os.statvfs
    dev_dir: str = "/dev"
    run: Callable[..., Any] = subprocess.run
    which: Callable[[str], str | None] = shutil.which
    timeout_s: float = 2.0
    write_test_mb: float = 64.0


# -- devices --------------------------------------------------------------------------------
_DEVICE_SCHEMES = {"", "file", "dev", "serial", "v4l2", "alsa", "pps", "ptp"}


def stream_paths(sc: StreamConfig) -> list[tuple[str, int]]:
    """Local paths a stream names (URI, then string options), with the access it needs:
    read+write for devices, read for recorded files (``replay:``, ``file:`` outside /dev)."""
    out: list[tuple[str, int]] = []
    values = [sc.uri] + [v for v in sc.options.values() if isinstance(v, str)]
    for i, v in enumerate(values):
        if not v:
            continue
        path = None
        if v.startswith("/"):
            path = v
        elif i == 0 and v.isdigit() and sc.driver.startswith("camera."):
            path = f"/dev/video{v}"  # OpenCV camera index
        else:
            u = urlsplit(v)
            if u.scheme in _DEVICE_SCHEMES | {"replay"} and u.path.startswith("/"):
                path = u.path
        if path is None:
            continue
        try:
            is_chr = stat.S_ISCHR(os.stat(path).st_mode)
        except OSError:
            is_chr = False
        is_dev = (is_chr or path.startswith("/dev/")
                  or urlsplit(v).scheme in _DEVICE_SCHEMES - {"", "file"})
        read_only = Path(path).name.startswith(("pps", "ptp")) or not is_dev
        want = os.R_OK if read_only else os.R_OK | os.W_OK
        if (path, want) not in out:
            out.append((path, want))
    return out


def check_devices(cfg: RigConfig, who: Principal) -> list[Check]:
    checks: list[Check] = []
    pathless: list[str] = []
    for sc in cfg.streams:
        paths = stream_paths(sc)
        if not paths:
            pathless.append(sc.name)
            continue
        for path, want in paths:
            prob = access_problem(path, want, who)
            if prob is None:
                kind = ("char device" if stat.S_ISCHR(os.stat(path).st_mode) else "file")
                checks.append(Check("devices", Level.OK,
                                    f"{sc.name}: {path} ({kind}, {_want_str(want)} as {who.name})"))
            else:
                lvl = Level.FAIL if sc.required else Level.WARN
                checks.append(Check("devices", lvl, f"{sc.name}: {prob[0]}", prob[1]))
    if pathless:
        checks.append(Check("devices", Level.OK, f"{len(pathless)} stream(s) without a device "
                            f"path (synthetic, network or by name): {', '.join(pathless)}"))
    if who.uid == 0 and who.current:
        checks.append(Check("devices", Level.WARN, "checked as root, which may open anything",
                            "run `edgecap doctor --service` to check as the edgecap service user"))
    return checks


# -- clock ----------------------------------------------------------------------------------
def check_clock(cfg: RigConfig, who: Principal, probe: Probe) -> list[Check]:
    checks: list[Check] = []
    pps = sorted(glob.glob(os.path.join(probe.dev_dir, "pps*")))
    ptp = sorted(glob.glob(os.path.join(probe.dev_dir, "ptp*")))
    wants_pps = any("pps" in (sc.uri + str(sc.options)).lower() for sc in cfg.streams)
    wants_ptp = cfg.clock.timebase == "ptp" or cfg.clock.ptp_device is not None
    for kind, found, wanted in (("PPS", pps, wants_pps), ("PTP", ptp, wants_ptp)):
        if not found:
            checks.append(Check("clock", Level.FAIL if kind == "PTP" and wants_ptp else
                                Level.WARN if wanted else Level.OK,
                                f"no {kind} device in {probe.dev_dir}",
                                _missing_hint(f"/dev/{kind.lower()}0") if wanted else ""))
        for path in found:
            prob = access_problem(path, os.R_OK, who)
            checks.append(Check("clock", Level.OK, f"{kind} {path} readable") if prob is None
                          else Check("clock", Level.WARN, f"{kind} {prob[0]}", prob[1]))
    if cfg.clock.ptp_device:
        prob = access_problem(cfg.clock.ptp_device, os.R_OK, who)
        if prob is not None:
            checks.append(Check("clock", Level.FAIL, f"clock.ptp_device {prob[0]}", prob[1]))
    checks.append(check_chrony(probe))
    return checks


def check_chrony(probe: Probe) -> Check:
    """``chronyc -c tracking``: leap status and the system clock's offset."""
    exe = probe.which("chronyc")
    if exe is None:
        return Check("clock", Level.SKIP, "chronyc not installed; system clock discipline "
                     "unknown", "apt-get install chrony (or check timedatectl timesync-status)")
    try:
        r = probe.run([exe, "-c", "tracking"], capture_output=True, text=True,
                      timeout=probe.timeout_s)
    except (OSError, subprocess.TimeoutExpired) as e:
        return Check("clock", Level.WARN, f"chronyc failed: {e}", "systemctl status chrony")
    if r.returncode != 0:
        msg = (r.stderr or r.stdout or "").strip().splitlines()[:1]
        return Check("clock", Level.WARN, f"chronyc tracking: {msg[0] if msg else r.returncode}",
                     "start chronyd: systemctl enable --now chrony")
    f = r.stdout.strip().split(",")
    try:
        ref, stratum, offset_s, leap = f[1], int(f[2]), float(f[4]), f[13]
    except (IndexError, ValueError):
        return Check("clock", Level.WARN, f"chronyc output not understood: {r.stdout[:80]!r}")
    detail = (f"chrony: ref {ref or '-'} stratum {stratum}, system offset "
              f"{offset_s * 1e3:+.3f} ms, leap {leap}")
    if leap.lower().startswith("not sync") or stratum == 0:
        return Check("clock", Level.WARN, detail, "chrony is not synchronised: check its "
                     "sources (chronyc sources) and the network/GPS refclock")
    if abs(offset_s) > 0.1:
        return Check("clock", Level.WARN, detail, "large offset: chrony is still slewing; "
                     "wait, or `chronyc makestep` before recording")
    return Check("clock", Level.OK, detail)


# -- disk -----------------------------------------------------------------------------------
def estimate_load_bps(cfg: RigConfig) -> dict[str, float]:
    """Bytes per second each stream writes, from its rate and typical sample sizes
    (MJPEG ≈ 0.15 byte/pixel, raw 3 bytes/pixel, pcm-s16, points × 24 bytes)."""
    from .schemas import POINT_DTYPE

    out: dict[str, float] = {}
    for sc in cfg.streams:
        o = sc.options
        kind = sc.driver.split(".", 1)[0]
        rate = sc.rate_hz
        if kind == "camera":
            px = float(o.get("width", 1280)) * float(o.get("height", 720))
            raw = str(o.get("encoding", o.get("format", ""))).lower() in (
                "bgr8", "rgb8", "raw", "yuyv")
            out[sc.name] = px * (3.0 if raw else 0.15) * (rate or 30.0)
        elif kind == "audio":
            out[sc.name] = float(o.get("sample_rate", 48000)) * int(o.get("channels", 1)) * 2
        elif kind == "lidar":
            if "rings" in o or "columns" in o:
                pts = int(o.get("rings", 64)) * int(o.get("columns", 1024))
                out[sc.name] = pts * POINT_DTYPE.itemsize * (rate or 10.0)
            else:  # a real sensor: OS1-64 at 1024×10 ≈ 16 MB/s of packets
                out[sc.name] = 16e6 * (int(o.get("rings", 64)) / 64)
        elif kind == "gps":
            out[sc.name] = 300.0 * (rate or 1.0)
        else:
            out[sc.name] = 1000.0 * (rate or 10.0)
    return out


def measure_write_speed(directory: Path, mb: float) -> float:
    """Write ``mb`` MiB in 4 MiB blocks, fsync, and return bytes/s. Raises OSError."""
    block = os.urandom(4 << 20)
    total = int(mb * (1 << 20))
    path = directory / f".edgecap-doctor-{os.getpid()}.tmp"
    t0 = time.perf_counter()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            left = total
            while left > 0:
                left -= os.write(fd, block[:min(left, len(block))])
            os.fsync(fd)
        finally:
            os.close(fd)
        dt = time.perf_counter() - t0
    finally:
        try:
            path.unlink()
        except OSError:
            pass
    return total / max(dt, 1e-9)


def check_disk(cfg: RigConfig, who: Principal, probe: Probe,
               out_dir: str | None = None) -> list[Check]:
    out = Path(out_dir or cfg.recorder.out_dir).absolute()
    load = sum(estimate_load_bps(cfg).values()) * 1.05  # container overhead
    checks: list[Check] = []
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    prob = access_problem(str(existing), os.W_OK | os.R_OK, who)
    if prob is not None:
        return [Check("disk", Level.FAIL, f"out_dir {out}: {prob[0]}",
                      f"chown {who.name} {existing} (the units use /var/lib/edgecap)")]
    try:
        st = probe.statvfs(str(existing))
    except OSError as e:
        return [Check("disk", Level.FAIL, f"statvfs {existing}: {e.strerror}")]
    free = st.f_bavail * st.f_frsize
    total = st.f_blocks * st.f_frsize
    secs = free / load if load else float("inf")
    detail = (f"{out}: {human_bytes(free)} free of {human_bytes(total)}; configured load ≈ "
              f"{human_bytes(load)}/s → {secs / 3600:.1f} h of recording")
    if free < 256 << 20 or secs < 300:
        checks.append(Check("disk", Level.FAIL, detail, "free space (delete uploaded "
                            "sessions), set recorder.quota_gb, or point out_dir at a larger disk"))
    elif secs < 3600:
        checks.append(Check("disk", Level.WARN, detail, "less than an hour left: set "
                            "recorder.quota_gb or sync.delete_after_upload"))
    else:
        checks.append(Check("disk", Level.OK, detail))
    quota = cfg.recorder.quota_gb
    if quota and quota * (1 << 30) > free:
        checks.append(Check("disk", Level.WARN, f"recorder.quota_gb = {quota} exceeds the "
                            f"{human_bytes(free)} free", "lower quota_gb below the free space"))

    if probe.write_test_mb > 0:
        mb = probe.write_test_mb
        if free < 256 << 20 or mb * (1 << 20) > free * 0.5:
            checks.append(Check("disk", Level.SKIP, f"write test of {mb:.0f} MiB skipped: "
                                f"only {human_bytes(free)} free", "free space first"))
            return checks
        existing.mkdir(parents=True, exist_ok=True)
        try:
            speed = measure_write_speed(existing, mb)
        except OSError as e:
            checks.append(Check("disk", Level.FAIL, f"write test in {existing} failed: "
                                f"{e.strerror}", "check the disk (dmesg) and free space"))
            return checks
        detail = (f"fsync'ed write {human_bytes(speed)}/s = {speed / load:.1f}× the configured "
                  f"load" if load else f"fsync'ed write {human_bytes(speed)}/s")
        if load and speed < load:
            checks.append(Check("disk", Level.FAIL, detail, "the disk cannot keep up: use a "
                                "faster disk, lower camera resolution/rate, or drop raw encodings"))
        elif load and speed < 2 * load:
            checks.append(Check("disk", Level.WARN, detail, "little headroom for flushes and "
                                "uploads; a faster disk is advised"))
        else:
            checks.append(Check("disk", Level.OK, detail))
    return checks


# -- models ---------------------------------------------------------------------------------
def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def resolve_model(model: str, cfg: RigConfig) -> Path:
    """A relative model path is looked up beside the rig file first, then in the cwd."""
    p = Path(model).expanduser()
    if p.is_absolute():
        return p
    base = Path(cfg.source_path).parent if cfg.source_path != "<memory>" else Path.cwd()
    return base / p if (base / p).exists() else p.absolute()


def check_models(cfg: RigConfig, who: Principal) -> list[Check]:
    checks = []
    for i, lab in enumerate(cfg.labelers):
        if not lab.model:
            checks.append(Check("models", Level.OK, f"labelers[{i}] {lab.kind}: no model file"))
            continue
        path = resolve_model(lab.model, cfg)
        prob = access_problem(str(path), os.R_OK, who)
        if prob is not None:
            checks.append(Check("models", Level.FAIL, f"labelers[{i}] {lab.kind}: {prob[0]}",
                                "copy the model there (see docs/labeling.md) or fix "
                                f"labelers[{i}].model" if "missing" in prob[0] else prob[1]))
            continue
        try:
            digest = file_sha256(path)
        except OSError as e:
            checks.append(Check("models", Level.FAIL, f"{path}: unreadable: {e.strerror}"))
            continue
        checks.append(Check("models", Level.OK, f"labelers[{i}] {lab.kind}: {path} "
                            f"({human_bytes(path.stat().st_size)}) sha256 {digest}"))
    return checks


# -- sync -----------------------------------------------------------------------------------
def parse_endpoint(server: str) -> tuple[str, int]:
    """``tcp://host:port`` (or ``host:port``) → (host, port); ValueError otherwise."""
    u = urlsplit(server if "://" in server else "tcp://" + server)
    if u.scheme != "tcp" or not u.hostname or u.port is None:
        raise ValueError(f"expected tcp://host:port, got {server!r}")
    return u.hostname, u.port


def load_key(value: str, secret: bool) -> tuple[bytes | None, bytes | None]:
    """A CURVE key given inline (40 z85 characters) or as a zmq certificate file. Returns
    (public, secret); raises ValueError/OSError with the reason."""
    import zmq.auth
    from zmq.utils import z85

    if not secret and len(value) == 40 and not os.path.exists(value):
        if len(z85.decode(value.encode())) != 32:
            raise ValueError("not a 32-byte z85 key")
        return value.encode(), None
    pub, sec = zmq.auth.load_certificate(value)
    if secret and not sec:
        raise ValueError("file holds no secret key")
    return pub, sec


def curve_handshake(host: str, port: int, server_pub: bytes, client_pub: bytes,
                    client_sec: bytes, timeout_s: float) -> str:
    """Open a CURVE DEALER to the server and report the handshake outcome from the
    socket monitor: ``ok``, ``auth`` (key refused), ``protocol`` or ``timeout``. Sends
    no application message, so it works whatever protocol the server speaks."""
    import zmq
    from zmq.utils.monitor import recv_monitor_message

    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    s.curve_serverkey, s.curve_publickey, s.curve_secretkey = server_pub, client_pub, client_sec
    mon = s.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                               | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                               | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
    try:
        s.connect(f"tcp://{host}:{port}")
        end = time.monotonic() + timeout_s
        while (left := end - time.monotonic()) > 0:
            if not mon.poll(int(left * 1000)):
                break
            ev = recv_monitor_message(mon)["event"]
            if ev == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return "ok"
            if ev == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                return "auth"
            return "protocol"
        return "timeout"
    finally:
        s.disable_monitor()
        mon.close(0)
        s.close(0)


def check_sync(cfg: RigConfig, who: Principal, probe: Probe) -> list[Check]:
    sc = cfg.sync
    checks: list[Check] = []
    try:
        host, port = parse_endpoint(sc.server)
    except ValueError as e:
        return [Check("sync", Level.FAIL, f"sync.server: {e}", "set sync.server = "
                      "\"tcp://ingest.example:7450\"")]
    t0 = time.perf_counter()
    try:
        socket.create_connection((host, port), timeout=probe.timeout_s).close()
        reachable = True
        checks.append(Check("sync", Level.OK, f"ingest server {host}:{port} reachable "
                            f"({(time.perf_counter() - t0) * 1e3:.0f} ms)"))
    except OSError as e:
        reachable = False
        checks.append(Check("sync", Level.FAIL, f"ingest server {host}:{port} unreachable: "
                            f"{e.strerror or e}", "is `edgecap sync serve` running there? "
                            "check the address, route and firewall (the uploader retries "
                            "by itself)"))
    if sc.insecure:
        loop = host in ("127.0.0.1", "localhost", "::1")
        checks.append(Check("sync", Level.OK if loop else Level.FAIL,
                            "sync.insecure = true (plain TCP" +
                            (", loopback only)" if loop else ") to a remote host"),
                            "" if loop else "remove insecure and configure CURVE keys"))
        return checks
    keys: dict[str, tuple[bytes | None, bytes | None]] = {}
    for label, value, secret in (("sync.server_public_key", sc.server_public_key, False),
                                 ("sync.client_secret_key_file", sc.client_secret_key_file,
                                  True)):
        if not value:
            checks.append(Check("sync", Level.FAIL, f"{label} is not set",
                                "`edgecap keys generate` and set it in the rig file"))
            continue
        if os.path.exists(value) or secret:
            prob = access_problem(value, os.R_OK, who)
            if prob is not None:
                checks.append(Check("sync", Level.FAIL, f"{label}: {prob[0]}", prob[1]))
                continue
            mode = os.stat(value).st_mode
            if secret and mode & 0o077:
                checks.append(Check("sync", Level.WARN, f"{label} {value} is readable by "
                                    f"others ({stat.filemode(mode)})", f"chmod 600 {value}"))
        try:
            keys[label] = load_key(value, secret)
            checks.append(Check("sync", Level.OK, f"{label} loaded"))
        except (ValueError, OSError) as e:
            checks.append(Check("sync", Level.FAIL, f"{label}: not a CURVE key: {e}",
                                "regenerate with `edgecap keys generate`"))
    if reachable and len(keys) == 2:
        spub = keys["sync.server_public_key"][0]
        cpub, csec = keys["sync.client_secret_key_file"]
        outcome = curve_handshake(host, port, spub, cpub, csec, probe.timeout_s)  # type: ignore[arg-type]
        if outcome == "ok":
            checks.append(Check("sync", Level.OK, "CURVE handshake accepted"))
        elif outcome == "auth":
            checks.append(Check("sync", Level.FAIL, "CURVE handshake: client key refused",
                                "add this device's public key to the ingest server's "
                                "allow-list"))
        else:
            checks.append(Check("sync", Level.FAIL, f"CURVE handshake: {outcome}",
                                "check sync.server_public_key matches the server's key"))
    return checks


# -- all ------------------------------------------------------------------------------------
def run_checks(cfg: RigConfig, who: Principal | None = None, probe: Probe | None = None,
               out_dir: str | None = None, areas: Iterable[str] | None = None) -> list[Check]:
    """Every check for ``cfg`` (or the named ``areas``), in order. Never raises for what it
    finds; an unexpected exception in one area becomes a FAIL line and the rest go on."""
    who = who or Principal.me()
    probe = probe or Probe()
    funcs: dict[str, Callable[[], list[Check]]] = {
        "devices": lambda: check_devices(cfg, who),
        "clock": lambda: check_clock(cfg, who, probe),
        "disk": lambda: check_disk(cfg, who, probe, out_dir),
        "models": lambda: check_models(cfg, who),
        "sync": lambda: check_sync(cfg, who, probe),
    }
    out: list[Check] = []
    for name in (areas or funcs):
        try:
            out += funcs[name]()
        except Exception as e:  # a doctor must finish its round
            out.append(Check(name, Level.FAIL, f"check crashed: {type(e).__name__}: {e}",
                             "please report this"))
    return out


def exit_code(checks: list[Check]) -> int:
    return 1 if any(c.level is Level.FAIL for c in checks) else 0
