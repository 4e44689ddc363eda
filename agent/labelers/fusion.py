"""``fusion.project``: LiDAR boxes projected into every calibrated camera and associated with
that camera's 2D detections.

Input: the ``lidar.clusters`` labels of the LiDAR streams named in ``streams`` (the pool
chains them: configure ``lidar.clusters`` on the same stream). For each box: its 8 corners
go LiDAR → vehicle through the LiDAR stream's ``calibration.extrinsics`` (``x, y, z, roll,
pitch, yaw``; without one: identity rotation, sensor ``lidar_height_m`` above the vehicle
origin) → camera through :class:`agent.geometry.PinholeCamera` (the camera stream's
calibration). A box needs ``min_visible_px`` of image after clipping to be kept.

Association: the camera's ``camera.yolo`` label nearest in time (within ``max_dt_ms``),
greedy one-to-one by IoU of the projected box with the 2D box (highest first, at least
``min_iou``). A matched projection takes the 2D class and ``score = 2D score × IoU``; an
unmatched one keeps the LiDAR size class with ``score = cluster score × 0.5``.

Output: ``/labels/<camera>/lidar_projection`` (ImageAnnotations: the box's 12 projected
edges when all corners are in front of the camera, else its clipped 2D box), one label per
camera per scan, ``t_ns`` of the scan. Detection dicts carry ``box`` (projected, pixels),
``bbox3d`` (LiDAR frame), ``points``, ``match_iou``, ``matched_box``, ``lidar_stream``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from pydantic import Field

from agent.geometry import PinholeCamera, _rot
from agent.types import Sample, StreamInfo, StreamKind

from . import (Labeler, LabelerOptions, ModelInfo, detection, label_stream, make_label,
               register)
from ._foxglove import image_annotations

VERSION = "1.0"


class FusionOptions(LabelerOptions):
    cameras: list[str] | None = Field(default=None, description="default: every camera "
                                      "stream with a calibration")
    detector_suffix: str = Field(default="yolo", description="2D label stream suffix")
    max_dt_ms: float = Field(default=100.0, ge=0)
    min_iou: float = Field(default=0.3, ge=0, le=1)
    min_visible_px: float = Field(default=4.0, ge=0)
    lidar_height_m: float = Field(default=1.8, description="used without LiDAR extrinsics")


def box_corners(b: dict[str, Any]) -> np.ndarray:
    """8×3 corners of ``{center, size, yaw}`` (order: bottom 0-3 then top 4-7, as
    :meth:`hil.world.ObjectState.corners`)."""
    l, w, h = b["size"]
    dx = np.array([1, 1, -1, -1, 1, 1, -1, -1]) * l / 2
    dy = np.array([1, -1, -1, 1, 1, -1, -1, 1]) * w / 2
    dz = np.array([-1, -1, -1, -1, 1, 1, 1, 1]) * h / 2
    c, s = math.cos(b.get("yaw", 0.0)), math.sin(b.get("yaw", 0.0))
    cx, cy, cz = b["center"]
    return np.stack([cx + c * dx - s * dy, cy + s * dx + c * dy, cz + dz], 1)


def lidar_to_vehicle(calibration: dict[str, Any] | None, height_m: float = 1.8
                     ) -> tuple[np.ndarray, np.ndarray]:
    """``(R, t)`` with ``p_vehicle = R @ p_lidar + t`` from a LiDAR stream's calibration."""
    ex = (calibration or {}).get("extrinsics")
    if not ex:
        return np.eye(3), np.array([0.0, 0.0, height_m])
    return (_rot(ex.get("roll", 0.0), ex.get("pitch", 0.0), ex.get("yaw", 0.0)),
            np.array([ex.get("x", 0.0), ex.get("y", 0.0), ex.get("z", 0.0)], float))


def project_box(b: dict[str, Any], rt: tuple[np.ndarray, np.ndarray], cam: PinholeCamera,
                min_visible_px: float = 4.0
                ) -> tuple[list[float], np.ndarray | None] | None:
    """Project a LiDAR-frame box: ``(box2d [x0, y0, x1, y1], corners_uv 8×2 or None when
    some corner is behind the camera)``, or None when less than ``min_visible_px`` shows."""
    r, t = rt
    corners_v = box_corners(b) @ r.T + t
    box = cam.box_2d(corners_v, min_visible_px)
    if box is None:
        return None
    uv, front = cam.project(corners_v)
    return [round(v, 1) for v in box], (uv if front.all() else None)


