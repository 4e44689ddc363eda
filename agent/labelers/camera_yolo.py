"""``camera.yolo``: any Ultralytics-layout YOLO ONNX detector on camera frames.

Model contract (what ``yolo export format=onnx`` writes): one input ``[1, 3, H, W]`` float
RGB in 0..1, one output ``[1, 4 + C, N]`` whose rows are ``cx, cy, w, h`` in input pixels
then C class scores (already sigmoid). Class names come from the ONNX ``metadata_props``
``names`` (a dict string such as ``"{0: 'car', 1: 'pedestrian'}"``) or from
``options.names``. Without ``model`` the detector trained on the HIL world is used
(``agent/labelers/models/hil-detector.onnx``, see ``hil/training/train_detector.py``).

Pipeline per frame: JPEG decoded at 1/2, 1/4 or 1/8 size when the letterboxed input is that
much smaller (``cv2.IMREAD_REDUCED_COLOR_*``: the decoder skips the work), letterbox
(aspect kept, centred, grey 114 padding), ONNX run, confidence filter, class-aware NMS
(``cv2.dnn.NMSBoxesBatched``), boxes mapped back to source pixels → ImageAnnotations.
Decoding and letterboxing are the labeler's ``prepare`` step: the pool runs it for the next
frame on a second thread while the model runs on the current one.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pydantic import Field

from agent.types import Sample, StreamInfo, StreamKind

from . import (UNSET, Labeler, LabelerError, LabelerOptions, ModelInfo, detection, make_label,
               register)
from ._foxglove import image_annotations
from ._onnx import metadata, parse_names, session

DEFAULT_MODEL = Path(__file__).resolve().parent / "models" / "hil-detector.onnx"
IMAGE_ENCODINGS = ("jpeg", "png", "bgr8", "rgb8", "mono8")


class YoloOptions(LabelerOptions):
    conf: float = Field(default=0.25, gt=0, lt=1, description="minimum class score")
    iou: float = Field(default=0.45, gt=0, le=1, description="NMS IoU threshold")
    max_det: int = Field(default=100, ge=1, le=10_000)
    names: list[str] | None = Field(default=None, description="class names (override)")
    classes: list[str] | None = Field(default=None, description="keep only these classes")
    imgsz: list[int] | None = Field(default=None, min_length=2, max_length=2,
                                    description="[height, width] for dynamic-shape models")
    reduced_decode: bool = True
    agnostic_nms: bool = Field(default=False, description="NMS across classes (one box per "
                               "object even when two classes score on it)")


def jpeg_size(data: bytes | memoryview) -> tuple[int, int] | None:
    """``(width, height)`` from a JPEG's SOF marker, without decoding; None if not found."""
    b = bytes(data[:65536]) if not isinstance(data, bytes) else data
    if len(b) < 4 or b[0] != 0xFF or b[1] != 0xD8:
        return None
    i = 2
    n = len(b)
    while i + 9 < n:
        if b[i] != 0xFF:
            i += 1
            continue
        marker = b[i + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
            i += 1 if marker == 0xFF else 2
            continue
        seg_len = struct.unpack(">H", b[i + 2:i + 4])[0]
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD,
                      0xCE, 0xCF):
            h, w = struct.unpack(">HH", b[i + 5:i + 9])
            return w, h
        i += 2 + seg_len
    return None


_REDUCED = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8}


def reduction_for(w: int, h: int, in_h: int, in_w: int) -> int:
    """Largest JPEG DCT reduction (1, 2, 4, 8) of a ``w × h`` frame that still leaves at
    least the pixels a letterbox into ``in_h × in_w`` keeps."""
    s = min(in_h / h, in_w / w)
    r = 1
    while r < 8 and s * r * 2 <= 1.0:
        r *= 2
    return r


def decode_for_input(data: bytes, in_h: int, in_w: int, reduction: int | None = None
                     ) -> tuple[np.ndarray | None, float]:
    """Decode a JPEG for a model input of ``in_h × in_w``, at 1/2, 1/4 or 1/8 size when that
    loses nothing (``reduction`` forces one). Returns ``(bgr, factor)`` with source pixel =
    decoded pixel × factor, or ``(None, 1.0)`` for undecodable data."""
    size = jpeg_size(data)
    r = reduction or (reduction_for(size[0], size[1], in_h, in_w) if size else 1)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), _REDUCED.get(r, cv2.IMREAD_COLOR))
    if img is None:
        return None, 1.0
    return img, (size[0] / img.shape[1] if size else 1.0)


