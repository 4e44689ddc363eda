"""The synthetic world a scenario describes, evaluated at any true time.

True time is seconds since the run started (``t_s``) and, in nanoseconds, the agent's
monotonic timebase: ``true_ns = run_t0_ns + t_s * 1e9``. Every emulator stamps what it
sends on its own :class:`DeviceClock` and writes the true time beside it, so the agent's
``t_ns`` can be scored exactly.

Frames: world = local ENU (x east, y north, z up, metres). Vehicle frame: x forward,
y left, z up, origin on the ground under the rear axle; ``Pose.yaw`` is the heading
(radians from east, counter-clockwise).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np

from .scenario import DeviceSettings, Fault, Scenario, WorldObject

EARTH_R = 6_378_137.0


@dataclass(frozen=True)
class Pose:
    x: float
    y: float
    z: float
    yaw: float
    speed: float

    def to_vehicle(self, pts: np.ndarray) -> np.ndarray:
        """World points (N×3) into the vehicle frame."""
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        d = pts - np.array([self.x, self.y, self.z])
        return np.stack([c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1], d[:, 2]], 1)


@dataclass(frozen=True)
class ObjectState:
    """An object's box at one instant, in world coordinates (``center`` at mid-height)."""

    id: str
    cls: str
    center: tuple[float, float, float]
    size: tuple[float, float, float]
    yaw: float

    def corners(self) -> np.ndarray:
        """The 8 corners (8×3, world frame)."""
        l, w, h = self.size
        dx = np.array([1, 1, -1, -1, 1, 1, -1, -1]) * l / 2
        dy = np.array([1, -1, -1, 1, 1, -1, -1, 1]) * w / 2
        dz = np.array([-1, -1, -1, -1, 1, 1, 1, 1]) * h / 2
        c, s = math.cos(self.yaw), math.sin(self.yaw)
        return np.stack([self.center[0] + c * dx - s * dy, self.center[1] + s * dx + c * dy,
                         self.center[2] + dz], 1)


class DeviceClock:
    """A device's clock against true time: ``device = offset + true × (1 + drift_ppm·1e-6)``
    in integer nanoseconds. ``offset_s`` may be hours; arithmetic stays in ints."""

    def __init__(self, offset_s: float = 0.0, drift_ppm: float = 0.0, epoch_ns: int = 0):
        self.offset_ns = int(round(offset_s * 1e9))
        self.drift_ppm = drift_ppm
        self.epoch_ns = epoch_ns  # true time at which device = epoch + offset exactly

    def device_ns(self, true_ns: int) -> int:
        dt = true_ns - self.epoch_ns
        return self.epoch_ns + self.offset_ns + dt + int(round(dt * self.drift_ppm * 1e-6))

    def true_ns(self, device_ns: int) -> int:
        d = device_ns - self.epoch_ns - self.offset_ns
        return self.epoch_ns + int(round(d / (1 + self.drift_ppm * 1e-6)))

    def to_dict(self) -> dict[str, float]:
        return {"offset_ns": self.offset_ns, "drift_ppm": self.drift_ppm,
                "epoch_ns": self.epoch_ns}


class Jitter:
    """Arrival delay of a device's data: exponential with ``mean_ms`` plus rare spikes of
    ``spike_ms``; deterministic for a seed."""

    def __init__(self, s: DeviceSettings, seed: int):
        self.mean_s = s.jitter_mean_ms / 1e3
        self.spike_s = s.spike_ms / 1e3
        self.p = s.spike_prob
        self.rng = np.random.default_rng(seed)

    def delay_s(self) -> float:
        d = self.rng.exponential(self.mean_s) if self.mean_s > 0 else 0.0
        if self.p and self.rng.random() < self.p:
            d += self.spike_s
        return float(d)