def iou_xyxy(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    u = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / u if u > 0 else 0.0


def associate(proj: list[list[float]], dets: list[list[float]], min_iou: float
              ) -> dict[int, tuple[int, float]]:
    """Greedy one-to-one matching by IoU: ``{projection index: (detection index, IoU)}``."""
    pairs = sorted(((iou_xyxy(p, d), i, j) for i, p in enumerate(proj)
                    for j, d in enumerate(dets)), reverse=True)
    used_p: set[int] = set()
    used_d: set[int] = set()
    out = {}
    for iou, i, j in pairs:
        if iou < min_iou:
            break
        if i in used_p or j in used_d:
            continue
        used_p.add(i)
        used_d.add(j)
        out[i] = (j, iou)
    return out


@register("fusion.project")
class FusionProject(Labeler):
    """LiDAR boxes in camera images on ``/labels/<camera>/lidar_projection``."""

    suffix = "lidar_projection"
    Options = FusionOptions
    requires = "a lidar.clusters labeler on the same stream and a camera with calibration"

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        o = self.options
        self.model = ModelInfo("lidar-camera-projection", VERSION, "", {
            "min_iou": o.min_iou, "max_dt_ms": o.max_dt_ms,
            "min_visible_px": o.min_visible_px})
        self._cams: dict[str, PinholeCamera] = {}
        self._rt: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _cameras(self) -> dict[str, StreamInfo]:
        infos = self.context.infos if self.context else {}
        names = self.options.cameras
        return {n: i for n, i in infos.items() if i.kind == StreamKind.CAMERA and i.calibration
                and (names is None or n in names)}

    def accepts(self, info: StreamInfo) -> bool:
        if info.kind != StreamKind.LABEL or info.params.get("labeler") != "lidar.clusters":
            return False
        cams = self._cameras()
        if not cams:
            return False
        src = info.params.get("source", "")
        lidar = (self.context.infos.get(src) if self.context else None)
        self._rt[info.name] = lidar_to_vehicle(lidar.calibration if lidar else None,
                                               self.options.lidar_height_m)
        for name, ci in cams.items():
            self._cams[name] = PinholeCamera.from_calibration(
                ci.calibration, ci.params.get("width"), ci.params.get("height"))
        return True

    def outputs(self, info: StreamInfo) -> list[StreamInfo]:
        return [self.make_output(name, ci, self.suffix) for name, ci in self._cameras().items()]

    def label(self, sample: Sample) -> list[Sample]:
        boxes = sample.meta.get("detections")
        rt = self._rt.get(sample.stream)
        if boxes is None or rt is None:
            self.bad_input += 1
            return []
        o = self.options
        lidar = boxes[0]["stream"] if boxes else sample.stream
        out = []
        for cam_name, cam in self._cams.items():
            proj, kept = [], []
            for b in boxes:
                p = project_box(b["bbox3d"], rt, cam, o.min_visible_px)
                if p is not None:
                    proj.append(p)
                    kept.append(b)
            near = None
            if self.context is not None:
                near = self.context.nearest(label_stream(cam_name, o.detector_suffix),
                                            sample.t_ns, int(o.max_dt_ms * 1e6))
            d2 = [d for d in (near[1] if near else []) if d.get("box")]
            match = associate([p[0] for p in proj], [d["box"] for d in d2], o.min_iou)
            dets = []
            for i, ((box2d, uv), b) in enumerate(zip(proj, kept)):
                extra: dict[str, Any] = {"box": box2d, "bbox3d": b["bbox3d"],
                                         "points": b.get("points", 0), "lidar_stream": lidar}
                if uv is not None:
                    extra["corners_uv"] = [[round(float(x), 1), round(float(y), 1)]
                                           for x, y in uv]
                if i in match:
                    j, iou = match[i]
                    cls, score = d2[j]["cls"], d2[j]["score"] * iou
                    extra.update(match_iou=round(iou, 3), matched_box=d2[j]["box"])
                else:
                    cls, score = b["cls"], b["score"] * 0.5
                    extra["match_iou"] = 0.0
                dets.append(detection(cam_name, sample.t_ns, self.kind, cls, score, **extra))
            msg = image_annotations(sample.t_ns, dets, self.model, self.kind, cam_name)
            out.append(make_label(sample, label_stream(cam_name, self.suffix), msg, dets))
        return out
