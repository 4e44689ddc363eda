"""Evaluate a YOLO-layout detector on a HIL scenario's rendered frames (held out from
training): frames at even times over the scenario, rendered by the default 1280×720 HIL
camera, JPEG q90, through :class:`agent.labelers.camera_yolo.YoloDetector`, scored with
:func:`agent.labelers.score.camera_scores`."""

from __future__ import annotations

import os
from typing import Any

import cv2
import numpy as np

from agent.geometry import PinholeCamera
from agent.labelers.camera_yolo import YoloDetector, YoloOptions
from agent.labelers.score import camera_scores
from hil.render import default_calibration, render
from hil.scenario import load_scenario
from hil.world import World


def scenario_frames(name: str, n_frames: int, width: int = 1280, height: int = 720
                    ) -> list[tuple[float, bytes, list[dict[str, Any]]]]:
    """``(t_s, jpeg, gt)`` for ``n_frames`` evenly spaced times (GT: renderer boxes)."""
    sc = load_scenario(name)
    world = World(sc)
    cam = PinholeCamera.from_calibration(default_calibration(width, height))
    out = []
    for t in np.linspace(0.5, sc.duration_s - 0.5, n_frames):
        img, boxes = render(world, float(t), cam)
        ok, jpg = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        gt = [{"image": float(t), "cls": b.cls, "box": [b.x0, b.y0, b.x1, b.y1],
               "visibility": b.visibility} for b in boxes]
        out.append((float(t), jpg.tobytes(), gt))
    return out


def evaluate_scenario(model: str | os.PathLike[str], name: str = "city-drive",
                      n_frames: int = 240, threads: int = 1, score_thr: float = 0.25
                      ) -> dict[str, Any]:
    """mAP@0.5 over all detections down to 0.05; precision/recall at ``score_thr``."""
    det = YoloDetector(model, threads, YoloOptions(conf=0.05))
    gt: list[dict[str, Any]] = []
    dets: list[dict[str, Any]] = []
    frames = scenario_frames(name, n_frames)
    for t, jpg, g in frames:
        gt.extend(g)
        for d in det.detect_jpeg(jpg) or []:
            dets.append({"image": t, **d})
    return {"scenario": name, "frames": n_frames,
            **camera_scores(gt, dets, det.names, score_thr=score_thr,
                            images=[f[0] for f in frames])}
