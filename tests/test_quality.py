"""The per-segment quality report flags each defect it checks, and a clean segment none."""

from __future__ import annotations

import cv2
import numpy as np

from agent.quality import QualityMonitor
from agent.schemas import POINT_DTYPE
from agent.types import Sample, StreamInfo, StreamKind

S = 1_000_000_000
INFOS = {
    "/cam": StreamInfo("/cam", StreamKind.CAMERA, "jpeg", 10),
    "/mic": StreamInfo("/mic", StreamKind.AUDIO, "pcm-s16", 10,
                       params={"sample_rate": 16000}),
    "/lidar": StreamInfo("/lidar", StreamKind.LIDAR, "points", 10),
    "/gps": StreamInfo("/gps", StreamKind.GPS, "fix", 10),
}
RNG = np.random.default_rng(0)
SHARP = RNG.integers(0, 255, (480, 640, 3), dtype=np.uint8)


def jpeg(img: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def points(n: int) -> np.ndarray:
    p = np.zeros(n, POINT_DTYPE)
    p["x"] = RNG.normal(0, 10, n)
    return p


def run(seconds: int = 10, *, blur=False, bright=False, clip=False, silent=False,
        empty_lidar=False, no_fix=False, frozen=False, still=False, drop_cam=0.0,
        consent="obtained") -> dict:
    qm = QualityMonitor(INFOS, {"consent_status": consent})
    frames = [jpeg(np.clip(SHARP.astype(int) + k, 0, 255).astype(np.uint8)) for k in range(3)]
    if blur:
        frames = [jpeg(cv2.GaussianBlur(SHARP, (31, 31), 12))] * 3
    if bright:
        frames = [jpeg(np.full_like(SHARP, 250))] * 3
    for k in range(seconds * 10):
        t = k * S // 10
        if not (drop_cam and k % int(1 / drop_cam) == 0):
            img = frames[0] if frozen else frames[k % 3]
            qm.observe("seg", Sample("/cam", img, t, t_ns=t))
        pcm = (RNG.normal(0, 3000, 1600)).astype("<i2")
        if clip:
            pcm[:100] = 32767
        if silent:
            pcm[:] = 0
        qm.observe("seg", Sample("/mic", pcm, t, t_ns=t))
        qm.observe("seg", Sample("/lidar", points(0 if empty_lidar and k % 2 else 60000),
                                 t, t_ns=t))
        qm.observe("seg", Sample("/gps", {"lat": 1.0, "lon": 2.0, "fix_quality": 0 if no_fix
                                          else 1, "hdop": 0.9,
                                          "speed_mps": 0.0 if still else 8.0}, t, t_ns=t))
    manifest_streams = {n: {"messages": seconds * 10 - (seconds * 10 * drop_cam
                                                        if n == "/cam" else 0)}
                        for n in INFOS}
    clock = {n: {"source": "estimator", "state": "locked"} for n in INFOS}
    return qm.report("seg", (0, seconds * S - S // 10), manifest_streams, clock)


def test_clean_segment_raises_no_flag() -> None:
    rep = run()
    assert rep["flags"] == [] and rep["verdict"] == "ok", rep["flags"]


def test_each_defect_is_flagged() -> None:
    cases = {
        "blur": ("noise:/cam", run(blur=True)),
        "overexposed": ("noise:/cam", run(bright=True)),
        "clipping": ("noise:/mic", run(clip=True)),
        "silence": ("noise:/mic", run(silent=True)),
        "empty lidar": ("noise:/lidar", run(empty_lidar=True)),
        "no gps fix": ("noise:/gps", run(no_fix=True)),
        "frozen camera": ("near_duplicates:/cam", run(frozen=True)),
        "standing still": ("near_duplicates:/gps", run(still=True)),
        "missing frames": ("completeness:/cam", run(drop_cam=0.25)),
        "consent": ("provenance", run(consent="unknown")),
    }
    for what, (flag, rep) in cases.items():
        assert flag in rep["flags"], (what, rep["flags"])
        assert rep["verdict"] in ("warn", "fail"), what


def test_blur_and_exposure_figures() -> None:
    sharp = run()["checks"]["noise"]["streams"]["/cam"]
    blurred = run(blur=True)["checks"]["noise"]["streams"]["/cam"]
    assert sharp["frames_checked"] >= 9 and sharp["blurred"] == 0
    assert blurred["blurred"] == blurred["frames_checked"]
    assert blurred["laplacian_var_median"] < 60 < sharp["laplacian_var_median"]
