"""Score the bundles' quality reports (``manifest["quality"]``) against what the scenario
injected: every fault must be flagged, and nothing else may be.

    q = score_quality(manifests, faults, streams, run_t0_ns, duration_s, shortfalls)
    q["faults"]["missed"]        # injected faults no segment flagged
    q["flags"]["unexplained"]    # flags with no cause in the truth: false alarms

Times: segment windows (``t_first_ns``/``t_last_ns``, the agent's timebase) are mapped to
scenario seconds with ``run_t0_ns`` (in HIL the timebase is the world's true time).

A fault ``(device, kind, [t_s, t_s + duration_s])`` is *detected* when a segment whose
span overlaps it flags, on that device's stream, one of :data:`EXPECTED` ``[kind]``.

Each flag of each segment is then *explained* by the first of these that holds, or
counted *unexplained*:

- ``fault``: its stream's device had a fault overlapping the segment (recovery included:
  up to :data:`RECOVERY_S` after the fault ends);
- ``emulator``: a ``completeness`` or ``alignment`` flag (audio: also ``noise``) on a
  stream whose emulator itself fell short in the segment (it overran or sent frames late on
  a saturated machine, or wrote audio too late for the sound server, which played zeros:
  a real defect of the data, but the emulator's, not a device fault). Shortfalls up to 1 s either side of the segment count:
  a gap is counted when the frame after it arrives, which may close the segment, and old
  audio truth marks unplayed audio only once a second;
- ``warm-up``: an ``alignment`` flag whose stream is still ``acquiring`` in a segment that
  begins within :data:`WARMUP_S` of the first sample (the clock estimators lock on the
  first seconds of data; see docs/clock.md);
- ``start``/``end``: a ``completeness`` flag of the session's first or last segment
  (the agent starts and stops inside a window), or a ``noise`` flag of a segment that
  began before t = 0 (the emulators send nothing, or silence, before the world starts).
"""

from __future__ import annotations

from typing import Any, Iterable

NS = 1_000_000_000
RECOVERY_S = 2.0
WARMUP_S = 20.0

#: checks that must flag each fault kind on its device's stream (any one of them)
EXPECTED: dict[str, tuple[str, ...]] = {
    "dropout": ("completeness", "noise"),  # audio: zeroed chunks inside live audio
    "stall": ("completeness",),
    "disconnect": ("completeness",),
    "truncate": ("completeness", "noise"),
    "corrupt": ("completeness", "noise"),
    "garbage": ("completeness", "noise"),
    "bad_checksum": ("completeness",),
    "outage": ("noise",),
    "overexpose": ("noise",),
    "underexpose": ("noise",),
    "blur": ("noise",),
    "freeze": ("near_duplicates",),
    "clip": ("noise",),
    "silence": ("noise",),
}


def _span_s(m: dict[str, Any], run_t0_ns: int) -> tuple[float, float] | None:
    a = m.get("t_first_ns") or m.get("window_start_ns")
    b = m.get("t_last_ns") or m.get("window_end_ns")
    if a is None or b is None:
        return None
    return (a - run_t0_ns) / NS, (b - run_t0_ns) / NS


def _overlaps(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def _flag_parts(flag: str) -> tuple[str, str]:
    check, _, stream = flag.partition(":")
    return check, stream


def score_quality(manifests: Iterable[dict[str, Any]], faults: dict[str, list[Any]],
                  streams: dict[str, str], run_t0_ns: int,
                  shortfalls: dict[str, list[float]] | None = None) -> dict[str, Any]:
    """``faults``: device → its scenario :class:`hil.scenario.Fault` list; ``streams``:
    device → stream name; ``shortfalls``: device → scenario seconds of samples its emulator
    withheld for its own reasons (overrun). Returns the report section (module doc)."""
    shortfalls = shortfalls or {}
    by_stream = {s: d for d, s in streams.items()}
    segs = []
    for m in manifests:
        span = _span_s(m, run_t0_ns)
        q = m.get("quality")
        if span is None or not isinstance(q, dict):
            continue
        segs.append((m.get("segment", len(segs)), span, q))
    segs.sort(key=lambda x: x[1][0])
    first_s = segs[0][1][0] if segs else 0.0

    detected, missed = [], []
    for dev, fl in sorted(faults.items()):
        stream = streams.get(dev)
        if stream is None:
            continue
        for f in fl:
            want = EXPECTED.get(f.kind)
            if want is None:
                continue
            iv = (f.t_s, f.t_s + max(f.duration_s, 0.0))
            hits = sorted({c for _, span, q in segs if _overlaps(span, iv)
                           for c, s in map(_flag_parts, q.get("flags", ()))
                           if s == stream and c in want})
            row = {"device": dev, "kind": f.kind, "t_s": f.t_s, "duration_s": f.duration_s,
                   "expected": list(want), "flagged": hits}
            (detected if hits else missed).append(row)

    explained: dict[str, int] = {}
    unexplained: list[dict[str, Any]] = []
    last = len(segs) - 1
    for i, (seg, span, q) in enumerate(segs):
        for flag in q.get("flags", ()):
            check, stream = _flag_parts(flag)
            why = _explain(check, stream, span, q, i, last, first_s, by_stream.get(stream),
                           faults, shortfalls)
            if why is None:
                unexplained.append({"segment": seg, "t_s": [round(span[0], 2),
                                                             round(span[1], 2)],
                                    "flag": flag, "detail": _detail(q, check, stream)})
            else:
                explained[why] = explained.get(why, 0) + 1
    return {"segments": len(segs),
            "faults": {"injected": len(detected) + len(missed), "detected": len(detected),
                       "missed": missed, "rows": detected + missed},
            "flags": {"total": sum(len(q.get("flags", ())) for _, _, q in segs),
                      "explained": explained, "unexplained": unexplained}}


def _explain(check: str, stream: str, span: tuple[float, float], q: dict[str, Any], i: int,
             last: int, first_s: float, dev: str | None, faults: dict[str, list[Any]],
             shortfalls: dict[str, list[float]]) -> str | None:
    if dev is not None and any(_overlaps(span, (f.t_s, f.t_s + f.duration_s + RECOVERY_S))
                               for f in faults.get(dev, ())):
        return "fault"
    if dev is not None and (check in ("completeness", "alignment")
                            or (check == "noise" and dev == "audio")) \
            and any(span[0] - 1.0 <= t <= span[1] + 1.0 for t in shortfalls.get(dev, ())):
        return "emulator"
    if check == "alignment" and span[0] - first_s < WARMUP_S:
        st = _detail(q, check, stream) or {}
        if st.get("state") == "acquiring":
            return "warm-up"
    if check == "completeness" and i in (0, last):
        return "start" if i == 0 else "end"
    if check == "noise" and span[0] < 0:
        return "start"  # the agent recorded before t = 0, when the emulators began
    return None


def _detail(q: dict[str, Any], check: str, stream: str) -> dict[str, Any] | None:
    body = q.get("checks", {}).get(check, {})
    return body.get("streams", {}).get(stream) if stream else \
        {k: v for k, v in body.items() if k in ("verdict", "consent_status", "speech_detected")}
