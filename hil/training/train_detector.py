"""Train the HIL road-user detector on CPU and export it as a YOLO-layout ONNX file.

    .venv/bin/pip install -e '.[train]'        # torch (CPU) and onnx; not runtime deps
    .venv/bin/python -m hil.training.train_detector            # ~12 min on 2 cores
    .venv/bin/python -m hil.training.train_detector --quick    # a 1-minute smoke run

Data: ``--images`` random streets (:mod:`hil.training.scenes`) rendered by the HIL
renderer, boxes from its ground truth, prepared like ``camera.yolo`` prepares frames.
Model: :mod:`hil.training.detector_net`. Targets: an object is assigned to the pyramid
level its size suits (FCOS-style ranges) and to the cells of that level whose centres lie
in its box and within 2.5 strides of its centre (the nearest cell always); a cell claimed
twice goes to the smaller box. Loss: quality focal loss on the classes (target = IoU of the
predicted box) + 2 × GIoU loss on positives; cells inside ``ignore`` boxes are left out.
Optimiser AdamW, cosine learning rate with warm-up, horizontal flips.

Reproducible: every random draw comes from ``--seed`` (data: ``rng([seed, i])``; torch:
``manual_seed``, deterministic algorithms). Same seed, torch version, thread count and CPU
give the same weights. The run writes ``<out>.onnx`` (with ``names``, ``imgsz``,
``version``, ``model_name``, ``seed`` metadata) and ``<out>.json`` (config, seed, sha256,
losses, and precision/recall/mAP@0.5 on the held-out ``city-drive`` scenario).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

# OpenMP threads that spin while waiting burn the CPU other work needs (and make a
# contended 2-core run several times slower): wait passively. Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / "agent" / "labelers" / "models" / "hil-detector.onnx"
VERSION = "1.0"
RANGES = ((0, 72), (48, 160), (112, 1e9))  # max box side (input px) per stride 8/16/32


def build_targets(boxes: np.ndarray, cls: np.ndarray, ignore: np.ndarray, in_h: int,
                  in_w: int, strides: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray,
                                                                np.ndarray]:
    """Per cell over all levels: assigned GT index (-1 none), and an ``ignore`` mask.
    Returns ``(gt_index [N], ignore [N] bool, level_of_cell [N])``."""
    idx_all, ign_all, lvl_all = [], [], []
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    side = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
    for li, s in enumerate(strides):
        h, w = math.ceil(in_h / s), math.ceil(in_w / s)
        gx = (np.arange(w) + 0.5) * s
        gy = (np.arange(h) + 0.5) * s
        px = np.tile(gx, h)[:, None]
        py = np.repeat(gy, w)[:, None]
        n = h * w
        assigned = np.full(n, -1, np.int64)
        ign = np.zeros(n, bool)
        if len(boxes):
            inside = ((px >= boxes[:, 0]) & (px <= boxes[:, 2]) & (py >= boxes[:, 1])
                      & (py <= boxes[:, 3]))
            near = (np.abs(px - cx) < 2.5 * s) & (np.abs(py - cy) < 2.5 * s)
            lo, hi = RANGES[li]
            fits = (side >= lo) & (side < hi)
            pos = inside & near & fits & ~ignore
            # the cell holding the centre is always positive on a fitting level
            ci = (np.clip((cy // s).astype(int), 0, h - 1) * w
                  + np.clip((cx // s).astype(int), 0, w - 1))
            for k in np.nonzero(fits & ~ignore)[0]:
                pos[ci[k], k] = True
            cost = np.where(pos, areas[None, :], np.inf)
            best = cost.argmin(1)
            has = np.isfinite(cost[np.arange(n), best])
            assigned[has] = best[has]
            ign = (inside & ignore).any(1) & ~has
        idx_all.append(assigned)
        ign_all.append(ign)
        lvl_all.append(np.full(n, li))
    return np.concatenate(idx_all), np.concatenate(ign_all), np.concatenate(lvl_all)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--imgsz", type=int, nargs=2, default=[288, 512], metavar=("H", "W"))
    ap.add_argument("--eval-frames", type=int, default=240)
    ap.add_argument("--quick", action="store_true", help="tiny run to check the script")
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.epochs, args.eval_frames = 96, 1, 24

    try:
        import torch
    except ImportError:
        print("train_detector needs torch: .venv/bin/pip install -e '.[train]'", file=sys.stderr)
        return 2
    from hil.training.detector_net import STRIDES, Exported, Net, decode
    from hil.training.scenes import CLASSES, make_item

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    in_h, in_w = args.imgsz
    t_start = time.monotonic()

    # -- data ---------------------------------------------------------------------------
    print(f"rendering {args.images} training images…", flush=True)
    items = [make_item(args.seed, i, in_h, in_w) for i in range(args.images)]
    images = np.stack([it.image for it in items])  # B H W 3 BGR
    t_data = time.monotonic() - t_start
    n_boxes = sum(int((~it.ignore).sum()) for it in items)
    print(f"  {n_boxes} boxes, {t_data:.0f} s", flush=True)

    net = Net(len(CLASSES)).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=5e-4)
    steps = args.epochs * math.ceil(args.images / args.batch)
    warm = min(100, steps // 10)

    def lr_at(step: int) -> float:
        if step < warm:
            return args.lr * (step + 1) / warm
        return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))

    rng = np.random.default_rng([args.seed, 7])
    step, losses = 0, []
    net.train()
    for epoch in range(args.epochs):
        order = rng.permutation(args.images)
        ep_loss = []
        for b0 in range(0, args.images, args.batch):
            sel = order[b0:b0 + args.batch]
            flips = rng.random(len(sel)) < 0.5
            x_np = images[sel][..., ::-1].astype(np.float32) / 255.0  # RGB
            tgt = []
            for j, i in enumerate(sel):
                bx = items[i].boxes.copy()
                if flips[j]:
                    x_np[j] = x_np[j, :, ::-1]
                    bx[:, [0, 2]] = in_w - bx[:, [2, 0]]
                tgt.append((bx, items[i].cls, items[i].ignore))
            x = torch.from_numpy(np.ascontiguousarray(x_np.transpose(0, 3, 1, 2))).contiguous(
                memory_format=torch.channels_last)
            loss, parts = _loss(net, x, tgt, in_h, in_w, STRIDES, decode, len(CLASSES))
            for g in opt.param_groups:
                g["lr"] = lr_at(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 10.0)
            opt.step()
            step += 1
            ep_loss.append(parts)
            if step % 25 == 0:
                m = np.mean(ep_loss[-25:], 0)
                print(f"  step {step}/{steps} epoch {epoch} cls {m[0]:.3f} box {m[1]:.3f} "
                      f"pos/img {m[2]:.1f} {time.monotonic() - t_start:.0f} s", flush=True)
        losses.append([round(float(v), 4) for v in np.mean(ep_loss, 0)])

    # -- export ---------------------------------------------------------------------------
    net.eval()
    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"names": repr({i: n for i, n in enumerate(CLASSES)}), "imgsz": repr([in_h, in_w]),
            "version": VERSION, "model_name": "hil-detector", "seed": str(args.seed),
            "task": "detect", "stride": repr(list(STRIDES)),
            "description": "edgecap HIL road-user detector (hil/training/train_detector.py)"}
    export_onnx(Exported(net).float().to(memory_format=torch.contiguous_format),
                (1, 3, in_h, in_w), out, meta)
    sha = hashlib.sha256(out.read_bytes()).hexdigest()
    t_train = time.monotonic() - t_start

    print("evaluating on city-drive…", flush=True)
    from hil.training.evaluate import evaluate_scenario

    ev = evaluate_scenario(out, "city-drive", args.eval_frames)
    record = {"model": str(out.relative_to(ROOT)) if out.is_relative_to(ROOT) else str(out),
              "sha256": sha, "size_bytes": out.stat().st_size, "version": VERSION,
              "classes": CLASSES, "imgsz": [in_h, in_w], "seed": args.seed,
              "config": {k: (str(v) if isinstance(v, Path) else v)
                         for k, v in vars(args).items()},
              "torch": torch.__version__, "python": platform.python_version(),
              "machine": platform.machine(), "threads": args.threads,
              "boxes": n_boxes, "steps": steps, "epoch_losses_cls_box_pos": losses,
              "data_s": round(t_data, 1), "train_s": round(t_train, 1),
              "eval_city_drive": ev}
    out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(ev, indent=1))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB, sha256 {sha[:12]}…) in "
          f"{time.monotonic() - t_start:.0f} s")
    return 0


def giou(p, g):
    """``(1 - GIoU, IoU)`` of paired boxes ``[M, 4]`` (x0 y0 x1 y1)."""
    import torch

    ix0, iy0 = torch.maximum(p[:, 0], g[:, 0]), torch.maximum(p[:, 1], g[:, 1])
    ix1, iy1 = torch.minimum(p[:, 2], g[:, 2]), torch.minimum(p[:, 3], g[:, 3])
    inter = (ix1 - ix0).clamp(min=0) * (iy1 - iy0).clamp(min=0)
    ap = (p[:, 2] - p[:, 0]) * (p[:, 3] - p[:, 1])
    ag = (g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1])
    union = ap + ag - inter + 1e-6
    iou = inter / union
    cw = torch.maximum(p[:, 2], g[:, 2]) - torch.minimum(p[:, 0], g[:, 0])
    ch = torch.maximum(p[:, 3], g[:, 3]) - torch.minimum(p[:, 1], g[:, 1])
    c = cw * ch + 1e-6
    return 1 - (iou - (c - union) / c), iou


def _loss(net, x, tgt, in_h, in_w, strides, decode, n_cls):
    """Quality focal loss + 2 × GIoU loss; returns (loss, [cls, box, positives/image])."""
    import torch
    import torch.nn.functional as F

    boxes, logits = decode(net(x))
    b_n = logits.shape[0]
    weight = torch.ones(logits.shape[:2])
    bi, ni, ci, gts = [], [], [], []
    for b, (bx, cl, ig) in enumerate(tgt):
        gi, ign, _ = build_targets(bx, cl, ig, in_h, in_w, strides)
        weight[b, torch.from_numpy(np.nonzero(ign)[0])] = 0.0
        pos = np.nonzero(gi >= 0)[0]
        bi.append(np.full(len(pos), b))
        ni.append(pos)
        ci.append(cl[gi[pos]])
        gts.append(bx[gi[pos]])
    bi_t, ni_t, ci_t = (torch.from_numpy(np.concatenate(a)).long() for a in (bi, ni, ci))
    npos = max(1, len(ni_t))
    target = torch.zeros_like(logits)
    if len(ni_t):
        gl, iou = giou(boxes[bi_t, ni_t], torch.from_numpy(np.concatenate(gts)).float())
        target[bi_t, ni_t, ci_t] = iou.detach().clamp(min=0.05)
        box_loss = gl.sum() / npos
    else:
        box_loss = boxes.sum() * 0.0
    p = torch.sigmoid(logits)
    qfl = F.binary_cross_entropy_with_logits(logits, target, reduction="none") \
        * (p - target).abs().pow(2)
    cls_loss = (qfl * weight[..., None]).sum() / npos
    loss = cls_loss + 2.0 * box_loss
    return loss, [float(cls_loss.detach()), float(box_loss.detach()), len(ni_t) / b_n]


def export_onnx(model, shape, out: Path, meta: dict[str, str]) -> None:
    """Export with the TorchScript exporter (opset 17) and write ``meta`` into the ONNX
    ``metadata_props`` (where Ultralytics keeps ``names``)."""
    import onnx
    import torch

    import warnings

    tmp = out.with_suffix(".tmp.onnx")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, torch.zeros(shape), str(tmp), dynamo=False, opset_version=17,
                          input_names=["images"], output_names=["output0"])
    m = onnx.load(str(tmp))
    del m.metadata_props[:]
    for k, v in meta.items():
        p = m.metadata_props.add()
        p.key, p.value = k, v
    m.producer_name = "edgecap-hil-training"
    onnx.checker.check_model(m)
    onnx.save(m, str(out))
    os.unlink(tmp)


if __name__ == "__main__":
    sys.exit(main())
