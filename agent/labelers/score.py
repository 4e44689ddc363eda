"""Scoring pre-labels against ground truth (HIL runs, training evaluation).

All inputs are lists of plain dicts; times are shared-timebase ns, boxes are pixels of the
source image or metres in the LiDAR frame.

- :func:`camera_scores` — ``gt``: ``{image, cls, box: [x0, y0, x1, y1], ignore?}``;
  ``dets``: ``{image, cls, score, box}``. ``image`` is any hashable frame key (a camera
  ``seq`` or ``t_ns``) shared by both lists; images with GT but no detection must appear in
  ``gt`` (or in ``images``) to count. Small or hidden truth is *ignored* (COCO crowd
  semantics: neither a miss nor a false positive when detected): ``ignore`` set, height
  < ``min_height_px`` or ``visibility`` < ``min_visibility``. Returns precision and
  recall at IoU 0.5 for detections with score ≥ ``score_thr`` and mAP@0.5 (pycocotools,
  101-point interpolation, all detections) overall and per class.
- :func:`vad_scores` — ``truth``/``pred``: ``{start_ns, end_ns}``. Segment F1: a truth
  segment is found when predicted speech covers ≥ ``cover`` of it; a predicted segment is
  right when ≥ ``cover`` of it lies within truth widened by ``collar_ms``. Also frame F1 on
  10 ms frames (collar excluded).
- :func:`lidar_scores` — ``truth``/``pred``: ``{frame, bbox3d: {center, size, yaw}}`` (or
  ``center``/``size``/``yaw`` at the top level, as the HIL LiDAR truth writes them), in
  the LiDAR frame;
  bird's-eye IoU of the rotated footprints (height ignored: BEV is what matters to a
  planner and what a clustering labeler can promise); one-to-one greedy matching by IoU;
  recall and precision at ``iou`` (0.3). Boxes farther than ``max_range_m`` from the
  sensor, and truth with fewer than ``min_points`` returns (its ``points``), are left out
  (a prediction overlapping such truth counts neither way).
"""

from __future__ import annotations

import contextlib
import io
import math
from typing import Any, Hashable, Iterable

import numpy as np

# -- camera -------------------------------------------------------------------------------


def _iou_xyxy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ix0 = np.maximum(a[:, None, 0], b[None, :, 0])
    iy0 = np.maximum(a[:, None, 1], b[None, :, 1])
    ix1 = np.minimum(a[:, None, 2], b[None, :, 2])
    iy1 = np.minimum(a[:, None, 3], b[None, :, 3])
    inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
    aa = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    ab = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    return inter / np.maximum(aa[:, None] + ab[None, :] - inter, 1e-9)


def _ignored(g: dict[str, Any], min_height_px: float, min_visibility: float) -> bool:
    b = g["box"]
    return bool(g.get("ignore")) or (b[3] - b[1]) < min_height_px or \
        g.get("visibility", 1.0) < min_visibility


