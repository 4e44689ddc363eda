"""The frame renderer: the synthetic world seen through a pinhole camera on the vehicle.

    img, boxes = render(world, t_s, camera)          # BGR uint8 (camera.height × width × 3)

Used by the camera emulator for every frame and by the labeler work to make training
images, so it depends only on the world, a time and a :class:`agent.geometry.PinholeCamera`.
Pure function of its arguments (deterministic; no clocks, no randomness); thread-safe —
the only shared state is a cache of pre-rendered backgrounds and road geometry.

What is drawn: sky and ground (pre-rendered once per camera, exact for any mount pose),
the road along the vehicle's trajectory with a dashed centre line, and every object by
class with shaded faces: ``car`` (body, darker window cabin, wheels), ``pedestrian``
(legs, torso, head), ``cyclist`` (two wheels, frame, rider), ``sign`` (pole and plate).
Parts are painted far to near. Lighting scales the whole frame by the world's brightness;
``flash`` (the clapper) turns it white; ``blur_px``/``overexpose`` are image defects.

Ground truth: one :class:`GtBox` per object whose 3D box projects to at least 4×4 px in
the image (:meth:`PinholeCamera.box_2d`), in pixels, with ``visibility`` = the share of
the object's own silhouette that is neither covered by nearer objects nor outside the
frame. A flash frame shows nothing, so it has no boxes.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import asdict, dataclass
from typing import Any

import cv2
import numpy as np

from agent.geometry import PinholeCamera, _rot

from .world import ObjectState, Pose, World

NEAR_M = 0.2            # near clipping plane (camera z)
FAR_M = 250.0           # objects and road farther than this are not drawn
ROAD_HALF_W = 5.0
MASK_SCALE = 4          # visibility masks are 1/4 of the image in each direction
_LIGHT = np.array([0.35, 0.25, 0.9]) / np.linalg.norm([0.35, 0.25, 0.9])

# class colours, BGR
SKY_TOP, SKY_HORIZON = (200, 130, 70), (235, 215, 190)
GROUND_NEAR, GROUND_FAR = (70, 120, 95), (150, 170, 160)
ROAD, ROAD_LINE = (85, 85, 85), (230, 230, 230)
CAR_BODY, CAR_WINDOW, TYRE = (190, 95, 35), (70, 45, 35), (25, 25, 25)
PED_TORSO, PED_LEGS, SKIN = (170, 50, 190), (100, 45, 30), (140, 175, 225)
CYC_JERSEY, CYC_FRAME = (40, 210, 230), (60, 170, 40)
SIGN_POLE, SIGN_PLATE = (160, 160, 160), (40, 40, 210)


@dataclass(frozen=True)
class GtBox:
    """A ground-truth 2D box in pixels (``x0, y0`` top-left, ``x1, y1`` bottom-right,
    clipped to the image) of object ``id`` of class ``cls``; ``depth_m`` is the distance
    of the box centre along the optical axis."""

    id: str
    cls: str
    x0: float
    y0: float
    x1: float
    y1: float
    visibility: float
    depth_m: float

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("x0", "y0", "x1", "y1"):
            d[k] = round(d[k], 1)
        d["visibility"] = round(d["visibility"], 3)
        d["depth_m"] = round(d["depth_m"], 2)
        return d


def default_calibration(width: int, height: int) -> dict[str, Any]:
    """A plausible forward camera for ``width × height``: ~58° horizontal field of view
    (fx = fy = 0.9·width), principal point at the centre, mounted 1.5 m ahead of the rear
    axle and 1.4 m up, looking forward. The dict a rig's ``[streams.calibration]`` holds."""
    f = round(0.9 * width, 3)
    return {"fx": f, "fy": f, "cx": width / 2, "cy": height / 2, "width": width,
            "height": height,
            "extrinsics": {"x": 1.5, "y": 0.0, "z": 1.4, "roll": 0.0, "pitch": 0.0,
                           "yaw": 0.0}}


# -- parts --------------------------------------------------------------------------------
# A part is (kind, local points N×3, colour, thickness). kind "box": points are the 8
# corners (indices as in _BOX_FACES), drawn as its visible faces with shading; "poly":
# a filled planar polygon; "line": an open polyline of given thickness in metres.
_BOX_FACES = ((0, 1, 2, 3), (4, 5, 6, 7), (0, 1, 5, 4), (1, 2, 6, 5), (2, 3, 7, 6),
              (3, 0, 4, 7))
