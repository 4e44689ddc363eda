"""Cross-modal sync check: impulsive events seen by camera, microphone and LiDAR, paired
across streams, and the offset between the streams' timestamps of the same event.

    rep = check_sync("recordings/<session>")        # dict, JSON-ready
    rep["pairs"][0]["offset_ms"]["median"]          # B − A, ms

An event is something that happens at one instant in the world and that several sensors
see: the HIL clapper (a white camera frame, a click, a board appearing 6 m ahead of the
LiDAR), a clapperboard in front of the rig. Per stream (kind from the recording):

- camera: *flash* -- a frame whose mean brightness (grey, JPEGs decoded at 1/8 scale)
  jumps at least ``flash_min`` grey levels (and ``k`` MADs) above the median of the
  previous ``baseline_s`` (frames still above half that stay out of the baseline for
  ``hold_s``, 0.7 s, then a lasting level becomes the baseline; the next event needs the
  level back down first);
- audio: *click* -- a spectral-flux onset (:class:`agent.labelers.audio_onset.
  OnsetDetector`) timed at its attack sample (first sample at half the peak), sample by
  sample on the recorded block times;
- LiDAR: *appear* -- a scan with at least ``appear_min`` points (and ``k`` MADs above the
  usual) inside a box in front of the sensor (``lidar_region``, sensor frame, default
  1..12 m ahead, ±2 m, from 0.4 m above the ground plane of a roof-mounted sensor) that
  lie in 1 m cells empty, with their neighbours, in the previous scan: something that was
  not there and did not drive in.

A sensor samples: it can only show an event in its first sample at or after it. Each
event therefore carries the recorded time ``t_ns`` of that first sample and the time of
the sample before, ``prev_ns``: the event happened in ``(prev_ns, t_ns]`` on that
stream's timestamps (camera: frame times; LiDAR: the scan's time, or the time of the
board's own columns with ``lidar_timing="points"``; audio: the attack sample, resolution
one sample). Events of two streams A, B within ``max_offset_ms`` are paired, and per pair
of streams the report gives:

- ``offset_ms``: ``t_B − t_A`` of the first samples showing each event (median, min, max,
  spread = max − min over events). For aligned streams this is the difference of the
  sampling instants (up to one period of the slower stream), not zero;
- ``bounds_ms``: the misalignment ``m`` (B's timestamp of an instant minus A's) that all
  events allow: each event gives ``t_B,prev − t_A < m < t_B − t_A,prev``; the
  intersection over events (``None`` when they contradict each other: drift, or a wrong
  pairing). Events at varied phases against the frame/scan times narrow it; events
  locked to the same phase (a HIL scenario's clappers on whole seconds) leave it one
  period wide. ``estimate_ms`` is its midpoint.

What "truth" means for this (HIL): the clapper happens at one true instant in every
modality. The true offset of a pair for an event is the difference of the *true* sampling
instants of the two first samples showing it (from the emulators' truth logs), plus any
known fixed latency not yet calibrated away (the audio path's). ``offset_ms`` minus that
is the timestamp misalignment at the event; ``tests/test_check_sync.py`` checks it.

Reads files only (blocking); one thread. Bad or undecodable samples are counted
(``skipped``) and never raise; a path that is not a session raises ReplayError.
"""

from __future__ import annotations

import json
import math
from collections import deque
from dataclasses import dataclass, field
from itertools import combinations
from pathlib import Path
from typing import Any, Iterable

import numpy as np

NS = 1_000_000_000

#: default LiDAR box in the sensor frame: x0, x1, y0, y1, z0, z1 (m); z0 = −1.5 m is
#: ~0.4 m above the ground for a sensor mounted 1.9 m up (the HIL rig's)
LIDAR_REGION = (1.0, 12.0, -2.0, 2.0, -1.5, 3.0)


@dataclass
class Event:
    """One impulsive event on one stream: it happened in ``(prev_ns, t_ns]`` of the
    stream's timestamps (session timebase). ``strength``: how far above the baseline."""

    stream: str
    kind: str
    t_ns: int
    prev_ns: int
    seq: int | None = None
    strength: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = {"kind": self.kind, "t_ns": self.t_ns, "prev_ns": self.prev_ns, "seq": self.seq,
             "strength": round(self.strength, 3)}
        d.update(self.extra)
        return d


