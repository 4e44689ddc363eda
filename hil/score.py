"""Score a HIL run: what the agent recorded against what the emulators wrote as truth.

    report = score_run(run_dir)            # dict, JSON-ready; run_dir holds run.json
    print_report(report)                   # rich tables
    report["assertions"]["failed"]         # the scenario's [assertions] that failed

Inputs: ``run_dir/run.json`` (:class:`hil.runner.RunResult`), ``run_dir/truth/*.jsonl``
(:mod:`hil.truth`) and the recorded session (MCAP segments with manifests). Only the
bundle is read, never the agent's memory: the ``/edgecap/stamps`` rows give every
sample's ``t_ns`` (agent timebase), ``device_t_ns``, ``host_rx_ns`` and ``seq``.

Matching a recorded sample to the truth:

- camera: ``seq`` (the JPEG's frame counter) = truth ``seq``; truth = ``true_ns`` of the
  frame's capture;
- LiDAR: ``seq`` (16-bit frame id, the nearest device time decides after a wrap); truth =
  the true time of the sample's ``device_t_ns`` (first valid column) through the truth
  clock (offset, drift);
- GPS (``/gps``): ``device_t_ns`` (UTC of the fix, 10 ms resolution) = truth
  ``device_ns``; truth = the fix instant;
- audio: the recorded PCM is located in the emulator's ``audio/emitted.wav`` by
  cross-correlation, once per contiguous run of blocks (a sample-index jump starts a new
  run); a block whose first sample is emitted index ``E`` carries the world's sound at
  true time ``t0 + E / (rate · (1 + drift_ppm·1e-6))`` — that is its truth.

Per stream the *window* is [first, last] truth unit matched; units the device produced in
it are ``truth``, those matched ``received``, ``lost = truth − received``, of which
``withheld`` the emulator held back on purpose (faults, its own overruns). ``counted`` is
what the agent's counters say it lost (device gaps + queue drops). Timestamp error =
``t_ns − truth`` (agent) and ``host_rx_ns − truth`` (naive arrival stamping): p50 of the
signed error, p99 and max of its magnitude, and ``spread_p99`` = p99 of |error − p50|
(what a constant-latency calibration cannot remove); ``ts_settled`` is the same without
each stream's first ``SETTLE_S`` (at most half its window): the agent's start-up and the
clock estimators' acquisition. ``counted`` for LiDAR is its ``missing_frames`` gaps in
scans; ``uncounted_share`` = (lost − counted)⁺ / truth.

Labels are scored with :mod:`agent.labelers.score` when label channels were recorded.
Called from one thread; reads files only; never raises for bad or missing bundle data
(problems are listed under ``problems``).
"""

from __future__ import annotations

import json
import math
import wave
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from agent.quality import QualityThresholds, has_zero_run

from .quality_score import score_quality
from .runner import RunResult
from .truth import read_truth
from .world import DeviceClock

NS = 1_000_000_000
STAMPS_TOPIC = "/edgecap/stamps"
LATE_SEND_NS = 5_000_000
DROPOUT_RUN = QualityThresholds().dropout_run


# -- reading the bundle ------------------------------------------------------------------
class Bundle:
    """What the scorer needs from a recorded session: stamps per stream, audio PCM blocks,
    label messages, manifests and the verification result."""

    def __init__(self, session_dir: Path | None, audio_topics: Iterable[str] = (),
                 label_prefix: str = "/labels/"):
        self.stamps: dict[str, np.ndarray] = {}
        self.audio: dict[str, list[tuple[int, int, bytes]]] = {}   # topic → (t_ns, seq, pcm)
        self.labels: dict[str, list[tuple[int, bytes, str]]] = {}  # topic → (t, data, schema)
        self.manifests: list[dict[str, Any]] = []
        self.segments: list[dict[str, Any]] = []
        self.problems: list[str] = []
        self.inspect: dict[str, Any] = {}
        if session_dir is None or not Path(session_dir).is_dir():
            self.problems.append("no session was recorded")
            return
        self._read(Path(session_dir), set(audio_topics), label_prefix)

    def _read(self, sdir: Path, audio_topics: set[str], label_prefix: str) -> None:
        from mcap.reader import make_reader

        from agent.inspect import inspect_path
        from agent.manifest import manifest_path, read_manifest

        try:
            self.inspect = inspect_path(sdir)
        except Exception as e:  # noqa: BLE001 - reported
            self.problems.append(f"inspect: {e}")
        self.segments = self.inspect.get("segments", [])
        rows: dict[str, list[list[Any]]] = {}
        for seg in sorted(sdir.glob("*.mcap")):
            try:
                self.manifests.append(read_manifest(manifest_path(seg)))
            except Exception as e:  # noqa: BLE001
                self.problems.append(str(e))
            try:
                with open(seg, "rb") as f:
                    reader = make_reader(f)
                    summary = reader.get_summary()
                    topics = None  # all, when the file has no summary to filter by
                    if summary is not None:
                        topics = [c.topic for c in summary.channels.values()
                                  if c.topic == STAMPS_TOPIC or c.topic in audio_topics
                                  or c.topic.startswith(label_prefix)]
                    for schema, channel, msg in reader.iter_messages(topics=topics):
                        topic = channel.topic
                        if topic == STAMPS_TOPIC:
                            doc = json.loads(msg.data)
                            rows.setdefault(doc["stream"], []).extend(doc["rows"])
                        elif topic in audio_topics:
                            self.audio.setdefault(topic, []).append(
                                (msg.log_time, msg.sequence, bytes(msg.data)))
                        elif topic.startswith(label_prefix):
                            self.labels.setdefault(topic, []).append(
                                (msg.log_time, bytes(msg.data), schema.name if schema else ""))
            except Exception as e:  # noqa: BLE001 - a damaged segment is a finding
                self.problems.append(f"{seg.name}: unreadable ({e})")
        for name, r in rows.items():
            a = np.array([[(-1 if v is None else v) for v in row] for row in r], dtype=np.int64)
            self.stamps[name] = a[np.argsort(a[:, 0], kind="stable")] if len(a) else \
                np.zeros((0, 4), np.int64)

    def device_totals(self, stream: str) -> dict[str, int]:
        """The agent's cumulative device counters of ``stream`` (max over segments) plus
        its queue drops (summed over segments)."""
        tot: dict[str, int] = {}
        qd = 0
        for m in self.manifests:
            st = m.get("streams", {}).get(stream)
            if not st:
                continue
            for k, v in (st.get("device_total") or st.get("device") or {}).items():
                if isinstance(v, (int, float)):
                    tot[k] = max(tot.get(k, 0), int(v))
            qd += int(st.get("queue_drops", 0) or 0)
        tot["queue_drops"] = qd
        return tot

    def gap_events(self, stream: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for m in self.manifests:
            out.extend((m.get("streams", {}).get(stream) or {}).get("gap_events", []) or [])
        return out


# -- statistics --------------------------------------------------------------------------
def err_stats(err_ns: np.ndarray | list[int]) -> dict[str, Any]:
    """Signed p50, |err| p99 and max, spread p99 = p99 |err − p50| (all ms)."""
    e = np.asarray(err_ns, dtype=np.float64) / 1e6
    if e.size == 0:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None, "spread_p99_ms": None}
    med = float(np.median(e))
    a = np.abs(e)
    return {"n": int(e.size), "p50_ms": round(med, 4),
            "p99_ms": round(float(np.percentile(a, 99)), 4), "max_ms": round(float(a.max()), 4),
            "spread_p99_ms": round(float(np.percentile(np.abs(e - med), 99)), 4)}


