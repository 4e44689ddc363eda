"""Exports into labeling tools: each loads in its tool's own library (pycocotools for
COCO; Label Studio's task JSON schema; CVAT XML parsed back, PCD read by open3d) and
matches golden files for a small deterministic session."""

from __future__ import annotations

import json
import os
import wave
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from agent.export import ExportError, ExportOptions, export
from agent.export.cvat import parse_cvat_xml, read_pcd
from agent.export.labelstudio import validate_tasks
from test_replay_fixture import T0, make_session

GOLDEN = Path(__file__).resolve().parent / "golden"
UPDATE = os.environ.get("EDGECAP_UPDATE_GOLDEN") == "1"


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory):
    return make_session(tmp_path_factory.mktemp("export"), duration_s=3.0)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory):
    """The golden session: 0.6 s, 5 Hz camera, every label kind."""
    return make_session(tmp_path_factory.mktemp("golden"), duration_s=0.6, cam_hz=5.0)


def _opts(out: Path, **kw) -> ExportOptions:
    return ExportOptions(out_dir=out, progress=False, **kw)


def test_coco_loads_in_pycocotools(session, tmp_path: Path) -> None:
    from pycocotools.coco import COCO

    res = export(str(session.session_dir), "coco", _opts(tmp_path, streams=["/camera/*"]))
    coco = COCO(str(tmp_path / "annotations.json"))
    front = session.samples["/camera/front"]
    n_img = len(front) + len(session.samples["/camera/rear"])
    assert len(coco.getImgIds()) == res["images"] == n_img
    assert {c["name"] for c in coco.loadCats(coco.getCatIds())} == {"car", "pedestrian"}
    n_boxes = sum(1 + (i % 3 == 0) for i in range(len(front)))
    assert len(coco.getAnnIds()) == res["annotations"] == n_boxes
    # the JPEG bytes are the recorded ones, the box is the recorded box as x, y, w, h
    img = next(i for i in coco.dataset["images"]
               if i["edgecap"]["stream"] == "/camera/front" and i["edgecap"]["seq"] == 4)
    assert (tmp_path / img["file_name"]).read_bytes() == front[4].payload
    assert (img["width"], img["height"]) == (64, 48)
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
    assert len(anns) == 1 and anns[0]["bbox"] == [8.0, 6.0, 26.0, 34.0]
    assert anns[0]["score"] == pytest.approx(0.9) and anns[0]["model"] == \
        "tiny-yolo:3@abababab"
    # results API takes our annotations as detections (scores kept)
    dets = coco.loadRes([{k: a[k] for k in ("image_id", "category_id", "bbox", "score")}
                         for a in coco.dataset["annotations"]])
    assert len(dets.getAnnIds()) == n_boxes


def test_labelstudio_tasks_validate_and_carry_model_version(session, tmp_path: Path) -> None:
    res = export(str(session.session_dir), "labelstudio",
                 _opts(tmp_path, streams=["/camera/front", "/mic"]), clip_s=2.0)
    tasks = json.loads((tmp_path / "tasks.json").read_text())
    assert validate_tasks(tasks) == []
    assert res["image_tasks"] == len(session.samples["/camera/front"])
    img = next(t for t in tasks if t["data"].get("seq") == 3 and "image" in t["data"])
    (pred,) = img["predictions"]
    assert pred["model_version"] == "tiny-yolo:3@abababab"
    car, ped = sorted(pred["result"], key=lambda r: r["value"]["rectanglelabels"][0])
    assert car["value"]["x"] == pytest.approx(100 * 7 / 64, abs=1e-3)
    assert car["value"]["width"] == pytest.approx(100 * 26 / 64, abs=1e-3)
    assert car["original_width"] == 64 and car["score"] == pytest.approx(0.8)
    assert pred["score"] == pytest.approx((0.8 + 0.42) / 2, abs=1e-4)
    audio = [t for t in tasks if "audio" in t["data"]]
    assert len(audio) == 2  # 3 s of audio in 2 s clips
    with wave.open(str(tmp_path / audio[0]["data"]["audio"])) as w:
        assert (w.getframerate(), w.getnchannels(), w.getnframes()) == (48000, 1, 96000)
    (ap,) = audio[0]["predictions"]
    regions = [r["value"] for r in ap["result"]]
    assert regions == [{"start": 0.3, "end": 0.9, "labels": ["speech"]},
                       {"start": 1.5, "end": 2.0, "labels": ["speech"]}]  # clipped at 2 s
    assert ap["model_version"] == "silero_vad:5.1@cdcdcdcd"
    (bp,) = audio[1]["predictions"]
    assert [r["value"] for r in bp["result"]] == [{"start": 0.0, "end": 0.2,
                                                   "labels": ["speech"]}]
    bad = json.loads(json.dumps(tasks))
    bad[0]["predictions"][0]["result"][0]["value"]["x"] = 140
    del bad[1]["predictions"][0]["model_version"]
    assert len(validate_tasks(bad)) == 2  # the schema catches what Label Studio rejects


