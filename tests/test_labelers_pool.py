"""The labeler pool: capture never waits for labeling, skips are counted, sampling policy,
subscribers, chaining, and labels recorded beside the raw data."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from mcap.reader import make_reader

from agent.config import LabelerConfig, parse_config
from agent.labelers import (Labeler, LabelerError, LabelerOptions, create, detection,
                            label_stream, make_label, register)
from agent.labelers.pool import LabelerPool
from agent.manifest import manifest_path
from agent.pipeline import Pipeline
from agent.types import Sample, StreamInfo, StreamKind


class SlowOptions(LabelerOptions):
    delay_s: float = 0.1
    fail_every: int = 0


@register("test.slow")
class SlowLabeler(Labeler):
    """A fake registered like a real labeler: sleeps ``delay_s`` per sample (or waits for
    ``gate`` when one is set), then emits one JSON label with a detection."""

    suffix = "slow"
    Options = SlowOptions
    gate: threading.Event | None = None

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.delay_s = self.options.delay_s
        self.fail_every = self.options.fail_every
        self.seen = 0

    def accepts(self, info: StreamInfo) -> bool:
        return info.kind in (StreamKind.CAMERA, StreamKind.AUDIO)

    def output_encoding(self) -> tuple[str, dict[str, Any]]:
        return "json", {"schema": "edgecap.TestLabel"}

    def label(self, sample: Sample) -> list[Sample]:
        self.seen += 1
        if self.fail_every and self.seen % self.fail_every == 0:
            raise RuntimeError("boom")
        if self.gate is not None:
            self.gate.wait(10)
        else:
            time.sleep(self.delay_s)
        det = detection(sample.stream, sample.t_ns, self.kind, "thing", 0.9,
                        box=[0, 0, 10, 10])
        return [make_label(sample, self.out_stream(sample.stream),
                           {"model": self.model.as_dict(), "n": self.seen}, [det])]


def _rig(labelers: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "device_id": "lab-rig",
        "streams": [
            {"name": "/camera/front", "driver": "camera.synthetic", "rate_hz": 30,
             "options": {"width": 160, "height": 120, "cycle": 5}},
            {"name": "/mic", "driver": "audio.synthetic",
             "options": {"sample_rate": 16000, "block": 320}},
        ],
        "labelers": labelers,
        "recorder": {"window_s": 1.0, "fsync_interval_s": 0.2, "late_grace_s": 0.5},
    }


def test_saturation_never_drops_raw_samples(tmp_path: Path) -> None:
    """Labeling at 10/s against 80 samples/s of capture: the pool skips and counts, the
    raw streams lose nothing, and every label made is recorded with its source's t_ns."""
    cfg = parse_config(_rig([{"kind": "test.slow", "streams": ["/camera/front", "/mic"],
                              "queue_size": 2, "options": {"delay_s": 0.1}}]))
    pipe = Pipeline(cfg, out_dir=tmp_path)
    pipe.open()  # builds the LabelerPool of cfg.labelers and attaches it
    pool = pipe.labelers
    assert isinstance(pool, LabelerPool)
    outs = pool.outputs
    assert [o.name for o in outs] == ["/labels/camera/front/slow", "/labels/mic/slow"]
    raw_t: dict[str, set[int]] = {"/camera/front": set(), "/mic": set()}
    pipe.taps.append(lambda s: raw_t[s.stream].add(s.t_ns))
    pipe.start()
    time.sleep(2.0)
    pipe.stop()  # stops the pool first (drains, counts the rest as skipped)

    st = pipe.stats()["streams"]
    for name in ("/camera/front", "/mic"):
        assert st[name]["queue_drops"] == 0, name
        assert st[name]["gaps"] == 0, name
        assert st[name]["enqueued"] == st[name]["received"] > 10, name
    ps = pool.stats()["test.slow#0"]
    offered = ps["offered"]
    assert offered == st["/camera/front"]["received"] + st["/mic"]["received"]
    assert ps["skipped"] > offered / 2, "labeling is 8x slower than capture"
    assert ps["labeled"] + ps["skipped"] + ps["queue_depth"] == offered
    assert ps["labels_out"] == ps["labeled"] >= 5
    assert ps["latency_ms_p50"] >= 100 and ps["latency_ms_p99"] >= ps["latency_ms_p50"]

    recorded: dict[str, list[int]] = {}
    for seg in sorted(pipe.session_dir.glob("*.mcap")):
        with open(seg, "rb") as f:
            for _, ch, msg in make_reader(f).iter_messages():
                recorded.setdefault(ch.topic, []).append(msg.log_time)
    n_labels = sum(len(recorded.get(o.name, [])) for o in outs)
    assert n_labels == ps["labels_out"]
    assert len(recorded["/camera/front"]) == st["/camera/front"]["received"]
    for o in outs:
        src = o.params["source"]
        assert set(recorded.get(o.name, [])) <= raw_t[src], "label t_ns = its sample's"

    # every bundle's manifest carries the labeler's counters beside each label stream
    per_stream = ps["streams"]["/camera/front"]
    last: dict[str, int] = {}
    for seg in sorted(pipe.session_dir.glob("*.mcap")):
        man = json.loads(manifest_path(seg).read_text())
        last = man["streams"]["/labels/camera/front/slow"].get("device_total", last)
    assert last["skipped"] == per_stream["skipped"] > 0
    assert last["labeled"] == per_stream["labeled"]
    assert last["offered"] == per_stream["offered"] == st["/camera/front"]["received"]


