"""Triggers and retention: pre/post windows kept, the rest expired, overlapping windows
merged; quota eviction order; degraded mode."""

from __future__ import annotations

import json
import time
from pathlib import Path

from agent.config import TriggerConfig, parse_config
from agent.inspect import inspect_path
from agent.manifest import manifest_path, write_manifest
from agent.pipeline import Pipeline
from agent.retention import Retention
from agent.triggers import TriggerEngine, Window, merge_windows, request_manual_trigger

S = 1_000_000_000


def test_merge_windows_unites_overlaps_and_keeps_names() -> None:
    ws = merge_windows([Window(10, 20, {"a"}, 1), Window(15, 30, {"b"}, 3),
                        Window(30, 35, {"c"}), Window(50, 60, {"d"})])
    assert [(w.start_ns, w.end_ns) for w in ws] == [(10, 35), (50, 60)]
    assert ws[0].names == {"a", "b", "c"} and ws[0].priority == 3


def test_label_rule_with_class_score_count_region() -> None:
    eng = TriggerEngine([TriggerConfig(name="peds", kind="label", pre_s=2, post_s=1,
                                       options={"classes": ["pedestrian"], "min_score": 0.6,
                                                "min_count": 2,
                                                "region": [0.25, 0.0, 0.75, 1.0]})])
    det = {"cls": "pedestrian", "score": 0.9, "box": [0.4, 0.2, 0.5, 0.6]}
    eng.on_label({"stream": "/cam", "t_ns": 10 * S, "detections": [det]})
    assert eng.windows() == []  # one is not enough
    eng.on_label({"stream": "/cam", "t_ns": 10 * S,
                  "detections": [det, {**det, "score": 0.5}]})
    assert eng.windows() == []  # low score does not count
    eng.on_label({"stream": "/cam", "t_ns": 10 * S,
                  "detections": [det, {**det, "box": [0.9, 0.1, 1.0, 0.2]}]})
    assert eng.windows() == []  # outside the region
    eng.on_label({"stream": "/cam", "t_ns": 10 * S, "detections": [det, det]})
    (w,) = eng.windows()
    assert (w.start_ns, w.end_ns) == (8 * S, 11 * S)


def test_speech_geofence_and_speed_rules() -> None:
    eng = TriggerEngine([
        TriggerConfig(name="talk", kind="speech", pre_s=1, post_s=1),
        TriggerConfig(name="depot", kind="geofence", pre_s=0, post_s=5,
                      options={"center": [48.0, 11.0], "radius_m": 50}),
        TriggerConfig(name="fast", kind="speed", pre_s=0, post_s=1, priority=5,
                      options={"above_mps": 20}),
    ])
    eng.on_label({"t_ns": 0, "segments": [{"kind": "speech", "start_ns": 5 * S,
                                           "end_ns": 6 * S}]})
    assert eng.match(4 * S, 5 * S)[0] == ["talk"]
    far = {"lat": 48.01, "lon": 11.0, "fix_quality": 1, "speed_mps": 3}
    near = {"lat": 48.0001, "lon": 11.0, "fix_quality": 1, "speed_mps": 25}
    eng.on_fix(100 * S, far)
    assert eng.match(100 * S, 101 * S) == ([], 0)
    eng.on_fix(101 * S, near)
    eng.on_fix(102 * S, near)  # still inside: entering fires once
    assert eng.fired["depot"] == 1
    assert eng.match(101 * S, 102 * S) == (["depot", "fast"], 5)


def _fake_segment(d: Path, name: str, start_s: int, size: int, retention: str,
                  triggers: list[str] | None = None) -> tuple[Path, dict]:
    p = d / f"{name}.mcap"
    p.write_bytes(b"\0" * size)
    man = {"sha256": "0" * 64, "size": size, "window_start_ns": start_s * S,
           "window_end_ns": (start_s + 1) * S, "retention": retention,
           "triggers": triggers or [], "priority": 0}
    write_manifest(p, man)
    return p, man


