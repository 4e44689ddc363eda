"""The recorder: one writer thread that drains the per-stream queues into time-window
segments on the shared timebase.

    queues ──drain──▶ sort by t_ns ──▶ segment for floor((t − t0) / window)
                                          │  every fsync interval: stamps + counters, flush, fsync
                                          └▶ closed when the watermark passes end + grace:
                                             finish, fsync, rename, manifest, on_closed hooks

Segments of a session are named ``<session_id>_<index:05d>.mcap``. A sample whose window
is already closed (it arrived later than ``late_grace_s``) goes into the oldest open
segment and is counted as late; it is never dropped.

Thread model: ``add_stream`` before ``start``; ``start``/``stop`` from the owner thread;
everything else runs on the writer thread. ``stats()`` may be read from any thread.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import __version__
from .errors import RecorderError
from .manifest import write_manifest
from .queues import StreamQueue
from .schemas import Codec, codec_for
from .segment import SegmentWriter
from .types import Sample, StreamInfo, StreamKind

log = logging.getLogger("edgecap.recorder")

STAMPS_TOPIC = "/edgecap/stamps"
COUNTERS_TOPIC = "/edgecap/counters"
_STAMPS_INFO = StreamInfo(STAMPS_TOPIC, StreamKind.CLOCK, "json",
                          params={"schema": "edgecap.Stamps"})
_COUNTERS_INFO = StreamInfo(COUNTERS_TOPIC, StreamKind.EVENT, "json",
                            params={"schema": "edgecap.Counters"})


@dataclass
class _Stream:
    info: StreamInfo
    codec: Codec
    queue: StreamQueue
    counters: Callable[[], dict[str, int]]
    gap_events: Callable[[], list[dict[str, Any]]]
    drops_reported: int = 0
    counters_reported: dict[str, int] | None = None
    gaps_reported_ns: int = 0


class Recorder:
    """Writes the session into ``session_dir``.

    ``metadata`` holds the MCAP metadata records written at the start of every segment
    (name → str→str map). ``live`` selects the watermark: the timebase clock for live
    capture, the newest sample time for recorded sources replayed as fast as possible.
    ``on_closed`` callbacks receive ``(segment_path, manifest)`` on the writer thread.
    """

    def __init__(self, session_dir: Path, session_id: str, metadata: dict[str, dict[str, str]],
                 manifest_extra: dict[str, Any], now_ns: Callable[[], int], t0_ns: int,
                 window_s: float = 10.0, max_segment_mb: float = 2048.0,
                 compression: str = "none", chunk_kb: int = 4096,
                 fsync_interval_s: float = 1.0, late_grace_s: float = 1.0, live: bool = True):
        self.session_dir = session_dir
        self.session_id = session_id
        self.metadata = metadata
        self.manifest_extra = manifest_extra
        self.now_ns = now_ns
        self.t0_ns = t0_ns
        self.window_ns = int(window_s * 1e9)
        self.max_segment_bytes = int(max_segment_mb * (1 << 20))
        self.compression = compression
        self.chunk_size = chunk_kb * 1024
        self.fsync_interval_s = fsync_interval_s
        self.grace_ns = int(late_grace_s * 1e9)
        self.live = live
        self.wake = threading.Event()
        self.on_closed: list[Callable[[Path, dict[str, Any]], None]] = []
        self.closed_segments: list[Path] = []
        self.alerts: list[str] = []
        self.disk_drops = 0
        self._streams: dict[str, _Stream] = {}
        self._open: dict[int, SegmentWriter] = {}
        self._next_part: dict[int, int] = {}
        self._max_t = t0_ns
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._error_backoff_until = 0
        self._manifest_retry: list[tuple[Path, dict[str, Any]]] = []
        self.clock_summary: Callable[[], dict[str, Any]] = dict
        #: optional :class:`agent.quality.QualityMonitor`; fills the manifest's quality
        self.quality: Any = None
        #: ``retention`` written into each manifest at close (see agent.retention)
        self.initial_retention: Callable[[], str] = lambda: "keep"
        #: streams not written while the spool is over quota (degraded mode)
        self.suppressed: set[str] = set()
        self.degraded_drops: dict[str, int] = {}
        session_dir.mkdir(parents=True, exist_ok=True)

    # -- setup ------------------------------------------------------------------------
    def add_stream(self, info: StreamInfo, queue: StreamQueue,
                   counters: Callable[[], dict[str, int]] = dict,
                   gap_events: Callable[[], list[dict[str, Any]]] = list) -> None:
        """Register a stream before ``start``; the queue must share ``self.wake``."""
        queue.wake = self.wake
        self._streams[info.name] = _Stream(info, codec_for(info), queue, counters, gap_events)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edgecap-writer", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Drain what is queued, close every open segment, join the writer thread."""
        self._stop.set()
        self.wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    # -- writer thread ----------------------------------------------------------------
    def _run(self) -> None:
        while True:
            stopping = self._stop.is_set()
            self.wake.wait(0.05)
            self.wake.clear()
            batch: list[Sample] = []
            for st in self._streams.values():
                batch.extend(st.queue.drain())
            if batch:
                batch.sort(key=lambda s: s.t_ns)
                for s in batch:
                    try:
                        self._write(s)
                    except Exception as e:  # the writer thread must never die
                        log.exception("recorder: unexpected error writing %s", s.stream)
                        self._alert(f"unexpected error writing {s.stream}: {e}")
                        self.disk_drops += 1
            watermark = self.now_ns() if self.live else self._max_t
            try:
                self._close_due(watermark)
                self._sync_due()
                if self._manifest_retry:
                    self._retry_manifests()
            except Exception as e:
                log.exception("recorder: housekeeping failed")
                self._alert(f"recorder housekeeping failed: {e}")
            if stopping and not any(len(st.queue) for st in self._streams.values()):
                break
        for idx in sorted(self._open):
            try:
                self._close(idx)
            except Exception as e:
                log.exception("recorder: closing segment %d failed", idx)
                self._alert(f"closing segment failed: {e}")

    def _write(self, s: Sample) -> None:
        st = self._streams.get(s.stream)
        if st is None:
            log.error("sample for unregistered stream %s dropped", s.stream)
            self.disk_drops += 1
            return
        if s.t_ns > self._max_t:
            self._max_t = s.t_ns
        if s.stream in self.suppressed:
            self.degraded_drops[s.stream] = self.degraded_drops.get(s.stream, 0) + 1
            return
        seg = self._segment_for(s.t_ns)
        if seg is None:
            self.disk_drops += 1
            return
        try:
            data = st.codec.encode(s, st.info)
        except Exception as e:  # a driver produced a payload its codec cannot take
            log.error("%s: cannot encode sample: %s", s.stream, e)
            self.disk_drops += 1
            return
        publish = s.device_t_ns if s.device_t_ns is not None else s.host_rx_ns
        try:
            seg.write(st.info, st.codec, data, s.t_ns, publish, s.seq or 0)
        except RecorderError as e:
            self._fail(seg, e)
            self.disk_drops += 1
            return
        seg.pending_stamps.setdefault(s.stream, []).append(
            [s.t_ns, s.device_t_ns, s.host_rx_ns, s.seq])
        if self.quality is not None:
            self.quality.observe(seg.name, s)
        if seg.size >= self.max_segment_bytes:
            self._split(seg)

    def _segment_for(self, t_ns: int) -> SegmentWriter | None:
        idx = max(0, (t_ns - self.t0_ns) // self.window_ns)
        seg = self._open.get(idx)
        if seg is not None:
            return seg
        if self._open and idx < min(self._open):
            return self._open[min(self._open)]  # late sample: oldest open window
        if time.monotonic_ns() < self._error_backoff_until:
            return None
        part = self._next_part.get(idx, 0)
        name = f"{self.session_id}_{idx:05d}" + (f"-{part}" if part else "")
        start = self.t0_ns + idx * self.window_ns
        try:
            seg = SegmentWriter(self.session_dir, name, idx, (start, start + self.window_ns),
                                self.metadata, self.compression, self.chunk_size,
                                self.fsync_interval_s)
        except RecorderError as e:
            self._alert(str(e))
            self._error_backoff_until = time.monotonic_ns() + 1_000_000_000
            return None
        self._next_part[idx] = part + 1
        self._open[idx] = seg
        return seg

    def _split(self, seg: SegmentWriter) -> None:
        """Size limit reached: close this part; the window continues in a new part."""
        self._close(seg.index)

    def _flush_side_channels(self, seg: SegmentWriter, counters: bool) -> None:
        """Write the segment's pending stamps (device and arrival time of every sample since
        the last flush) and, with ``counters``, a snapshot of every loss counter."""
        t = max(seg.t_last_ns or seg.window[0], seg.window[0])
        stamps_codec = codec_for(_STAMPS_INFO)
        for name, rows in seg.pending_stamps.items():
            if rows:
                doc = {"stream": name, "columns": ["t_ns", "device_t_ns", "host_rx_ns", "seq"],
                       "rows": rows}
                seg.write(_STAMPS_INFO, stamps_codec, _encode_json(doc), t, t, 0)
        seg.pending_stamps = {}
        if counters:
            doc = {"host_mono_ns": time.monotonic_ns(), "streams": self._counter_snapshot(),
                   "disk_drops": self.disk_drops}
            seg.write(_COUNTERS_INFO, codec_for(_COUNTERS_INFO), _encode_json(doc), t, t, 0)

    def _counter_snapshot(self) -> dict[str, dict[str, int]]:
        return {n: {**st.counters(), "queue_drops": st.queue.dropped,
                    "queue_depth": len(st.queue)} for n, st in self._streams.items()}

    def _sync_due(self) -> None:
        """Every fsync interval: side channels, flush the open chunk, fsync. This bounds
        what a power cut can lose to about one interval."""
        if not self._open:
            return
        newest = max(self._open)
        for idx, seg in list(self._open.items()):
            if not seg.sync_due():
                continue
            try:
                self._flush_side_channels(seg, counters=idx == newest)
                seg.sync()
            except RecorderError as e:
                self._fail(seg, e)

    def _close_due(self, watermark: int) -> None:
        for idx in sorted(self._open):
            seg = self._open[idx]
            if seg.window[1] + self.grace_ns <= watermark:
                self._close(idx)

    def _close(self, idx: int) -> None:
        seg = self._open.pop(idx)
        try:
            self._flush_side_channels(seg, counters=not self._open)
            path, sha, size = seg.close()
        except RecorderError as e:
            self._fail(seg, e)
            return
        manifest = self._manifest(seg, sha, size)
        self._publish(path, manifest)

    def _publish(self, path: Path, manifest: dict[str, Any]) -> bool:
        """Write the manifest (which makes the segment visible to retention and upload);
        on failure keep it for a retry on the next writer loop."""
        try:
            write_manifest(path, manifest)
        except OSError as e:
            if (path, manifest) not in self._manifest_retry:
                self._manifest_retry.append((path, manifest))
                self._alert(f"manifest for {path.name} not written ({e.strerror}); "
                            f"will retry")
            return False
        self.closed_segments.append(path)
        log.info("closed %s (%d bytes)", path.name, manifest["size"])
        for cb in self.on_closed:
            try:
                cb(path, manifest)
            except Exception:
                log.exception("on_closed hook failed for %s", path.name)
        return True

    def _retry_manifests(self) -> None:
        pending, self._manifest_retry = self._manifest_retry, []
        for path, manifest in pending:
            if not self._publish(path, manifest):
                self._manifest_retry.append((path, manifest))

    def _manifest(self, seg: SegmentWriter, sha: str, size: int) -> dict[str, Any]:
        streams: dict[str, Any] = {}
        for name, st in self._streams.items():
            stats = seg.stats.get(name, {"messages": 0, "bytes": 0, "t_first_ns": None,
                                         "t_last_ns": None})
            counters = st.counters()
            prev = st.counters_reported or {}
            delta = {k: v - prev.get(k, 0) for k, v in counters.items()}
            st.counters_reported = counters
            drops = st.queue.dropped - st.drops_reported
            new_gaps = [g for g in st.gap_events() if g.get("host_ns", 0) > st.gaps_reported_ns]
            st.gaps_reported_ns = max([st.gaps_reported_ns] + [g.get("host_ns", 0)
                                                               for g in new_gaps])
            st.drops_reported = st.queue.dropped
            streams[name] = {**stats, "kind": st.info.kind.value, "encoding": st.info.encoding,
                             "rate_hz": st.info.rate_hz, "queue_drops": drops,
                             "device": delta, "device_total": counters,
                             "gap_events": new_gaps[:100],
                             "degraded_drops_total": self.degraded_drops.get(name, 0)}
        for name in (STAMPS_TOPIC, COUNTERS_TOPIC):
            if name in seg.stats:
                streams[name] = {**seg.stats[name], "kind": "meta", "encoding": "json"}
        clock = self.clock_summary()
        span = ((seg.t_first_ns, seg.t_last_ns) if seg.t_first_ns is not None
                and seg.t_last_ns is not None else None)
        quality = (self.quality.report(seg.name, span, streams, clock)
                   if self.quality is not None else None)
        return {
            **self.manifest_extra,
            "session_id": self.session_id,
            "segment": seg.name,
            "index": seg.index,
            "file": seg.final_path.name,
            "sha256": sha,
            "size": size,
            "window_start_ns": seg.window[0],
            "window_end_ns": seg.window[1],
            "t_first_ns": seg.t_first_ns,
            "t_last_ns": seg.t_last_ns,
            "late_samples": seg.late,
            "compression": self.compression,
            "recovered": False,
            "retention": self.initial_retention(),
            "triggers": [],
            "priority": 0,
            "closed_unix_ns": time.time_ns(),
            "agent_version": __version__,
            "streams": streams,
            "disk_drops_total": self.disk_drops,
            "clock": clock,
            "quality": quality,
            "alerts": list(self.alerts[-20:]),
        }

    def _fail(self, seg: SegmentWriter, err: Exception) -> None:
        """A write failed: keep what is on disk as ``.active`` for recovery, alert, and
        retry with a new segment after a back-off."""
        self._alert(str(err))
        seg.abandon()
        self._open.pop(seg.index, None)
        self._error_backoff_until = time.monotonic_ns() + 1_000_000_000

    def _alert(self, msg: str) -> None:
        log.error("recorder: %s", msg)
        self.alerts.append(msg)

    # -- status -----------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return {"open_segments": len(self._open), "closed_segments": len(self.closed_segments),
                "disk_drops": self.disk_drops, "alerts": list(self.alerts[-5:]),
                "degraded_drops": dict(self.degraded_drops),
                "streams": self._counter_snapshot()}


def _encode_json(obj: dict[str, Any]) -> bytes:
    return codec_for(_STAMPS_INFO).encode(Sample(stream="", payload=obj, host_rx_ns=0),
                                          _STAMPS_INFO)
