"""LiDAR scans of a HIL scenario for evaluating ``lidar.clusters`` without the emulator's
UDP path: the HIL LiDAR's own ray caster (:class:`hil.raycast.Raycaster`), a 64 × 1024
beam pattern over ±22.5° elevation, 1.9 m mount, 1 cm range noise, and the truth boxes in
the sensor frame with their return counts (as ``truth/lidar.jsonl`` has them)."""

from __future__ import annotations

from typing import Any

import numpy as np


def hil_scan(t_s: float = 5.0, scenario: str = "city-drive"
             ) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """``(points POINT_DTYPE, truth boxes {id, cls, center, size, yaw, points})`` of the
    scenario at ``t_s`` (sensor frame)."""
    from agent.schemas import POINT_DTYPE
    from hil.raycast import Raycaster, box_in_sensor_frame
    from hil.scenario import load_scenario
    from hil.world import World

    world = World(load_scenario(scenario))
    az = np.linspace(-np.pi, np.pi, 1024, endpoint=False)
    el = np.radians(np.linspace(-22.5, 22.5, 64))
    aa, ee = np.meshgrid(az, el)
    d = np.stack([np.cos(ee) * np.cos(aa), np.cos(ee) * np.sin(aa), np.sin(ee)], -1)
    d = d.reshape(-1, 3)
    rc = Raycaster(np.zeros_like(d), d, max_range_m=100.0)
    pose, objs = world.pose(t_s), world.objects(t_s)
    hits = rc.cast(pose, objs)
    ok = np.isfinite(hits.range_m)
    rng = np.random.default_rng(0)
    r = hits.range_m[ok] + rng.normal(0, 0.01, int(ok.sum()))
    xyz = d[ok] * r[:, None]
    pts = np.zeros(len(xyz), POINT_DTYPE)
    pts["x"], pts["y"], pts["z"] = xyz.T.astype(np.float32)
    counts = np.bincount(hits.hit_object[ok][hits.hit_object[ok] >= 0], minlength=len(objs))
    truth = [{**box_in_sensor_frame(o, pose, rc.mount), "points": int(counts[i])}
             for i, o in enumerate(objs)]
    return pts, truth