def test_offer_returns_while_worker_is_stuck() -> None:
    """The tap never waits: with the worker blocked, 1000 offers return at once and all
    but the queue (and the one in hand) are counted as skipped."""
    gate = threading.Event()
    SlowLabeler.gate = gate
    try:
        pool = LabelerPool.from_config([LabelerConfig(kind="test.slow", streams=["/cam"],
                                                      queue_size=3)])
        pool.plan([StreamInfo("/cam", StreamKind.CAMERA, "jpeg", 30.0)])
        pool.start()
        pool.offer(Sample("/cam", b"x", 1, t_ns=1))
        deadline = time.monotonic() + 5
        while pool.queued() and time.monotonic() < deadline:
            time.sleep(0.005)  # the worker has taken the first sample and is stuck
        t0 = time.monotonic()
        for i in range(1000):
            pool.offer(Sample("/cam", b"x", 1, t_ns=2 + i))
        elapsed = time.monotonic() - t0
        st = pool.stats()["test.slow#0"]
        assert elapsed < 1.0
        assert st["queue_depth"] == 3
        assert st["skipped"] == 1000 - 3
        gate.set()
        assert pool.wait_idle(5)
        assert pool.stats()["test.slow#0"]["labeled"] == 4
        pool.stop()
    finally:
        SlowLabeler.gate = None
        gate.set()


@register("test.pipelined")
class PipelinedLabeler(Labeler):
    """Its ``label`` of sample n waits until ``prepare`` of sample n+1 has run: this only
    finishes when the pool overlaps the two stages on two threads."""

    suffix = "pipe"
    pipelined = True

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        self.prepared: dict[int, threading.Event] = {}
        self.threads: set[str] = set()
        self.got: list[Any] = []

    def accepts(self, info: StreamInfo) -> bool:
        return True

    def output_encoding(self) -> tuple[str, dict[str, Any]]:
        return "json", {}

    def prepare(self, sample: Sample) -> Any:
        self.threads.add("prepare:" + threading.current_thread().name.split(":")[0])
        self.prepared.setdefault(sample.seq, threading.Event()).set()
        return {"seq": sample.seq}

    def label(self, sample: Sample, prepared: Any = None) -> list[Sample]:
        self.threads.add("label:" + threading.current_thread().name.split(":")[0])
        self.got.append(prepared)
        if sample.seq < 3:
            assert self.prepared.setdefault(sample.seq + 1, threading.Event()).wait(5)
        return []


