"""Camera: the ``camera.opencv`` driver's CPU per frame with and without JPEG passthrough,
and the HIL camera emulator's own CPU cost, on one 1280×720 @ 30 fps MJPEG stream.

The emulator runs in a subprocess (``python -m hil.emulators.camera``) so its CPU is
read from ``/proc/<pid>/stat`` and the driver's from this process's ``process_time``
(which also counts FFmpeg's threads for the VideoCapture peer). Figures:

- driver passthrough vs the driver's own decode + re-encode path (``passthrough=False``)
- driver passthrough vs the naive peer: ``cv2.VideoCapture`` on the URL + ``imencode``
- emulator CPU as a share of one core, and the frame rate it delivered vs the nominal 30
- labeler decode to 640 px: reduced-size JPEG decode vs full decode + resize
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np

from bench import Result

ROOT = Path(__file__).resolve().parent.parent
W, H, FPS = 1280, 720, 30.0


def _proc_cpu_s(pid: int) -> float:
    """CPU seconds of ``pid`` and its live descendants (the emulator's render process)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    own = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    kids = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            kids += (task / "children").read_text().split()
        except OSError:
            pass
    return own + sum(_proc_cpu_s(int(k)) for k in kids)


def _driver_cpu(uri: str, seconds: float, **opts: object) -> tuple[float, int, int]:
    """(CPU s, frames, bytes) of the driver over ``seconds`` after a 0.5 s warm-up."""
    from drivers.camera import OpenCvCamera, OpenCvCameraOptions

    drv = OpenCvCamera("/camera/bench", uri, OpenCvCameraOptions(**opts), FPS)
    drv.open()
    n = nbytes = 0
    cpu0 = t0 = None
    try:
        start = time.monotonic()
        for s in drv:
            now = time.monotonic()
            if cpu0 is None:
                if now - start >= 0.5:
                    cpu0, t0 = time.process_time(), now
                continue
            n += 1
            nbytes += len(s.payload)
            if now - t0 >= seconds:
                break
        cpu = time.process_time() - (cpu0 or 0.0)
    finally:
        drv.close()
    return cpu, n, nbytes


def _videocapture_cpu(uri: str, seconds: float, quality: int = 85) -> tuple[float, int]:
    cap = cv2.VideoCapture(uri, cv2.CAP_FFMPEG)
    try:
        start = time.monotonic()
        while time.monotonic() - start < 0.5:
            cap.read()
        cpu0, t0, n = time.process_time(), time.monotonic(), 0
        while time.monotonic() - t0 < seconds:
            ok, img = cap.read()
            if not ok:
                break
            cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
            n += 1
        return time.process_time() - cpu0, n
    finally:
        cap.release()


def _labeler_decode(jpeg: bytes, reps: int) -> tuple[float, float]:
    from agent.types import Sample
    from drivers.camera import decode_for_labeler

    s = Sample("/c", jpeg, 0)
    buf = np.frombuffer(jpeg, np.uint8)
    t = time.process_time()
    for _ in range(reps):
        decode_for_labeler(s, 640)
    reduced = (time.process_time() - t) / reps
    t = time.process_time()
    for _ in range(reps):
        cv2.resize(cv2.imdecode(buf, cv2.IMREAD_COLOR), (640, 360), interpolation=cv2.INTER_AREA)
    full = (time.process_time() - t) / reps
    return reduced, full


def run(quick: bool = False) -> list[Result]:
    win = 3.0 if quick else 8.0
    proc = subprocess.Popen(
        [sys.executable, "-m", "hil.emulators.camera", "--width", str(W), "--height", str(H),
         "--fps", str(FPS), "--duration", str(4 * win + 10)],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        uri = proc.stdout.readline().strip()
        if not uri.startswith("http://"):
            raise RuntimeError(f"emulator did not start: {uri!r}")
        e_cpu0, e_t0 = _proc_cpu_s(proc.pid), time.monotonic()
        pt_cpu, pt_n, pt_bytes = _driver_cpu(uri, win)
        e_cpu = _proc_cpu_s(proc.pid) - e_cpu0
        e_wall = time.monotonic() - e_t0
        re_cpu, re_n, _ = _driver_cpu(uri, win, passthrough=False, quality=85)
        vc_cpu, vc_n = _videocapture_cpu(uri, win)
        from drivers.camera import OpenCvCamera, OpenCvCameraOptions
        drv = OpenCvCamera("/c", uri, OpenCvCameraOptions(), FPS)
        drv.open()
        sample = next(iter(drv))
        drv.close()
    finally:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    summary = out.strip().splitlines()[-1] if out.strip() else ""
    load1 = os.getloadavg()[0]
    pt_ms = 1e3 * pt_cpu / max(pt_n, 1)
    re_ms = 1e3 * re_cpu / max(re_n, 1)
    vc_ms = 1e3 * vc_cpu / max(vc_n, 1)
    e_share = e_cpu / e_wall
    fps = pt_n / win
    red, full = _labeler_decode(bytes(sample.payload), 20 if quick else 60)
    frame_kb = pt_bytes / max(pt_n, 1) / 1024
    return [
        Result("driver CPU/frame, JPEG passthrough", pt_ms, "ms",
               reference=f"decode + re-encode path {re_ms:.2f} ms", ratio=pt_ms / re_ms,
               goal=0.25, higher_is_better=False, ratio_desc="of re-encode",
               extra={"frames": pt_n, "reencode_frames": re_n, "frame_kb": round(frame_kb, 1),
                      "reencode_ms": re_ms}),
        Result("driver CPU/frame vs VideoCapture+imencode", pt_ms, "ms",
               reference=f"cv2.VideoCapture + imencode {vc_ms:.2f} ms", ratio=pt_ms / vc_ms,
               goal=0.25, higher_is_better=False, ratio_desc="of peer",
               extra={"peer_frames": vc_n, "peer_ms": vc_ms}),
        Result("driver CPU share at 1280×720@30 (passthrough)", 100 * pt_cpu / win, "% core",
               reference="one core", ratio=pt_cpu / win, goal=0.1, higher_is_better=False),
        Result("emulator CPU at 1280×720@30", 100 * e_share, "% core",
               reference="one core", ratio=e_share, goal=0.6, higher_is_better=False,
               extra={"cpu_s": e_cpu, "wall_s": e_wall}),
        Result("emulator delivered frame rate", fps, "fps", reference="nominal 30 fps",
               ratio=fps / FPS, goal=0.97,
               extra={"emulator_summary": summary, "loadavg_1min": load1,
                      "cpus": os.cpu_count()}),
        Result("labeler decode 1280×720 → 640 px", 1e3 * red, "ms",
               reference=f"full decode + resize {1e3 * full:.2f} ms", ratio=red / full,
               goal=0.7, higher_is_better=False),
    ]