_FACE_IDX = np.array(_BOX_FACES)
_FACE_NORMALS = np.array([[0, 0, -1], [0, 0, 1], [1, 0, 0], [0, -1, 0], [-1, 0, 0], [0, 1, 0]],
                         float)


def _box(x0: float, x1: float, y0: float, y1: float, z0: float, z1: float) -> np.ndarray:
    return np.array([[x1, y1, z0], [x1, y0, z0], [x0, y0, z0], [x0, y1, z0],
                     [x1, y1, z1], [x1, y0, z1], [x0, y0, z1], [x0, y1, z1]], float)


def _disc(cx: float, y: float, cz: float, r: float, n: int = 12) -> np.ndarray:
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + r * np.cos(a), np.full(n, y), cz + r * np.sin(a)], 1)


def _facing_disc(cx: float, cy: float, cz: float, r: float, n: int = 10) -> np.ndarray:
    """A disc in the local y–z plane; drawn together with an x–z disc it reads as a round
    head from any direction."""
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([np.full(n, cx), cy + r * np.cos(a), cz + r * np.sin(a)], 1)


@functools.lru_cache(maxsize=256)
def _parts(cls: str, size: tuple[float, float, float]
           ) -> tuple[tuple[str, np.ndarray, tuple[int, int, int], float], ...]:
    """The drawing parts of an object of class ``cls`` and ``size`` (cached, read-only)."""
    out = tuple(_make_parts(cls, size))
    for part in out:
        part[1].setflags(write=False)
    return out


def _make_parts(cls: str, size: tuple[float, float, float]
                ) -> list[tuple[str, np.ndarray, tuple[int, int, int], float]]:
    l, w, h = size
    if cls == "car":
        r = min(0.36, 0.23 * h)
        parts = [("box", _box(-l / 2, l / 2, -w / 2, w / 2, 0.6 * r, 0.62 * h), CAR_BODY, 0),
                 ("box", _box(-0.3 * l, 0.2 * l, -0.44 * w, 0.44 * w, 0.62 * h, h),
                  CAR_WINDOW, 0)]
        for sx in (-0.32 * l, 0.32 * l):
            for sy in (-w / 2 - 0.01, w / 2 + 0.01):
                parts.append(("poly", _disc(sx, sy, r, r), TYRE, 0))
        return parts
    if cls == "pedestrian":
        k = h / 1.75
        return [("box", _box(-0.12, 0.12, -0.14, 0.14, 0, 0.48 * h), PED_LEGS, 0),
                ("box", _box(-0.13, 0.13, -0.22, 0.22, 0.48 * h, 0.84 * h), PED_TORSO, 0),
                ("poly", _facing_disc(0, 0, 0.92 * h, 0.11 * k), SKIN, 0),
                ("poly", _disc(0, 0, 0.92 * h, 0.11 * k), SKIN, 0)]
    if cls == "cyclist":
        k = h / 1.7
        r, xb = 0.34 * k, 0.3 * l
        return [("line", _disc(-xb, 0, r, r, 16), TYRE, 0.05),
                ("line", _disc(xb, 0, r, r, 16), TYRE, 0.05),
                ("line", np.array([[-xb, 0, r], [-0.05, 0, 0.95 * r], [0.1, 0, 0.95 * k],
                                   [xb - 0.05, 0, 1.05 * k], [xb, 0, r]]), CYC_FRAME, 0.04),
                ("line", np.array([[-0.1, 0, 0.95 * k], [0.0, 0, 0.5 * k], [-0.05, 0, 0.3]]),
                 PED_LEGS, 0.1),
                ("box", _box(-0.25, 0.1, -0.18, 0.18, 0.95 * k, 1.45 * k), CYC_JERSEY, 0),
                ("poly", _facing_disc(0.12, 0, 1.56 * k, 0.11 * k), SKIN, 0),
                ("poly", _disc(0.12, 0, 1.56 * k, 0.11 * k), SKIN, 0)]
    # sign: the plate spans the larger horizontal dimension and faces along the other
    if w >= l:
        plate = _box(-max(l, 0.03) / 2, max(l, 0.03) / 2, -w / 2, w / 2, 0.62 * h, h)
    else:
        plate = _box(-l / 2, l / 2, -max(w, 0.03) / 2, max(w, 0.03) / 2, 0.62 * h, h)
    return [("box", _box(-0.04, 0.04, -0.04, 0.04, 0, 0.62 * h), SIGN_POLE, 0),
            ("box", plate, SIGN_PLATE, 0)]


