"""Metrics endpoint scraped over HTTP during a real synthetic recording; counts checked
against the session's manifests after stop. Plus the journald log format and the
health readers the endpoint is built on."""

from __future__ import annotations

import io
import json
import logging
import os
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.config import parse_config
from agent.health import RateMeter, clock_jitter_s, clock_locked, clock_offset_s, spool_backlog
from agent.logfmt import KeyValueFormatter, configure_logging, priority, quote, under_journal
from agent.metrics import (UPLOAD, MetricsServer, PipelineCollector, observe_label_latency,
                           set_upload_rate)
from agent.pipeline import Pipeline


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """``{(sample_name, sorted label items): value}`` from a live endpoint."""
    with urllib.request.urlopen(url, timeout=5) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def per_stream(m: dict, name: str) -> dict[str, float]:
    return {dict(k[1])["stream"]: v for k, v in m.items() if k[0] == name}


RIG = {
    "device_id": "metrics-test",
    "streams": [
        {"name": "/camera/front", "driver": "camera.synthetic", "rate_hz": 30,
         "options": {"width": 64, "height": 48, "cycle": 4}},
        {"name": "/mic/cabin", "driver": "audio.synthetic",
         "options": {"sample_rate": 48000, "block": 960}},
        {"name": "/lidar/top", "driver": "lidar.synthetic", "rate_hz": 10,
         "options": {"rings": 4, "columns": 64}},
        {"name": "/gps", "driver": "gps.synthetic", "rate_hz": 5, "required": False},
    ],
    "recorder": {"window_s": 0.5, "late_grace_s": 0.2, "fsync_interval_s": 0.2},
}


def test_scrape_during_recording_matches_manifests(tmp_path):
    cfg = parse_config({**RIG, "recorder": {**RIG["recorder"], "out_dir": str(tmp_path)}})
    pipe = Pipeline(cfg)
    pipe.open()
    srv = MetricsServer(PipelineCollector(pipe, cache_s=0), port=0)
    srv.start()
    try:
        pipe.start()
        time.sleep(0.8)
        scrape(srv.url)
        time.sleep(0.7)
        mid = scrape(srv.url)
        rates = per_stream(mid, "edgecap_stream_rate_hz")
        assert 15 < rates["/camera/front"] < 45, rates
        assert 30 < rates["/mic/cabin"] < 70, rates  # 48000 / 960 = 50 Hz
        assert per_stream(mid, "edgecap_stream_samples_total")["/camera/front"] > 20
        assert per_stream(mid, "edgecap_stream_nominal_rate_hz")["/mic/cabin"] == 50
        assert per_stream(mid, "edgecap_stream_required") == {
            "/camera/front": 1, "/mic/cabin": 1, "/lidar/top": 1, "/gps": 0}
        assert per_stream(mid, "edgecap_clock_locked")["/camera/front"] == 1
        assert mid[("edgecap_disk_free_bytes", (("path", str(tmp_path)),))] > 0
        assert ("edgecap_agent_info", (("config_digest", cfg.digest[:16]),
                                       ("device_id", "metrics-test"),
                                       ("session_id", pipe.session_id),
                                       ("timebase", "monotonic"),
                                       ("version", __import__("agent").__version__))) in mid
    finally:
        pipe.stop()
    try:
        end = scrape(srv.url)
    finally:
        srv.stop()

    manifests = [json.loads(p.read_text()) for p in pipe.session_dir.glob("*.manifest.json")]
    assert len(manifests) >= 2
    assert end[("edgecap_segments_closed_total", ())] == len(manifests)
    assert end[("edgecap_spool_backlog_segments", ())] == len(manifests)  # none uploaded
    last = max(manifests, key=lambda m: m["index"])
    samples = per_stream(end, "edgecap_stream_samples_total")
    drops = per_stream(end, "edgecap_stream_queue_drops_total")
    received = per_stream(end, "edgecap_stream_received_total")
    gaps = per_stream(end, "edgecap_stream_gaps_total")
    for name in ("/camera/front", "/mic/cabin", "/lidar/top", "/gps"):
        written = sum(m["streams"][name]["messages"] for m in manifests)
        assert written > 0
        assert written + end[("edgecap_disk_drops_total", ())] == samples[name] - drops[name]
        assert sum(m["streams"][name]["queue_drops"] for m in manifests) == drops[name]
        assert last["streams"][name]["device_total"]["received"] == received[name]
        assert last["streams"][name]["device_total"]["gaps"] == gaps[name]