@pytest.mark.parametrize("box, score", [
    ([7.0, 5.0, 33.0, 30.0], 0.8),
    ([-3.5, 1e-7, 70.0, 47.25], 1 / 3),  # clipped to the image
    ([float("nan"), 5.0, 33.0, 30.0], 0.5),
    ([7.0, 5.0, float("inf"), 30.0], float("nan")),
    ([40.0, 5.0, 33.0, 30.0], 0.5),  # empty after clipping: dropped
])
def test_labelstudio_task_text_is_the_json_of_its_dict(box, score) -> None:
    """Image tasks are written as text without building dicts: they must be what the JSON
    encoder gives for the same dict (sorted keys, compact; NaN/Infinity as it spells
    them), so that tasks.json is the same bytes as before."""
    from agent.export.common import Frame, LabelSet, json_text
    from agent.export.labelstudio import _image_task
    from agent.types import Sample, StreamInfo, StreamKind
    from test_replay_fixture import jpeg

    info = StreamInfo("/camera/x", StreamKind.CAMERA, "jpeg", 10.0)
    dets = [{"cls": "car", "score": score, "box": box},
            {"cls": 'a "quoted" é', "score": 0.25, "box": [1, 2, 3, 4]}, {"cls": "x"}]
    fr = Frame(Sample("/camera/x", jpeg(1, 64, 48), 0, t_ns=T0, seq=3), info,
               [LabelSet("/labels/x", "camera.yolo", {"name": "m", "version": "1"}, dets,
                         T0), LabelSet("/labels/y", "l", {}, [], T0)])

    class Files:
        def write(self, path, data) -> None:
            pass

    text, n = _image_task(fr, "/out", "/data/", set(), Files())
    assert n == 2
    assert text == json_text(json.loads(text))


def test_cvat_xml_pcd_and_cuboids(session, tmp_path: Path) -> None:
    import open3d as o3d

    res = export(str(session.session_dir), "cvat", _opts(tmp_path))
    doc = parse_cvat_xml(tmp_path / "annotations.xml")
    assert set(doc["labels"]) == {"car", "pedestrian"}
    front = [i for i in doc["images"] if i["name"].startswith("images/camera_front/")]
    assert len(front) == len(session.samples["/camera/front"])
    b = front[4]["boxes"][0]
    assert (b["label"], b["xtl"], b["ytl"], b["xbr"], b["ybr"]) == ("car", 8.0, 6.0, 34.0, 40.0)
    assert b["source"] == "auto" and float(b["attributes"]["score"]) == pytest.approx(0.9)
    scans = session.samples["/lidar"]
    pcds = sorted((tmp_path / "pointcloud" / "pointcloud").glob("*.pcd"))
    assert len(pcds) == res["pointclouds"] == len(scans)
    pc = o3d.io.read_point_cloud(str(pcds[2]))
    assert len(pc.points) == len(scans[2].payload)
    xyz = np.stack([scans[2].payload[k] for k in ("x", "y", "z")], 1)
    assert np.allclose(np.asarray(pc.points), xyz, atol=1e-6)
    assert np.array_equal(read_pcd(pcds[2])[:, 3], scans[2].payload["intensity"])
    dm = json.loads((tmp_path / "pointcloud" / "annotations" / "default.json").read_text())
    labels = [lab["name"] for lab in dm["categories"]["label"]["labels"]]
    item = dm["items"][2]
    (cub,) = item["annotations"]
    assert cub["type"] == "cuboid_3d" and labels[cub["label_id"]] == "car"
    assert cub["position"] == pytest.approx([5.0, 1.2, 0.7]) and cub["scale"] == \
        pytest.approx([4.5, 1.8, 1.5]) and cub["rotation"][2] == pytest.approx(0.25, abs=1e-4)
    # related images: the nearest frame of each camera, in CVAT's <name>_pcd folder
    rel = item["related_images"]
    assert {r["stream"] for r in rel} == {"/camera/front", "/camera/rear"}
    for r in rel:
        assert abs(r["t_ns"] - item["attr"]["t_ns"]) <= 25_000_000
        p = tmp_path / "pointcloud" / r["path"]
        assert p.parent.name == f"{item['id']}_pcd" and p.read_bytes()[:2] == b"\xff\xd8"