# -- detectors -----------------------------------------------------------------------------
class _Baseline:
    """Median and MAD of the last ``span_ns`` of a scalar signal (levels before now)."""

    def __init__(self, span_ns: int, min_n: int = 5):
        self.span_ns = span_ns
        self.min_n = min_n
        self.q: deque[tuple[int, float]] = deque()

    def stats(self) -> tuple[float, float] | None:
        if len(self.q) < self.min_n:
            return None
        v = np.fromiter((x for _, x in self.q), np.float64)
        med = float(np.median(v))
        return med, float(np.median(np.abs(v - med)))

    def push(self, t_ns: int, x: float) -> None:
        self.q.append((t_ns, x))
        while self.q and self.q[0][0] < t_ns - self.span_ns:
            self.q.popleft()


class FlashDetector:
    """Camera frames → flash events (module doc). ``feed`` takes JPEG/PNG bytes or an
    image array; undecodable frames are counted in ``skipped``."""

    def __init__(self, stream: str, min_jump: float = 40.0, k: float = 8.0,
                 baseline_s: float = 1.0, refractory_s: float = 0.3, hold_s: float = 0.7):
        self.stream = stream
        self.min_jump, self.k = min_jump, k
        self.base = _Baseline(int(baseline_s * NS))
        self.refractory_ns = int(refractory_s * NS)
        self.hold_ns = int(hold_s * NS)
        self.prev_ns: int | None = None
        self.last_event_ns: int | None = None
        self.armed = True   # re-armed once the level is back near its baseline
        self.skipped = 0
        self.frames = 0

    @staticmethod
    def brightness(payload: Any) -> float | None:
        import cv2

        if isinstance(payload, (bytes, bytearray, memoryview)):
            img = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_REDUCED_GRAYSCALE_8)
            return None if img is None else float(img.mean())
        if isinstance(payload, np.ndarray) and payload.size:
            return float(payload.mean())
        return None

    def feed(self, t_ns: int, seq: int | None, payload: Any) -> list[Event]:
        m = self.brightness(payload)
        if m is None:
            self.skipped += 1
            return []
        self.frames += 1
        out: list[Event] = []
        st = self.base.stats()
        high = False
        if st is not None and self.prev_ns is not None:
            med, mad = st
            jump = m - med
            thr = max(self.min_jump, self.k * mad)
            high = jump >= thr / 2
            if (jump >= thr and self.armed and (
                    self.last_event_ns is None
                    or t_ns - self.last_event_ns >= self.refractory_ns)):
                self.last_event_ns = t_ns
                self.armed = False
                out.append(Event(self.stream, "flash", t_ns, self.prev_ns, seq, jump,
                                 {"brightness": round(m, 1), "baseline": round(med, 1)}))
        self.armed = self.armed or not high
        # flash frames stay out of the baseline for ``hold_s``; a level that stays (lights
        # switched on) then becomes the baseline instead of freezing the detector
        if not high or (self.last_event_ns is not None
                        and t_ns - self.last_event_ns >= self.hold_ns):
            self.base.push(t_ns, m)
        self.prev_ns = t_ns
        return out


