"""Bounded queues never block the producer and count every drop."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from agent.config import parse_config
from agent.inspect import inspect_path
from agent.pipeline import Pipeline
from agent.queues import StreamQueue
from agent.types import Sample


def _s(i: int, size: int = 10) -> Sample:
    return Sample("/x", b"\0" * size, host_rx_ns=i, seq=i)


def test_drop_oldest_keeps_newest_and_counts() -> None:
    q = StreamQueue("/x", max_items=3, max_bytes=10**6)
    for i in range(10):
        assert q.put(_s(i))
    assert q.dropped == 7 and q.put_count == 10
    assert [s.seq for s in q.drain()] == [7, 8, 9]
    assert q.depth_bytes == 0


def test_drop_newest_keeps_contiguous_past() -> None:
    q = StreamQueue("/x", max_items=3, max_bytes=10**6, policy="drop_newest")
    results = [q.put(_s(i)) for i in range(5)]
    assert results == [True, True, True, False, False]
    assert q.dropped == 2 and [s.seq for s in q.drain()] == [0, 1, 2]


def test_byte_bound() -> None:
    q = StreamQueue("/x", max_items=100, max_bytes=250)
    for i in range(5):
        q.put(_s(i, 100))
    assert len(q) == 2 and q.dropped == 3 and q.dropped_bytes == 300


def test_put_never_blocks_while_consumer_holds_nothing() -> None:
    q = StreamQueue("/x", max_items=2, max_bytes=10**6)
    t0 = time.perf_counter()
    for i in range(10_000):
        q.put(_s(i))
    assert time.perf_counter() - t0 < 2.0
    assert q.dropped == 9_998


def test_pipeline_overflow_is_counted_in_manifests(tmp_path: Path) -> None:
    cfg = parse_config({
        "device_id": "ovf",
        "streams": [{"name": "/cam", "driver": "camera.synthetic", "rate_hz": 200,
                     "queue_size": 2, "options": {"width": 64, "height": 48, "cycle": 2}}],
        "recorder": {"window_s": 1.0, "late_grace_s": 0.1},
    })
    pipe = Pipeline(cfg, out_dir=tmp_path)
    pipe.open()
    gate = threading.Event()
    real_write = pipe.recorder._write

    def slow_write(s: Sample) -> None:  # a disk that stalls for the first second
        gate.wait(1.0)
        real_write(s)

    pipe.recorder._write = slow_write
    pipe.start()
    time.sleep(1.5)
    gate.set()
    time.sleep(0.5)
    pipe.stop()
    q = pipe.queues["/cam"]
    assert q.dropped > 0
    rep = inspect_path(pipe.session_dir)
    assert rep["ok"], rep["problems"]
    st = rep["streams"]["/cam"]
    assert st["queue_drops"] == q.dropped
    assert st["messages"] + st["queue_drops"] == q.put_count
