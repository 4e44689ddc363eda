"""A tiny anchor-free detector (PyTorch) whose ONNX export has the Ultralytics YOLO layout.

Backbone: five stride-2 conv stages (16-32-64-96-128 channels, BatchNorm + SiLU, residual
3×3 blocks); a top-down feature pyramid to 64 channels at strides 8, 16 and 32; one head
per level predicting ``l, t, r, b`` (softplus × stride: distances from the cell centre to
the box sides) and C class logits. :class:`Exported` decodes that to the YOLO output
``[1, 4 + C, N]`` (``cx, cy, w, h`` in input pixels, sigmoid scores) so ``camera.yolo``
treats it like any Ultralytics export.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

STRIDES = (8, 16, 32)


def conv(c1: int, c2: int, k: int = 3, s: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c1, c2, k, s, k // 2, bias=False), nn.BatchNorm2d(c2),
                         nn.SiLU(inplace=True))


class Block(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.a = conv(c, c // 2, 1)
        self.b = conv(c // 2, c, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(self.a(x))


class Net(nn.Module):
    """``forward(x)`` → list of raw maps ``[B, 4 + C, H/s, W/s]`` for s in STRIDES."""

    def __init__(self, n_cls: int, width: int = 64):
        super().__init__()
        self.n_cls = n_cls
        self.s1 = conv(3, 16, 3, 2)
        self.s2 = nn.Sequential(conv(16, 32, 3, 2), Block(32))
        self.s3 = nn.Sequential(conv(32, 64, 3, 2), Block(64), Block(64))
        self.s4 = nn.Sequential(conv(64, 96, 3, 2), Block(96), Block(96))
        self.s5 = nn.Sequential(conv(96, 128, 3, 2), Block(128))
        self.lat = nn.ModuleList([conv(64, width, 1), conv(96, width, 1), conv(128, width, 1)])
        self.smooth = nn.ModuleList([conv(width, width, 3) for _ in STRIDES])
        self.heads = nn.ModuleList([nn.Sequential(conv(width, width, 3),
                                                  nn.Conv2d(width, 4 + n_cls, 1))
                                    for _ in STRIDES])
        prior = -4.6  # sigmoid ≈ 0.01: few positives at the start, as in RetinaNet
        for h in self.heads:
            nn.init.constant_(h[-1].bias[4:], prior)
            nn.init.constant_(h[-1].bias[:4], 0.5)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        c3 = self.s3(self.s2(self.s1(x)))
        c4 = self.s4(c3)
        c5 = self.s5(c4)
        p5 = self.lat[2](c5)
        p4 = self.lat[1](c4) + F.interpolate(p5, size=c4.shape[-2:], mode="nearest")
        p3 = self.lat[0](c3) + F.interpolate(p4, size=c3.shape[-2:], mode="nearest")
        return [h(s(p)) for h, s, p in zip(self.heads, self.smooth, (p3, p4, p5))]


def grid(h: int, w: int, stride: int, device: torch.device | None = None) -> torch.Tensor:
    """Cell centres ``[H*W, 2]`` (x, y) in input pixels, row-major."""
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device),
                            indexing="ij")
    return torch.stack([(xs.reshape(-1) + 0.5) * stride, (ys.reshape(-1) + 0.5) * stride], 1)


def decode(raw: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw maps → ``(boxes [B, N, 4] x0y0x1y1, logits [B, N, C])`` over all levels."""
    boxes, logits = [], []
    for r, s in zip(raw, STRIDES):
        b, c, h, w = r.shape
        r = r.flatten(2).transpose(1, 2)  # B, HW, 4+C
        g = grid(h, w, s, r.device)
        ltrb = F.softplus(r[..., :4]) * s
        boxes.append(torch.cat([g - ltrb[..., :2], g + ltrb[..., 2:]], -1))
        logits.append(r[..., 4:])
    return torch.cat(boxes, 1), torch.cat(logits, 1)


class Exported(nn.Module):
    """The ONNX graph: image ``[1, 3, H, W]`` (RGB 0..1) → ``[1, 4 + C, N]``."""

    def __init__(self, net: Net):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        boxes, logits = decode(self.net(x))
        cxcy = (boxes[..., :2] + boxes[..., 2:]) / 2
        wh = boxes[..., 2:] - boxes[..., :2]
        return torch.cat([cxcy, wh, torch.sigmoid(logits)], -1).transpose(1, 2)
