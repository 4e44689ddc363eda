"""``lidar.clusters``: object boxes from a LiDAR scan without a learned model (open3d).

Per scan (points in the sensor frame): drop empty returns, points nearer than
``min_range_m`` (the vehicle itself) or farther than ``max_range_m`` → voxel down-sample
(``voxel_m``) → ground plane by RANSAC (``segment_plane``; accepted only if its normal is
within ``max_tilt_deg`` of vertical, else the ground is ``z < -mount height + 0.2 m``) →
points between ``ground_m`` and ``max_height_m`` above the plane → DBSCAN
(``cluster_dbscan``, ``eps_m``, ``min_points``) → per cluster an oriented bird's-eye box
(``cv2.minAreaRect`` of the footprint; the length is the longer side, ``yaw`` its
heading) spanning ground to the cluster top. A footprint thinner than ``min_side_m`` (one
face seen) grows to it away from the sensor; a face 1.3–2.4 m wide and 1–2 m high whose
upper part spans its whole width (a vehicle's end, unlike a rider's torso) is completed to
``vehicle_length_m`` — the one size prior the labeler uses. Clusters bigger than
``max_footprint_m`` (walls, hedges) or lower than ``min_height_m`` are dropped, and so is a
box lying mostly inside a bigger one (a piece DBSCAN split off). Each box counts the *raw* non-ground
points inside it (``points``) and gets a size-based class guess (car, pedestrian,
cyclist, sign, else ``unknown``) with ``score`` = how well its size fits that class.

Labels: ``/labels/<lidar>/clusters`` as ``foxglove.SceneUpdate`` (one cube entity per box,
metadata ``class``, ``score``, ``points`` and the provenance keys) in the LiDAR's frame.
"""

from __future__ import annotations

import math
from typing import Any

import cv2
import numpy as np
from pydantic import Field

from agent.types import Sample, StreamInfo, StreamKind

from . import Labeler, LabelerOptions, ModelInfo, detection, make_label, register
from ._foxglove import scene_update

VERSION = "1.0"

# class → ((length lo, hi), (width lo, hi), (height lo, hi)) in metres, bird's-eye footprint
SIZE_CLASSES = {
    "car": ((2.8, 6.0), (1.3, 2.6), (1.0, 2.4)),
    "cyclist": ((1.2, 2.4), (0.3, 1.1), (1.2, 2.1)),
    "pedestrian": ((0.2, 1.2), (0.2, 1.1), (1.1, 2.2)),
    "sign": ((0.05, 1.2), (0.05, 1.2), (1.6, 4.0)),
}


class ClusterOptions(LabelerOptions):
    voxel_m: float = Field(default=0.1, ge=0, description="0 = no down-sampling")
    min_range_m: float = Field(default=1.5, ge=0)
    max_range_m: float = Field(default=60.0, gt=0)
    plane_distance_m: float = Field(default=0.15, gt=0)
    plane_iterations: int = Field(default=200, ge=10)
    max_tilt_deg: float = Field(default=15.0, gt=0, le=90)
    mount_height_m: float | None = Field(default=None, description="default: calibration z "
                                         "or 1.8 m")
    ground_m: float = Field(default=0.2, ge=0, description="points lower are ground")
    max_height_m: float = Field(default=4.0, gt=0)
    eps_m: float = Field(default=0.6, gt=0)
    min_points: int = Field(default=6, ge=1)
    min_box_points: int = Field(default=10, ge=1)
    min_height_m: float = Field(default=0.4, ge=0)
    min_side_m: float = Field(default=0.4, ge=0, description="thinner footprints grow to "
                              "this, away from the sensor")
    vehicle_length_m: float = Field(default=4.4, ge=0, description="length given to a "
                                    "vehicle seen end-on; 0 = off")
    max_footprint_m: float = Field(default=10.0, gt=0)
    seed: int = 0


def classify(l: float, w: float, h: float) -> tuple[str, float]:
    """Size-based class guess and a 0..1 fit score (1 = inside every range)."""
    best, best_s = "unknown", 0.0
    for cls, ranges in SIZE_CLASSES.items():
        s = 1.0
        for v, (lo, hi) in zip((l, w, h), ranges):
            if v < lo:
                s *= max(0.0, 1 - (lo - v) / lo)
            elif v > hi:
                s *= max(0.0, 1 - (v - hi) / hi)
        if s > best_s:
            best, best_s = cls, s
    return (best, best_s) if best_s >= 0.5 else ("unknown", best_s)


def points_xyz(payload: Any) -> np.ndarray | None:
    """N×3 float64 from a POINT_DTYPE array (or an N×3/N×4 float array); None otherwise."""
    if not isinstance(payload, np.ndarray):
        return None
    if payload.dtype.names and all(k in payload.dtype.names for k in ("x", "y", "z")):
        xyz = np.stack([payload["x"], payload["y"], payload["z"]], 1).astype(np.float64)
    elif payload.ndim == 2 and payload.shape[1] >= 3:
        xyz = payload[:, :3].astype(np.float64)
    else:
        return None
    ok = np.isfinite(xyz).all(1) & (np.abs(xyz).sum(1) > 0)
    return xyz[ok]