class AppearDetector:
    """LiDAR scans → appear events: an object appears inside ``region`` (module doc).

    The signal is the number of the scan's points in the region that lie in ``voxel_m``
    cells empty in the previous scan *and* around them (one cell each way: the vehicle and
    objects move ≲ 1 m a scan): things that approach or pass do not count, a board that is
    suddenly there does. An event is a scan where that count reaches ``min_points`` and
    ``k`` MADs above its median over ``baseline_s``; the next one needs the count back
    below half that. ``timing="scan"`` stamps the event with the scan's time; ``"points"``
    with the scan's time plus the median ``t_offset_ns`` of the new points (when the object
    was actually swept; right for real sensors)."""

    def __init__(self, stream: str, region: tuple[float, ...] = LIDAR_REGION,
                 min_points: int = 100, k: float = 8.0, baseline_s: float = 1.0,
                 refractory_s: float = 0.3, timing: str = "scan", voxel_m: float = 1.0):
        if len(region) != 6:
            raise ValueError("lidar region must be x0, x1, y0, y1, z0, z1")
        if timing not in ("scan", "points"):
            raise ValueError("lidar timing must be 'scan' or 'points'")
        self.stream = stream
        self.region = tuple(float(v) for v in region)
        self.min_points, self.k = min_points, k
        self.base = _Baseline(int(baseline_s * NS), min_n=3)
        self.refractory_ns = int(refractory_s * NS)
        self.timing = timing
        self.voxel = float(voxel_m)
        self._near_prev: np.ndarray | None = None  # sorted keys of cells near last scan's
        self.prev_ns: int | None = None
        self.prev_obs_ns: int | None = None
        self.last_event_ns: int | None = None
        self.armed = True
        self.skipped = 0
        self.frames = 0

    @staticmethod
    def _keys(ix: np.ndarray, iy: np.ndarray, iz: np.ndarray) -> np.ndarray:
        return (ix.astype(np.int64) << 42) + (iy.astype(np.int64) << 21) + iz.astype(np.int64)

    def feed(self, t_ns: int, seq: int | None, pts: Any) -> list[Event]:
        names = getattr(getattr(pts, "dtype", None), "names", None) or ()
        if not isinstance(pts, np.ndarray) or not {"x", "y", "z"} <= set(names):
            self.skipped += 1
            return []
        self.frames += 1
        x0, x1, y0, y1, z0, z1 = self.region
        x, y, z = pts["x"], pts["y"], pts["z"]
        inside = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1) & (z >= z0) & (z <= z1)
        # cells offset to stay positive (keys pack three 21-bit fields)
        v = self.voxel
        ix = np.floor((x[inside] - x0) / v).astype(np.int64) + 4
        iy = np.floor((y[inside] - y0) / v).astype(np.int64) + 4
        iz = np.floor((z[inside] - z0) / v).astype(np.int64) + 4
        keys = self._keys(ix, iy, iz)
        if self._near_prev is None:
            new = np.zeros(len(keys), bool)
        else:
            new = ~np.isin(keys, self._near_prev, assume_unique=False)
        n = int(new.sum())
        cells = np.unique(np.stack([ix, iy, iz], 1), axis=0) if len(keys) else \
            np.zeros((0, 3), np.int64)
        d = np.array([(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)])
        near = (cells[:, None, :] + d[None, :, :]).reshape(-1, 3)
        self._near_prev = np.unique(self._keys(near[:, 0], near[:, 1], near[:, 2]))
        obs = t_ns
        if self.timing == "points" and n and "t_offset_ns" in names:
            obs = t_ns + int(np.median(pts["t_offset_ns"][inside][new]))
        out: list[Event] = []
        st = self.base.stats()
        high = False
        if st is not None and self.prev_ns is not None:
            med, mad = st
            thr = max(self.min_points, med + self.k * mad)
            high = n >= thr / 2
            if (n >= thr and self.armed and (
                    self.last_event_ns is None
                    or t_ns - self.last_event_ns >= self.refractory_ns)):
                self.last_event_ns = t_ns
                self.armed = False
                prev = self.prev_obs_ns if self.timing == "points" and \
                    self.prev_obs_ns is not None else self.prev_ns
                out.append(Event(self.stream, "appear", obs, min(prev, obs), seq,
                                 float(n - med), {"points": n, "baseline": round(med, 1),
                                                  "in_region": int(inside.sum()),
                                                  "scan_t_ns": t_ns}))
        self.armed = self.armed or not high
        if not out:
            self.base.push(t_ns, float(n))
        self.prev_ns = t_ns
        self.prev_obs_ns = obs
        return out


class ClickDetector:
    """Audio blocks → click events, timed at the attack sample on the recorded block
    times. A block that does not follow on (a gap, a reconnect) restarts the detector."""

    def __init__(self, stream: str, rate: float, k: float = 6.0, min_rise_db: float = 3.0,
                 min_interval_ms: float = 300.0):
        # min_rise_db 3 (the labeler's default is 9): OnsetDetector compares the onset
        # frame's energy with the preceding frames *including* the half-overlapping one,
        # which already holds a click that starts late in it (~6 dB rise then)
        from agent.labelers._audio import BlockClock
        from agent.labelers.audio_onset import OnsetDetector, OnsetOptions

        self.stream = stream
        self.rate = float(rate)
        self.opts = OnsetOptions(k=k, min_rise_db=min_rise_db,
                                 min_interval_ms=min_interval_ms, sample_rate=int(rate))
        self._make = lambda: OnsetDetector(self.opts, int(round(self.rate)))
        self.det = self._make()
        self.clock = BlockClock(self.rate)
        self.skipped = 0
        self.frames = 0

    def feed(self, t_ns: int, seq: int | None, pcm: Any) -> list[Event]:
        if not isinstance(pcm, np.ndarray) or pcm.ndim not in (1, 2) or not pcm.size:
            self.skipped += 1
            return []
        x = pcm if pcm.ndim == 1 else pcm[:, 0]
        x = x.astype(np.float32) / (32768.0 if pcm.dtype == np.int16 else 1.0)
        if not self.clock.add(t_ns, len(x)):
            self.det = self._make()
            self.clock.reset()
            self.clock.add(t_ns, len(x))
        self.frames += len(x)
        out = []
        step = NS / self.rate
        for k, score in self.det.feed(x):
            t = self.clock.time_of(k)
            out.append(Event(self.stream, "click", t, t - int(round(step)), None, score,
                             {"sample": int(k)}))
        return out