def letterbox(img: np.ndarray, in_h: int, in_w: int) -> tuple[np.ndarray, float, float, float]:
    """Resize keeping aspect into ``in_h × in_w``, centred on grey 114. Returns the canvas
    and ``(scale, pad_x, pad_y)`` so that ``input = image * scale + pad``."""
    h, w = img.shape[:2]
    s = min(in_h / h, in_w / w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    resized = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR) if (nh, nw) != (h, w) \
        else img
    canvas = np.full((in_h, in_w, 3), 114, np.uint8)
    py, px = (in_h - nh) // 2, (in_w - nw) // 2
    canvas[py:py + nh, px:px + nw] = resized
    return canvas, s, float(px), float(py)


def decode_yolo(out: np.ndarray, n_cls: int, conf: float, iou: float, max_det: int,
                agnostic: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw output ``[1, 4+C, N]`` (or ``[1, N, 4+C]``) → ``(boxes x0y0x1y1 K×4, scores K,
    class ids K)`` in input pixels after the confidence filter and NMS (per class, or
    across classes with ``agnostic``)."""
    a = np.asarray(out)[0]
    if a.shape[0] != 4 + n_cls and a.shape[1] == 4 + n_cls:
        a = a.T
    scores_all = a[4:4 + n_cls]
    cls = scores_all.argmax(0)
    score = scores_all[cls, np.arange(a.shape[1])]
    keep = score >= conf
    if not keep.any():
        return np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64)
    xywh = a[:4, keep].T.astype(np.float32)
    score, cls = score[keep].astype(np.float32), cls[keep]
    tl = xywh[:, :2] - xywh[:, 2:] / 2
    rects = np.concatenate([tl, xywh[:, 2:]], 1)
    if agnostic:
        idx = cv2.dnn.NMSBoxes(rects.tolist(), score.tolist(), conf, iou)
    else:
        idx = cv2.dnn.NMSBoxesBatched(rects.tolist(), score.tolist(), cls.tolist(), conf, iou)
    idx = np.asarray(idx, dtype=np.int64).reshape(-1)[:max_det]
    boxes = np.concatenate([tl[idx], tl[idx] + xywh[idx, 2:]], 1)
    return boxes, score[idx], cls[idx]


class YoloDetector:
    """The model and its pre/post-processing, usable without the pool (tests, scoring,
    benchmarks). ``detect(bgr)`` and ``detect_jpeg(bytes)`` return dicts with ``cls``,
    ``score``, ``box`` in source pixels. Not thread-safe per instance (one worker)."""

    def __init__(self, path: str | os.PathLike[str] | None = None, threads: int = 1,
                 options: YoloOptions | None = None):
        o = options or YoloOptions()
        self.options = o
        self.path = os.fspath(path or DEFAULT_MODEL)
        self.sess = session(self.path, threads)
        inp = self.sess.get_inputs()[0]
        self.input_name = inp.name
        meta = metadata(self.sess)
        shape = list(inp.shape)
        if o.imgsz:
            self.in_h, self.in_w = o.imgsz
        elif len(shape) == 4 and all(isinstance(d, int) for d in shape[2:]):
            self.in_h, self.in_w = int(shape[2]), int(shape[3])
        elif "imgsz" in meta:
            sz = parse_names(meta["imgsz"])
            self.in_h, self.in_w = int(sz[0]), int(sz[-1])
        else:
            self.in_h = self.in_w = 640
        self.names = list(o.names) if o.names else parse_names(meta.get("names"))
        out_shape = self.sess.get_outputs()[0].shape
        rows = out_shape[1] if len(out_shape) == 3 and isinstance(out_shape[1], int) else None
        if not self.names:
            if rows is None:
                raise LabelerError(f"{self.path}: no class names in the model metadata; "
                                   "set options.names")
            self.names = [f"class{i}" for i in range(rows - 4)]
        if rows is not None and rows != 4 + len(self.names) and (
                not isinstance(out_shape[2], int) or out_shape[2] != 4 + len(self.names)):
            raise LabelerError(f"{self.path}: output {out_shape} does not match "
                               f"{len(self.names)} class names")
        version = meta.get("version") or str(self.sess.get_modelmeta().version)
        name = meta.get("model_name") or Path(self.path).stem
        self.model = ModelInfo.of_file(self.path, name, version,
                                       {"conf": o.conf, "iou": o.iou,
                                        **({"agnostic_nms": 1} if o.agnostic_nms else {})})
        self.keep = set(o.classes) if o.classes else None

    # -- preprocessing --------------------------------------------------------------
    def decode_jpeg(self, data: bytes) -> tuple[np.ndarray | None, float]:
        """Decode (reduced where it pays), see :func:`decode_for_input`."""
        r = None if self.options.reduced_decode else 1
        return decode_for_input(data, self.in_h, self.in_w, r)

    def preprocess(self, bgr: np.ndarray) -> tuple[np.ndarray, float, float, float]:
        canvas, s, px, py = letterbox(bgr, self.in_h, self.in_w)
        x = cv2.dnn.blobFromImage(canvas, 1 / 255.0, swapRB=True)  # NCHW float32 RGB
        return x, s, px, py

    def prepare(self, bgr: np.ndarray, factor: float = 1.0) -> Prepared:
        """Model-free half of :meth:`detect` (any thread)."""
        x, s, px, py = self.preprocess(bgr)
        return Prepared(x, s, px, py, factor, bgr.shape[1], bgr.shape[0])

    def prepare_jpeg(self, data: bytes) -> Prepared | None:
        img, factor = self.decode_jpeg(data)
        return None if img is None else self.prepare(img, factor)

    # -- inference ------------------------------------------------------------------
    def run(self, p: Prepared) -> list[dict[str, Any]]:
        """Model and post-processing: detections with boxes in source pixels."""
        out = self.sess.run(None, {self.input_name: p.x})[0]
        boxes, scores, cls = decode_yolo(out, len(self.names), self.options.conf,
                                         self.options.iou, self.options.max_det,
                                         self.options.agnostic_nms)
        res = []
        for b, sc, c in zip(boxes, scores, cls):
            name = self.names[int(c)]
            if self.keep is not None and name not in self.keep:
                continue
            x0 = float(np.clip((b[0] - p.pad_x) / p.scale, 0, p.w)) * p.factor
            y0 = float(np.clip((b[1] - p.pad_y) / p.scale, 0, p.h)) * p.factor
            x1 = float(np.clip((b[2] - p.pad_x) / p.scale, 0, p.w)) * p.factor
            y1 = float(np.clip((b[3] - p.pad_y) / p.scale, 0, p.h)) * p.factor
            if x1 - x0 < 1 or y1 - y0 < 1:
                continue
            res.append({"cls": name, "score": float(sc),
                        "box": [round(x0, 1), round(y0, 1), round(x1, 1), round(y1, 1)]})
        return res

    def detect(self, bgr: np.ndarray, factor: float = 1.0) -> list[dict[str, Any]]:
        """Detections on a BGR image; boxes are multiplied by ``factor`` (reduced decode)."""
        return self.run(self.prepare(bgr, factor))

    def detect_jpeg(self, data: bytes) -> list[dict[str, Any]] | None:
        p = self.prepare_jpeg(data)
        return None if p is None else self.run(p)


@dataclass(frozen=True)
class Prepared:
    """A frame ready for the model: input tensor and how to map boxes back
    (``source = (input - pad) / scale × factor``, clipped to ``w × h`` decoded pixels)."""

    x: np.ndarray
    scale: float
    pad_x: float
    pad_y: float
    factor: float
    w: int
    h: int


def image_of(sample: Sample, encoding: str) -> tuple[np.ndarray | None, bytes | None]:
    """``(array, compressed bytes)`` of a camera sample; one of them is None."""
    p = sample.payload
    if encoding in ("jpeg", "png"):
        if isinstance(p, (bytes, bytearray, memoryview)):
            return None, bytes(p)
        return None, None
    if not isinstance(p, np.ndarray):
        return None, None
    if encoding == "rgb8":
        return cv2.cvtColor(p, cv2.COLOR_RGB2BGR), None
    if encoding == "mono8":
        return cv2.cvtColor(p, cv2.COLOR_GRAY2BGR), None
    return p, None


@register("camera.yolo")
class CameraYolo(Labeler):
    """2D boxes on ``/labels/<camera>/yolo`` as ImageAnnotations."""

    suffix = "yolo"
    Options = YoloOptions
    pipelined = True

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.det = YoloDetector(cfg.model, cfg.threads, self.options)
        self.model = self.det.model
        self._enc: dict[str, str] = {}

    def accepts(self, info: StreamInfo) -> bool:
        ok = info.kind == StreamKind.CAMERA and info.encoding in IMAGE_ENCODINGS
        if ok:
            self._enc[info.name] = info.encoding
        return ok

    def prepare(self, sample: Sample) -> Prepared | None:
        """Decode and letterbox (the pool's prepare thread); None for bad input."""
        arr, data = image_of(sample, self._enc.get(sample.stream, "jpeg"))
        if data is not None:
            return self.det.prepare_jpeg(data)
        if arr is not None and arr.ndim == 3:
            return self.det.prepare(arr)
        return None

    def label(self, sample: Sample, prepared: Any = UNSET) -> list[Sample]:
        p = self.prepare(sample) if prepared is UNSET else prepared
        if p is None:
            self.bad_input += 1
            return []
        full = [detection(sample.stream, sample.t_ns, self.kind, d["cls"], d["score"],
                          box=d["box"]) for d in self.det.run(p)]
        msg = image_annotations(sample.t_ns, full, self.model, self.kind, sample.stream,
                                self.det.names)
        return [make_label(sample, self.out_stream(sample.stream), msg, full)]
