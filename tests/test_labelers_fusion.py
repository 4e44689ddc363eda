"""fusion.project: projection math against hand-computed pixels, greedy association, and the
whole chain (lidar.clusters → fusion.project ← a 2D detector) inside a pool."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from agent.config import LabelerConfig
from agent.geometry import PinholeCamera
from agent.labelers import Labeler, LabelerOptions, detection, make_label, register
from agent.labelers.fusion import associate, box_corners, lidar_to_vehicle, project_box
from agent.labelers.pool import LabelerPool
from agent.schemas import POINT_DTYPE
from agent.types import Sample, StreamInfo, StreamKind

CAL = {"fx": 500.0, "fy": 500.0, "cx": 320.0, "cy": 240.0, "width": 640, "height": 480,
       "extrinsics": {"x": 1.5, "y": 0.0, "z": 1.4, "roll": 0.0, "pitch": 0.0, "yaw": 0.0}}


def test_projection_matches_hand_computation() -> None:
    cam = PinholeCamera.from_calibration(CAL)
    rt = lidar_to_vehicle(None, 1.8)  # no extrinsics: identity, 1.8 m up
    # a 2 × 1 × 1.5 m box standing on the ground 10 m ahead of the camera: LiDAR z of the
    # ground is -1.8, so the centre is at z = -1.8 + 0.75
    box = {"center": [11.5, 0.0, -1.05], "size": [2.0, 1.0, 1.5], "yaw": 0.0}
    b2d, uv = project_box(box, rt, cam)
    # nearest face 9 m from the camera: u = 320 ± 500·0.5/9, v from z = +0.1 and -1.4 m
    # relative to the camera: v = 240 - 500·0.1/9 (top) and 240 + 500·1.4/9 (bottom)
    assert b2d == pytest.approx([320 - 250 / 9, 240 - 50 / 9, 320 + 250 / 9,
                                 240 + 700 / 9], abs=0.06)
    assert uv is not None and uv.shape == (8, 2)
    # the far face (11 m) projects inside the near one
    far = uv[[0, 1, 4, 5]]
    assert far[:, 0].min() == pytest.approx(320 - 250 / 11, abs=1e-6)

    # a LiDAR mounted 2 m ahead, yawed 90° left: a point 5 m ahead of the vehicle is at
    # LiDAR (x=0, y=-3): rotation +90° maps it to vehicle (3, 0) + (2, 0, 0)
    r, t = lidar_to_vehicle({"extrinsics": {"x": 2.0, "yaw": math.pi / 2}})
    assert r @ np.array([0.0, -3.0, 0.0]) + t == pytest.approx([5.0, 0.0, 0.0])

    behind = {"center": [-10.0, 0.0, -1.0], "size": [2.0, 1.0, 1.5], "yaw": 0.0}
    assert project_box(behind, rt, cam) is None
    straddle = {"center": [2.5, 0.3, -1.05], "size": [4.0, 1.0, 1.5], "yaw": 0.0}
    b2d, uv = project_box(straddle, rt, cam)
    assert uv is None and b2d[2] <= 640  # partly behind: clipped 2D box, no wireframe


def test_corners_and_association() -> None:
    c = box_corners({"center": [0, 0, 0], "size": [4, 2, 2], "yaw": math.pi / 2})
    assert c[0] == pytest.approx([-1, 2, -1])  # +l/2 along y after the turn
    proj = [[0, 0, 10, 10], [20, 0, 30, 10], [100, 100, 110, 110]]
    dets = [[21, 0, 31, 10], [0, 1, 10, 11], [0, 0, 10, 10]]
    m = associate(proj, dets, 0.3)
    assert m[0][0] == 2 and m[0][1] == pytest.approx(1.0)
    assert m[1][0] == 0 and 2 not in m


class FixedOptions(LabelerOptions):
    box: list[float] = [0, 0, 1, 1]


@register("test.fixed2d")
class Fixed2D(Labeler):
    """A fake 2D detector registered like camera.yolo, on the same label stream name, that
    reports one fixed box (the expected projection of the LiDAR object)."""

    suffix = "yolo"
    Options = FixedOptions

    def accepts(self, info: StreamInfo) -> bool:
        return info.kind == StreamKind.CAMERA

    def label(self, sample: Sample) -> list[Sample]:
        d = detection(sample.stream, sample.t_ns, "camera.yolo", "car", 0.8,
                      box=self.options.box)
        return [make_label(sample, self.out_stream(sample.stream), None, [d])]


def _box_points(rng: np.random.Generator) -> np.ndarray:
    ground = np.stack([rng.uniform(2, 40, 8000), rng.uniform(-15, 15, 8000),
                       rng.normal(-1.8, 0.02, 8000)], 1)
    u = rng.uniform(0, 1, (1500, 3))
    car = np.stack([9.25 + 4.5 * u[:, 0], -0.9 + 1.8 * u[:, 1], -1.8 + 1.5 * u[:, 2]], 1)
    xyz = np.concatenate([ground, car])
    pts = np.zeros(len(xyz), POINT_DTYPE)
    pts["x"], pts["y"], pts["z"] = xyz.T
    return pts


def test_fusion_needs_clusters_and_a_calibrated_camera() -> None:
    from agent.labelers import LabelerError

    pool = LabelerPool.from_config([LabelerConfig(kind="fusion.project", streams=["/lidar"])])
    with pytest.raises(LabelerError, match="needs a lidar.clusters labeler"):
        pool.plan([StreamInfo("/cam", StreamKind.CAMERA, "jpeg", 10.0, calibration=CAL),
                   StreamInfo("/lidar", StreamKind.LIDAR, "points", 10.0)])


def test_chain_in_pool_projects_and_matches() -> None:
    cam = PinholeCamera.from_calibration(CAL)
    expect, _ = project_box({"center": [11.5, 0.0, -1.05], "size": [4.5, 1.8, 1.5],
                             "yaw": 0.0}, lidar_to_vehicle(None, 1.8), cam)
    pool = LabelerPool.from_config([
        LabelerConfig(kind="test.fixed2d", streams=["/cam"], options={"box": expect}),
        LabelerConfig(kind="lidar.clusters", streams=["/lidar"]),
        LabelerConfig(kind="fusion.project", streams=["/lidar"]),
    ])
    outs = pool.plan([StreamInfo("/cam", StreamKind.CAMERA, "jpeg", 10.0, calibration=CAL),
                      StreamInfo("/lidar", StreamKind.LIDAR, "points", 10.0)])
    assert [o.name for o in outs] == ["/labels/cam/yolo", "/labels/lidar/clusters",
                                      "/labels/cam/lidar_projection"]
    got: list[tuple[Sample, list[dict[str, Any]]]] = []
    pool.subscribe(lambda s, d: got.append((s, d)))
    pool.start()
    pool.offer(Sample("/cam", b"jpeg", 1, t_ns=1_000_000_000))
    assert pool.wait_idle(10)
    pool.offer(Sample("/lidar", _box_points(np.random.default_rng(0)), 1,
                      t_ns=1_020_000_000))
    assert pool.wait_idle(20)
    pool.stop()
    proj = [(s, d) for s, d in got if s.stream == "/labels/cam/lidar_projection"]
    assert len(proj) == 1
    s, dets = proj[0]
    assert s.t_ns == 1_020_000_000 and len(dets) == 1
    d = dets[0]
    assert d["cls"] == "car" and d["match_iou"] > 0.8 and d["matched_box"] == expect
    assert d["box"] == pytest.approx(expect, abs=12)
    assert d["points"] > 1000 and d["lidar_stream"] == "/lidar"
    assert len(s.payload.points[0].points) == 24  # 12 edges as a LINE_LIST
    meta = {kv.key: kv.value for kv in s.payload.metadata}
    assert meta["labeler"] == "fusion.project" and meta["source"] == "/cam"
    assert pool.stats()["fusion.project#2"]["labeled"] == 1