def in_boxes(xyz: np.ndarray, boxes: list[dict[str, Any]]) -> np.ndarray:
    """Count of points inside each box (oriented footprint and z range)."""
    counts = np.zeros(len(boxes), np.int64)
    for i, b in enumerate(boxes):
        cx, cy, cz = b["center"]
        l, w, h = b["size"]
        c, s = math.cos(b["yaw"]), math.sin(b["yaw"])
        dx, dy = xyz[:, 0] - cx, xyz[:, 1] - cy
        u, v = c * dx + s * dy, -s * dx + c * dy
        inside = ((np.abs(u) <= l / 2 + 1e-3) & (np.abs(v) <= w / 2 + 1e-3)
                  & (np.abs(xyz[:, 2] - cz) <= h / 2 + 1e-3))
        counts[i] = int(inside.sum())
    return counts


def _full_width(c: np.ndarray, ch: np.ndarray, cx: float, cy: float, yaw: float, a: float,
                top: float, bins: int = 5) -> bool:
    """True when points at 55–85 % of the cluster's height fill every one of ``bins`` slices
    of the face width: a vehicle's body and cabin do, a rider's or walker's torso does not.
    (The HIL LiDAR ray-casts objects as solid boxes, so there a cyclist seen side-on passes
    too and is completed as a vehicle.)"""
    u = (c[:, 0] - cx) * math.cos(yaw) + (c[:, 1] - cy) * math.sin(yaw)
    band = (ch > 0.55 * top) & (ch < 0.85 * top)
    if band.sum() < bins:
        return False
    idx = np.clip(((u[band] + a / 2) / a * bins).astype(int), 0, bins - 1)
    return len(np.unique(idx)) == bins


def _drop_contained(boxes: list[dict[str, Any]], share: float = 0.5) -> list[dict[str, Any]]:
    """Drop a box whose footprint lies at least ``share`` inside a bigger box (a piece of
    one object that DBSCAN split off, e.g. a roof edge seen at a grazing angle)."""
    from .score import _clip, _poly_area, bev_corners

    def fp(b: dict[str, Any]) -> dict[str, Any]:  # the footprint as seen, before growth
        return b.get("_raw", b)

    order = sorted(boxes, key=lambda b: -fp(b)["size"][0] * fp(b)["size"][1])
    kept: list[dict[str, Any]] = []
    for b in order:
        area = fp(b)["size"][0] * fp(b)["size"][1]
        pb = bev_corners(fp(b))
        if any(_poly_area(_clip(pb, bev_corners(k))) >= share * area for k in kept):
            continue
        kept.append(b)
    return kept