def _truth(run_dir: Path, device: str) -> list[dict[str, Any]]:
    p = run_dir / "truth" / f"{device}.jsonl"
    return list(read_truth(p)) if p.exists() else []


def _clock(recs: list[dict[str, Any]]) -> DeviceClock:
    c = next((r for r in recs if r.get("type") == "clock"), None)
    clk = DeviceClock()
    if c:
        clk.offset_ns, clk.drift_ppm, clk.epoch_ns = (int(c["offset_ns"]), float(c["drift_ppm"]),
                                                      int(c["epoch_ns"]))
    return clk


def _stream_row(device: str, stream: str, unit: str, truth_n: int, received: int,
                withheld: int, counted: int | None, err: list[int], naive: list[int],
                true_ns: list[int] | None = None, **extra: Any) -> dict[str, Any]:
    lost = max(0, truth_n - received)
    unexplained = max(0, lost - withheld)
    uncounted = None if counted is None else max(0, lost - counted)
    row = {"device": device, "stream": stream, "unit": unit, "truth": truth_n,
           "received": received, "lost": lost, "withheld": withheld, "counted": counted,
           "loss_share": round(unexplained / truth_n, 5) if truth_n else (1.0 if received
                                                                         == 0 else 0.0),
           "uncounted_share": None if uncounted is None or not truth_n
           else round(uncounted / truth_n, 5),
           "ts": err_stats(err), "naive": err_stats(naive)}
    if true_ns:
        row["ts_settled"], row["settle_s"] = settled_stats(err, true_ns)
    row.update(extra)
    return row


SETTLE_S = 10.0


def settled_stats(err: list[int], true_ns: list[int]) -> tuple[dict[str, Any], float]:
    """Error statistics without a stream's first ``SETTLE_S`` seconds (at most half of its
    window): the steady state after the agent's start-up and the clock estimator's
    acquisition. Returns (stats, seconds left out)."""
    t = np.asarray(true_ns, dtype=np.int64)
    settle = min(SETTLE_S, (int(t.max()) - int(t.min())) / 2e9)
    keep = t >= t.min() + int(settle * NS)
    return err_stats(np.asarray(err, dtype=np.int64)[keep]), round(settle, 2)


#: blocks this close after a sound-path change are left out of a stretch (the change
#: itself falls inside one of them) ...
STRETCH_GUARD_NS = 300_000_000
#: ... and this close after the mic came back: the agent re-locks its clock (issue 5's
#: bound for a re-lock is 2 s)
RELOCK_GUARD_NS = 2_000_000_000


def stretch_stats(err: list[int], true_ns: list[int], boundaries_ns: list[int],
                  settle_from_ns: int, relocks_ns: list[int] = ()) -> dict[str, Any]:
    """Audio error about each stretch's own median, pooled (``spread_p99_ms``), where a
    stretch is the time between two changes of the emulated sound path
    (``boundaries_ns``: the mic re-plugged, play-out restarted after unplayed chunks, the
    sound server playing zeros for an emulator stall). Each such change moves the content
    against the sink's sample clock — the emulator's sound arriving late, which a real
    microphone's ADC cannot do — so one latency calibration holds per stretch, not per
    run. Samples before ``settle_from_ns``, within :data:`STRETCH_GUARD_NS` after a
    boundary or within :data:`RELOCK_GUARD_NS` after one of ``relocks_ns`` (boundaries
    where the stream restarted) are left out; ``steps_ms`` are the median changes from
    stretch to stretch."""
    e = np.asarray(err, dtype=np.int64)
    t = np.asarray(true_ns, dtype=np.int64)
    b = np.asarray(sorted(set(boundaries_ns) | set(relocks_ns)), dtype=np.int64)
    idx = np.searchsorted(b, t, side="right")
    far = np.iinfo(np.int64).min // 2   # before the first boundary (or there is none)
    since = t - (np.where(idx > 0, b[np.maximum(idx - 1, 0)], far) if b.size else far)
    keep = (t >= settle_from_ns) & (since >= STRETCH_GUARD_NS)
    for r in relocks_ns:
        keep &= ~((t >= r) & (t < r + RELOCK_GUARD_NS))
    devs, meds = [], []
    for k in np.unique(idx[keep]):
        m = keep & (idx == k)
        if m.sum() < 20:
            continue
        med = float(np.median(e[m]))
        meds.append(med)
        devs.append(np.abs(e[m] - med))
    if not devs:
        return {"stretches": 0, "n": 0, "spread_p99_ms": None, "steps_ms": []}
    d = np.concatenate(devs) / 1e6
    return {"stretches": len(meds), "n": int(d.size),
            "spread_p99_ms": round(float(np.percentile(d, 99)), 4),
            "steps_ms": [round((b_ - a) / 1e6, 3) for a, b_ in zip(meds, meds[1:])]}