class World:
    """Evaluates a scenario: vehicle pose, object boxes, lighting, events, faults."""

    def __init__(self, sc: Scenario):
        self.sc = sc
        self._legs: list[tuple[float, float, tuple[float, float], tuple[float, float]]] = []
        t = 0.0
        wp = sc.trajectory
        prev = (wp[0].x, wp[0].y)
        if wp[0].stop_s:
            self._legs.append((t, t + wp[0].stop_s, prev, prev))
            t += wp[0].stop_s
        for w in wp[1:]:
            cur = (w.x, w.y)
            dist = math.dist(prev, cur)
            if dist > 0:
                dur = dist / w.speed_mps
                self._legs.append((t, t + dur, prev, cur))
                t += dur
            if w.stop_s:
                self._legs.append((t, t + w.stop_s, cur, cur))
                t += w.stop_s
            prev = cur
        if not self._legs:
            self._legs.append((0.0, 1.0, prev, prev))
        self._leg_starts = [leg[0] for leg in self._legs]
        self.path_end_s = t

    # -- vehicle ----------------------------------------------------------------------
    def pose(self, t_s: float) -> Pose:
        """Vehicle pose at ``t_s``; after the path ends the vehicle stays put."""
        i = max(0, bisect.bisect_right(self._leg_starts, t_s) - 1)
        t0, t1, a, b = self._legs[i]
        if t_s >= t1:
            f = 1.0
        else:
            f = (t_s - t0) / (t1 - t0) if t1 > t0 else 0.0
        x, y = a[0] + f * (b[0] - a[0]), a[1] + f * (b[1] - a[1])
        moving = a != b and t0 <= t_s < t1
        yaw = self._heading(i)
        speed = math.dist(a, b) / (t1 - t0) if moving else 0.0
        return Pose(x, y, 0.0, yaw, speed)

    def _heading(self, i: int) -> float:
        # a stop keeps the heading of the last leg that moved (or the next one at start)
        for j in list(range(i, -1, -1)) + list(range(i + 1, len(self._legs))):
            _, _, a, b = self._legs[j]
            if a != b:
                return math.atan2(b[1] - a[1], b[0] - a[0])
        return 0.0

    def geodetic(self, x: float, y: float, z: float = 0.0) -> tuple[float, float, float]:
        """Local ENU metres → (lat, lon, alt) by a local tangent-plane approximation
        (exact to centimetres over a few kilometres)."""
        o = self.sc.origin
        lat = o.lat + math.degrees(y / EARTH_R)
        lon = o.lon + math.degrees(x / (EARTH_R * math.cos(math.radians(o.lat))))
        return lat, lon, o.alt + z

    # -- objects ----------------------------------------------------------------------
    def objects(self, t_s: float) -> list[ObjectState]:
        out = []
        for o in self.sc.objects:
            if t_s < o.appear_s or (o.vanish_s is not None and t_s >= o.vanish_s):
                continue
            out.append(self._object_at(o, t_s))
        for k, tc in enumerate(self.sc.clapper_s):
            if tc <= t_s < tc + 0.5:
                # the clapper's LiDAR sign: a board that appears 6 m ahead of the vehicle
                p = self.pose(tc)
                cx = p.x + 6 * math.cos(p.yaw)
                cy = p.y + 6 * math.sin(p.yaw)
                # thin along the line of sight (length 0.2 m), 1.5 m wide across it
                out.append(ObjectState(f"clapper-{k}", "sign", (cx, cy, 1.0), (0.2, 1.5, 2.0),
                                       p.yaw))
        return out

    @staticmethod
    def _object_at(o: WorldObject, t_s: float) -> ObjectState:
        l, w, h = o.size
        if len(o.path) < 2:
            x, y, z = o.position
            return ObjectState(o.id, o.cls, (x, y, z + h / 2), o.size, o.yaw)
        pts = o.path + [o.path[0]]
        lens = [math.dist(a, b) for a, b in zip(pts, pts[1:])]
        total = sum(lens) or 1.0
        d = ((t_s - o.appear_s) * o.speed_mps) % total
        for (a, b), seg in zip(zip(pts, pts[1:]), lens):
            if d <= seg and seg > 0:
                f = d / seg
                yaw = math.atan2(b[1] - a[1], b[0] - a[0])
                return ObjectState(o.id, o.cls, (a[0] + f * (b[0] - a[0]),
                                                 a[1] + f * (b[1] - a[1]), h / 2), o.size, yaw)
            d -= seg
        a = pts[0]
        return ObjectState(o.id, o.cls, (a[0], a[1], h / 2), o.size, 0.0)

    # -- scene-wide -------------------------------------------------------------------
    def brightness(self, t_s: float) -> float:
        """Light level (1 = normal) by linear interpolation of the lighting keyframes."""
        keys = self.sc.lighting
        if not keys:
            return 1.0
        ts = [k[0] for k in keys]
        return float(np.interp(t_s, ts, [k[1] for k in keys]))

    def clapper_active(self, t_s: float, width_s: float) -> int | None:
        """Index of the clapper whose flash/click covers ``t_s`` (within ``width_s``)."""
        for k, tc in enumerate(self.sc.clapper_s):
            if tc <= t_s < tc + width_s:
                return k
        return None

    @staticmethod
    def active_faults(settings: DeviceSettings, t_s: float) -> list[Fault]:
        return [f for f in settings.faults if f.t_s <= t_s < f.t_s + max(f.duration_s, 1e-9)]
