"""hil/quality_score.py: injected faults must be flagged; flags the truth cannot explain
are counted as false alarms."""

from __future__ import annotations

from hil.quality_score import score_quality
from hil.scenario import Fault

T0 = 1_000 * 10**9
S = 10**9
STREAMS = {"camera": "/cam", "audio": "/mic"}


def seg(i: int, flags: list[str], states: dict[str, str] | None = None) -> dict:
    """Segment ``i`` covering scenario seconds [5i, 5i + 5) with these flags."""
    checks = {"alignment": {"streams": {s: {"state": st, "verdict": "warn"}
                                        for s, st in (states or {}).items()}}}
    return {"segment": i, "t_first_ns": T0 + 5 * i * S, "t_last_ns": T0 + (5 * i + 5) * S - 1,
            "quality": {"flags": flags, "checks": checks}}


def test_a_flagged_fault_is_detected_and_its_flags_explained() -> None:
    faults = {"camera": [Fault(kind="blur", t_s=12.0, duration_s=2.0)], "audio": []}
    q = score_quality([seg(0, []), seg(1, []), seg(2, ["noise:/cam"]), seg(3, [])],
                      faults, STREAMS, T0)
    assert q["faults"]["detected"] == 1 and q["faults"]["missed"] == []
    assert q["flags"]["explained"] == {"fault": 1} and q["flags"]["unexplained"] == []


def test_a_fault_flagged_by_the_wrong_check_or_stream_is_missed() -> None:
    faults = {"camera": [Fault(kind="blur", t_s=12.0, duration_s=2.0)], "audio": []}
    q = score_quality([seg(0, []), seg(1, []), seg(2, ["completeness:/cam", "noise:/mic"]),
                       seg(3, [])], faults, STREAMS, T0)
    assert [m["kind"] for m in q["faults"]["missed"]] == ["blur"]
    # the camera's completeness flag overlaps its fault; the microphone's has no cause
    assert [u["flag"] for u in q["flags"]["unexplained"]] == ["noise:/mic"]


def test_clean_run_flags_need_a_cause() -> None:
    segs = [seg(0, ["alignment:/cam", "completeness:/cam"], {"/cam": "acquiring"}),
            seg(1, []), seg(2, ["completeness:/mic"]),
            seg(5, ["alignment:/cam"], {"/cam": "acquiring"}),  # 25 s: past the warm-up
            seg(6, ["completeness:/cam"])]
    q = score_quality(segs, {"camera": [], "audio": []}, STREAMS, T0,
                      shortfalls={"audio": [11.5]})  # the audio emulator overran at 11.5 s
    assert q["flags"]["explained"] == {"warm-up": 1, "start": 1, "emulator": 1, "end": 1}
    assert [(u["segment"], u["flag"]) for u in q["flags"]["unexplained"]] == \
        [(5, "alignment:/cam")]


def test_noise_before_the_world_starts_is_explained() -> None:
    early = seg(0, ["noise:/mic"])
    early["t_first_ns"] -= S  # the agent was recording 1 s before t = 0
    q = score_quality([early, seg(1, ["noise:/mic"])], {"camera": [], "audio": []},
                      STREAMS, T0)
    assert q["flags"]["explained"] == {"start": 1}
    assert [u["segment"] for u in q["flags"]["unexplained"]] == [1]


def test_audio_the_sound_server_did_not_play_explains_its_silence() -> None:
    segs = [seg(0, []), seg(1, []), seg(2, ["noise:/mic", "noise:/cam"]), seg(3, [])]
    q = score_quality(segs, {"camera": [], "audio": []}, STREAMS, T0,
                      shortfalls={"audio": [12.0], "camera": [12.0]})
    assert q["flags"]["explained"] == {"emulator": 1}
    # an emulator's overrun explains missing camera frames, never a camera image defect
    assert [u["flag"] for u in q["flags"]["unexplained"]] == ["noise:/cam"]