def _no_data(device: str, stream: str, unit: str, why: str) -> dict[str, Any]:
    row = _stream_row(device, stream, unit, 0, 0, 0, None, [], [])
    row["loss_share"] = 1.0
    row["note"] = why
    return row


# -- per device --------------------------------------------------------------------------
#: causes of units an emulator held back on purpose or could not produce itself
EMULATOR_CAUSES = {"dropout", "stall", "disconnect", "overrun"}


def score_camera(run_dir: Path, b: Bundle, stream: str) -> dict[str, Any]:
    recs = _truth(run_dir, "camera")
    frames = {r["seq"]: r for r in recs if r.get("type") == "sample"}
    rows = b.stamps.get(stream)
    if not frames or rows is None or not len(rows):
        return _no_data("camera", stream, "frames", "no truth" if not frames else "no frames")
    client_drops = {r["seq"] for r in recs if r.get("type") == "fault"
                    and r.get("kind") == "client_drop"}
    err, naive, trues, got, mismatch = [], [], [], set(), 0
    for t, dev, rx, seq in rows.tolist():
        fr = frames.get(seq)
        if fr is None or seq in got:
            continue
        if dev != fr["device_ns"]:
            mismatch += 1
            continue
        got.add(seq)
        err.append(t - fr["true_ns"])
        naive.append(rx - fr["true_ns"])
        trues.append(fr["true_ns"])
    if not got:
        return _no_data("camera", stream, "frames", "no recorded frame matches the truth")
    lo, hi = min(got), max(got)
    window = [s for s in frames if lo <= s <= hi]
    # held back by the emulator itself; "no_client" (the agent was reconnecting) and
    # "client_drop" (the agent read too slowly) are the agent's losses
    withheld = sum(1 for s in window if s not in got and
                   frames[s].get("reason") in EMULATOR_CAUSES)
    reasons: dict[str, int] = {}
    for s in window:
        if s not in got:
            why = frames[s].get("reason") or ("client_drop" if s in client_drops
                                              else "not_received")
            reasons[why] = reasons.get(why, 0) + 1
    tot = b.device_totals(stream)
    return _stream_row("camera", stream, "frames", len(window), len(got), withheld,
                       tot.get("gaps", 0) + tot["queue_drops"], err, naive, trues,
                       window_ns=[frames[lo]["true_ns"], frames[hi]["true_ns"]],
                       lost_by_cause=reasons, device_time_mismatch=mismatch, agent=tot)


def score_lidar(run_dir: Path, b: Bundle, stream: str) -> dict[str, Any]:
    recs = _truth(run_dir, "lidar")
    scans = [r for r in recs if r.get("type") == "sample"]
    rows = b.stamps.get(stream)
    if not scans or rows is None or not len(rows):
        return _no_data("lidar", stream, "scans", "no truth" if not scans else "no scans")
    clk = _clock(recs)
    by_fid: dict[int, list[dict[str, Any]]] = {}
    for r in scans:
        by_fid.setdefault(r["seq"], []).append(r)
    period = 100_000_000
    err, naive, trues, got = [], [], [], set()
    mismatch = 0
    for t, dev, rx, seq in rows.tolist():
        cands = by_fid.get(seq & 0xFFFF, [])
        if not cands or dev < 0:
            mismatch += 1
            continue
        fr = min(cands, key=lambda r: abs(r["device_ns"] - dev))
        if not 0 <= dev - fr["device_ns"] < period or fr["frame"] in got:
            mismatch += 1
            continue
        got.add(fr["frame"])
        true = clk.true_ns(dev)
        err.append(t - true)
        naive.append(rx - true)
        trues.append(true)
    if not got:
        return _no_data("lidar", stream, "scans", "no recorded scan matches the truth")
    lo, hi = min(got), max(got)
    window = [r for r in scans if lo <= r["frame"] <= hi]
    # a scan is withheld when none of its packets left intact (stall, disconnect, the
    # emulator's overrun, or every packet dropped/damaged); partly sent scans arrive
    # incomplete and count as received
    withheld = sum(1 for r in window if r["frame"] not in got and r.get("packets_sent", 1) == 0)
    tot = b.device_totals(stream)
    ppf = max(1, int(window[0].get("packets", 64)))
    missing_scans = sum(int(e.get("count", 0)) for e in b.gap_events(stream)
                        if e.get("cause") == "missing_frames") // ppf
    pk = {k: sum(int(r.get(k, 0)) for r in window)
          for k in ("packets", "packets_sent", "packets_dropped", "truncated", "corrupted",
                    "withheld", "garbage")}
    damaged = sum(1 for r in window if r.get("packets_sent", 0) < r.get("packets", 0))
    reasons: dict[str, int] = {}
    for r in window:
        if r["frame"] not in got:
            why = r.get("reason") or ("all_packets_lost" if r.get("packets_sent", 1) == 0
                                      else "not_received")
            reasons[why] = reasons.get(why, 0) + 1
    return _stream_row("lidar", stream, "scans", len(window), len(got), withheld,
                       missing_scans + tot["queue_drops"], err, naive, trues,
                       window_ns=[next(r for r in window if r["frame"] == lo)["true_ns"],
                                  next(r for r in window if r["frame"] == hi)["true_ns"]],
                       lost_by_cause=reasons, device_time_mismatch=mismatch,
                       packets={"truth": pk, "damaged_scans": damaged,
                                "agent": {k: tot.get(k, 0) for k in (
                                    "packets", "missing_packets", "corrupt", "truncated",
                                    "garbage", "late_packets", "duplicates",
                                    "incomplete_scans", "startup_skipped")}},
                       agent=tot)


