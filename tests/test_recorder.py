"""Recorder round trips: what is written reads back with the mcap reader, every message
decodes with its Foxglove schema, manifests verify, and damage is reported as such."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mcap.reader import make_reader

from agent.config import parse_config
from agent.inspect import inspect_path
from agent.manifest import manifest_path, verify_segment
from agent.pipeline import Pipeline
from agent.schemas import decode_points, decoder_factories

RIG = {
    "device_id": "test-rig",
    "streams": [
        {"name": "/camera/front", "driver": "camera.synthetic", "rate_hz": 20,
         "options": {"width": 160, "height": 120, "cycle": 5}},
        {"name": "/mic", "driver": "audio.synthetic",
         "options": {"sample_rate": 16000, "block": 800}},
        {"name": "/lidar", "driver": "lidar.synthetic", "rate_hz": 10,
         "options": {"rings": 4, "columns": 64}},
        {"name": "/gps", "driver": "gps.synthetic", "rate_hz": 5},
    ],
    "recorder": {"window_s": 1.0, "fsync_interval_s": 0.2, "late_grace_s": 0.5},
}


def record(tmp_path: Path, seconds: float = 2.5, rig: dict | None = None) -> Pipeline:
    cfg = parse_config(rig or RIG)
    pipe = Pipeline(cfg, out_dir=tmp_path)
    pipe.open()
    pipe.start()
    time.sleep(seconds)
    pipe.stop()
    return pipe


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    return record(tmp_path_factory.mktemp("rec"))


def test_segments_verify_and_decode(session: Pipeline) -> None:
    segs = sorted(session.session_dir.glob("*.mcap"))
    assert len(segs) >= 2, "1 s windows over 2.5 s must give several segments"
    assert not list(session.session_dir.glob("*.active"))
    seen: dict[str, int] = {}
    for seg in segs:
        assert verify_segment(seg) == []
        with open(seg, "rb") as f:
            reader = make_reader(f, decoder_factories=decoder_factories())
            meta = {m.name: m.metadata for m in reader.iter_metadata()}
            assert meta["edgecap.session"]["device_id"] == "test-rig"
            assert meta["edgecap.session"]["session_id"] == session.session_id
            assert "consent_status" in meta["edgecap.provenance"]
            for schema, channel, msg, dec in reader.iter_decoded_messages():
                seen[channel.topic] = seen.get(channel.topic, 0) + 1
                if schema.encoding == "protobuf":
                    assert dec.timestamp.seconds * 10**9 + dec.timestamp.nanos == msg.log_time
                if channel.topic == "/camera/front":
                    assert schema.name == "foxglove.CompressedImage"
                    assert dec.format == "jpeg" and bytes(dec.data[:2]) == b"\xff\xd8"
                elif channel.topic == "/mic":
                    assert schema.name == "foxglove.RawAudio"
                    assert dec.sample_rate == 16000 and len(dec.data) == 800 * 2
                elif channel.topic == "/lidar":
                    assert schema.name == "foxglove.PointCloud"
                    pts = decode_points(dec.data)
                    assert len(pts) == 4 * 64
                    assert np.allclose(np.hypot(pts["x"], pts["y"])[:64].mean(), 10, atol=1.2)
                elif channel.topic == "/gps":
                    assert schema.name == "foxglove.LocationFix"
                    assert abs(dec.latitude - 48.137) < 1e-6
                elif channel.topic == "/edgecap/stamps":
                    doc = dec
                    assert doc["columns"] == ["t_ns", "device_t_ns", "host_rx_ns", "seq"]
    assert seen["/camera/front"] >= 40
    assert seen["/mic"] >= 40
    assert seen["/lidar"] >= 20 and seen["/gps"] >= 10


def test_manifest_counts_match_and_inspect_reports(session: Pipeline) -> None:
    rep = inspect_path(session.session_dir)
    assert rep["ok"], rep["problems"]
    cam = rep["streams"]["/camera/front"]
    assert cam["queue_drops"] == 0
    assert cam["rate_hz"] == pytest.approx(20, rel=0.1)
    total = sum(json.loads(manifest_path(s).read_text())["streams"]["/camera/front"]["messages"]
                for s in session.session_dir.glob("*.mcap"))
    assert total == cam["messages"]
    # stamps: one row per sample with device and host times
    man = json.loads(manifest_path(sorted(session.session_dir.glob("*.mcap"))[0]).read_text())
    assert man["sha256"] and man["size"] > 0 and man["window_end_ns"] > man["window_start_ns"]
    assert man["config_digest"] and man["provenance"]["consent_status"] == "unknown"


def test_windows_are_half_open_and_contiguous(session: Pipeline) -> None:
    mans = [json.loads(manifest_path(s).read_text())
            for s in sorted(session.session_dir.glob("*.mcap"))]
    for a, b in zip(mans, mans[1:]):
        assert a["window_end_ns"] == b["window_start_ns"]
    for m in mans:
        # a sample later than the grace (a loaded machine) lands in the oldest open
        # segment and is counted; otherwise every sample lies inside the window
        if m["late_samples"] == 0:
            assert m["window_start_ns"] <= m["t_first_ns"]
            assert m["t_last_ns"] < m["window_end_ns"]
    assert sum(m["late_samples"] for m in mans) <= 3


def test_corrupted_segment_is_reported(session: Pipeline, tmp_path: Path) -> None:
    seg = sorted(session.session_dir.glob("*.mcap"))[0]
    bad = tmp_path / seg.name
    data = bytearray(seg.read_bytes())
    with open(seg, "rb") as f:  # flip a byte inside the first chunk's records (CRC'd)
        chunk = make_reader(f).get_summary().chunk_indexes[0]
    data[chunk.chunk_start_offset + chunk.chunk_length // 2] ^= 0xFF
    bad.write_bytes(data)
    manifest_path(bad).write_text(manifest_path(seg).read_text())
    probs = verify_segment(bad)
    assert any("sha256 does not match" in p for p in probs)
    # same bytes but a manifest that was updated to match: the CRC check still catches it
    man = json.loads(manifest_path(seg).read_text())
    from agent.manifest import file_sha256

    man["sha256"], man["size"] = file_sha256(bad)
    manifest_path(bad).write_text(json.dumps(man))
    probs = verify_segment(bad)
    assert probs and "not a readable MCAP" in probs[0]


def test_tampered_manifest_and_truncation_are_reported(session: Pipeline,
                                                       tmp_path: Path) -> None:
    seg = sorted(session.session_dir.glob("*.mcap"))[0]
    cp = tmp_path / seg.name
    cp.write_bytes(seg.read_bytes())
    man = json.loads(manifest_path(seg).read_text())
    man["streams"]["/camera/front"]["messages"] += 1
    manifest_path(cp).write_text(json.dumps(man))
    assert any("message counts" in p for p in verify_segment(cp))
    cp.write_bytes(seg.read_bytes()[:-100])
    manifest_path(cp).write_text(manifest_path(seg).read_text())
    assert any("size" in p for p in verify_segment(cp))
    manifest_path(cp).unlink()
    assert verify_segment(cp) == [f"{manifest_path(cp)}: manifest missing"]


def test_sigterm_during_record_leaves_only_closed_valid_segments(tmp_path: Path,
                                                                 root: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "record", "-c",
                             str(root / "examples" / "synthetic.toml"), "-o", str(tmp_path),
                             "-q"], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    time.sleep(4.0)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    sessions = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(sessions) == 1
    assert not list(sessions[0].glob("*.active"))
    segs = list(sessions[0].glob("*.mcap"))
    assert segs
    for s in segs:
        assert verify_segment(s) == []
    rep = inspect_path(sessions[0])
    assert rep["ok"] and rep["streams"]["/camera/front"]["messages"] >= 30


def test_one_recorder_per_output_directory(tmp_path: Path) -> None:
    from agent.errors import RecorderError

    a = Pipeline(parse_config(RIG), out_dir=tmp_path)
    a.open()
    b = Pipeline(parse_config(RIG), out_dir=tmp_path)
    with pytest.raises(RecorderError, match="in use by another edgecap recorder"):
        b.open()
    a.start()
    a.stop()
    c = Pipeline(parse_config(RIG), out_dir=tmp_path)  # released at stop
    c.open()
    c.start()
    c.stop()


def test_failed_open_releases_devices_and_directory(tmp_path: Path) -> None:
    from agent.errors import DriverError

    rig = {**RIG, "streams": RIG["streams"] + [
        {"name": "/cam2", "driver": "camera.opencv", "uri": "/dev/video99"}]}
    p = Pipeline(parse_config(rig), out_dir=tmp_path)
    with pytest.raises(DriverError, match="/cam2"):
        p.open()
    q = Pipeline(parse_config(RIG), out_dir=tmp_path)
    q.open()
    q.start()
    q.stop()
