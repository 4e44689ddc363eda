"""Scoring helpers for HIL runs: camera P/R and mAP@0.5 (pycocotools), VAD segment and frame
F1, bird's-eye IoU and LiDAR recall — on hand-made cases with known answers."""

from __future__ import annotations

import math

import pytest

from agent.labelers.score import bev_iou, camera_scores, lidar_scores, vad_scores

pytest.importorskip("pycocotools")


def _g(image, cls, box, **kw):
    return {"image": image, "cls": cls, "box": box, **kw}


def test_camera_perfect_and_imperfect() -> None:
    gt = [_g(1, "car", [10, 10, 60, 50]), _g(1, "pedestrian", [100, 20, 120, 80]),
          _g(2, "car", [0, 0, 40, 40])]
    perfect = [{**g, "score": 0.9} for g in gt]
    s = camera_scores(gt, perfect, ["car", "pedestrian"])
    assert (s["precision"], s["recall"], s["map50"]) == (1.0, 1.0, 1.0)
    # one car missed, one false pedestrian (higher score than the true one), one shifted box
    dets = [{**gt[0], "score": 0.9},
            {**_g(1, "pedestrian", [200, 20, 220, 80]), "score": 0.8},
            {**gt[1], "score": 0.7},
            {**_g(2, "car", [30, 30, 70, 70]), "score": 0.6}]  # IoU 0.06: a miss
    s = camera_scores(gt, dets, ["car", "pedestrian"])
    assert (s["tp"], s["fp"], s["fn"]) == (2, 2, 1)
    assert s["precision"] == 0.5 and s["recall"] == pytest.approx(2 / 3, abs=1e-4)
    assert s["ap_per_class"]["car"] == pytest.approx(0.5, abs=0.01)
    assert s["ap_per_class"]["pedestrian"] == pytest.approx(0.5, abs=0.01)
    # below score_thr: not in precision/recall, still in the mAP ranking
    s = camera_scores(gt, [{**g, "score": 0.1} for g in gt], score_thr=0.25)
    assert s["recall"] == 0.0 and s["map50"] == 1.0


def test_camera_ignores_small_and_hidden_truth() -> None:
    gt = [_g(1, "car", [10, 10, 60, 50]), _g(1, "car", [200, 200, 206, 205]),
          _g(1, "sign", [300, 10, 330, 80], visibility=0.1)]
    dets = [{**gt[0], "score": 0.9}, {**gt[1], "score": 0.5}]
    s = camera_scores(gt, dets, ["car", "sign"])
    assert s["gt_boxes"] == 1 and s["ignored_gt"] == 2
    assert (s["tp"], s["fp"], s["fn"]) == (1, 0, 0) and s["map50"] == 1.0
    assert camera_scores(gt, [], ["car"])["recall"] == 0.0


def test_vad_segment_and_frame_f1() -> None:
    s = 1_000_000_000
    truth = [{"start_ns": 1 * s, "end_ns": 3 * s}, {"start_ns": 6 * s, "end_ns": 8 * s}]
    same = vad_scores(truth, truth)
    assert same["f1"] == 1.0 and same["frame_f1"] == 1.0
    # the second utterance split in two with a pause, a false segment, first one missed
    pred = [{"start_ns": 6 * s, "end_ns": 7 * s}, {"start_ns": 7_200_000_000, "end_ns": 8 * s},
            {"start_ns": 10 * s, "end_ns": 11 * s}]
    r = vad_scores(truth, pred)
    assert (r["found"], r["right"]) == (1, 2)
    assert r["precision"] == pytest.approx(2 / 3, abs=1e-4) and r["recall"] == 0.5
    assert r["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5), abs=1e-3)
    assert 0 < r["frame_f1"] < 1
    assert vad_scores(truth, [])["f1"] == 0.0


def test_bev_iou_and_lidar_recall() -> None:
    a = {"center": [0, 0, 0], "size": [2, 2, 1], "yaw": 0.0}
    b = {"center": [1, 0, 0], "size": [2, 2, 1], "yaw": 0.0}
    assert bev_iou(a, a) == pytest.approx(1.0)
    assert bev_iou(a, b) == pytest.approx(2 / 6)
    rot = {"center": [0, 0, 0], "size": [2, 2, 1], "yaw": math.pi / 4}
    # a square and itself turned 45°: the octagon has area 8(√2 - 1)
    inter = 8 * (math.sqrt(2) - 1)
    assert bev_iou(a, rot) == pytest.approx(inter / (8 - inter), abs=1e-9)
    long = {"center": [0, 0, 0], "size": [4, 1, 1], "yaw": math.pi / 2}  # same as yaw 0 w/l
    same = {"center": [0, 0, 0], "size": [1, 4, 1], "yaw": 0.0}
    assert bev_iou(long, same) == pytest.approx(1.0)

    truth = [{"frame": 0, "bbox3d": a}, {"frame": 0, "bbox3d": {**a, "center": [10, 0, 0]}},
             {"frame": 1, "bbox3d": a}, {"frame": 1, "bbox3d": {**a, "center": [90, 0, 0]}}]
    pred = [{"frame": 0, "bbox3d": b}, {"frame": 0, "bbox3d": {**a, "center": [10.2, 0, 0]}},
            {"frame": 1, "bbox3d": {**a, "center": [5, 5, 0]}}]
    r = lidar_scores(truth, pred, iou=0.3, max_range_m=40)
    assert r["truth_boxes"] == 3 and r["tp"] == 2
    assert r["recall"] == pytest.approx(2 / 3, abs=1e-4) and r["precision"] == pytest.approx(
        2 / 3, abs=1e-4)
    assert lidar_scores(truth, pred, iou=0.5)["tp"] == 1