def score_gps(run_dir: Path, b: Bundle, stream: str) -> dict[str, Any]:
    recs = _truth(run_dir, "gps")
    epochs: dict[int, dict[str, Any]] = {}
    for r in recs:
        if r.get("type") in ("sample", "fault") and "device_ns" in r and "seq" in r:
            epochs.setdefault(int(r["device_ns"]) // 10_000_000, r)
    rows = b.stamps.get(stream)
    if not epochs or rows is None or not len(rows):
        return _no_data("gps", stream, "fixes", "no truth" if not epochs else "no fixes")
    err, naive, trues, got = [], [], [], set()
    mismatch = 0
    for t, dev, rx, _seq in rows.tolist():
        key = (dev + 5_000_000) // 10_000_000
        r = epochs.get(key)
        if r is None or r.get("type") != "sample" or key in got:
            mismatch += 1
            continue
        got.add(key)
        err.append(t - r["true_ns"])
        naive.append(rx - r["true_ns"])
        trues.append(r["true_ns"])
    if not got:
        return _no_data("gps", stream, "fixes", "no recorded fix matches the truth")
    lo, hi = min(got), max(got)
    window = [k for k in epochs if lo <= k <= hi]
    withheld = sum(1 for k in window if k not in got and epochs[k].get("type") == "fault")
    reasons: dict[str, int] = {}
    for k in window:
        if k not in got:
            why = epochs[k].get("kind") if epochs[k].get("type") == "fault" else "not_received"
            reasons[why] = reasons.get(why, 0) + 1
    tot = b.device_totals(stream)
    return _stream_row("gps", stream, "fixes", len(window), len(got), withheld,
                       tot.get("gaps", 0) + tot["queue_drops"], err, naive, trues,
                       window_ns=[epochs[lo]["true_ns"], epochs[hi]["true_ns"]],
                       lost_by_cause=reasons, unmatched_fixes=mismatch, agent=tot)


def _read_wav(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as w:
        ch, n = w.getnchannels(), w.getnframes()
        x = np.frombuffer(w.readframes(n), "<i2")
        return x.reshape(-1, ch)[:, 0].copy(), w.getframerate()


#: least correlation of two pieces of a run that agree on its place in the emitted sound
ALIGN_AGREE_CORR = 0.5


def locate(rec: np.ndarray, ref: np.ndarray, guess: int, search: int) -> tuple[int, float]:
    """Offset of ``rec`` in ``ref`` near ``guess`` (± ``search`` samples) by FFT
    cross-correlation; returns (offset, normalised correlation at it)."""
    lo = max(0, guess - search)
    hi = min(len(ref), guess + search + len(rec))
    seg = ref[lo:hi].astype(np.float64)
    r = rec.astype(np.float64)
    if len(seg) < len(r) or not r.any():
        return -1, 0.0
    n = 1 << int(math.ceil(math.log2(len(seg) + len(r))))
    c = np.fft.irfft(np.fft.rfft(seg, n) * np.conj(np.fft.rfft(r, n)), n)[:len(seg) - len(r) + 1]
    k = int(np.argmax(c))
    win = seg[k:k + len(r)]
    den = math.sqrt(float(np.dot(win, win)) * float(np.dot(r, r)))
    return lo + k, (float(c[k]) / den if den else 0.0)


def score_audio(run_dir: Path, b: Bundle, stream: str, run_t0_ns: int) -> dict[str, Any]:
    recs = _truth(run_dir, "audio")
    st = next((r for r in recs if r.get("type") == "stream"), None)
    rows = b.stamps.get(stream)
    wav = run_dir / "audio" / "emitted.wav"
    msgs = b.audio.get(stream, [])
    if st is None or not wav.exists():
        return _no_data("audio", stream, "samples", "no truth (stream record / emitted.wav)")
    if rows is None or not len(rows) or not msgs:
        return _no_data("audio", stream, "samples", "no audio blocks")
    from foxglove_schemas_protobuf.RawAudio_pb2 import RawAudio

    ref, rate = _read_wav(wav)
    first = int(st["first_index"])
    ratio = 1.0 + float(st.get("drift_ppm", 0.0)) * 1e-6
    # blocks in time order with their PCM (first channel)
    blocks = []
    for t, seq, data in sorted(msgs):
        m = RawAudio()
        try:
            m.ParseFromString(data)
        except Exception:  # noqa: BLE001 - a bad message is skipped
            continue
        ch = max(1, m.number_of_channels)
        pcm = np.frombuffer(m.data, "<i2").reshape(-1, ch)[:, 0]
        blocks.append((t, pcm))
    by_t = {int(r[0]): r for r in rows.tolist()}
    runs: list[list[tuple[int, int, int, np.ndarray]]] = []   # (t, rx, seq, pcm)
    for t, pcm in blocks:
        r = by_t.get(t)
        if r is None:
            continue
        seq, rx = int(r[3]), int(r[2])
        if runs and runs[-1][-1][2] + len(runs[-1][-1][3]) == seq:
            runs[-1].append((t, rx, seq, pcm))
        else:
            runs.append([(t, rx, seq, pcm)])
    err, naive, trues = [], [], []
    # blocks with digital zeros where the emulator had written sound: the sound server
    # played zeros (an underrun on a stalled host); the agent never makes zeros itself
    server_zeros: list[float] = []
    spans: list[tuple[int, int]] = []   # emitted [start, end) received
    unaligned = 0
    corr_min = 1.0
    run_starts: list[int] = []   # index into trues of each aligned run's first block
    for run in runs:
        pcm = np.concatenate([x[3] for x in run])
        seq0 = run[0][2]
        pos = None  # wav position of the run's first sample (< 0: it began before t = 0)
        # a piece that matches well places the run; so do two pieces that agree on one
        # place: the sound server resamples (hil.pulse), and white background noise
        # resampled at a fractional phase correlates at ~0.77 where the place is right
        cand: tuple[int, float] | None = None
        for start in range(0, max(1, len(pcm) - rate // 4), 2 * rate):
            piece = pcm[start:start + rate]
            if not piece.any() or len(piece) < rate // 4:
                continue
            guess = int((run[0][0] - run_t0_ns) * rate / NS) - first + start
            p, c = locate(piece, ref, guess, rate)
            if p >= 0 and c > 0.9:
                pos, corr_min = p - start, min(corr_min, c)
                break
            if p >= 0 and c > ALIGN_AGREE_CORR:
                if cand is not None and abs(cand[0] - (p - start)) <= 1:
                    pos, corr_min = cand[0], min(corr_min, c, cand[1])
                    break
                cand = (p - start, c)
        if pos is None:
            unaligned += sum(len(x[3]) for x in run)
            continue
        end = len(ref)  # only what the emulator emitted has a truth
        run_starts.append(len(trues))
        for t, rx, seq, blk in run:
            w = pos + (seq - seq0)
            if w < 0 or w + len(blk) > end:
                continue
            e = first + w
            true = run_t0_ns + int(round(e / (rate * ratio) * NS))
            err.append(t - true)
            naive.append(rx - true)
            trues.append(true)
            if has_zero_run(blk, DROPOUT_RUN) and not has_zero_run(ref[w:w + len(blk)],
                                                                   DROPOUT_RUN):
                server_zeros.append((true - run_t0_ns) / NS)
        a, b_ = max(0, pos), min(end, pos + len(pcm))
        if b_ > a:
            spans.append((first + a, first + b_))
    if not spans:
        return _no_data("audio", stream, "samples", "recorded audio not found in the "
                        "emitted signal")
    lo, hi = min(s[0] for s in spans), max(s[1] for s in spans)
    covered = sum(b_ - a for a, b_ in _merge(spans))
    tot = b.device_totals(stream)
    unplayed = sum(1 for r in recs if r.get("type") == "player_restart")
    # the mic was unplugged on purpose: samples played meanwhile (by their play-out
    # schedule, run_t0 + index/rate) were withheld from the agent
    withheld = 0
    unplug = None
    for r in recs:
        if r.get("type") == "fault" and r.get("kind") == "disconnect":
            if r.get("phase") == "unplugged":
                unplug = int(r["mono_ns"])
            elif r.get("phase") == "plugged" and unplug is not None:
                a = int((unplug - run_t0_ns) * rate // NS)
                b_ = int((int(r["mono_ns"]) - run_t0_ns) * rate // NS)
                withheld += max(0, min(b_, hi) - max(a, lo))
                unplug = None
    block = len(blocks[0][1]) if blocks else 0
    # where the emulated sound path changed: each run's start (a re-plugged mic), play-out
    # restarts after unplayed chunks, the sound server's zeros
    bounds = [run_t0_ns + int(x * NS) for x in server_zeros]
    bounds += [int(r["content_true_ns"]) for r in recs if r.get("type") == "unplayed"]
    relocks = [trues[i] for i in run_starts[1:] if i < len(trues)]
    row_t = np.asarray(trues, dtype=np.int64)
    settle_from = int(row_t.min()) + int(min(SETTLE_S, (int(row_t.max()) - int(row_t.min()))
                                             / 2e9) * NS) if len(row_t) else 0
    stretches = stretch_stats(err, trues, bounds, settle_from, relocks) if trues else None
    return _stream_row("audio", stream, "samples", hi - lo, covered, withheld,
                       tot.get("gaps", 0) + tot["queue_drops"] * block, err, naive, trues,
                       ts_stretches=stretches,
                       window_ns=[run_t0_ns + int(lo / (rate * ratio) * NS),
                                  run_t0_ns + int(hi / (rate * ratio) * NS)],
                       runs=len(runs), unaligned_samples=unaligned,
                       min_correlation=round(corr_min, 4), player_restarts=unplayed,
                       sound_server_dropouts_s=[round(x, 3) for x in server_zeros],
                       agent=tot)


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


# -- labels ------------------------------------------------------------------------------
def score_labels(run_dir: Path, b: Bundle, res: RunResult,
                 rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Label quality per modality where label channels were recorded; ``{"note": "no
    labels"}`` for a modality without any."""
    out: dict[str, Any] = {}
    topics = list(b.labels)
    cam, mic, lid = (res.streams.get(d) for d in ("camera", "audio", "lidar"))

    def find(src: str | None, suffix: str) -> str | None:
        if not src:
            return None
        want = "/labels/" + src.lstrip("/") + "/" + suffix
        return want if want in b.labels else None

    try:
        from agent.labelers import score as ls
    except ImportError as e:
        return {"note": f"label scorer unavailable: {e}"}
    t = find(cam, "yolo")
    if t:
        out["camera"] = _score_camera_labels(run_dir, b, cam, t, ls)
    elif cam:
        out["camera"] = {"note": "no labels"}
    t = find(mic, "vad")
    if t:
        out["vad"] = _score_vad(run_dir, b, t, rows.get("audio"), ls)
    elif mic:
        out["vad"] = {"note": "no labels"}
    t = find(lid, "clusters")
    if t:
        out["lidar"] = _score_lidar_labels(run_dir, b, lid, t, ls)
    elif lid:
        out["lidar"] = {"note": "no labels"}
    out["topics"] = topics
    return out


def _score_camera_labels(run_dir: Path, b: Bundle, stream: str, topic: str,
                         ls: Any) -> dict[str, Any]:
    from foxglove_schemas_protobuf.ImageAnnotations_pb2 import ImageAnnotations

    from agent.labelers._foxglove import detections_from_image_annotations

    seq_of = {int(r[0]): int(r[3]) for r in b.stamps.get(stream, np.zeros((0, 4))).tolist()}
    frames = {r["seq"]: r for r in _truth(run_dir, "camera") if r.get("type") == "sample"}
    dets, images = [], set()
    for t, data, _schema in b.labels[topic]:
        seq = seq_of.get(t)
        if seq is None or seq not in frames:
            continue
        msg = ImageAnnotations()
        try:
            msg.ParseFromString(data)
        except Exception:  # noqa: BLE001
            continue
        images.add(seq)
        for d in detections_from_image_annotations(msg, t):
            if d.get("box"):
                dets.append({"image": seq, "cls": d["cls"], "score": d["score"],
                             "box": d["box"]})
    gt = [{"image": s, "cls": bx["cls"], "box": [bx["x0"], bx["y0"], bx["x1"], bx["y1"]],
           "visibility": bx.get("visibility", 1.0)}
          for s in images for bx in frames[s].get("boxes", [])]
    if not images:
        return {"note": "labels do not match recorded frames"}
    r = ls.camera_scores(gt, dets, images=sorted(images))
    r["frames_labelled"] = len(images)
    return r


def _score_vad(run_dir: Path, b: Bundle, topic: str, audio_row: dict[str, Any] | None,
               ls: Any) -> dict[str, Any]:
    pred: dict[int, dict[str, Any]] = {}
    for _t, data, _schema in b.labels[topic]:
        try:
            doc = json.loads(data)
        except ValueError:
            continue
        for s in doc.get("segments", []):
            if s.get("end_ns") is not None and s.get("start_ns") is not None:
                pred[int(s["start_ns"])] = {"start_ns": int(s["start_ns"]),
                                            "end_ns": int(s["end_ns"])}
    win = (audio_row or {}).get("window_ns")
    truth = [{"start_ns": r["true_start_ns"], "end_ns": r["true_end_ns"]}
             for r in _truth(run_dir, "audio")
             if r.get("type") == "event" and r.get("kind") == "speech"]
    if win:  # speech wholly inside the recorded audio
        truth = [s for s in truth if s["start_ns"] >= win[0] and s["end_ns"] <= win[1]]
    if not truth:
        return {"note": "no speech in the recorded window", "pred_segments": len(pred)}
    return ls.vad_scores(truth, list(pred.values()))


def _score_lidar_labels(run_dir: Path, b: Bundle, stream: str, topic: str,
                        ls: Any) -> dict[str, Any]:
    from foxglove_schemas_protobuf.SceneUpdate_pb2 import SceneUpdate

    from agent.labelers._foxglove import detections_from_scene_update

    rows = b.stamps.get(stream, np.zeros((0, 4), np.int64)).tolist()
    of_t = {int(r[0]): (int(r[1]), int(r[3])) for r in rows}
    recs = [r for r in _truth(run_dir, "lidar") if r.get("type") == "sample"]
    by_fid: dict[int, list[dict[str, Any]]] = {}
    for r in recs:
        by_fid.setdefault(r["seq"], []).append(r)
    pred, truth, frames = [], [], set()
    for t, data, _schema in b.labels[topic]:
        if t not in of_t:
            continue
        dev, seq = of_t[t]
        fr = min(by_fid.get(seq & 0xFFFF, []), key=lambda r: abs(r["device_ns"] - dev),
                 default=None)
        if fr is None or not 0 <= dev - fr["device_ns"] < 100_000_000:
            continue
        msg = SceneUpdate()
        try:
            msg.ParseFromString(data)
        except Exception:  # noqa: BLE001
            continue
        if fr["frame"] not in frames:
            frames.add(fr["frame"])
            truth += [{"frame": fr["frame"], **bx} for bx in fr.get("boxes", [])]
        pred += [{"frame": fr["frame"], "bbox3d": d["bbox3d"]}
                 for d in detections_from_scene_update(msg, t)]
    if not frames:
        return {"note": "labels do not match recorded scans"}
    r = ls.lidar_scores(truth, pred, min_points=20)
    r["scans_labelled"] = len(frames)
    return r


# -- the report --------------------------------------------------------------------------
def rss_summary(rss: list[tuple[float, int]], skip_s: float = 5.0) -> dict[str, Any]:
    """Agent RSS: first/last/peak (MB), growth after ``skip_s`` of start-up, and the slope
    of a line fitted to the second half of the run (MB/min)."""
    rss = [x for x in rss if x[1] > 0]
    if not rss:
        return {"samples": 0}
    t = np.array([x[0] for x in rss], float)
    m = np.array([x[1] for x in rss], float) / 2**20
    keep = t >= min(skip_s, t[-1] / 2)
    t2, m2 = (t[keep], m[keep]) if keep.sum() >= 2 else (t, m)
    half = t2 >= t2[0] + (t2[-1] - t2[0]) / 2
    slope = float(np.polyfit(t2[half], m2[half], 1)[0]) * 60 if half.sum() >= 3 else None
    return {"samples": len(rss), "start_mb": round(float(m2[0]), 1),
            "end_mb": round(float(m[-1]), 1), "peak_mb": round(float(m.max()), 1),
            "growth_mb": round(float(m2[-1] - m2[0]), 1),
            "slope_mb_per_min": None if slope is None else round(slope, 2),
            "seconds": round(float(t[-1]), 1)}


SCORERS = {"camera": score_camera, "lidar": score_lidar, "gps": score_gps}


def score_run(run_dir: str | Path, assertions: dict[str, float] | None = None
              ) -> dict[str, Any]:
    """The scored report of a finished run (see module doc). ``assertions`` default to the
    scenario file's ``[assertions]``."""
    run_dir = Path(run_dir)
    res = RunResult.load(run_dir)
    audio_topics = [res.streams["audio"]] if "audio" in res.streams else []
    b = Bundle(Path(res.session_dir) if res.session_dir else None, audio_topics)
    streams: dict[str, dict[str, Any]] = {}
    for dev in res.devices:
        name = res.streams[dev]
        try:
            if dev == "audio":
                streams[dev] = score_audio(run_dir, b, name, res.run_t0_ns)
            else:
                streams[dev] = SCORERS[dev](run_dir, b, name)
        except Exception as e:  # noqa: BLE001 - a scorer bug must not hide the others
            streams[dev] = _no_data(dev, name, "?", f"scoring failed: {e!r}")
    labels = score_labels(run_dir, b, res, streams) if b.labels else {
        "note": "no labels" + ("" if res.labelers else " (no labeler configured)")}
    segs = b.segments
    n_seg = len(segs)
    local_ok = sum(1 for s in segs if s.get("verified"))
    up = res.upload or {}
    verified = local_ok
    if res.upload is not None:
        store_ok = not (up.get("store") or {}).get("problems")
        verified = min(local_ok, int(up.get("verified", 0))) if store_ok else 0
    report: dict[str, Any] = {
        "scenario": res.scenario, "run_dir": str(run_dir), "session_dir": res.session_dir,
        "duration_s": res.duration_s, "devices": res.devices, "wall_s": res.wall_s,
        "agent": {"exit_status": res.agent_rc, "stopped_by": res.agent_stop,
                  "cpu_s": res.cpu_s, "rss": rss_summary(res.rss),
                  "first_sample_after_t0_s": _first_sample_s(b, res)},
        "streams": streams, "labels": labels,
        "segments": {"total": n_seg, "verified_locally": local_ok,
                     "verified": verified,
                     "verified_share": round(verified / n_seg, 4) if n_seg else 0.0,
                     "unclosed": len(b.inspect.get("problems", [])) if b.inspect else None},
        "upload": res.upload, "upload_note": res.upload_note,
        "emulators": res.emulators, "problems": b.problems, "notes": res.notes,
    }
    from .scenario import load_scenario

    try:
        sc = load_scenario(res.scenario_path)
    except Exception:  # noqa: BLE001 - scored without assertions, said so
        sc = None
        report["problems"].append(f"cannot load {res.scenario_path} for its assertions")
    if sc is not None:
        report["quality"] = score_quality(
            b.manifests, {d: list(getattr(sc.devices, d).faults) for d in res.devices
                          if getattr(sc.devices, d, None) is not None},
            {d: res.streams[d] for d in res.devices}, res.run_t0_ns,
            {d: _shortfalls(run_dir, d, res.run_t0_ns)
             + list(streams.get(d, {}).get("sound_server_dropouts_s", ()))
             for d in res.devices})
    if assertions is None:
        assertions = sc.assertions if sc is not None else {}
    report["assertions"] = check_assertions(report, assertions)
    return report


def _shortfalls(run_dir: Path, device: str, run_t0_ns: int) -> list[float]:
    """Scenario seconds at which ``device``'s emulator fell short on its own account, not
    for a scenario fault: a frame, scan or fix it overran (camera/LiDAR ``sample`` with
    reason ``overrun``, GPS ``fault`` of kind ``overrun``), audio it wrote too late to be
    played (``unplayed`` chunks; older runs: ``anchor`` with ``played: false``, once a
    second): the sound server played zeros instead; a camera frame it sent more than
    ``LATE_SEND_NS`` after its schedule (a busy machine: arrival delay that no device
    had, which can look like a clock jump to the estimator)."""
    out = []
    for r in _truth(run_dir, device):
        kind = r.get("type")
        if (kind == "sample" and r.get("reason") == "overrun") or \
                (kind == "fault" and r.get("kind") == "overrun"):
            t = r.get("true_ns")
        elif kind == "unplayed" or (kind == "anchor" and r.get("played") is False):
            t = r.get("content_true_ns")
        elif kind == "send" and r.get("sent_ns", 0) - r.get("sched_ns", 0) > LATE_SEND_NS:
            t = r.get("sched_ns")  # the camera emulator itself sent the frame late
        else:
            continue
        if t is not None:
            out.append((t - run_t0_ns) / NS)
    return out


def _first_sample_s(b: Bundle, res: RunResult) -> float | None:
    firsts = [int(a[0, 0]) for a in b.stamps.values() if len(a)]
    return round((min(firsts) - res.run_t0_ns) / 1e9, 3) if firsts else None


# -- assertions --------------------------------------------------------------------------
def _metric(report: dict[str, Any], key: str) -> tuple[float | None, str, str]:
    """(value, comparison "<=" or ">=", note) for an assertion key; raises KeyError for an
    unknown key."""
    s, lab = report["streams"], report["labels"]
    for dev in ("camera", "lidar", "gps", "audio"):
        if key == f"{dev}_ts_p99_ms":
            row = s.get(dev)
            return (None if row is None else row["ts"]["p99_ms"], "<=",
                    "" if row is not None else f"{dev} not run")
        if key == f"{dev}_ts_settled_p99_ms":
            row = s.get(dev)
            st = (row or {}).get("ts_settled") or {}
            return (st.get("p99_ms"), "<=", "" if row is not None else f"{dev} not run")
        if key == f"{dev}_ts_stretch_spread_p99_ms":
            row = s.get(dev)
            st = (row or {}).get("ts_stretches") or {}
            return (st.get("spread_p99_ms"), "<=", "" if row is not None else f"{dev} not run")
        if key == f"{dev}_ts_spread_p99_ms":
            row = s.get(dev)
            st = (row or {}).get("ts_settled") or (row or {}).get("ts") or {}
            return (st.get("spread_p99_ms"), "<=", "" if row is not None else f"{dev} not run")
        if key == f"{dev}_loss_share_max":
            row = s.get(dev)
            return (None if row is None else row["loss_share"], "<=",
                    "" if row is not None else f"{dev} not run")
    if key == "max_loss_share":
        vals = [r["loss_share"] for r in s.values()]
        return (max(vals) if vals else None), "<=", ""
    if key == "max_uncounted_share":
        vals = [r["uncounted_share"] for r in s.values() if r.get("uncounted_share") is not None]
        return (max(vals) if vals else None), "<=", ""
    if key == "min_segments_verified_share":
        return report["segments"]["verified_share"], ">=", ""
    if key in ("quality_faults_missed_max", "quality_unexplained_flags_max"):
        q = report.get("quality")
        if q is None:
            return None, "<=", "no quality report scored"
        n = len(q["faults"]["missed"]) if key == "quality_faults_missed_max" else \
            len(q["flags"]["unexplained"])
        return n, "<=", ""
    if key == "max_rss_growth_mb":
        return report["agent"]["rss"].get("growth_mb"), "<=", ""
    if key == "max_rss_slope_mb_per_min":
        return report["agent"]["rss"].get("slope_mb_per_min"), "<=", ""
    label_keys = {"camera_recall_min": ("camera", "recall"),
                  "camera_precision_min": ("camera", "precision"),
                  "camera_map50_min": ("camera", "map50"), "vad_f1_min": ("vad", "f1"),
                  "lidar_recall_min": ("lidar", "recall")}
    if key in label_keys:
        part, field_ = label_keys[key]
        d = lab.get(part) if isinstance(lab, dict) else None
        if not d or field_ not in d:
            return None, ">=", (d or {}).get("note", "no labels") if isinstance(d, dict) \
                else "no labels"
        return d[field_], ">=", ""
    raise KeyError(key)


def check_assertions(report: dict[str, Any], assertions: dict[str, float]) -> dict[str, Any]:
    """Check the scenario's thresholds. A metric that could not be measured because its
    device or labeler did not run is *skipped* (listed, not failed); a stream that ran but
    measured nothing fails. An unknown key fails (a typo must not pass silently)."""
    results, failed, skipped = [], [], []
    for key, limit in sorted(assertions.items()):
        try:
            value, op, note = _metric(report, key)
        except KeyError:
            r = {"key": key, "limit": limit, "value": None, "ok": False,
                 "note": "unknown assertion key"}
            results.append(r)
            failed.append(r)
            continue
        if value is None:
            ran = note == "" and not key.endswith(("_min",))
            r = {"key": key, "limit": limit, "value": None, "op": op, "ok": not ran,
                 "note": note or "not measured"}
            (failed if ran else skipped).append(r)
            results.append(r)
            continue
        ok = value <= limit if op == "<=" else value >= limit
        r = {"key": key, "limit": limit, "value": value, "op": op, "ok": ok, "note": note}
        results.append(r)
        if not ok:
            failed.append(r)
    return {"results": results, "failed": failed, "skipped": skipped, "ok": not failed}


# -- printing ----------------------------------------------------------------------------
def _f(v: Any, nd: int = 2) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{nd if abs(v) < 10 else 1 if abs(v) < 100 else 0}f}"
    return str(v)


def _ts(st: dict[str, Any]) -> str:
    if not st or not st.get("n"):
        return "—"
    return f"{_f(st['p50_ms'])} / {_f(st['p99_ms'])} / {_f(st['max_ms'])}"


def print_report(report: dict[str, Any], console: Any = None) -> None:
    """Terminal tables (rich): streams, labels, run facts, assertions."""
    from rich.console import Console
    from rich.table import Table

    con = console or Console()
    t = Table(title=f"HIL {report['scenario']}: {report['duration_s']:g} s scenario, "
              f"{len(report['devices'])} device(s)", title_justify="left")
    for col, just in (("stream", "left"), ("unit", "left"), ("truth", "right"),
                      ("recv", "right"), ("lost", "right"), ("withheld", "right"),
                      ("counted", "right"), ("t_ns err ms p50/p99/max", "right"),
                      ("settled p99", "right"), ("arrival err ms p50/p99/max", "right")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for row in report["streams"].values():
        t.add_row(row["stream"], row["unit"], _f(row["truth"]), _f(row["received"]),
                  _f(row["lost"]), _f(row["withheld"]), _f(row["counted"]), _ts(row["ts"]),
                  _f((row.get("ts_settled") or {}).get("p99_ms")), _ts(row["naive"]))
    con.print(t)
    con.print("  t_ns: the agent's timestamps; arrival: host_rx_ns (naive stamping); error = "
              "stamp - truth, p50 signed, p99/max of |error|; settled: without each "
              f"stream's first {SETTLE_S:g} s (half its window at most); lost - withheld = "
              "unexplained loss")
    for row in report["streams"].values():
        if row.get("note"):
            con.print(f"  {row['stream']}: {row['note']}")
        elif row.get("lost_by_cause"):
            con.print(f"  {row['stream']} lost by cause: {row['lost_by_cause']}")
    lab = report["labels"]
    if isinstance(lab, dict) and any(isinstance(v, dict) for v in lab.values()):
        lt = Table(title="labels", title_justify="left")
        for col in ("modality", "result"):
            lt.add_column(col)
        for k in ("camera", "vad", "lidar"):
            d = lab.get(k)
            if not isinstance(d, dict):
                continue
            if "note" in d and len(d) <= 2:
                lt.add_row(k, d["note"])
                continue
            keys = {"camera": ("precision", "recall", "map50", "frames_labelled"),
                    "vad": ("precision", "recall", "f1", "truth_segments", "pred_segments"),
                    "lidar": ("recall", "precision", "truth_boxes", "scans_labelled")}[k]
            lt.add_row(k, "  ".join(f"{x} {_f(d.get(x), 3)}" for x in keys))
        con.print(lt)
    else:
        con.print(f"labels: {lab.get('note', 'no labels') if isinstance(lab, dict) else lab}")
    q = report.get("quality")
    if q:
        fq, fl = q["faults"], q["flags"]
        con.print(f"quality flags: {fq['detected']}/{fq['injected']} injected faults flagged; "
                  f"{fl['total']} flags, explained {fl['explained'] or '{}'}, "
                  f"unexplained {len(fl['unexplained'])}")
        for r in fq["missed"]:
            con.print(f"  [red]missed[/] {r['device']} {r['kind']} at {r['t_s']:g} s "
                      f"(expected {'/'.join(r['expected'])})")
        for r in fl["unexplained"]:
            con.print(f"  [yellow]unexplained[/] {r['flag']} in {r['t_s'][0]:g}–"
                      f"{r['t_s'][1]:g} s: {r['detail']}")
    a = report["agent"]
    rss = a["rss"]
    seg = report["segments"]
    up = report.get("upload") or {}
    con.print(
        f"agent: exit {a['exit_status']} ({a['stopped_by']}), first sample "
        f"{_f(a['first_sample_after_t0_s'])} s after t=0, CPU {_f(a['cpu_s'], 1)} s, RSS "
        f"{_f(rss.get('start_mb'), 1)} → {_f(rss.get('end_mb'), 1)} MB (peak "
        f"{_f(rss.get('peak_mb'), 1)}, slope {_f(rss.get('slope_mb_per_min'))} MB/min)")
    con.print(f"segments: {seg['total']}, verified {seg['verified']} "
              f"({seg['verified_share']:.0%})" + (
                  f"; upload: {up.get('uploaded', 0)} uploaded, {up.get('verified', 0)} "
                  f"verified by the server, store re-hash "
                  f"{'ok' if not (up.get('store') or {}).get('problems') else 'FAILED'} in "
                  f"{_f(up.get('seconds'), 1)} s" if report.get("upload") else
                  f"; {report.get('upload_note') or 'no upload'}"))
    for n in report.get("notes", []):
        con.print(f"note: {n}")
    for p in report.get("problems", []):
        con.print(f"[yellow]problem:[/] {p}")
    res = report["assertions"]
    for r in res["results"]:
        mark = "[green]pass[/]" if r["ok"] and r not in res["skipped"] else (
            "[yellow]skip[/]" if r in res["skipped"] else "[red]FAIL[/]")
        val = _f(r["value"], 4)
        con.print(f"  {mark} {r['key']} = {val} {r.get('op', '')} {r['limit']:g}"
                  + (f"  ({r['note']})" if r.get("note") else ""))
    con.print("[green]assertions passed[/]" if res["ok"] else
              f"[red]{len(res['failed'])} assertion(s) failed[/]")
