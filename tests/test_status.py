"""``edgecap status --once`` against a live agent's metrics endpoint (a real pipeline of
synthetic drivers in this process, read over HTTP like from another process)."""

from __future__ import annotations

import json
import time

import pytest
from click.testing import CliRunner
from prometheus_client import CollectorRegistry, Gauge, start_http_server
from rich.console import Console

from agent.cli import main
from agent.config import parse_config
from agent.metrics import MetricsServer, PipelineCollector
from agent.notify import Notifier, Supervisor
from agent.pipeline import Pipeline
from agent.status import StatusError, fetch_snapshot, parse_metrics, render


@pytest.fixture
def agent(tmp_path):
    """A recording pipeline with a supervisor ticking and a metrics endpoint."""
    cfg = parse_config({
        "device_id": "status-test",
        "streams": [
            {"name": "/camera/front", "driver": "camera.synthetic", "rate_hz": 20,
             "options": {"width": 64, "height": 48, "cycle": 2}},
            {"name": "/gps", "driver": "gps.synthetic", "rate_hz": 5, "required": False},
        ],
        "recorder": {"out_dir": str(tmp_path), "window_s": 0.5, "late_grace_s": 0.2},
    })
    pipe = Pipeline(cfg)
    pipe.open()
    sup = Supervisor.for_pipeline(pipe, Notifier(""), interval_usec=0)
    health = {}
    srv = MetricsServer(PipelineCollector(pipe, health=lambda: health.get("h"), cache_s=0),
                        port=0)
    srv.start()
    pipe.start()
    for _ in range(8):
        time.sleep(0.1)
        health["h"] = sup.tick(pipe.stats())
    yield srv.url, pipe
    pipe.stop()
    srv.stop()


def test_status_once_shows_streams_rates_and_health(agent):
    url, pipe = agent
    r = CliRunner().invoke(main, ["status", "--once", "--url", url, "--sync-url", ""])
    assert r.exit_code == 0, r.output
    out = r.output
    assert "status-test" in out and pipe.session_id in out and "HEALTHY" in out
    row = next(line for line in out.splitlines() if "/camera/front" in line).split()
    assert row[0] == "/camera/front" and row[1] == "•"  # required
    measured, nominal = row[2].split("/")
    assert 10 < float(measured) < 100 and nominal == "20"  # synthetic drivers catch up in bursts
    assert row[-1] == "locked"
    gps = next(line for line in out.splitlines() if "/gps" in line).split()
    assert gps[1].endswith("/5")  # not required: no bullet
    assert "segment(s) waiting" in out and "free of" in out


def test_status_json_matches_pipeline(agent):
    url, pipe = agent
    r = CliRunner().invoke(main, ["status", "--once", "--json", "--url", url, "--sync-url", ""])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["info"]["device_id"] == "status-test"
    assert set(data["streams"]) == {"/camera/front", "/gps"}
    assert data["streams"]["/gps"]["required"] is False
    assert data["values"]["edgecap_ready"] == 1.0
    live = pipe.stats()["streams"]["/camera/front"]["enqueued"]
    assert 0 < data["streams"]["/camera/front"]["samples"] <= live


def test_status_reads_the_uploader_endpoint(agent):
    """The uploader's own registry (sync.metrics.UploaderMetrics, as served by
    ``edgecap sync run --metrics-port``): rate from its bytes-sent counter between two
    snapshots, pending bundles, link state."""
    from sync.metrics import UploaderMetrics

    url, _ = agent
    m = UploaderMetrics()
    m.pending.set(3)
    m.pending_bytes.set(3 << 20)
    m.connected.set(1)
    up, _t = start_http_server(0, "127.0.0.1", m.registry)
    sync_url = f"http://127.0.0.1:{up.server_port}/metrics"
    try:
        first = fetch_snapshot(url, sync_url)
        m.bytes_sent.inc(2 << 20)
        time.sleep(0.2)
        second = fetch_snapshot(url, sync_url, prev=first)
    finally:
        up.shutdown()
        up.server_close()
    assert first.upload_source == "uploader" and "upload_rate_bytes_per_second" not in first.values
    dt = second.t_mono - first.t_mono
    assert second.values["upload_rate_bytes_per_second"] == pytest.approx((2 << 20) / dt)
    con = Console(width=160, record=True, color_system=None)
    con.print(render(second))
    line = next(x for x in con.export_text().splitlines() if x.startswith("upload"))
    assert "sent 2.0 MiB" in line and "pending 3 bundle(s) 3.0 MiB" in line
    assert "connected" in line and "[uploader]" in line
    # an uploader that sets a rate gauge itself is shown as is
    reg = CollectorRegistry()
    Gauge("edgecap_upload_rate_bytes_per_second", "", registry=reg).set(5 << 20)
    up2, _t2 = start_http_server(0, "127.0.0.1", reg)
    try:
        snap = fetch_snapshot(url, f"http://127.0.0.1:{up2.server_port}/metrics")
    finally:
        up2.shutdown()
        up2.server_close()
    con = Console(width=160, record=True, color_system=None)
    con.print(render(snap))
    assert "upload    5.0 MiB/s" in con.export_text()
    # uploader down: the view says so instead of failing
    snap = fetch_snapshot(url, "http://127.0.0.1:9/metrics", timeout_s=0.5)
    assert snap.upload_source.startswith("uploader not reachable")


def test_status_unreachable_agent_exits_1():
    r = CliRunner().invoke(main, ["status", "--once", "--url", "http://127.0.0.1:9/metrics",
                                  "--sync-url", ""])
    assert r.exit_code == 1 and "metrics_port" in r.output


def test_parse_rejects_foreign_or_garbage_endpoints():
    with pytest.raises(StatusError, match="no edgecap metrics"):
        parse_metrics("# HELP up x\n# TYPE up gauge\nup 1\n")
    with pytest.raises(StatusError):
        parse_metrics("this is { not prometheus")


def test_render_flags_unhealthy_unlocked_and_slow():
    snap = parse_metrics("\n".join([
        'edgecap_agent_info{device_id="d",session_id="s",version="0",timebase="m",'
        'config_digest="x"} 1',
        'edgecap_stream_rate_hz{stream="/lidar"} 2.0',
        'edgecap_stream_nominal_rate_hz{stream="/lidar"} 10.0',
        'edgecap_stream_required{stream="/lidar"} 1',
        'edgecap_stream_queue_drops_total{stream="/lidar"} 7',
        'edgecap_clock_locked{stream="/lidar"} 0',
        'edgecap_clock_offset_seconds{stream="/lidar"} 0.000250',
        'edgecap_ready 1', 'edgecap_healthy 0', 'edgecap_degraded 0',
        'edgecap_disk_free_bytes{path="/x"} 1073741824',
        'edgecap_disk_total_bytes{path="/x"} 4294967296', ""]))
    con = Console(width=140, record=True, color_system=None)
    con.print(render(snap))
    text = con.export_text()
    assert "UNHEALTHY (watchdog starved)" in text
    assert "UNLOCKED" in text and "+250 µs" in text
    assert "1.0 GiB free of 4.0 GiB (25% free)" in text
    row = next(line for line in text.splitlines() if "/lidar" in line)
    assert " 7 " in row