def test_spool_backlog_and_shared_metrics(tmp_path):
    cfg = parse_config({**RIG, "recorder": {"out_dir": str(tmp_path)}})
    pipe = Pipeline(cfg)  # never opened: the collector must cope with an idle pipeline
    sess = tmp_path / "s1"
    sess.mkdir()
    for i in range(3):
        (sess / f"s1_{i:05d}.mcap").write_bytes(b"x" * 100)
    (sess / "s1_00000.mcap.uploaded").touch()
    (sess / "s1_00001.uploaded").touch()
    (sess / "s1_00003.mcap.active").write_bytes(b"y" * 50)  # open: not backlog yet
    observe_label_latency("camera.yolo", 0.042)
    observe_label_latency("camera.yolo", -1)  # nonsense is ignored
    set_upload_rate(1.5e6, backlog_bytes=300)
    srv = MetricsServer(PipelineCollector(pipe, cache_s=0), port=0)
    srv.start()
    try:
        m = scrape(srv.url)
    finally:
        srv.stop()
        UPLOAD.rate = UPLOAD.backlog = None  # process-wide: leave it as found
    assert m[("edgecap_spool_backlog_segments", ())] == 1
    assert m[("edgecap_spool_backlog_bytes", ())] == 100
    assert m[("edgecap_spool_uploaded_segments", ())] == 2
    assert m[("edgecap_label_latency_seconds_count", (("labeler", "camera.yolo"),))] >= 1
    assert m[("edgecap_label_latency_seconds_bucket",
              (("labeler", "camera.yolo"), ("le", "0.05")))] >= 1
    assert m[("edgecap_upload_rate_bytes_per_second", ())] == 1.5e6
    assert m[("edgecap_upload_backlog_bytes", ())] == 300
    assert m[("edgecap_segments_closed_total", ())] == 0


def test_upload_gauges_absent_until_set(tmp_path):
    cfg = parse_config({**RIG, "recorder": {"out_dir": str(tmp_path)}})
    srv = MetricsServer(PipelineCollector(Pipeline(cfg)), port=0)
    srv.start()
    try:
        m = scrape(srv.url)
    finally:
        srv.stop()
    assert not any(k[0].startswith("edgecap_upload_") for k in m)  # no uploader here: no 0


def test_metrics_port_in_use_raises_oserror(tmp_path):
    cfg = parse_config({**RIG, "recorder": {"out_dir": str(tmp_path)}})
    a = MetricsServer(PipelineCollector(Pipeline(cfg)), port=0)
    port = a.start()
    try:
        with pytest.raises(OSError):
            MetricsServer(PipelineCollector(Pipeline(cfg)), port=port).start()
    finally:
        a.stop()
        a.stop()  # idempotent


# -- health readers ----------------------------------------------------------------------
def test_rate_meter_window_and_reset():
    m = RateMeter(window_s=2.0, min_span_s=0.5)
    m.observe({"a": 0}, 0)
    assert m.rates() == {}
    m.observe({"a": 5}, 200_000_000)
    assert m.rates() == {}  # less than min_span apart: unknown, not zero
    m.observe({"a": 10}, 1_000_000_000)
    assert m.rates() == {"a": 10.0}
    for i in range(2, 10):
        m.observe({"a": 10 + 20 * (i - 1)}, i * 1_000_000_000)
    assert m.rates()["a"] == pytest.approx(20.0)  # old 10 Hz points slid out of the window
    m.observe({"a": 3}, 10_000_000_000)  # counter went backwards: history restarts
    assert m.rates() == {}


