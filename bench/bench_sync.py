"""Sync: upload goodput against raw ZeroMQ CURVE on the same bytes, bytes re-sent after a
kill, and how closely the token bucket holds its cap.

- goodput: the uploader → ingest server (CURVE, fs backend, fsync, sha256 verified) vs a
  bare DEALER→ROUTER CURVE stream of the same files in the same chunk size, no protocol,
  no hashing, no disk; best of 3 alternating runs each. Goal ≥ 0.7×.
- re-sent after a kill: (a) the ingest server is SIGKILLed mid-upload and restarted; the
  uploader counts payload bytes it sends twice; (b) the uploader process is SIGKILLed
  mid-upload and restarted; bytes that crossed the link (a counting TCP proxy) beyond one
  clean upload of the same bundle. Both in units of one chunk; goal ≤ 1.
- throttle: payload bytes the server received over 10 s (2 s with --quick) after a 1 s
  start, against ``bandwidth_kbps``. Goal: within 10 %.
"""

from __future__ import annotations

import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import zmq

from bench import Result
from sync import keys as keylib
from sync.ingest import IngestServer
from sync.testing import (FaultProxy, IngestProcess, ingest_config, make_bundle, make_keys,
                          sync_config)
from sync.uploader import Uploader

CHUNK = 1 << 20


def _spool(root: Path, n: int, size: int, session: str = "rig_b") -> Path:
    """``n`` segments of ``size`` incompressible bytes, each with its own hash."""
    spool = root / "spool"
    base = os.urandom(size)
    for i in range(n):
        make_bundle(spool, "rig", session, i, size, data=i.to_bytes(8, "big") + base[8:])
    return spool


def _reset(spool: Path) -> None:
    for m in spool.glob("*/*.uploaded"):
        m.unlink()
    (spool / ".sync-state.json").unlink(missing_ok=True)


_RAW_SINK = """
import hashlib, os, sys, zmq
from sync import keys
work = sys.argv[2] == "work"  # also hash and write what arrives, then fsync
out = os.open(sys.argv[3], os.O_WRONLY | os.O_CREAT | os.O_TRUNC) if work else -1
h = hashlib.sha256()
ctx = zmq.Context()
pub, sec = keys.load_secret_key(sys.argv[1])
r = ctx.socket(zmq.ROUTER)
r.curve_server, r.curve_publickey, r.curve_secretkey = True, pub, sec
port = r.bind_to_random_port("tcp://127.0.0.1")
print(port, flush=True)
rid, total = r.recv_multipart()
r.send_multipart([rid, b"go"])
total, got = int(total), 0
while got < total:
    rid, frame = r.recv_multipart(copy=False)
    got += len(frame.buffer)
    if work:
        h.update(frame.buffer)
        os.write(out, frame.buffer)
if work:
    os.fsync(out)
r.send_multipart([rid.bytes, b"done"])
"""


def _raw_curve(files: list[Path], keyset: dict[str, Path], work: bool = False) -> float:
    """Seconds to push the files through a bare CURVE DEALER→ROUTER (the ROUTER in its own
    process, like the ingest server) in CHUNK frames: no protocol, hashing or disk — or,
    with ``work``, a receiver that also hashes, writes and fsyncs what arrives (the work
    a verifying, durable receiver cannot skip)."""
    sink = subprocess.Popen([sys.executable, "-c", _RAW_SINK, str(keyset["server_secret"]),
                             "work" if work else "raw", str(files[0].parent.parent.parent
                                                            / "raw-sink.out")],
                            stdout=subprocess.PIPE, text=True)
    assert sink.stdout is not None
    port = int(sink.stdout.readline())
    ctx = zmq.Context()
    cpub, csec = keylib.load_secret_key(keyset["rig_secret"])
    d = ctx.socket(zmq.DEALER)
    d.curve_publickey, d.curve_secretkey = cpub, csec
    d.curve_serverkey = keylib.load_public_key(str(keyset["server_public"]))
    d.connect(f"tcp://127.0.0.1:{port}")
    d.send(str(sum(f.stat().st_size for f in files)).encode())
    d.recv()
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb") as fh:
            while data := fh.read(CHUNK):
                d.send(data, copy=False)
    d.recv()
    dt = time.perf_counter() - t0
    d.close(0)
    ctx.term()
    sink.wait(10)
    return dt