def test_quota_eviction_order_and_degrade(tmp_path: Path) -> None:
    eng = TriggerEngine([TriggerConfig(name="t", kind="manual")])
    calls = []
    ret = Retention(tmp_path, eng, keep_s=1000, quota_bytes=5000, now_ns=lambda: 0,
                    degrade=lambda on: calls.append(on) or (["/labels"] if on else []))
    segs = {
        "up": _fake_segment(tmp_path, "up", 5, 1000, "keep", ["t"]),
        "trig": _fake_segment(tmp_path, "trig", 0, 1000, "keep", ["t"]),
        "untrig": _fake_segment(tmp_path, "untrig", 1, 1000, "untriggered"),
        "pend": _fake_segment(tmp_path, "pend", 2, 1000, "pending"),
        "plain": _fake_segment(tmp_path, "plain", 3, 1000, "keep"),
    }
    (tmp_path / "up.uploaded").write_text("")
    for p, man in segs.values():
        ret.on_closed(p, man)
    order = [s.path.stem for s in ret.eviction_order()]
    assert order == ["up", "untrig", "plain", "pend"]  # triggered, not uploaded: never
    ret._enforce_quota()  # 5 segments + manifests ≈ 6.3 kB > 5 kB
    assert not (tmp_path / "up.mcap").exists() and not (tmp_path / "untrig.mcap").exists()
    assert (tmp_path / "trig.mcap").exists() and (tmp_path / "pend.mcap").exists()
    ev = [json.loads(x) for x in (tmp_path / "evictions.jsonl").read_text().splitlines()]
    assert [e["segment"] for e in ev] == ["up.mcap", "untrig.mcap"]
    # nothing evictable left but the triggered segment: degrade instead
    ret.quota = 1500
    ret._enforce_quota()
    assert (tmp_path / "trig.mcap").exists()
    assert calls and calls[-1] is True and ret.degraded == ["/labels"]
    assert "over quota" in ret.alerts[-1]


RIG = {
    "device_id": "trig",
    "streams": [{"name": "/cam", "driver": "camera.synthetic", "rate_hz": 20,
                 "options": {"width": 64, "height": 48, "cycle": 2}}],
    "recorder": {"window_s": 1.0, "late_grace_s": 0.2, "keep_s": 0.5},
    "triggers": [{"name": "mark", "kind": "manual", "pre_s": 0.5, "post_s": 0.5,
                  "priority": 2}],
}


def test_manual_trigger_keeps_its_window_and_expires_the_rest(tmp_path: Path) -> None:
    pipe = Pipeline(parse_config(RIG), out_dir=tmp_path)
    pipe.open()
    pipe.start()
    time.sleep(3.2)
    request_manual_trigger(tmp_path, "mark")
    t_trig = time.monotonic_ns()
    time.sleep(5.5)
    pipe.stop()
    rep = inspect_path(pipe.session_dir)
    assert rep["ok"], rep["problems"]
    mans = {m.name: json.loads(m.read_text())
            for m in pipe.session_dir.glob("*.manifest.json")}
    kept = [m for m in mans.values() if m["retention"] == "keep"]
    assert kept, mans
    for m in kept:  # every kept segment overlaps the trigger window, and carries it
        assert m["triggers"] == ["mark"] and m["priority"] == 2
        assert m["window_start_ns"] < t_trig + 0.6 * S and m["window_end_ns"] > t_trig - 0.6 * S
    covered = sorted((m["window_start_ns"], m["window_end_ns"]) for m in kept)
    assert covered[0][0] <= t_trig - 0.5 * S and covered[-1][1] >= t_trig + 0.5 * S
    # the oldest segments were decided untriggered and expired (deleted, logged)
    assert pipe.retention.counts["expired"] >= 1
    assert not any(m["window_end_ns"] < t_trig - 3 * S for m in mans.values())
    ev = (tmp_path / "evictions.jsonl").read_text()
    assert '"reason": "expired"' in ev


def test_uploader_takes_only_decided_segments(tmp_path: Path) -> None:
    """The spool hands the uploader a segment only once retention kept it."""
    from sync.spool import Spool

    sdir = tmp_path / "rig_20260101T000000Z_abcd"
    sdir.mkdir()
    p, man = _fake_segment(sdir, "rig_20260101T000000Z_abcd_00000", 0, 100, "pending")
    man.update(device_id="rig", session_id=sdir.name, segment=p.stem)
    write_manifest(p, man)
    spool = Spool(tmp_path)
    assert spool.scan() == []
    man["retention"] = "keep"
    man["triggers"] = ["t"]
    write_manifest(p, man)
    (b,) = spool.scan()
    assert b.triggered and b.path == p


def test_segments_of_an_earlier_session_are_adopted_and_decided(tmp_path: Path) -> None:
    """After a crash an earlier session's pending segments are decided by its own
    trigger log; untriggered ones expire, kept ones stay."""
    old = tmp_path / "rig_20260101T000000Z_0001"
    old.mkdir()
    a, _ = _fake_segment(old, "rig_20260101T000000Z_0001_00000", 0, 10, "pending")
    b, _ = _fake_segment(old, "rig_20260101T000000Z_0001_00001", 5, 10, "pending")
    (old / "triggers.jsonl").write_text(json.dumps(
        {"name": "mark", "t_ns": 0, "start_ns": 0, "end_ns": S // 2, "priority": 3}) + "\n")
    ret = Retention(tmp_path, TriggerEngine([]), keep_s=0.0001, quota_bytes=None)
    assert ret.adopt_existing() == 2
    ret.tick()
    man_a = json.loads(manifest_path(a).read_text())
    assert man_a["retention"] == "keep" and man_a["triggers"] == ["mark"]
    assert man_a["priority"] == 3
    time.sleep(0.01)
    ret.tick()  # b was decided untriggered, then expired
    assert not b.exists() and a.exists()