# -- camera-space helpers -----------------------------------------------------------------
class _View:
    """World → camera optical frame for one pose; projection and near-plane clipping."""

    def __init__(self, camera: PinholeCamera, pose: Pose):
        self.cam = camera
        c, s = math.cos(pose.yaw), math.sin(pose.yaw)
        # world → vehicle is d ↦ Rvᵀ(d − p); vehicle → body is ↦ Rcᵀ(v − pos);
        # body → optical permutes axes. Compose into one affine map.
        rv = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
        rc = _rot(*camera.rpy)
        perm = np.array([[0, -1, 0], [0, 0, -1], [1, 0, 0]], float)
        self.m = perm @ rc.T @ rv.T
        self.t = -(perm @ rc.T @ (rv.T @ np.array([pose.x, pose.y, pose.z])
                                  + np.asarray(camera.position, float)))
        self.pose = pose

    def to_cam(self, pts_world: np.ndarray) -> np.ndarray:
        return pts_world @ self.m.T + self.t

    def project(self, pc: np.ndarray) -> np.ndarray:
        z = pc[:, 2]
        uv = np.empty((len(pc), 2))
        uv[:, 0] = self.cam.fx * pc[:, 0] / z + self.cam.cx
        uv[:, 1] = self.cam.fy * pc[:, 1] / z + self.cam.cy
        return np.clip(uv, -1e6, 1e6)


def _clip_near(poly: np.ndarray) -> np.ndarray:
    """Sutherland–Hodgman against the plane z = NEAR_M (keeps z ≥ NEAR_M)."""
    out = []
    n = len(poly)
    for i in range(n):
        a, b = poly[i], poly[(i + 1) % n]
        ina, inb = a[2] >= NEAR_M, b[2] >= NEAR_M
        if ina:
            out.append(a)
        if ina != inb:
            f = (NEAR_M - a[2]) / (b[2] - a[2])
            out.append(a + f * (b - a))
    return np.array(out) if out else np.empty((0, 3))


_SHIFT = 4


def _fix(uv: np.ndarray, scale: float = 1.0) -> np.ndarray:
    return np.round(uv * (scale * (1 << _SHIFT))).astype(np.int32)


# -- cached static geometry ---------------------------------------------------------------
_cache_lock = threading.Lock()
_bg_cache: dict[PinholeCamera, np.ndarray] = {}
_road_cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def background(camera: PinholeCamera) -> np.ndarray:
    """Sky and ground as seen by ``camera`` on level ground (read-only array, cached)."""
    with _cache_lock:
        bg = _bg_cache.get(camera)
    if bg is not None:
        return bg
    w, h = camera.width, camera.height
    u, v = np.meshgrid(np.arange(w, dtype=np.float32) + 0.5,
                       np.arange(h, dtype=np.float32) + 0.5)
    ox, oy = (u - camera.cx) / camera.fx, (v - camera.cy) / camera.fy
    body = np.stack([np.ones_like(ox), -ox, -oy], -1)           # x fwd, y left, z up
    d = body @ _rot(*camera.rpy).T.astype(np.float32)
    d /= np.linalg.norm(d, axis=-1, keepdims=True)
    dz = d[..., 2]
    height_m = max(camera.position[2], 0.05)
    ground = dz < -1e-4
    dist = np.where(ground, height_m / np.maximum(-dz, 1e-4), np.inf)
    fg = np.clip(1.0 - np.exp(-dist / 60.0), 0, 1)[..., None]         # haze with distance
    gcol = (1 - fg) * np.array(GROUND_NEAR) + fg * np.array(GROUND_FAR)
    fs = np.clip(dz / 0.5, 0, 1)[..., None]                            # sky by elevation
    scol = (1 - fs) * np.array(SKY_HORIZON) + fs * np.array(SKY_TOP)
    bg = np.where(ground[..., None], gcol, scol).astype(np.uint8)
    bg.setflags(write=False)
    with _cache_lock:
        if len(_bg_cache) > 8:
            _bg_cache.clear()
        _bg_cache[camera] = bg
    return bg