def _ours(root: Path, spool: Path, keyset: dict[str, Path], rnd: int) -> tuple[float, int]:
    """Seconds for ``run_once`` against an ingest server in its own process (fresh store,
    so every bundle is really transferred, verified, fsynced and stored)."""
    _reset(spool)
    srv = IngestProcess(root / f"srv{rnd}", keyset)
    srv.start()
    try:
        up = Uploader(sync_config(srv.endpoint, keyset, chunk_kb=CHUNK >> 10), "rig", spool)
        t0 = time.perf_counter()  # includes connecting: a few ms of 128 MiB
        s = up.run_once(give_up_s=60)
        dt = time.perf_counter() - t0
        up.close()
    finally:
        srv.kill()
    if s.pending or s.stored != s.uploaded:
        raise RuntimeError(f"upload incomplete: {s}")
    return dt, s.bundle_bytes


def goodput(root: Path, keyset: dict[str, Path], quick: bool) -> list[Result]:
    n, size = (4, 8 << 20) if quick else (4, 32 << 20)
    spool = _spool(root / "g", n, size)
    files = sorted(spool.glob("*/*.mcap"))
    total = sum(f.stat().st_size for f in files)
    raw, work, ours = [], [], []
    for rnd in range(3 if quick else 5):  # alternate, so drifting load hits all alike
        raw.append(total / _raw_curve(files, keyset))
        work.append(total / _raw_curve(files, keyset, work=True))
        dt, nbytes = _ours(root / "g", spool, keyset, rnd)
        ours.append(nbytes / dt)
    med = statistics.median
    extra = {"raw_MBps": [round(x / 1e6) for x in raw],
             "raw_hash_write_MBps": [round(x / 1e6) for x in work],
             "ours_MBps": [round(x / 1e6) for x in ours], "bytes": total, "chunk": CHUNK,
             "median_ratio": med(ours) / med(raw)}
    return [Result("upload goodput (CURVE, fs, verified)", max(ours) / 1e6, "MB/s",
                   reference=f"raw ZeroMQ CURVE {max(raw) / 1e6:.0f} MB/s",
                   ratio=max(ours) / max(raw), goal=0.7, ratio_desc="best of runs",
                   extra=extra),
            Result("goodput vs CURVE + hash + write", max(ours) / 1e6, "MB/s",
                   reference=f"raw CURVE whose receiver hashes+writes+fsyncs "
                   f"{max(work) / 1e6:.0f} MB/s", ratio=max(ours) / max(work),
                   ratio_desc="protocol overhead only",
                   extra={"median_ratio": med(ours) / med(work)})]


def resent_after_ingest_kill(root: Path, keyset: dict[str, Path], quick: bool) -> Result:
    size = (24 if quick else 64) << 20
    kills = 2 if quick else 4
    spool = _spool(root / "k", 1, size)
    srv = IngestProcess(root / "k", keyset)
    srv.start()
    up = Uploader(sync_config(srv.endpoint, keyset, chunk_kb=CHUNK >> 10), "rig", spool)
    out: list = []
    t = threading.Thread(target=lambda: out.append(up.run_once(give_up_s=60)))
    t.start()
    done = 0
    try:
        for k in range(kills):
            target = size * (k + 1) / (kills + 1)
            while t.is_alive() and (up.metrics.registry.get_sample_value(
                    "edgecap_sync_upload_bytes_sent_total") or 0) < target:
                time.sleep(0.002)
            if not t.is_alive():
                break
            srv.kill()
            done += 1
            srv.start()
        t.join(120)
    finally:
        srv.kill()
        up.close()
    s = out[0]
    per_kill = s.resent_bytes / max(1, done)
    return Result("re-sent after ingest SIGKILL", per_kill / CHUNK, "chunks/kill",
                  reference=f"{done} kills, chunk {CHUNK >> 10} KiB, window "
                  f"{up.cfg.window}", ratio=per_kill / CHUNK, goal=1.0,
                  higher_is_better=False, ratio_desc="chunks",
                  extra={"resent_bytes": s.resent_bytes, "kills": done,
                         "uploaded": s.uploaded})


UPLOADER = """
import logging, sys
logging.disable(logging.WARNING)
from sync.testing import sync_config
from sync.uploader import Uploader
endpoint, spool = sys.argv[1], sys.argv[2]
up = Uploader(sync_config(endpoint, chunk_kb=1024), "rig", spool)
print("start", flush=True)
up.run_once(give_up_s=60)
"""