def test_cvat_ascii_pcd_round_trip(small, tmp_path: Path) -> None:
    export(str(small.session_dir), "cvat", _opts(tmp_path, streams=["/lidar"]), pcd_ascii=True)
    p = sorted((tmp_path / "pointcloud" / "pointcloud").glob("*.pcd"))[0]
    assert b"DATA ascii" in p.read_bytes()[:400]
    got = read_pcd(p)
    want = small.samples["/lidar"][0].payload
    assert np.allclose(got[:, 0], want["x"], atol=1e-5) and len(got) == len(want)


def test_window_and_only_triggered(session, tmp_path: Path) -> None:
    res = export(str(session.session_dir), "coco",
                 _opts(tmp_path / "a", streams=["/camera/front"], from_s=1.0, to_s=1.5))
    assert res["images"] == 10
    trig = session.session_dir / "triggers.jsonl"
    trig.write_text(json.dumps({"name": "car", "t_ns": T0 + 2_000_000_000,
                                "start_ns": T0 + 1_900_000_000,
                                "end_ns": T0 + 2_100_000_000}) + "\n")
    try:
        res = export(str(session.session_dir), "coco",
                     _opts(tmp_path / "b", streams=["/camera/front"], only_triggered=True))
    finally:
        trig.unlink()
    doc = json.loads((tmp_path / "b" / "annotations.json").read_text())
    ts = [i["edgecap"]["t_ns"] for i in doc["images"]]
    assert res["images"] == 4 and all(T0 + 1.9e9 <= t < T0 + 2.1e9 for t in ts)
    with pytest.raises(ExportError, match="no stream matches"):
        export(str(session.session_dir), "coco", _opts(tmp_path / "c", streams=["/nope"]))


# -- golden files ---------------------------------------------------------------------

def _normalise(obj):
    """Drop what changes between runs (creation dates, absolute paths)."""
    if isinstance(obj, dict):
        return {k: _normalise(v) for k, v in obj.items() if k not in ("date_created", "out")}
    if isinstance(obj, list):
        return [_normalise(v) for v in obj]
    return obj


def _golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"{path} missing: run with EDGECAP_UPDATE_GOLDEN=1 once"
    assert text == path.read_text(), f"{name} differs from the golden file"


def _dump(obj) -> str:
    return json.dumps(_normalise(obj), indent=1, sort_keys=True) + "\n"


def test_golden_coco(small, tmp_path: Path) -> None:
    export(str(small.session_dir), "coco", _opts(tmp_path))
    _golden("coco_annotations.json", _dump(json.loads((tmp_path / "annotations.json")
                                                      .read_text())))


def test_golden_labelstudio(small, tmp_path: Path) -> None:
    export(str(small.session_dir), "labelstudio", _opts(tmp_path), url_prefix="/data/")
    _golden("labelstudio_tasks.json", _dump(json.loads((tmp_path / "tasks.json").read_text())))
    _golden("labelstudio_config_image.xml", (tmp_path / "label_config_image.xml").read_text())


def test_golden_cvat(small, tmp_path: Path) -> None:
    export(str(small.session_dir), "cvat", _opts(tmp_path))
    _golden("cvat_annotations.xml", (tmp_path / "annotations.xml").read_text())
    _golden("cvat_pointcloud_default.json", _dump(json.loads(
        (tmp_path / "pointcloud" / "annotations" / "default.json").read_text())))


def test_cli_export(small, tmp_path: Path) -> None:
    from agent.cli import main

    r = CliRunner().invoke(main, ["export", str(small.session_dir), "--format", "coco",
                                  "--out", str(tmp_path / "o"), "-q", "-s", "/camera/front"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["images"] == len(small.samples["/camera/front"]) and doc["annotations"] > 0
    r = CliRunner().invoke(main, ["export", str(small.session_dir), "--format", "coco",
                                  "--out", str(tmp_path / "p"), "-q", "-s", "/x"])
    assert r.exit_code == 2 and "no stream matches" in r.output