# -- reading a session ---------------------------------------------------------------------
def resolve_session(path: str | Path) -> Path:
    """A session folder, one segment, a HIL run folder (``run.json`` names its session) or
    a recordings folder holding exactly one session."""
    p = Path(path)
    run = p / "run.json"
    if p.is_dir() and run.is_file():
        try:
            sd = json.loads(run.read_text()).get("session_dir")
        except (OSError, ValueError):
            sd = None
        if sd:
            return Path(sd)
    if p.is_dir() and not any(p.glob("*.mcap")):
        subs = [s for s in p.iterdir() if s.is_dir() and any(s.glob("*.mcap"))]
        if len(subs) == 1:
            return subs[0]
    return p


def _is_hil(metadata: dict[str, dict[str, str]]) -> bool:
    src = (metadata.get("edgecap.provenance") or {}).get("source", "")
    return src.startswith("edgecap HIL")


def detect_events(path: str | Path, streams: Iterable[str] | None = None,
                  lidar_region: tuple[float, ...] = LIDAR_REGION,
                  lidar_timing: str = "auto", flash_min: float = 40.0,
                  appear_min: int = 100) -> tuple[dict[str, list[Event]], dict[str, Any]]:
    """Events per stream of a recorded session, and facts about the reading (``infos``:
    kind and counts per stream, ``lidar_timing`` used, ``notes``)."""
    from .replay import SessionReader, open_session
    from .types import StreamKind

    sess = open_session(str(resolve_session(path)))
    reader = SessionReader(sess)
    notes: list[str] = []
    if lidar_timing == "auto":
        lidar_timing = "scan" if _is_hil(reader.metadata) else "points"
        if lidar_timing == "scan":
            notes.append("LiDAR events at the scan's time: the HIL emulator samples the world "
                         "once per scan, at its start")
    want = set(streams) if streams else None
    dets: dict[str, Any] = {}
    for name, info in reader.infos.items():
        if want is not None and name not in want:
            continue
        if info.kind == StreamKind.CAMERA:
            dets[name] = FlashDetector(name, min_jump=flash_min)
        elif info.kind == StreamKind.AUDIO and info.encoding == "pcm-s16":
            rate = info.params.get("sample_rate") or 48_000
            dets[name] = ClickDetector(name, float(rate))
        elif info.kind == StreamKind.LIDAR:
            dets[name] = AppearDetector(name, lidar_region, min_points=appear_min,
                                        timing=lidar_timing)
    if want is not None:
        for name in sorted(want - set(dets)):
            notes.append(f"{name}: not a camera, audio or LiDAR stream of this session")
    events: dict[str, list[Event]] = {n: [] for n in dets}
    for rec in reader.records(streams=set(dets)):
        s = reader.sample(rec)
        d = dets[rec.stream]
        if s is None:
            d.skipped += 1
            continue
        events[rec.stream].extend(d.feed(s.t_ns, s.seq, s.payload))
    facts = {"session": str(sess.root), "lidar_timing": lidar_timing, "notes": notes,
             "streams": {n: {"kind": reader.infos[n].kind.value, "samples": d.frames,
                             "skipped": d.skipped, "events": len(events[n])}
                         for n, d in dets.items()},
             "bad_segments": reader.bad_segments, "decode_errors": reader.decode_errors}
    return events, facts


# -- pairing ---------------------------------------------------------------------------------
def pair_events(a: list[Event], b: list[Event], max_offset_ns: int) -> list[tuple[Event, Event]]:
    """Mutually nearest events of two streams within ``max_offset_ns`` of each other."""
    if not a or not b:
        return []
    tb = np.array([e.t_ns for e in b], np.int64)
    ta = np.array([e.t_ns for e in a], np.int64)
    out = []
    for i, ea in enumerate(a):
        j = int(np.argmin(np.abs(tb - ea.t_ns)))
        if abs(int(tb[j]) - ea.t_ns) > max_offset_ns:
            continue
        if int(np.argmin(np.abs(ta - int(tb[j])))) != i:
            continue
        out.append((ea, b[j]))
    return out