class ClusterBoxes:
    """The algorithm without the labeler plumbing: ``boxes(xyz) -> [dict]`` with
    ``center``, ``size`` (l, w, h), ``yaw``, ``points``, ``cls``, ``score``. Sensor frame."""

    def __init__(self, o: ClusterOptions | None = None, mount_height_m: float = 1.8):
        import open3d as o3d

        self.o3d = o3d
        self.o = o or ClusterOptions()
        self.mount_height_m = self.o.mount_height_m or mount_height_m
        o3d.utility.set_verbosity_level(o3d.utility.VerbosityLevel.Error)
        o3d.utility.random.seed(self.o.seed)

    def ground(self, pcd: Any) -> tuple[np.ndarray, np.ndarray]:
        """Plane ``(a, b, c, d)`` with ``c > 0`` (``ax+by+cz+d`` = height above ground)."""
        o = self.o
        if len(pcd.points) >= 50:
            plane, _ = pcd.segment_plane(o.plane_distance_m, 3, o.plane_iterations)
            n = np.asarray(plane[:3], float)
            norm = np.linalg.norm(n)
            if norm > 0:
                plane = np.asarray(plane, float) / norm
                if plane[2] < 0:
                    plane = -plane
                if math.degrees(math.acos(min(1.0, plane[2]))) <= o.max_tilt_deg:
                    return plane, np.array(True)
        return np.array([0.0, 0.0, 1.0, self.mount_height_m]), np.array(False)

    def boxes(self, xyz: np.ndarray) -> list[dict[str, Any]]:
        o, o3d = self.o, self.o3d
        r = np.hypot(xyz[:, 0], xyz[:, 1])
        xyz = xyz[(r >= o.min_range_m) & (r <= o.max_range_m)]
        if len(xyz) < o.min_points:
            return []
        pcd = o3d.geometry.PointCloud(o3d.utility.Vector3dVector(xyz))
        if o.voxel_m > 0:
            pcd = pcd.voxel_down_sample(o.voxel_m)
        plane, _ = self.ground(pcd)
        pts = np.asarray(pcd.points)
        hgt = pts @ plane[:3] + plane[3]
        keep = (hgt > o.ground_m) & (hgt < o.max_height_m)
        obj = pts[keep]
        if len(obj) < o.min_points:
            return []
        labels = np.asarray(o3d.geometry.PointCloud(o3d.utility.Vector3dVector(obj))
                            .cluster_dbscan(o.eps_m, o.min_points, print_progress=False))
        raw_h = xyz @ plane[:3] + plane[3]
        raw_obj = xyz[(raw_h > o.ground_m) & (raw_h < o.max_height_m)]
        out = []
        for k in range(int(labels.max()) + 1 if labels.size else 0):
            c = obj[labels == k]
            if len(c) < o.min_points:
                continue
            (cx, cy), (a, b), ang = cv2.minAreaRect(c[:, :2].astype(np.float32))
            yaw = math.radians(ang)
            if b > a:
                a, b = b, a
                yaw += math.pi / 2
            yaw = (yaw + math.pi / 2) % math.pi - math.pi / 2
            a, b = max(a, o.voxel_m or 0.05), max(b, o.voxel_m or 0.05)
            ch = c @ plane[:3] + plane[3]
            top = float(ch.max())
            if a > o.max_footprint_m or top < o.min_height_m:
                continue
            raw = {"center": [cx, cy], "size": [a, b], "yaw": yaw}
            depth = o.min_side_m
            if (o.vehicle_length_m and b < 0.7 and 1.3 <= a <= 2.4 and 1.0 <= top <= 2.0
                    and _full_width(c, ch, cx, cy, yaw, a, top)):
                depth = o.vehicle_length_m  # a vehicle's end face: complete its length
            if b < depth:
                # seen from one side only: the unseen depth lies away from the sensor
                nx, ny = -math.sin(yaw), math.cos(yaw)  # the short axis
                sgn = 1.0 if nx * cx + ny * cy >= 0 else -1.0
                shift = (depth - b) / 2 * sgn
                cx, cy, b = cx + nx * shift, cy + ny * shift, depth
                if b > a:
                    a, b = b, a
                    yaw = (yaw + math.pi) % math.pi - math.pi / 2
            a, b = max(a, o.min_side_m), max(b, o.min_side_m)
            # box from the ground to the top, centred on the plane below the footprint
            gz = -(plane[3] + plane[0] * cx + plane[1] * cy) / plane[2]
            box = {"center": [float(cx), float(cy), float(gz + top / 2)],
                   "size": [float(a), float(b), top], "yaw": float(yaw), "_raw": raw}
            out.append(box)
        out = _drop_contained(out)
        for box in out:
            del box["_raw"]
        counts = in_boxes(raw_obj, out)
        res = []
        for box, n in zip(out, counts):
            if n < o.min_box_points:
                continue
            cls, fit = classify(*box["size"])
            res.append({**box, "points": int(n), "cls": cls,
                        "score": round(float(fit), 3)})
        return res


@register("lidar.clusters")
class LidarClusters(Labeler):
    """3D boxes on ``/labels/<lidar>/clusters`` as SceneUpdate."""

    suffix = "clusters"
    Options = ClusterOptions

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        # open3d takes a second or more to import: do it now, while the pipeline loads
        # its models before any device opens, not after (data would pile up meanwhile)
        import open3d  # noqa: F401

        o = self.options
        self.model = ModelInfo("ransac-dbscan-clusters", VERSION, "", {
            "voxel_m": o.voxel_m, "plane_distance_m": o.plane_distance_m,
            "eps_m": o.eps_m, "min_points": o.min_points, "min_box_points": o.min_box_points,
            "max_range_m": o.max_range_m})
        self._algo: dict[str, ClusterBoxes] = {}
        self._frame: dict[str, str] = {}
        self._period_ns: dict[str, int] = {}

    def accepts(self, info: StreamInfo) -> bool:
        ok = info.kind == StreamKind.LIDAR and info.encoding == "points"
        if ok:
            z = ((info.calibration or {}).get("extrinsics") or {}).get("z")
            self._algo[info.name] = ClusterBoxes(self.options, float(z) if z else 1.8)
            self._frame[info.name] = info.frame_id or info.name.strip("/").replace("/", "_")
            self._period_ns[info.name] = int(2e9 / info.rate_hz) if info.rate_hz else 0
        return ok

    def output_encoding(self) -> tuple[str, dict[str, Any]]:
        from foxglove_schemas_protobuf.SceneUpdate_pb2 import SceneUpdate

        return "protobuf", {"proto_class": SceneUpdate}

    def label(self, sample: Sample) -> list[Sample]:
        xyz = points_xyz(sample.payload)
        algo = self._algo.get(sample.stream)
        if xyz is None or algo is None:
            self.bad_input += 1
            return []
        boxes = algo.boxes(xyz)
        dets = [detection(sample.stream, sample.t_ns, self.kind, b["cls"], b["score"],
                          bbox3d={"center": [round(v, 3) for v in b["center"]],
                                  "size": [round(v, 3) for v in b["size"]],
                                  "yaw": round(b["yaw"], 4)},
                          points=b["points"]) for b in boxes]
        msg = scene_update(sample.t_ns, self._frame[sample.stream], dets, self.model,
                           self.kind, sample.stream, self._period_ns.get(sample.stream, 0))
        return [make_label(sample, self.out_stream(sample.stream), msg, dets)]
