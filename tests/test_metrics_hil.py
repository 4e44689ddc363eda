"""Metrics scraped during a HIL run match the manifest counts: the agent records the
camera and GPS emulators (real HTTP and pty interfaces, with an injected camera dropout),
its Prometheus endpoint is scraped while it runs and at the end, and every per-stream
counter equals what the manifests and the emulators' truth say."""

from __future__ import annotations

import json
import time
from pathlib import Path

from agent.config import parse_config
from agent.metrics import MetricsServer, PipelineCollector
from agent.pipeline import Pipeline
from hil.emulators.camera import CameraEmulator
from hil.emulators.gps import GpsEmulator
from hil.scenario import DeviceSettings, Fault, load_scenario
from hil.world import World
from test_metrics import per_stream, scrape


def test_metrics_match_manifests_on_the_emulated_rig(tmp_path: Path) -> None:
    world = World(load_scenario("city-drive", duration_s=20))
    t0 = time.monotonic_ns() + 500_000_000
    cam = CameraEmulator(world, DeviceSettings(
        rate_hz=15, options={"width": 320, "height": 240},
        faults=[Fault(kind="dropout", t_s=2.0, duration_s=1.0, rate=0.5)]), tmp_path, t0)
    gps = GpsEmulator(world, DeviceSettings(rate_hz=5, options={"baud": 115200}), tmp_path, t0)
    cam.start()
    gps.start()
    try:
        cfg = parse_config({
            "device_id": "hil-metrics",
            "streams": [{"name": "/camera/front", "driver": "camera.opencv", "uri": cam.uri},
                        {"name": "/gps", "driver": "gps.nmea", "uri": gps.uri}],
            "recorder": {"out_dir": str(tmp_path / "rec"), "window_s": 2.0},
        })
        pipe = Pipeline(cfg)
        pipe.open()
        srv = MetricsServer(PipelineCollector(pipe, cache_s=0), port=0)
        srv.start()
        try:
            pipe.start()
            time.sleep(2.5)
            mid = scrape(srv.url)
            assert per_stream(mid, "edgecap_stream_received_total")["/camera/front"] > 10
            time.sleep(3.0)
        finally:
            pipe.stop()
        end = scrape(srv.url)
        srv.stop()
    finally:
        cam.stop()
        gps.stop()
    manifests = [json.loads(p.read_text()) for p in pipe.session_dir.glob("*.manifest.json")]
    assert end[("edgecap_segments_closed_total", ())] == len(manifests) >= 2
    samples = per_stream(end, "edgecap_stream_samples_total")
    drops = per_stream(end, "edgecap_stream_queue_drops_total")
    gaps = per_stream(end, "edgecap_stream_gaps_total")
    last = max(manifests, key=lambda m: m["index"])
    for name in ("/camera/front", "/gps"):
        written = sum(m["streams"][name]["messages"] for m in manifests)
        assert written == samples[name] - drops[name] - end[("edgecap_disk_drops_total", ())]
        assert last["streams"][name]["device_total"]["gaps"] == gaps[name]
        assert sum(m["streams"][name]["device"].get("gaps", 0) for m in manifests) == gaps[name]
    # the camera's gaps are exactly the frames the emulator did not send within what the
    # agent recorded (the injected dropout, plus any frame it overran under load)
    from mcap.reader import make_reader

    seqs = []
    for seg in pipe.session_dir.glob("*.mcap"):
        with open(seg, "rb") as f:
            seqs += [m.sequence for _, c, m in make_reader(f).iter_messages()
                     if c.topic == "/camera/front"]
    recs = [json.loads(x) for x in (tmp_path / "truth" / "camera.jsonl").read_text()
            .splitlines()]
    sent = {r["seq"]: r["sent"] for r in recs if r.get("type") == "sample"}
    for r in recs:
        if r.get("type") == "fault" and r.get("kind") == "client_drop":
            sent[r["seq"]] = False
    skipped = [q for q in range(min(seqs), max(seqs) + 1) if not sent.get(q, True)]
    assert len(skipped) >= 3  # the dropout hit half the frames for a second
    assert gaps["/camera/front"] == len(skipped)