def test_clock_field_readers():
    assert clock_locked({"source": "arrival"})
    assert not clock_locked({"locked": False})
    assert clock_locked({"lock": "LOCKED"}) and not clock_locked({"lock_state": "holdover"})
    assert not clock_locked({"state": 0})
    # the clock stage's own words (agent.clock_estimator quality dicts)
    assert clock_locked({"source": "estimator", "state": "locked"})
    assert not clock_locked({"source": "estimator", "state": "acquiring"})
    assert not clock_locked({"source": "estimator", "state": "unlocked"})
    assert clock_locked({"source": "arrival", "state": "arrival"})
    assert clock_offset_s({"offset_ns": 2_000_000}) == pytest.approx(0.002)
    assert clock_offset_s({"offset_s": 0.5}) == 0.5
    assert clock_offset_s({"offset_ns": float("nan")}) is None
    assert clock_jitter_s({"jitter_ns": 1500}) == pytest.approx(1.5e-6)
    assert clock_jitter_s({"locked": True}) is None


def test_spool_backlog_unreadable_dir_is_skipped(tmp_path):
    assert spool_backlog(tmp_path / "does-not-exist").segments == 0


# -- journald-friendly logs --------------------------------------------------------------
def _record(level: int, msg: str, **extra) -> logging.LogRecord:
    rec = logging.LogRecord("edgecap.test", level, __file__, 1, msg, (), None)
    rec.__dict__.update(extra)
    return rec


def test_logfmt_terminal_line():
    line = KeyValueFormatter(journal=False).format(
        _record(logging.WARNING, 'disk "slow" now', stream="/camera/front", ms=12.5))
    assert line.startswith("ts=") and line.endswith(
        'level=warning logger=edgecap.test msg="disk \\"slow\\" now" stream=/camera/front ms=12.5')


def test_logfmt_journal_priority_and_one_line_tracebacks():
    f = KeyValueFormatter(journal=True)
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        import sys

        rec = logging.LogRecord("edgecap.x", logging.ERROR, __file__, 1, "failed", (),
                                sys.exc_info())
    line = f.format(rec)
    assert line.startswith("<3>level=error logger=edgecap.x msg=failed exc=\"Traceback")
    assert "\n" not in line and "ValueError: bad\\nthing" in line
    assert priority(logging.CRITICAL) == 2 and priority(logging.DEBUG) == 7
    assert priority(25) == 6  # between INFO and WARNING → info
    assert quote("") == '""' and quote("a=b") == '"a=b"' and quote(3) == "3"


def test_under_journal_checks_the_stream_identity(tmp_path, monkeypatch):
    path = tmp_path / "journal-stream"
    with open(path, "w") as fh, open(tmp_path / "other", "w") as other:
        st = os.fstat(fh.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert under_journal(fh)
        assert not under_journal(other)  # JOURNAL_STREAM inherited but stderr redirected
        assert not under_journal(io.StringIO())
        configure_logging(logging.INFO, fh)
        logging.getLogger("edgecap.t").info("hello", extra={"k": "v w"})
        configure_logging(logging.INFO, fh)  # replaces, does not stack handlers
        logging.getLogger("edgecap.t").warning("again")
    root = logging.getLogger()
    for h in [h for h in root.handlers if getattr(h, "_edgecap", False)]:
        root.removeHandler(h)
    text = path.read_text().splitlines()
    assert text == ['<6>level=info logger=edgecap.t msg=hello k="v w"',
                    "<4>level=warning logger=edgecap.t msg=again"]
    monkeypatch.setenv("JOURNAL_STREAM", "garbage")
    assert not under_journal()
