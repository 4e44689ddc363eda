"""Training scenes for the HIL detector: random worlds rendered by :mod:`hil.render`, with
boxes from the renderer's ground truth, prepared exactly as ``camera.yolo`` prepares a
camera frame at run time (JPEG → reduced decode → letterbox).

Pure numpy/OpenCV (no torch), deterministic for ``(seed, index)``: image ``i`` of a
dataset only depends on ``numpy.random.default_rng([seed, i])``.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import cv2
import numpy as np

from agent.geometry import PinholeCamera
from agent.labelers.camera_yolo import decode_for_input, letterbox
from hil.render import default_calibration, render
from hil.scenario import Origin, Scenario, Waypoint, WorldObject
from hil.world import World

CLASSES = ["car", "pedestrian", "cyclist", "sign"]
SIZES = {"car": (4.5, 1.8, 1.5), "pedestrian": (0.5, 0.6, 1.75), "cyclist": (1.8, 0.6, 1.7),
         "sign": (0.2, 0.8, 2.4)}
CLASS_P = [0.36, 0.26, 0.2, 0.18]


@dataclass
class Item:
    """One prepared training image (model input, BGR uint8) and its boxes in input pixels.
    ``ignore`` marks boxes too small or too hidden to ask the model for (neither positive
    nor negative in the loss)."""

    image: np.ndarray
    boxes: np.ndarray   # K×4 float32, x0 y0 x1 y1 (input pixels)
    cls: np.ndarray     # K int64
    ignore: np.ndarray  # K bool


def random_scenario(rng: np.random.Generator) -> tuple[Scenario, float]:
    """A random street and a moment on it: a road of 2–4 legs with random turns, the vehicle
    somewhere along it — or stopped at its end, facing open ground (as at the end of a HIL
    drive) — and 0–12 objects of the four classes placed around the vehicle, mostly ahead.
    Returns the scenario and the time to render."""
    wps = [Waypoint(x=0, y=0)]
    heading = 0.0
    x = y = 0.0
    for _ in range(int(rng.integers(2, 5))):
        length = float(rng.uniform(30, 140))
        x, y = x + length * math.cos(heading), y + length * math.sin(heading)
        wps.append(Waypoint(x=x, y=y, speed_mps=10.0))
        heading += float(rng.choice([-1, 1])) * float(rng.uniform(0.3, math.pi / 2))
    road = Scenario(name="train", duration_s=10, origin=Origin(lat=48.0, lon=11.0),
                    trajectory=wps)
    world = World(road)
    t_s = (world.path_end_s + 5.0 if rng.random() < 0.2
           else float(rng.uniform(0, world.path_end_s)))
    pose = world.pose(t_s)
    c, s = math.cos(pose.yaw), math.sin(pose.yaw)
    objs = []
    for k in range(int(rng.integers(0, 13))):
        cls = CLASSES[int(rng.choice(4, p=CLASS_P))]
        size = tuple(float(v) for v in np.array(SIZES[cls]) * rng.uniform(0.85, 1.15, 3))
        # distance: many near, some far (the camera sees 5–120 m)
        d = float(4 + 110 * rng.random() ** 1.6)
        lat = float(rng.uniform(-1, 1) * (3 + 0.35 * d))
        yaw = float(rng.uniform(-math.pi, math.pi))
        if cls in ("car", "cyclist") and rng.random() < 0.6:  # in a lane, along the road
            lat = float(rng.choice([-3.5, 3.5]) + rng.normal(0, 0.6))
            yaw = float(rng.choice([0, math.pi]) + rng.normal(0, 0.15))
        if cls == "sign":
            yaw = float(rng.choice([math.pi / 2, -math.pi / 2, 0.0]) + rng.normal(0, 0.3))
        objs.append(WorldObject(id=f"o{k}", cls=cls, size=size,
                                position=(pose.x + c * d - s * lat, pose.y + s * d + c * lat,
                                          0.0), yaw=pose.yaw + yaw))
    return road.model_copy(update={"objects": objs}), t_s


N_CAMERAS = 8  # the renderer caches the sky/ground of up to 8 cameras: stay within it


@functools.lru_cache(maxsize=4)
def cameras(seed: int, width: int, height: int) -> list[PinholeCamera]:
    """The camera variants of a dataset: the HIL default first, then focal length ±10 %,
    mount height 1.2–1.7 m, small pitch and yaw."""
    rng = np.random.default_rng([seed, 1 << 30])
    out = [PinholeCamera.from_calibration(default_calibration(width, height))]
    while len(out) < N_CAMERAS:
        cal = default_calibration(width, height)
        cal["fx"] = cal["fy"] = cal["fx"] * float(rng.uniform(0.9, 1.1))
        ex = cal["extrinsics"]
        ex["z"] = float(rng.uniform(1.2, 1.7))
        ex["pitch"] = float(rng.normal(0, 0.02))
        ex["yaw"] = float(rng.normal(0, 0.03))
        out.append(PinholeCamera.from_calibration(cal))
    return out


def make_item(seed: int, index: int, in_h: int, in_w: int, width: int = 1280,
              height: int = 720, min_px: float = 4.0, min_visibility: float = 0.3) -> Item:
    """Render, JPEG-compress and prepare training image ``index`` of dataset ``seed``."""
    rng = np.random.default_rng([seed, index])
    sc, t_s = random_scenario(rng)
    cam = cameras(seed, width, height)[int(rng.integers(N_CAMERAS))]
    blur = int(rng.choice([0, 0, 0, 0, 0, 3, 5]))
    img, gt = render(World(sc), t_s, cam, brightness=float(rng.uniform(0.55, 1.4)),
                     blur_px=blur)
    q = int(rng.integers(70, 95))
    ok, jpg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, q])
    assert ok
    dec, factor = decode_for_input(jpg.tobytes(), in_h, in_w)
    assert dec is not None
    canvas, s, px, py = letterbox(dec, in_h, in_w)
    k = s / factor
    boxes, cls, ign = [], [], []
    for b in gt:
        x0, y0, x1, y1 = b.x0 * k + px, b.y0 * k + py, b.x1 * k + px, b.y1 * k + py
        boxes.append((x0, y0, x1, y1))
        cls.append(CLASSES.index(b.cls))
        ign.append(b.visibility < min_visibility or min(x1 - x0, y1 - y0) < min_px)
    return Item(canvas, np.asarray(boxes, np.float32).reshape(-1, 4),
                np.asarray(cls, np.int64), np.asarray(ign, bool))