def _road(world: World) -> tuple[np.ndarray, np.ndarray]:
    """Road quads (Q×4×3) along the trajectory in ≤10 m pieces, and centre-line dashes."""
    key = tuple((w.x, w.y) for w in world.sc.trajectory)
    with _cache_lock:
        got = _road_cache.get(key)
    if got is not None:
        return got
    quads, dashes = [], []
    pts = [p for i, p in enumerate(key) if i == 0 or p != key[i - 1]]
    for a, b in zip(pts, pts[1:]):
        a, b = np.array(a, float), np.array(b, float)
        length = float(np.linalg.norm(b - a))
        d = (b - a) / length
        n = np.array([-d[1], d[0]])
        ext0, ext1 = -ROAD_HALF_W, length + ROAD_HALF_W   # overlap fills the corners
        k = max(1, math.ceil((ext1 - ext0) / 10.0))
        for i in range(k):
            s0 = ext0 + (ext1 - ext0) * i / k
            s1 = ext0 + (ext1 - ext0) * (i + 1) / k
            p0, p1 = a + d * s0, a + d * s1
            quads.append([(*(p0 + n * ROAD_HALF_W), 0), (*(p1 + n * ROAD_HALF_W), 0),
                          (*(p1 - n * ROAD_HALF_W), 0), (*(p0 - n * ROAD_HALF_W), 0)])
        s = 2.0
        while s + 3.0 < length:
            p0, p1 = a + d * s, a + d * (s + 3.0)
            dashes.append([(*(p0 + n * 0.08), 0.01), (*(p1 + n * 0.08), 0.01),
                           (*(p1 - n * 0.08), 0.01), (*(p0 - n * 0.08), 0.01)])
            s += 9.0
    got = (np.array(quads, float).reshape(-1, 4, 3), np.array(dashes, float).reshape(-1, 4, 3))
    with _cache_lock:
        _road_cache[key] = got
    return got


def _draw_ground_polys(img: np.ndarray, view: _View, polys: np.ndarray,
                       colour: tuple[int, int, int]) -> None:
    if not len(polys):
        return
    p = view.pose
    centre = polys.mean(1)
    near = np.hypot(centre[:, 0] - p.x, centre[:, 1] - p.y) < FAR_M
    polys = polys[near]
    if not len(polys):
        return
    pc = view.to_cam(polys.reshape(-1, 3)).reshape(-1, 4, 3)
    z = pc[..., 2]
    full = (z >= NEAR_M).all(1)
    some = (z >= NEAR_M).any(1) & ~full
    out = []
    if full.any():
        uv = view.project(pc[full].reshape(-1, 3)).reshape(-1, 4, 2)
        out.extend(_fix(uv))
    for q in pc[some]:
        c = _clip_near(q)
        if len(c) >= 3:
            out.append(_fix(view.project(c)))
    if out:
        cv2.fillPoly(img, out, colour, cv2.LINE_8, _SHIFT)


# -- the renderer -------------------------------------------------------------------------
def _shade(colour: tuple[int, int, int], normal_world: np.ndarray) -> tuple[int, ...]:
    k = 0.55 + 0.45 * max(0.0, float(normal_world @ _LIGHT))
    return tuple(int(min(255, c * k)) for c in colour)


def _object_draw_list(view: _View, o: ObjectState, idx: int) -> list[tuple]:
    """Drawing commands ``(depth, idx, kind, uv-or-points, colour, thickness_px)``."""
    c, s = math.cos(o.yaw), math.sin(o.yaw)
    rot = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])
    base = np.array([o.center[0], o.center[1], o.center[2] - o.size[2] / 2])
    cmds = []
    for kind, local, colour, thick in _parts(o.cls, tuple(o.size)):
        wpts = local @ rot.T + base
        pc = view.to_cam(wpts)
        if (pc[:, 2] < NEAR_M).all():
            continue
        depth = float(np.linalg.norm(pc.mean(0)))
        if kind == "box":
            faces = pc[_FACE_IDX]                                     # 6×4×3
            centres = faces.mean(1)
            n_world = _FACE_NORMALS @ rot.T
            n_cam = n_world @ view.m.T
            for k in np.nonzero((n_cam * centres).sum(1) < 0)[0]:   # facing the camera
                f = faces[k]
                if (f[:, 2] < NEAR_M).any():
                    f = _clip_near(f)
                    if len(f) < 3:
                        continue
                cmds.append((depth, idx, "poly", _fix(view.project(f)),
                             _shade(colour, n_world[k]), 0))
        elif kind == "poly":
            f = _clip_near(pc) if (pc[:, 2] < NEAR_M).any() else pc
            if len(f) >= 3:
                cmds.append((depth, idx, "poly", _fix(view.project(f)), colour, 0))
        else:  # line
            if (pc[:, 2] < NEAR_M).any():
                continue
            px = max(1, int(round(view.cam.fx * thick / max(depth, NEAR_M))))
            closed = np.allclose(local[0], local[-1]) or len(local) >= 12
            cmds.append((depth, idx, "line" + ("c" if closed else ""),
                         _fix(view.project(pc)), colour, px))
    return cmds


