"""Recorder throughput on a camera-heavy load, against (a) the plain ``mcap`` Writer writing
the same messages and (b) the machine's fsync'ed sequential write bandwidth, all measured
in this run on the same disk.

Load, the reference rig: 4 cameras of 1920×1080 MJPEG frames (~q90, measured size
printed) at 30 fps, an Ouster OS1-64 (1024×10: 65,536 points per scan) at 10 Hz, a 48 kHz
stereo microphone and 10 Hz GPS, ``seconds`` of capture fed to the recorder as fast as it
takes them (non-live watermark: samples carry their capture times; nothing is paced), with
the per-segment quality checks on.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
from mcap.writer import CompressionType, Writer
from mcap_protobuf.schema import register_schema

from agent.queues import StreamQueue
from agent.recorder import Recorder
from agent.quality import QualityMonitor
from agent.schemas import POINT_DTYPE, codec_for
from agent.types import Sample, StreamInfo, StreamKind
from bench import Result

FPS = 30
CAMERAS = 4


def make_frames(n: int = 4) -> list[bytes]:
    """Noisy 1080p frames encoded once at q90 (realistic JPEG sizes, ~200–400 KB)."""
    rng = np.random.default_rng(1)
    out = []
    for i in range(n):
        base = cv2.resize(rng.integers(0, 255, (68, 120, 3), dtype=np.uint8), (1920, 1080))
        noise = rng.normal(0, 2.5, base.shape)
        img = np.clip(base + noise, 0, 255).astype(np.uint8)
        cv2.putText(img, f"{i}", (100, 500), cv2.FONT_HERSHEY_SIMPLEX, 8, (255, 255, 255), 12)
        out.append(cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes())
    return out


def make_load(seconds: float) -> tuple[list[StreamInfo], list[Sample]]:
    frames = make_frames()
    infos = [StreamInfo(f"/camera/{i}", StreamKind.CAMERA, "jpeg", FPS) for i in range(CAMERAS)]
    audio = StreamInfo("/mic", StreamKind.AUDIO, "pcm-s16", 50,
                       params={"sample_rate": 48000, "channels": 2})
    infos.append(audio)
    t0 = 1_000_000_000
    samples: list[Sample] = []
    for k in range(int(seconds * FPS)):
        t = t0 + k * 1_000_000_000 // FPS
        for i in range(CAMERAS):
            samples.append(Sample(f"/camera/{i}", frames[(k + i) % len(frames)], t,
                                  device_t_ns=t, seq=k, t_ns=t + i * 1000))
    infos.append(StreamInfo("/lidar", StreamKind.LIDAR, "points", 10))
    infos.append(StreamInfo("/gps", StreamKind.GPS, "fix", 10))
    rng = np.random.default_rng(3)
    pts = np.zeros(65536, POINT_DTYPE)
    for f in ("x", "y", "z", "intensity"):
        pts[f] = rng.normal(0, 20, len(pts))
    pts["ring"] = np.repeat(np.arange(64), 1024)
    for k in range(int(seconds * 10)):
        t = t0 + k * 100_000_000
        samples.append(Sample("/lidar", pts, t, device_t_ns=t, seq=k, t_ns=t + 5000))
        fix = {"lat": 48.1 + k * 1e-6, "lon": 11.5, "alt": 500.0, "fix_quality": 1,
               "hdop": 0.8, "speed_mps": 10.0}
        samples.append(Sample("/gps", fix, t, device_t_ns=t, seq=k, t_ns=t + 7000))
    pcm = (np.random.default_rng(2).normal(0, 3000, (960, 2))).astype("<i2")
    for k in range(int(seconds * 50)):
        t = t0 + k * 20_000_000
        samples.append(Sample("/mic", pcm, t, device_t_ns=t, seq=k * 960, t_ns=t))
    samples.sort(key=lambda s: s.t_ns)
    return infos, samples


def run_recorder(dirpath: Path, infos: list[StreamInfo], samples: list[Sample]) -> float:
    rec = Recorder(dirpath, "bench", {"edgecap.session": {"device_id": "bench"}}, {},
                   now_ns=time.monotonic_ns, t0_ns=samples[0].t_ns, window_s=10.0,
                   compression="none", fsync_interval_s=1.0, late_grace_s=0.5, live=False)
    rec.quality = QualityMonitor({i.name: i for i in infos}, {"consent_status": "obtained"})
    queues = {}
    for info in infos:
        q = StreamQueue(info.name, 1_000_000, 8 << 30)
        rec.add_stream(info, q)
        queues[info.name] = q
    t0 = time.perf_counter()
    rec.start()

    def feed() -> None:
        for s in samples:
            q = queues[s.stream]
            while len(q) > 64:
                time.sleep(0.0002)
            q.put(s)

    th = threading.Thread(target=feed)
    th.start()
    th.join()
    rec.stop(timeout_s=600)
    dt = time.perf_counter() - t0
    drops = sum(q.dropped for q in queues.values())
    assert drops == 0, "the bench feeder must not drop"
    return dt


def run_plain_mcap(path: Path, infos: list[StreamInfo], samples: list[Sample]) -> float:
    """The same messages (same protobuf encoding) through the bare mcap Writer, fsync at end."""
    t0 = time.perf_counter()
    with open(path, "wb") as f:
        w = Writer(f, chunk_size=4 << 20, compression=CompressionType.NONE)
        w.start()
        chans = {}
        codecs = {}
        for info in infos:
            c = codec_for(info)
            sid = register_schema(w, c.proto_class)  # every reference stream is protobuf
            chans[info.name] = w.register_channel(info.name, "protobuf", sid)
            codecs[info.name] = (c, info)
        for s in samples:
            c, info = codecs[s.stream]
            w.add_message(chans[s.stream], s.t_ns, c.encode(s, info), s.t_ns, s.seq or 0)
        w.finish()
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def run_disk(path: Path, nbytes: int, block: int = 4 << 20) -> float:
    """Sequential write of ``nbytes`` in 4 MiB blocks with an fsync every second's worth."""
    buf = os.urandom(block)
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        written = 0
        last = t0
        while written < nbytes:
            written += f.write(buf)
            if time.perf_counter() - last > 1.0:
                os.fsync(f.fileno())
                last = time.perf_counter()
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def run(quick: bool = False) -> list[Result]:
    seconds = 3.0 if quick else 10.0
    infos, samples = make_load(seconds)
    nbytes = sum(s.nbytes() for s in samples)
    base = Path(os.environ.get("EDGECAP_BENCH_DIR", tempfile.gettempdir()))
    work = Path(tempfile.mkdtemp(prefix="edgecap-bench-", dir=base))
    try:
        # interleave the three measurements three times and keep each one's best run
        best = {"rec": 1e9, "mcap": 1e9, "disk": 1e9}
        for rep in range(3):
            d = work / f"rec{rep}"
            best["rec"] = min(best["rec"], run_recorder(d, infos, samples))
            shutil.rmtree(d)
            p = work / f"plain{rep}.mcap"
            best["mcap"] = min(best["mcap"], run_plain_mcap(p, infos, samples))
            p.unlink()
            p = work / f"disk{rep}.bin"
            best["disk"] = min(best["disk"], run_disk(p, nbytes))
            p.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mbps = {k: nbytes / v / 1e6 for k, v in best.items()}
    realtime = seconds / best["rec"]
    frame_kb = np.mean([s.nbytes() for s in samples if s.stream.startswith("/camera")]) / 1e3
    return [
        Result("recorder throughput", mbps["rec"], "MB/s", "plain mcap Writer "
               f"{mbps['mcap']:.0f} MB/s", mbps["rec"] / mbps["mcap"], goal=0.9,
               extra={"seconds_of_capture": seconds, "payload_mb": nbytes / 1e6,
                      "jpeg_kb": frame_kb}),
        Result("share of fsync'ed disk bandwidth", mbps["rec"], "MB/s",
               f"sequential write+fsync {mbps['disk']:.0f} MB/s", mbps["rec"] / mbps["disk"]),
        Result(f"reference rig ({CAMERAS}×1080p30 MJPEG {frame_kb:.0f} KB/frame, OS1-64, "
               "48 kHz stereo, GPS) with quality checks", realtime, "× real time",
               "capture duration", realtime, goal=5.0, extra={"drops": 0}),
    ]
