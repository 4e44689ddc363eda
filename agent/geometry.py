"""Camera geometry shared by the HIL renderer and the cross-modal labeler: a pinhole camera
with its pose in the vehicle frame, as given by a stream's ``[streams.calibration]``.

Calibration keys: ``fx, fy, cx, cy`` (pixels), ``width, height`` (optional) and
``extrinsics = {x, y, z, roll, pitch, yaw}`` — the camera's position (m) and orientation
(rad) in the vehicle frame (x forward, y left, z up). The camera looks along its own +x
before rotation; image u grows to the right, v downwards.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np


def _rot(roll: float, pitch: float, yaw: float) -> np.ndarray:
    cr, sr, cp, sp, cy, sy = (math.cos(roll), math.sin(roll), math.cos(pitch),
                              math.sin(pitch), math.cos(yaw), math.sin(yaw))
    rz = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]])
    ry = np.array([[cp, 0, sp], [0, 1, 0], [-sp, 0, cp]])
    rx = np.array([[1, 0, 0], [0, cr, -sr], [0, sr, cr]])
    return rz @ ry @ rx


@dataclass(frozen=True)
class PinholeCamera:
    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int
    position: tuple[float, float, float] = (0.0, 0.0, 0.0)
    rpy: tuple[float, float, float] = (0.0, 0.0, 0.0)

    @classmethod
    def from_calibration(cls, cal: dict[str, Any], width: int | None = None,
                         height: int | None = None) -> "PinholeCamera":
        ex = cal.get("extrinsics", {})
        return cls(float(cal["fx"]), float(cal["fy"]), float(cal["cx"]), float(cal["cy"]),
                   int(cal.get("width", width or round(2 * cal["cx"]))),
                   int(cal.get("height", height or round(2 * cal["cy"]))),
                   (ex.get("x", 0.0), ex.get("y", 0.0), ex.get("z", 0.0)),
                   (ex.get("roll", 0.0), ex.get("pitch", 0.0), ex.get("yaw", 0.0)))

    def vehicle_to_camera(self, pts: np.ndarray) -> np.ndarray:
        """Vehicle-frame points (N×3) → camera optical frame (x right, y down, z forward)."""
        r = _rot(*self.rpy)
        body = (pts - np.asarray(self.position)) @ r  # into camera body frame (x fwd)
        return np.stack([-body[:, 1], -body[:, 2], body[:, 0]], 1)

    def project(self, pts_vehicle: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Project vehicle-frame points. Returns ``(uv N×2, in_front N bool)``."""
        c = self.vehicle_to_camera(pts_vehicle)
        z = c[:, 2]
        front = z > 0.1
        zs = np.where(front, z, 1.0)
        uv = np.stack([self.fx * c[:, 0] / zs + self.cx, self.fy * c[:, 1] / zs + self.cy], 1)
        return uv, front

    def box_2d(self, corners_vehicle: np.ndarray, min_visible_px: float = 4.0
               ) -> tuple[float, float, float, float] | None:
        """Axis-aligned image box ``(x0, y0, x1, y1)`` of a 3D box's corners, clipped to the
        image; None when the box is behind the camera or less than ``min_visible_px``
        wide/high after clipping."""
        uv, front = self.project(corners_vehicle)
        if not front.all():
            if not front.any():
                return None
            uv = uv[front]
        x0, y0 = uv.min(0)
        x1, y1 = uv.max(0)
        x0, x1 = max(0.0, x0), min(float(self.width), x1)
        y0, y1 = max(0.0, y0), min(float(self.height), y1)
        if x1 - x0 < min_visible_px or y1 - y0 < min_visible_px:
            return None
        return float(x0), float(y0), float(x1), float(y1)