def _paint(img: np.ndarray, cmds: list[tuple], scale: float = 1.0,
           ids: bool = False) -> None:
    for _depth, idx, kind, pts, colour, px in cmds:
        col = idx + 1 if ids else colour
        p = pts if scale == 1.0 else np.round(pts * scale).astype(np.int32)
        if kind == "poly":
            cv2.fillPoly(img, [p], col, cv2.LINE_8, _SHIFT)
        else:
            cv2.polylines(img, [p], kind == "linec", col, max(1, int(px * scale)),
                          cv2.LINE_8, _SHIFT)


def render(world: World, t_s: float, camera: PinholeCamera, brightness: float | None = None,
           *, flash: bool = False, blur_px: int = 0, overexpose: float = 0.0,
           min_visibility: float = 0.0) -> tuple[np.ndarray, list[GtBox]]:
    """Render the world at scenario time ``t_s`` through ``camera`` (mounted on the
    vehicle). ``brightness`` defaults to ``world.brightness(t_s)`` (1 = normal).

    Returns ``(image, boxes)``: a new BGR uint8 array of ``camera.height × camera.width``
    and the ground-truth boxes (nearest first) of objects with ``visibility >
    min_visibility`` (0 keeps partly visible ones; fully hidden ones are never listed).
    ``flash`` renders the clapper (white frame, no boxes). ``blur_px`` box-blurs with that
    kernel size; ``overexpose`` (0..1) adds gain and offset until highlights clip.
    """
    w, h = camera.width, camera.height
    if flash:
        return np.full((h, w, 3), 255, np.uint8), []
    pose = world.pose(t_s)
    view = _View(camera, pose)
    img = background(camera).copy()
    quads, dashes = _road(world)
    _draw_ground_polys(img, view, quads, ROAD)
    _draw_ground_polys(img, view, dashes, ROAD_LINE)

    objs = [o for o in world.objects(t_s)
            if math.hypot(o.center[0] - pose.x, o.center[1] - pose.y) < FAR_M]
    per_obj = [_object_draw_list(view, o, i) for i, o in enumerate(objs)]
    cmds = sorted((c for cs in per_obj for c in cs), key=lambda c: -c[0])
    _paint(img, cmds)

    boxes: list[GtBox] = []
    if objs:
        ms = 1.0 / MASK_SCALE
        mh, mw = -(-h // MASK_SCALE), -(-w // MASK_SCALE)
        mask = np.zeros((mh, mw), np.uint8 if len(objs) < 255 else np.uint16)
        _paint(mask, cmds, ms, ids=True)
        visible = np.bincount(mask.ravel(), minlength=len(objs) + 1)
        for i, o in enumerate(objs):
            if not per_obj[i]:
                continue
            corners_v = pose.to_vehicle(o.corners())
            box = camera.box_2d(corners_v)
            if box is None or visible[i + 1] == 0:
                continue
            full = _solo_area(per_obj[i], w, h, ms)
            vis = min(1.0, visible[i + 1] / full) if full else 0.0
            if vis <= min_visibility:
                continue
            depth = float(camera.vehicle_to_camera(corners_v.mean(0, keepdims=True))[0, 2])
            boxes.append(GtBox(o.id, o.cls, *box, float(vis), depth))
        boxes.sort(key=lambda b: b.depth_m)

    b = world.brightness(t_s) if brightness is None else brightness
    if overexpose > 0:
        img = cv2.convertScaleAbs(img, alpha=b * (1 + 2.5 * overexpose), beta=90 * overexpose)
    elif abs(b - 1.0) > 1e-3:
        img = cv2.convertScaleAbs(img, alpha=b)
    if blur_px > 1:
        img = cv2.blur(img, (int(blur_px), int(blur_px)))
    return img, boxes


def _solo_area(cmds: list[tuple], w: int, h: int, ms: float) -> int:
    """Silhouette pixels of one object alone on a mask canvas with one image of margin
    on every side (so a partly out-of-frame object's full area is known)."""
    mh, mw = -(-h // MASK_SCALE), -(-w // MASK_SCALE)
    canvas = np.zeros((3 * mh, 3 * mw), np.uint8)
    off = np.array([mw, mh]) * (1 << _SHIFT)
    shifted = [(d, 0, k, np.round(p * ms).astype(np.int32) + off, c, px * ms)
               for d, _i, k, p, c, px in cmds]
    _paint(canvas, shifted, 1.0, ids=True)
    return int(np.count_nonzero(canvas))