def test_pipelined_labeler_prepares_ahead() -> None:
    pool = LabelerPool.from_config([LabelerConfig(kind="test.pipelined", streams=["/cam"],
                                                  queue_size=10)])
    pool.plan([StreamInfo("/cam", StreamKind.CAMERA, "jpeg", 30.0)])
    pool.start()
    for i in range(4):
        pool.offer(Sample("/cam", b"x", 1, seq=i, t_ns=i + 1))
    assert pool.wait_idle(10)
    pool.stop()
    lab = pool.workers[0].labeler
    assert lab.got == [{"seq": i} for i in range(4)]
    assert lab.threads == {"prepare:labeler-prep", "label:labeler"}
    assert pool.stats()["test.pipelined#0"]["labeled"] == 4


def _pool(**cfg: Any) -> LabelerPool:
    pool = LabelerPool.from_config([LabelerConfig(kind="test.slow", streams=["/cam"],
                                                  options={"delay_s": 0.0}, **cfg)])
    pool.plan([StreamInfo("/cam", StreamKind.CAMERA, "jpeg", 30.0)])
    return pool


def test_every_n_and_max_rate() -> None:
    pool = _pool(every_n=3, queue_size=100)
    for i in range(30):
        pool.offer(Sample("/cam", b"x", 1, t_ns=i * 33_333_333))
    r = pool.stats()["test.slow#0"]
    assert (r["sampled_out"], r["queue_depth"]) == (20, 10)

    pool = _pool(max_rate_hz=5.0, queue_size=100)
    for i in range(60):  # 2 s at 30 Hz with a little jitter
        pool.offer(Sample("/cam", b"x", 1, t_ns=i * 33_333_333 + (i % 3) * 1_000_000))
    r = pool.stats()["test.slow#0"]
    assert r["queue_depth"] == 10 and r["sampled_out"] == 50


def test_subscribers_latest_nearest_and_errors() -> None:
    pool = LabelerPool.from_config([LabelerConfig(
        kind="test.slow", streams=["/cam"], queue_size=100,
        options={"delay_s": 0.0, "fail_every": 4})])
    pool.plan([StreamInfo("/cam", StreamKind.CAMERA, "jpeg", 30.0)])
    got: list[tuple[Sample, list[dict[str, Any]]]] = []
    pool.subscribe(lambda s, d: got.append((s, d)))
    pool.subscribe(lambda s, d: 1 / 0)  # a broken subscriber is counted, not fatal
    pool.start()
    for i in range(8):
        pool.offer(Sample("/cam", b"x", 1000 + i, t_ns=(i + 1) * 100))
    assert pool.wait_idle(5)
    pool.stop()
    st = pool.stats()["test.slow#0"]
    assert st["errors"] == 2 and st["labeled"] == 6
    assert len(got) == 6 and pool.subscriber_errors == 6
    s, dets = got[0]
    assert s.stream == "/labels/cam/slow" and s.t_ns == 100
    assert dets == [{"stream": "/cam", "t_ns": 100, "kind": "test.slow", "cls": "thing",
                     "score": 0.9, "box": [0, 0, 10, 10]}]
    assert pool.latest("/labels/cam/slow")[0].t_ns == 700  # 400 and 800 failed
    assert pool.nearest("/labels/cam/slow", 390, 100)[0].t_ns == 300  # 400 failed
    assert pool.nearest("/labels/cam/slow", 390, 50) is None


def test_config_errors() -> None:
    with pytest.raises(LabelerError, match="unknown labeler 'camera.nope'"):
        create(LabelerConfig(kind="camera.nope", streams=["/cam"]))
    with pytest.raises(LabelerError, match="cannot label /gps"):
        pool = LabelerPool.from_config([LabelerConfig(kind="test.slow", streams=["/gps"])])
        pool.plan([StreamInfo("/gps", StreamKind.GPS, "fix", 5.0)])
    with pytest.raises(LabelerError, match="bad options"):
        create(LabelerConfig(kind="audio.onset", streams=["/mic"], options={"hopp": 3}))
    with pytest.raises(LabelerError, match="model file not found"):
        create(LabelerConfig(kind="camera.yolo", streams=["/cam"], model="/nope.onnx"))
    assert label_stream("/camera/front", "yolo") == "/labels/camera/front/yolo"
