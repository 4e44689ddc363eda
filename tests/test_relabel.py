"""Relabeling a session: new versioned label channels beside the old ones, every recorded
message copied byte for byte, same windows, manifests regenerated and verified. The
labeler is a fake registered exactly like the real ones."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from agent.inspect import inspect_path
from agent.labelers import (Labeler, LabelerOptions, ModelInfo, detection, make_label,
                            register)
from agent.labelers._foxglove import image_annotations
from agent.relabel import RelabelError, relabel
from agent.replay import SessionReader, open_session
from agent.types import Sample, StreamInfo, StreamKind
from test_replay_fixture import SESSION_ID, make_session


class FakeBoxOptions(LabelerOptions):
    size: float = 10.0


@register("test.fakebox")
class FakeBox(Labeler):
    """One box per camera frame whose x is the frame's seq; holds back the last frame's
    label until ``flush`` (like a stateful labeler)."""

    suffix = "fakebox"
    Options = FakeBoxOptions

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.model = ModelInfo.of_file(cfg.model, "fakebox", "2", {"size": self.options.size})
        self.held: Sample | None = None

    def accepts(self, info: StreamInfo) -> bool:
        return info.kind == StreamKind.CAMERA and info.encoding == "jpeg"

    def label(self, sample: Sample) -> list[Sample]:
        if not isinstance(sample.payload, bytes):
            self.bad_input += 1
            return []
        out = [self._make(self.held)] if self.held is not None else []
        self.held = sample
        return out

    def _make(self, s: Sample) -> Sample:
        x = float(s.seq or 0)
        dets = [detection(s.stream, s.t_ns, self.kind, "box", 0.75,
                          box=[x, 1.0, x + self.options.size, 11.0])]
        msg = image_annotations(s.t_ns, dets, self.model, self.kind, s.stream)
        return make_label(s, self.out_stream(s.stream), msg, dets)

    def flush(self) -> list[Sample]:
        out = [self._make(self.held)] if self.held is not None else []
        self.held = None
        return out


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory):
    return make_session(tmp_path_factory.mktemp("relabel"), duration_s=2.5)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    p = tmp_path / "fakebox.onnx"
    p.write_bytes(b"not really onnx, but a file with a hash")
    return p


def _raw(session_dir: Path) -> dict[tuple[str, int, int], bytes]:
    from mcap.reader import make_reader

    out = {}
    for seg in sorted(session_dir.glob("*.mcap")):
        with open(seg, "rb") as f:
            for _s, ch, m in make_reader(f).iter_messages(log_time_order=False):
                if ch.topic != "/edgecap/stamps":
                    out[(ch.topic, m.log_time, m.sequence)] = m.data
    return out


def test_relabel_adds_versioned_channels_and_keeps_everything(session, model: Path,
                                                              tmp_path: Path) -> None:
    res = relabel(str(session.session_dir), "test.fakebox", str(model), tmp_path,
                  streams=["/camera/front"], options={"size": 8.0})
    sha8 = hashlib.sha256(model.read_bytes()).hexdigest()[:8]
    new = f"/labels/camera/front/fakebox@{sha8}"
    assert res.tag == sha8 and res.session_dir == tmp_path / f"{SESSION_ID}-relabel-{sha8}"
    n = len(session.samples["/camera/front"])
    assert res.streams == {new: n} and res.labeled == n and res.errors == 0
    assert res.problems == []
    rep = inspect_path(res.session_dir)
    assert rep["ok"], rep["problems"]
    # same windows, every old message byte-identical, old label channel kept
    old_segs = sorted(p.name[len(SESSION_ID):] for p in session.session_dir.glob("*.mcap"))
    new_segs = sorted(p.name[len(res.session_id):] for p in res.session_dir.glob("*.mcap"))
    assert old_segs == new_segs
    before, after = _raw(session.session_dir), _raw(res.session_dir)
    assert {k: v for k, v in after.items() if k[0] != new} == before
    reader = SessionReader(open_session(str(res.session_dir)))
    info = reader.infos[new]
    assert info.params["version_tag"] == sha8 and info.params["model_sha256"].startswith(sha8)
    assert info.params["relabel_of"] == "/labels/camera/front/fakebox"
    assert "/labels/camera/front/yolo" in reader.infos
    labels = [reader.sample(r) for r in reader.records(streams={new})]
    front = session.samples["/camera/front"]
    assert [s.t_ns for s in labels] == [s.t_ns for s in front]  # the flushed one included
    p = labels[5].payload.points[0].points
    assert (p[0].x, p[1].x) == (5.0, 13.0)  # x = seq, size from the options
    assert reader.metadata["edgecap.session"]["relabel_of"] == SESSION_ID
    assert reader.metadata["edgecap.relabel"]["labeler"] == "test.fakebox"
    with pytest.raises(RelabelError, match="not empty"):
        relabel(str(session.session_dir), "test.fakebox", str(model), tmp_path)


def test_relabel_twice_needs_a_new_tag(session, model: Path, tmp_path: Path) -> None:
    first = relabel(str(session.session_dir), "test.fakebox", str(model), tmp_path / "a",
                    tag="v2")
    assert set(first.streams) == {"/labels/camera/front/fakebox@v2",
                                  "/labels/camera/rear/fakebox@v2"}
    with pytest.raises(RelabelError, match="already exists"):
        relabel(str(first.session_dir), "test.fakebox", str(model), tmp_path / "b", tag="v2")
    second = relabel(str(first.session_dir), "test.fakebox", str(model), tmp_path / "b",
                     tag="v3", streams=["/camera/rear"])
    reader = SessionReader(open_session(str(second.session_dir)))
    assert {"/labels/camera/front/fakebox@v2", "/labels/camera/rear/fakebox@v2",
            "/labels/camera/rear/fakebox@v3"} <= set(reader.infos)
    assert second.problems == []


def test_relabel_refuses_a_labeler_without_inputs(session, model: Path, tmp_path: Path) -> None:
    with pytest.raises(RelabelError, match="accepts none"):
        relabel(str(session.session_dir), "test.fakebox", str(model), tmp_path,
                streams=["/lidar"])


def test_relabel_export_shows_both_models(session, model: Path, tmp_path: Path) -> None:
    """A better model on last week's drive: both predictions reach Label Studio."""
    import json

    from agent.export import ExportOptions, export

    res = relabel(str(session.session_dir), "test.fakebox", str(model), tmp_path / "s",
                  streams=["/camera/front"], tag="v9")
    export(str(res.session_dir), "labelstudio",
           ExportOptions(out_dir=tmp_path / "ls", streams=["/camera/front"], progress=False))
    tasks = json.loads((tmp_path / "ls" / "tasks.json").read_text())
    versions = {p["model_version"] for p in tasks[3]["predictions"]}
    assert versions == {"tiny-yolo:3@abababab",
                        f"fakebox:2@{hashlib.sha256(model.read_bytes()).hexdigest()[:8]}"}


def test_cli_relabel(session, model: Path, tmp_path: Path) -> None:
    from agent.cli import main

    r = CliRunner().invoke(main, ["relabel", str(session.session_dir), "--labeler",
                                  "test.fakebox", "--model", str(model), "--out",
                                  str(tmp_path), "-s", "/camera/front", "-o", "size=4",
                                  "--tag", "cli"])
    assert r.exit_code == 0, r.output
    assert "/labels/camera/front/fakebox@cli" in r.output and "verified" in r.output
    r = CliRunner().invoke(main, ["relabel", str(session.session_dir), "--labeler",
                                  "no.such", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "unknown labeler" in r.output