def resent_after_uploader_kill(root: Path, quick: bool) -> Result:
    size = (24 if quick else 64) << 20
    kills = 2 if quick else 4
    spool = _spool(root / "u", 1, size)
    base = root / "u"
    # a clean upload through the counting proxy: the bytes one upload costs on the link
    with IngestServer(ingest_config(base / "clean")) as srv:
        proxy = FaultProxy(int(srv.endpoint.rsplit(":", 1)[1]))
        up = Uploader(sync_config(proxy.endpoint, chunk_kb=1024), "rig", spool)
        up.run_once(give_up_s=60)
        up.close()
        clean = proxy.bytes_up
        proxy.close()
    _reset(spool)
    with IngestServer(ingest_config(base / "killed")) as srv:
        proxy = FaultProxy(int(srv.endpoint.rsplit(":", 1)[1]))
        for k in range(kills):
            p = subprocess.Popen([sys.executable, "-c", UPLOADER, proxy.endpoint,
                                  str(spool)], stdout=subprocess.PIPE, text=True)
            assert p.stdout is not None and p.stdout.readline().strip() == "start"
            target = size * (k + 1) / (kills + 1)
            deadline = time.monotonic() + 60
            while srv.stats().get("bytes_received", 0) < target and p.poll() is None \
                    and time.monotonic() < deadline:
                time.sleep(0.002)
            p.send_signal(signal.SIGKILL)
            p.wait(10)
        up = Uploader(sync_config(proxy.endpoint, chunk_kb=1024), "rig", spool)
        s = up.run_once(give_up_s=60)
        up.close()
        total = proxy.bytes_up
        received = srv.stats().get("bytes_received", 0)
        proxy.close()
    if s.pending:
        raise RuntimeError(f"upload incomplete after uploader kills: {s}")
    per_kill = max(0, total - clean) / kills
    return Result("re-sent after uploader SIGKILL", per_kill / CHUNK, "chunks/kill",
                  reference=f"link bytes vs one clean upload ({clean / 1e6:.1f} MB)",
                  ratio=per_kill / CHUNK, goal=1.0, higher_is_better=False,
                  ratio_desc="chunks", extra={"link_bytes": total, "clean_link_bytes": clean,
                                              "server_payload_bytes": received,
                                              "size": size, "kills": kills})


def throttle(root: Path, quick: bool) -> Result:
    kbps = 16_000.0  # 2 MB/s of payload
    span = 2.0 if quick else 10.0
    rate = kbps * 1000 / 8
    spool = _spool(root / "t", 1, int(rate * (span + 4)))
    with IngestServer(ingest_config(root / "t")) as srv:
        up = Uploader(sync_config(srv.endpoint, bandwidth_kbps=kbps), "rig", spool)
        t = threading.Thread(target=lambda: up.run_once(give_up_s=60))
        t.start()
        time.sleep(1.0)
        b0, t0 = srv.stats().get("bytes_received", 0), time.monotonic()
        samples = []
        while time.monotonic() - t0 < span:
            time.sleep(0.5)
            samples.append((time.monotonic() - t0, srv.stats().get("bytes_received", 0) - b0))
        b1, t1 = srv.stats().get("bytes_received", 0), time.monotonic()
        up.stop()
        t.join(30)
        up.close()
    measured = (b1 - b0) / (t1 - t0)
    dev = abs(measured / rate - 1)
    return Result(f"throttle over {span:.0f} s", measured * 8 / 1000, "kbps",
                  reference=f"cap {kbps:.0f} kbps", ratio=dev, goal=0.10,
                  higher_is_better=False, ratio_desc="|rate/cap-1|",
                  extra={"rate_over_cap": measured / rate,
                         "half_second_kbps": [round(b * 8 / 1000 / max(ts, 1e-9))
                                              for ts, b in samples]})


def run(quick: bool) -> list[Result]:
    quiet = logging.getLogger("sync")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the kills below are meant to break links
    try:
        return _run(quick)
    finally:
        quiet.setLevel(level)


def _run(quick: bool) -> list[Result]:
    with tempfile.TemporaryDirectory(prefix="bench-sync-") as d:
        root = Path(d)
        keyset = make_keys(root / "keys")
        results = [*goodput(root, keyset, quick),
                   resent_after_ingest_kill(root, keyset, quick),
                   resent_after_uploader_kill(root, quick),
                   throttle(root, quick)]
    return results
