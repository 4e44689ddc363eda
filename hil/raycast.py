"""Ray casting the synthetic world for the emulated LiDAR (open3d ``RaycastingScene``).

The scene holds a flat ground plane (z = 0, world frame) and every object box of
:meth:`hil.world.World.objects` (clapper boards included) as 12 triangles. It is rebuilt
only when the set of boxes changed since the last cast; the rays (one per pixel of the
sensor's range image, origins and unit directions in the *sensor* frame) are fixed and
moved into the world by the vehicle pose on each cast.

Frames: the sensor frame is the vehicle frame (x forward, y left, z up) shifted by the
mount position ``mount_xyz`` (default 1.9 m above the ground under the rear axle); there
is no mounting rotation. ``cast`` is called by one thread (the emulator's render thread);
it blocks for the cast (~5 ms for 65,536 rays on 2 cores; open3d uses its own threads).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from .world import ObjectState, Pose

#: box faces as triangles over the corner order of :meth:`ObjectState.corners`
#: (0-3 bottom, 4-7 top, counter-clockwise seen from above), outward normals
_BOX_TRIANGLES = np.array([
    [0, 2, 1], [0, 3, 2],  # bottom
    [4, 5, 6], [4, 6, 7],  # top
    [0, 1, 5], [0, 5, 4],  # front (+x)
    [2, 3, 7], [2, 7, 6],  # back
    [1, 2, 6], [1, 6, 5],  # right (-y)
    [3, 0, 4], [3, 4, 7],  # left (+y)
], dtype=np.uint32)

#: pause between slices of GIL-holding work: long enough that a thread waiting for the GIL
#: (the packet sender) really gets it — ``sleep(0)`` lets the same thread take it back
YIELD_S = 0.0002

GROUND = -1  # ``hit_object`` value for the ground plane
NOTHING = -2  # no return within range


@dataclass
class Hits:
    """One cast: per ray the range in metres (``inf`` where nothing was hit within
    ``max_range_m``), which object was hit (index into the ``objects`` list given to
    ``cast``, ``GROUND`` or ``NOTHING``) and the cosine of the incidence angle."""

    range_m: np.ndarray  # float32 (N,)
    hit_object: np.ndarray  # int32 (N,)
    cos_incidence: np.ndarray  # float32 (N,)


class Raycaster:
    """Casts a fixed bundle of sensor rays into the world at a vehicle pose.

    ``origins``/``directions`` are (N, 3) in the sensor frame (directions unit length).
    """

    def __init__(self, origins: np.ndarray, directions: np.ndarray,
                 mount_xyz: tuple[float, float, float] = (0.0, 0.0, 1.9),
                 max_range_m: float = 120.0, ground_half_m: float = 5000.0, nthreads: int = 1,
                 chunk: int = 8192):
        import open3d.core as o3c  # lazy: open3d is heavy to import

        self._o3c = o3c
        self.origins = np.asarray(origins, np.float32) + np.asarray(mount_xyz, np.float32)
        d = np.asarray(directions, np.float32)
        self.directions = d / np.linalg.norm(d, axis=1, keepdims=True)
        self.mount = np.asarray(mount_xyz, np.float64)
        self.max_range_m = float(max_range_m)
        #: open3d worker threads (0 = all cores). One by default: a cast that takes every
        #: core starves the emulator's packet sender and makes its packets late.
        self.nthreads = nthreads
        self.chunk = chunk
        g = ground_half_m
        self._ground_v = np.array([[-g, -g, 0], [g, -g, 0], [g, g, 0], [-g, g, 0]], np.float32)
        self._ground_t = np.array([[0, 1, 2], [0, 2, 3]], np.uint32)
        self._scene = None
        self._scene_key: tuple | None = None
        self._geom_to_obj: dict[int, int] = {}
        self.rebuilds = 0
        self._rays = np.empty((len(self.origins), 6), np.float32)

    def _build(self, objects: list[ObjectState]) -> None:
        import open3d as o3d

        o3c = self._o3c
        scene = o3d.t.geometry.RaycastingScene(nthreads=self.nthreads)
        gid = scene.add_triangles(o3c.Tensor(self._ground_v), o3c.Tensor(self._ground_t))
        mapping = {int(gid): GROUND}
        for i, ob in enumerate(objects):
            v = ob.corners().astype(np.float32)
            gid = scene.add_triangles(o3c.Tensor(v), o3c.Tensor(_BOX_TRIANGLES))
            mapping[int(gid)] = i
        self._scene, self._geom_to_obj = scene, mapping
        self.rebuilds += 1

    def cast(self, pose: Pose, objects: list[ObjectState]) -> Hits:
        """Cast every ray from the sensor at ``pose`` into ground + ``objects``."""
        key = tuple((o.id, o.center, o.size, o.yaw) for o in objects)
        if self._scene is None or key != self._scene_key:
            self._build(objects)
            self._scene_key = key
        c, s = math.cos(pose.yaw), math.sin(pose.yaw)
        r, o, d = self._rays, self.origins, self.directions
        # rotation about z by hand: numpy's (N,3)@(3,3) is ~30x slower for this shape
        r[:, 0] = o[:, 0] * c - o[:, 1] * s + pose.x
        r[:, 1] = o[:, 0] * s + o[:, 1] * c + pose.y
        r[:, 2] = o[:, 2] + pose.z
        r[:, 3] = d[:, 0] * c - d[:, 1] * s
        r[:, 4] = d[:, 0] * s + d[:, 1] * c
        r[:, 5] = d[:, 2]
        n = len(r)
        t = np.empty(n, np.float32)
        gids = np.empty(n, np.int64)
        normals = np.empty((n, 3), np.float32)
        for a in range(0, n, self.chunk):
            # cast_rays holds the GIL: cast in slices and yield between them so that other
            # threads (the emulator's packet sender) wait at most one slice
            ans = self._scene.cast_rays(self._o3c.Tensor(r[a:a + self.chunk]),
                                        nthreads=self.nthreads)
            t[a:a + self.chunk] = ans["t_hit"].numpy()
            gids[a:a + self.chunk] = ans["geometry_ids"].numpy()
            normals[a:a + self.chunk] = ans["primitive_normals"].numpy()
            time.sleep(YIELD_S)
        hit = np.isfinite(t) & (t <= self.max_range_m)
        lut = np.full(max(self._geom_to_obj) + 2, NOTHING, np.int32)
        for g, o in self._geom_to_obj.items():
            lut[g] = o
        obj = np.where(hit, lut[np.where(hit, gids, len(lut) - 1)], NOTHING).astype(np.int32)
        cos = np.abs(np.einsum("ij,ij->i", normals, self._rays[:, 3:])).astype(np.float32)
        rng = np.where(hit, t, np.inf).astype(np.float32)
        return Hits(rng, obj, np.where(hit, cos, 0.0).astype(np.float32))


def box_in_sensor_frame(ob: ObjectState, pose: Pose,
                        mount_xyz: tuple[float, float, float]) -> dict:
    """An object's 3D box in the sensor frame: ``{id, cls, center, size, yaw}`` (metres,
    radians, yaw wrapped to [-pi, pi))."""
    cv = pose.to_vehicle(np.array([ob.center], np.float64))[0] - np.asarray(mount_xyz)
    yaw = (ob.yaw - pose.yaw + math.pi) % (2 * math.pi) - math.pi
    return {"id": ob.id, "cls": ob.cls, "center": [round(float(v), 4) for v in cv],
            "size": [float(v) for v in ob.size], "yaw": round(yaw, 6)}