def camera_scores(gt: list[dict[str, Any]], dets: list[dict[str, Any]],
                  classes: list[str] | None = None, score_thr: float = 0.25,
                  iou: float = 0.5, min_height_px: float = 12.0,
                  min_visibility: float = 0.3,
                  images: Iterable[Hashable] | None = None) -> dict[str, Any]:
    """Precision/recall at ``score_thr`` and mAP@``iou`` (pycocotools); see module doc."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    classes = list(classes) if classes else sorted({g["cls"] for g in gt} |
                                                   {d["cls"] for d in dets})
    cat = {c: i + 1 for i, c in enumerate(classes)}
    keys = list(dict.fromkeys([*(images or []), *(g["image"] for g in gt),
                               *(d["image"] for d in dets)]))
    img_id = {k: i + 1 for i, k in enumerate(keys)}
    anns = []
    for g in gt:
        if g["cls"] not in cat:
            continue
        x0, y0, x1, y1 = map(float, g["box"])
        ign = _ignored(g, min_height_px, min_visibility)
        anns.append({"id": len(anns) + 1, "image_id": img_id[g["image"]],
                     "category_id": cat[g["cls"]], "bbox": [x0, y0, x1 - x0, y1 - y0],
                     "area": (x1 - x0) * (y1 - y0), "iscrowd": int(ign), "ignore": int(ign)})
    res = [{"image_id": img_id[d["image"]], "category_id": cat[d["cls"]],
            "bbox": [float(d["box"][0]), float(d["box"][1]),
                     float(d["box"][2] - d["box"][0]), float(d["box"][3] - d["box"][1])],
            "score": float(d["score"])} for d in dets if d["cls"] in cat]
    n_gt = sum(1 for a in anns if not a["iscrowd"])
    out: dict[str, Any] = {"images": len(keys), "gt_boxes": n_gt,
                           "ignored_gt": len(anns) - n_gt, "detections": len(res),
                           "score_thr": score_thr, "iou": iou}
    out.update(_pr_at(anns, res, score_thr, iou))
    if not anns or not res:
        out.update({"map50": 0.0 if n_gt else None, "ap_per_class": {}})
        return out
    coco = COCO()
    coco.dataset = {"images": [{"id": i} for i in img_id.values()],
                    "categories": [{"id": i, "name": c} for c, i in cat.items()],
                    "annotations": anns}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
        dt = coco.loadRes(res)
        ev = COCOeval(coco, dt, "bbox")
        ev.params.iouThrs = np.array([iou])
        ev.params.maxDets = [1, 10, 100]
        ev.params.areaRng = [[0, 1e10]]
        ev.params.areaRngLbl = ["all"]
        ev.evaluate()
        ev.accumulate()
    prec = ev.eval["precision"][0, :, :, 0, -1]  # R × K
    per = {}
    for c, i in cat.items():
        col = prec[:, i - 1]
        if (col > -1).any():
            per[c] = round(float(col[col > -1].mean()), 4)
    out["ap_per_class"] = per
    out["map50"] = round(float(np.mean(list(per.values()))), 4) if per else 0.0
    return out


def _pr_at(anns: list[dict[str, Any]], res: list[dict[str, Any]], thr: float,
           iou: float) -> dict[str, Any]:
    """Greedy per image and class, highest score first; crowd (ignored) truth absorbs
    detections without counting them."""
    tp = fp = 0
    by: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for a in anns:
        by.setdefault((a["image_id"], a["category_id"]), []).append(a)
    dets: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for r in res:
        if r["score"] >= thr:
            dets.setdefault((r["image_id"], r["category_id"]), []).append(r)
    for key, ds in dets.items():
        gs = by.get(key, [])
        real = [g for g in gs if not g["iscrowd"]]
        crowd = [g for g in gs if g["iscrowd"]]
        used = np.zeros(len(real), bool)
        rb = np.array([_xyxy(g["bbox"]) for g in real]).reshape(-1, 4)
        cb = np.array([_xyxy(g["bbox"]) for g in crowd]).reshape(-1, 4)
        for d in sorted(ds, key=lambda r: -r["score"]):
            db = np.array([_xyxy(d["bbox"])])
            if len(rb):
                ious = _iou_xyxy(db, rb)[0]
                ious[used] = -1
                j = int(ious.argmax())
                if ious[j] >= iou:
                    used[j] = True
                    tp += 1
                    continue
            if len(cb) and _covered(db[0], cb) >= iou:
                continue
            fp += 1
    n_gt = sum(1 for a in anns if not a["iscrowd"])
    return {"tp": tp, "fp": fp, "fn": n_gt - tp,
            "precision": round(tp / (tp + fp), 4) if tp + fp else None,
            "recall": round(tp / n_gt, 4) if n_gt else None}


def _xyxy(b: list[float]) -> list[float]:
    return [b[0], b[1], b[0] + b[2], b[1] + b[3]]


def _covered(d: np.ndarray, crowd: np.ndarray) -> float:
    """Largest share of detection ``d`` inside one crowd box (COCO's crowd IoU)."""
    ix0 = np.maximum(d[0], crowd[:, 0])
    iy0 = np.maximum(d[1], crowd[:, 1])
    ix1 = np.minimum(d[2], crowd[:, 2])
    iy1 = np.minimum(d[3], crowd[:, 3])
    inter = np.clip(ix1 - ix0, 0, None) * np.clip(iy1 - iy0, 0, None)
    area = max((d[2] - d[0]) * (d[3] - d[1]), 1e-9)
    return float((inter / area).max())


# -- audio --------------------------------------------------------------------------------


def _merge(segs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(segs):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _overlap(a: int, b: int, segs: list[tuple[int, int]]) -> int:
    return sum(max(0, min(b, y) - max(a, x)) for x, y in segs)


def vad_scores(truth: list[dict[str, Any]], pred: list[dict[str, Any]], cover: float = 0.5,
               collar_ms: float = 250.0) -> dict[str, Any]:
    """Segment and frame F1 of speech segments; see module doc."""
    t = _merge([(int(s["start_ns"]), int(s["end_ns"])) for s in truth])
    p = _merge([(int(s["start_ns"]), int(s["end_ns"])) for s in pred
                if s.get("end_ns") is not None])
    col = int(collar_ms * 1e6)
    wide = _merge([(a - col, b + col) for a, b in t])
    found = sum(1 for a, b in t if _overlap(a, b, p) >= cover * (b - a))
    right = sum(1 for a, b in p if _overlap(a, b, wide) >= cover * (b - a))
    prec = right / len(p) if p else None
    rec = found / len(t) if t else None
    f1 = 2 * prec * rec / (prec + rec) if prec and rec else 0.0
    # frame level, 10 ms frames, frames within a collar of a truth boundary excluded
    frame_f1 = None
    ends = [x for a, b in t for x in (a, b)] + [x for a, b in p for x in (a, b)]
    if ends:
        lo, hi = min(ends) - col, max(ends) + col
        step = 10_000_000
        c = np.arange(lo, hi, step) + step // 2
        tm = _mask(c, t)
        pm = _mask(c, p)
        keep = np.ones(len(c), bool)
        for a, b in t:
            keep &= (np.abs(c - a) > col) & (np.abs(c - b) > col)
        tp = int((tm & pm & keep).sum())
        fp = int((~tm & pm & keep).sum())
        fn = int((tm & ~pm & keep).sum())
        frame_f1 = round(2 * tp / (2 * tp + fp + fn), 4) if tp + fp + fn else None
    return {"truth_segments": len(t), "pred_segments": len(p), "found": found, "right": right,
            "precision": None if prec is None else round(prec, 4),
            "recall": None if rec is None else round(rec, 4), "f1": round(f1, 4),
            "frame_f1": frame_f1}


def _mask(c: np.ndarray, segs: list[tuple[int, int]]) -> np.ndarray:
    m = np.zeros(len(c), bool)
    for a, b in segs:
        m |= (c >= a) & (c < b)
    return m


# -- LiDAR --------------------------------------------------------------------------------


def bev_corners(b: dict[str, Any]) -> np.ndarray:
    """Footprint corners (4×2) of ``{center, size, yaw}``."""
    cx, cy = b["center"][0], b["center"][1]
    l, w = b["size"][0], b["size"][1]
    c, s = math.cos(b.get("yaw", 0.0)), math.sin(b.get("yaw", 0.0))
    d = np.array([[l, w], [l, -w], [-l, -w], [-l, w]]) / 2
    return np.stack([cx + c * d[:, 0] - s * d[:, 1], cy + s * d[:, 0] + c * d[:, 1]], 1)


def bev_iou(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Bird's-eye IoU of two boxes (rotated rectangles) by convex polygon clipping."""
    pa, pb = bev_corners(a), bev_corners(b)
    inter = _poly_area(_clip(pa, pb))
    ua = a["size"][0] * a["size"][1] + b["size"][0] * b["size"][1] - inter
    return float(inter / ua) if ua > 0 else 0.0


def _poly_area(p: np.ndarray) -> float:
    if len(p) < 3:
        return 0.0
    x, y = p[:, 0], p[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def _clip(subject: np.ndarray, clip: np.ndarray) -> np.ndarray:
    """Sutherland–Hodgman: ``subject`` polygon clipped by convex ``clip`` (both CCW or
    both CW; orientation is normalised here)."""
    def ccw(p: np.ndarray) -> np.ndarray:
        x, y = p[:, 0], p[:, 1]
        return p if np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)) > 0 else p[::-1]

    out = list(ccw(subject))
    cp = ccw(clip)
    for i in range(len(cp)):
        a, b = cp[i], cp[(i + 1) % len(cp)]
        inp, out = out, []
        if not inp:
            break

        def inside(p: np.ndarray) -> bool:
            return (b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0]) >= -1e-12

        for j in range(len(inp)):
            p, q = inp[j], inp[(j + 1) % len(inp)]
            ip, iq = inside(p), inside(q)
            if ip:
                out.append(p)
            if ip != iq:
                d1, d2 = q - p, b - a
                den = d1[0] * d2[1] - d1[1] * d2[0]
                if abs(den) > 1e-12:
                    t = ((a[0] - p[0]) * d2[1] - (a[1] - p[1]) * d2[0]) / den
                    out.append(p + t * d1)
    return np.array(out).reshape(-1, 2)


def lidar_scores(truth: list[dict[str, Any]], pred: list[dict[str, Any]], iou: float = 0.3,
                 max_range_m: float = 40.0, min_points: int = 0) -> dict[str, Any]:
    """Recall/precision of 3D boxes at bird's-eye IoU ``iou``; see module doc."""
    def box(d: dict[str, Any]) -> dict[str, Any]:
        return d.get("bbox3d") or d

    def in_range(d: dict[str, Any]) -> bool:
        c = box(d)["center"]
        return math.hypot(c[0], c[1]) <= max_range_m

    few = [t for t in truth if in_range(t) and t.get("points", min_points) < min_points]
    truth = [t for t in truth if in_range(t) and t.get("points", min_points) >= min_points]
    by_t: dict[Hashable, list[dict[str, Any]]] = {}
    for t in truth:
        by_t.setdefault(t["frame"], []).append(t)
    by_p: dict[Hashable, list[dict[str, Any]]] = {}
    for p in pred:
        if in_range(p):
            by_p.setdefault(p["frame"], []).append(p)
    tp = 0
    ious: list[float] = []
    unmatched: list[dict[str, Any]] = []
    for f, ps in by_p.items():
        ts = by_t.get(f, [])
        m = np.array([[bev_iou(box(t), box(p)) for p in ps] for t in ts]).reshape(len(ts),
                                                                                  len(ps))
        used = np.zeros(len(ps), bool)
        while m.size and m.max() >= iou:
            i, j = np.unravel_index(int(m.argmax()), m.shape)
            ious.append(float(m[i, j]))
            m[i, :] = -1
            m[:, j] = -1
            used[j] = True
            tp += 1
        unmatched += [p for p, u in zip(ps, used) if not u]
    # a box found on truth with too few returns to ask for is neither right nor wrong
    ignored = sum(1 for p in unmatched if any(
        t["frame"] == p["frame"] and bev_iou(box(t), box(p)) > 0 for t in few))
    n_pred = sum(len(v) for v in by_p.values()) - ignored
    return {"truth_boxes": len(truth), "pred_boxes": n_pred, "tp": tp, "iou": iou,
            "recall": round(tp / len(truth), 4) if truth else None,
            "precision": round(tp / n_pred, 4) if n_pred else None,
            "mean_iou_matched": round(float(np.mean(ious)), 4) if ious else None}