def pair_report(a: str, b: str, pairs: list[tuple[Event, Event]]) -> dict[str, Any]:
    """Offsets ``B − A`` over paired events and the misalignment bounds (module doc)."""
    offs = np.array([eb.t_ns - ea.t_ns for ea, eb in pairs], np.int64)
    lo = max(eb.prev_ns - ea.t_ns for ea, eb in pairs)
    hi = min(eb.t_ns - ea.prev_ns for ea, eb in pairs)
    ms = offs / 1e6
    rep: dict[str, Any] = {
        "a": a, "b": b, "n": len(pairs),
        "offset_ms": {"median": round(float(np.median(ms)), 4),
                      "mean": round(float(ms.mean()), 4), "min": round(float(ms.min()), 4),
                      "max": round(float(ms.max()), 4),
                      "spread": round(float(ms.max() - ms.min()), 4)},
        "offsets_ms": [round(float(v), 4) for v in ms],
        "events_t_ns": [[ea.t_ns, eb.t_ns] for ea, eb in pairs],
    }
    if lo <= hi:
        rep["bounds_ms"] = [round(lo / 1e6, 4), round(hi / 1e6, 4)]
        rep["estimate_ms"] = round((lo + hi) / 2e6, 4)
    else:
        rep["bounds_ms"] = None
        rep["estimate_ms"] = None
        rep["note"] = ("events disagree beyond their sampling (drift between the streams, "
                       "or a wrong pairing)")
    return rep


_KIND_ORDER = {"camera": 0, "lidar": 1, "audio": 2}


def check_sync(path: str | Path, streams: Iterable[str] | None = None,
               max_offset_ms: float = 250.0, **detect: Any) -> dict[str, Any]:
    """The full report (module doc): events per stream and offsets per pair of streams.
    Pairs are ordered camera → LiDAR → audio (``B − A`` with A the earlier kind)."""
    events, facts = detect_events(path, streams, **detect)
    kinds = {n: facts["streams"][n]["kind"] for n in events}
    names = sorted(events, key=lambda n: (_KIND_ORDER.get(kinds[n], 9), n))
    pairs = []
    for a, b in combinations(names, 2):
        p = pair_events(events[a], events[b], int(max_offset_ms * 1e6))
        if p:
            pairs.append(pair_report(a, b, p))
        else:
            pairs.append({"a": a, "b": b, "n": 0, "note": "no events paired"})
    return {**facts, "max_offset_ms": max_offset_ms,
            "events": {n: [e.as_dict() for e in ev] for n, ev in events.items()},
            "pairs": pairs}


def latency_suggestion(rep: dict[str, Any], stream: str, reference: str,
                       current_latency_ms: float = 0.0) -> dict[str, Any] | None:
    """What ``[clock.options] latency_ms`` for ``stream`` the report implies against
    ``reference`` (a stream whose latency is known): the current setting plus the measured
    misalignment (the bounds' midpoint; ``uncertainty_ms`` its half width). None when the
    two streams have no paired events or the events disagree."""
    for p in rep["pairs"]:
        if {p["a"], p["b"]} == {stream, reference} and p.get("n"):
            if p.get("estimate_ms") is None:
                return None
            m = p["estimate_ms"] if p["b"] == stream else -p["estimate_ms"]
            lo, hi = p["bounds_ms"]
            return {"stream": stream, "reference": reference,
                    "latency_ms": round(current_latency_ms + m, 3),
                    "uncertainty_ms": round((hi - lo) / 2, 3), "events": p["n"]}
    return None


def recorded_latency_ms(path: str | Path, stream: str) -> float:
    """The ``latency_ns`` the clock stage applied to ``stream`` when recording (from the
    newest manifest's clock summary), in ms; 0 when not recorded."""
    from .manifest import read_manifest

    sdir = resolve_session(path)
    if sdir.is_file():
        sdir = sdir.parent
    for mp in sorted(sdir.glob("*.manifest.json"), reverse=True):
        try:
            m = read_manifest(mp)
        except Exception:  # noqa: BLE001 - a bad manifest says nothing
            continue
        q = (m.get("clock") or {}).get(stream) or {}
        if isinstance(q.get("latency_ns"), int):
            return q["latency_ns"] / 1e6
    return 0.0


def fmt_ms(v: float | None) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:+.3f}"
