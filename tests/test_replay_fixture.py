"""A small deterministic session written through the real Recorder, shared by the
replay, relabel and export tests (``from test_replay_fixture import make_session``)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from agent.labelers import ModelInfo, detection
from agent.labelers._audio import AUDIO_LABELS_SCHEMA, audio_payload
from agent.labelers._foxglove import image_annotations, scene_update
from agent.queues import StreamQueue
from agent.recorder import Recorder
from agent.schemas import POINT_DTYPE
from agent.types import Sample, StreamInfo, StreamKind

SESSION_ID = "testrig_20260101T000000Z_abcd"
T0 = 1_000_000_000_000  # session timebase origin (ns)
CAM_OFFSET = 12_500_000_000  # device clock − timebase
YOLO = ModelInfo("tiny-yolo", "3", "ab" * 32, {"conf": 0.25})
CLUSTERS = ModelInfo("ransac-dbscan-clusters", "1", "", {"eps_m": 0.5})
VAD = ModelInfo("silero_vad", "5.1", "cd" * 32, {"threshold": 0.5})


@dataclass
class Written:
    """What the builder wrote: per stream the samples in write order."""

    session_dir: Path
    infos: dict[str, StreamInfo]
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    t_first_ns: int = 0
    t_last_ns: int = 0


def jpeg(n: int, w: int = 64, h: int = 48) -> bytes:
    img = np.zeros((h, w, 3), np.uint8)
    img[:, (n * 4) % w:(n * 4) % w + 4] = 255
    img[..., 2] = 40 + n % 200
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 80])
    assert ok
    return buf.tobytes()


def points(n: int, count: int = 60) -> np.ndarray:
    p = np.zeros(count, POINT_DTYPE)
    a = np.linspace(0, 2 * np.pi, count, endpoint=False)
    p["x"], p["y"] = 5 * np.cos(a) + 0.01 * n, 5 * np.sin(a)
    p["z"] = np.linspace(-1, 1, count)
    p["intensity"] = np.arange(count, dtype=np.float32)
    p["t_offset_ns"] = np.arange(count, dtype=np.uint32) * 1000
    p["ring"] = np.arange(count) % 16
    return p


def make_session(root: Path, duration_s: float = 3.0, window_s: float = 1.0,
                 labels: bool = True, rear: bool = True, cam_hz: float = 20.0) -> Written:
    """Write ``root/SESSION_ID``: /camera/front (JPEG 64×48 at ``cam_hz``, device clock
    offset), /camera/rear (same instants: ties), /mic (48 kHz, 960-frame blocks), /lidar
    (10 Hz), /gps (5 Hz) and, with ``labels``, yolo boxes on every front frame, cluster
    cuboids on every scan and speech segments on the mic."""
    cal = {"fx": 50.0, "fy": 50.0, "cx": 32.0, "cy": 24.0}
    infos = {
        "/camera/front": StreamInfo("/camera/front", StreamKind.CAMERA, "jpeg", cam_hz,
                                    "camera_front", cal, {"width": 64, "height": 48}),
        "/mic": StreamInfo("/mic", StreamKind.AUDIO, "pcm-s16", 50.0,
                           params={"sample_rate": 48000, "channels": 1, "block": 960}),
        "/lidar": StreamInfo("/lidar", StreamKind.LIDAR, "points", 10.0, "lidar"),
        "/gps": StreamInfo("/gps", StreamKind.GPS, "fix", 5.0, "gps"),
    }
    if rear:
        infos["/camera/rear"] = StreamInfo("/camera/rear", StreamKind.CAMERA, "jpeg", cam_hz,
                                           "camera_rear", None, {"width": 64, "height": 48})
    if labels:
        from foxglove_schemas_protobuf.ImageAnnotations_pb2 import ImageAnnotations
        from foxglove_schemas_protobuf.SceneUpdate_pb2 import SceneUpdate

        infos["/labels/camera/front/yolo"] = StreamInfo(
            "/labels/camera/front/yolo", StreamKind.LABEL, "protobuf", cam_hz, "camera_front",
            params={"proto_class": ImageAnnotations, "labeler": "camera.yolo",
                    "source": "/camera/front", **YOLO.stream_params()})
        infos["/labels/lidar/clusters"] = StreamInfo(
            "/labels/lidar/clusters", StreamKind.LABEL, "protobuf", 10.0, "lidar",
            params={"proto_class": SceneUpdate, "labeler": "lidar.clusters",
                    "source": "/lidar", **CLUSTERS.stream_params()})
        infos["/labels/mic/vad"] = StreamInfo(
            "/labels/mic/vad", StreamKind.LABEL, "json", 50.0,
            params={"schema": "edgecap.AudioLabels", "json_schema": AUDIO_LABELS_SCHEMA,
                    "labeler": "audio.vad", "source": "/mic", **VAD.stream_params()})
    w = Written(root / SESSION_ID, infos)
    out: dict[str, list[Sample]] = {n: [] for n in infos}
    end = T0 + int(duration_s * 1e9)

    def add(s: Sample) -> None:
        out[s.stream].append(s)

    period = int(1e9 / cam_hz)
    for n, t in enumerate(range(T0, end, period)):
        add(Sample("/camera/front", jpeg(n), t + 2_000_000, device_t_ns=t + CAM_OFFSET,
                   seq=n, t_ns=t))
        if rear:
            add(Sample("/camera/rear", jpeg(n + 7), t + 2_100_000, device_t_ns=t + CAM_OFFSET,
                       seq=n, t_ns=t))
        if labels:
            dets = [detection("/camera/front", t, "camera.yolo", "car", 0.5 + (n % 5) / 10,
                              box=[4.0 + n % 10, 6.0, 30.0 + n % 10, 40.0])]
            if n % 3 == 0:
                dets.append(detection("/camera/front", t, "camera.yolo", "pedestrian", 0.42,
                                      box=[40.0, 10.0, 50.0, 44.0]))
            msg = image_annotations(t, dets, YOLO, "camera.yolo", "/camera/front")
            add(Sample("/labels/camera/front/yolo", msg, t + 30_000_000, seq=n, t_ns=t,
                       meta={"detections": dets}))
    blk = 960
    for k, t in enumerate(range(T0, end, 20_000_000)):
        i = np.arange(k * blk, (k + 1) * blk)
        pcm = (3000 * np.sin(2 * math.pi * 440 * i / 48000)).astype("<i2").reshape(-1, 1)
        add(Sample("/mic", pcm, t + 21_000_000, device_t_ns=k * blk * 1_000_000_000 // 48000,
                   seq=k * blk, t_ns=t))
    if labels:
        segs = [{"start_ns": T0 + 300_000_000, "end_ns": T0 + 900_000_000, "kind": "speech",
                 "score": 0.91, "open": False, "privacy": "speech"},
                {"start_ns": T0 + 1_500_000_000, "end_ns": T0 + 2_200_000_000,
                 "kind": "speech", "score": 0.77, "open": False, "privacy": "speech"}]
        for seg in segs:
            t = seg["end_ns"] + 100_000_000  # a VAD labels a segment once it has ended
            t -= (t - T0) % 20_000_000
            if t >= end:
                continue
            add(Sample("/labels/mic/vad", audio_payload("audio.vad", "/mic", VAD.as_dict(),
                                                        [seg], "speech"),
                       t + 40_000_000, seq=None, t_ns=t))
    for n, t in enumerate(range(T0 + 5_000_000, end, 100_000_000)):
        add(Sample("/lidar", points(n), t + 8_000_000, device_t_ns=t + 3_600_000_000_000,
                   seq=n, t_ns=t))
        if labels:
            dets = [detection("/lidar", t, "lidar.clusters", "car", 0.8,
                              bbox3d={"center": [5.0, 1.0 + n * 0.1, 0.7],
                                      "size": [4.5, 1.8, 1.5], "yaw": 0.25}, points=40)]
            msg = scene_update(t, "lidar", dets, CLUSTERS, "lidar.clusters", "/lidar", 0)
            add(Sample("/labels/lidar/clusters", msg, t + 50_000_000, seq=n, t_ns=t,
                       meta={"detections": dets}))
    for n, t in enumerate(range(T0 + 1_000_000, end, 200_000_000)):
        add(Sample("/gps", {"lat": 48.1 + n * 1e-5, "lon": 11.5, "alt": 520.0,
                            "covariance": [1.0, 0, 0, 0, 1.0, 0, 0, 0, 4.0]},
                   t + 3_000_000, device_t_ns=1_767_225_600_000_000_000 + n * 200_000_000,
                   seq=n, t_ns=t))
    w.samples = out
    w.t_first_ns = min(s.t_ns for v in out.values() for s in v)
    w.t_last_ns = max(s.t_ns for v in out.values() for s in v)
    _record(w, window_s)
    return w


def _record(w: Written, window_s: float) -> None:
    meta = {
        "edgecap.session": {"session_id": SESSION_ID, "device_id": "testrig",
                            "agent_version": "0.1.0", "timebase": "monotonic"},
        "edgecap.provenance": {"source": "tests", "consent_status": "not_required",
                               "known_limitations": json.dumps(["synthetic"])},
        "edgecap.calibration": {n: json.dumps(i.calibration) for n, i in w.infos.items()
                                if i.calibration},
        "edgecap.streams": {i.name: json.dumps({
            "kind": i.kind.value, "encoding": i.encoding, "rate_hz": i.rate_hz,
            "params": {k: v for k, v in i.params.items() if isinstance(v, (int, float, str))}})
            for i in w.infos.values()},
    }
    rec = Recorder(w.session_dir, SESSION_ID, meta, {"device_id": "testrig"},
                   now_ns=lambda: 0, t0_ns=T0, window_s=window_s, fsync_interval_s=0.05,
                   late_grace_s=0.0, live=False)
    for name, info in w.infos.items():
        q = StreamQueue(name, 1_000_000, 1 << 32)
        rec.add_stream(info, q)
        for s in w.samples[name]:
            q.put(s)
    rec.start()
    rec.stop()
    assert rec.disk_drops == 0, rec.alerts


def all_written(w: Written) -> list[Sample]:
    return [s for v in w.samples.values() for s in v]


def test_fixture_session_is_complete(tmp_path: Path) -> None:
    """The builder's session verifies against its manifests and holds every sample."""
    from agent.inspect import inspect_path

    w = make_session(tmp_path, duration_s=1.0)
    rep = inspect_path(w.session_dir)
    assert rep["ok"], rep["problems"]
    assert len(rep["segments"]) == 1
    for name, samples in w.samples.items():
        assert rep["streams"][name]["messages"] == len(samples), name
