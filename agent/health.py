"""Health facts read out of a running pipeline and its output directory, shared by the
watchdog (:mod:`agent.notify`), the metrics endpoint (:mod:`agent.metrics`) and ``doctor``.

Everything here is a pure reader: nothing counts twice, nothing blocks on the pipeline.
Rates are derived from the pipeline's own monotonically increasing counters; times are
host ``time.monotonic_ns()``.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

#: marker the uploader leaves beside an uploaded segment (``X.mcap.uploaded`` or ``X.uploaded``)
UPLOADED_SUFFIX = ".uploaded"


class RateMeter:
    """Per-key rates of monotonically increasing counts, over a sliding window.

    ``observe(counts, now_ns)`` may be called from any thread at any cadence (each scrape,
    each watchdog tick); ``rates()`` answers ``Δcount / Δt`` between the newest observation
    and the oldest one still inside ``window_s`` (at least ``min_span_s`` apart), so several
    callers sharing one meter do not disturb each other. A count that goes down (a counter
    reset) restarts that key's history. Never blocks for long (one lock, O(history)).
    """

    def __init__(self, window_s: float = 10.0, min_span_s: float = 0.5, max_points: int = 256):
        self.window_ns = int(window_s * 1e9)
        self.min_span_ns = int(min_span_s * 1e9)
        self._hist: deque[tuple[int, dict[str, float]]] = deque(maxlen=max_points)
        self._lock = threading.Lock()

    def observe(self, counts: Mapping[str, float], now_ns: int | None = None) -> None:
        now = time.monotonic_ns() if now_ns is None else now_ns
        with self._lock:
            if self._hist:
                last_t, last = self._hist[-1]
                if now < last_t:
                    return
                if any(counts.get(k, 0) < v for k, v in last.items()):
                    self._hist.clear()
            self._hist.append((now, dict(counts)))
            while len(self._hist) > 2 and now - self._hist[1][0] >= self.window_ns:
                self._hist.popleft()

    def rates(self) -> dict[str, float]:
        """Per-key rate in counts per second; keys without two spaced observations are
        absent (not zero: "unknown" is not "stalled")."""
        with self._lock:
            if len(self._hist) < 2:
                return {}
            t1, c1 = self._hist[-1]
            for t0, c0 in self._hist:
                if t1 - t0 >= self.min_span_ns:
                    break
            else:
                return {}
            dt = (t1 - t0) / 1e9
            return {k: (v - c0[k]) / dt for k, v in c1.items() if k in c0}


# -- clock lock ---------------------------------------------------------------------------
_LOCKED_WORDS = {"locked", "lock", "ok", "true", "yes", "synced", "synchronized", "tracking",
                 # no lock to lose: stamped on arrival, or the device clock is the timebase
                 "arrival", "device=timebase", "timebase", "n/a", "none"}


def clock_locked(entry: Mapping[str, Any]) -> bool:
    """Lock state of one ``ClockStage.summary()`` entry. The clock stage names it
    ``state`` (``locked``/``acquiring``/``unlocked``, or ``arrival`` for streams stamped on
    arrival, see :mod:`agent.clock_estimator`), or ``locked``/``lock``/``lock_state``
    (bool or word). An entry that says nothing about lock is treated as locked (streams
    stamped by the timebase itself or by arrival time have nothing to lose lock on)."""
    for key in ("locked", "lock", "lock_state", "state"):
        if key in entry:
            v = entry[key]
            if isinstance(v, bool):
                return v
            if isinstance(v, (int, float)):
                return v != 0
            if isinstance(v, str):
                return v.strip().lower() in _LOCKED_WORDS
            return bool(v)
    return True


def _num(entry: Mapping[str, Any], names_ns: tuple[str, ...],
         names_s: tuple[str, ...]) -> float | None:
    """First numeric field among ``names_ns`` (converted to s) or ``names_s``, else None."""
    for k in names_ns:
        v = entry.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return float(v) / 1e9
    for k in names_s:
        v = entry.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
    return None


def clock_offset_s(entry: Mapping[str, Any]) -> float | None:
    """Estimated device→timebase offset in seconds, if the clock stage reports one."""
    return _num(entry, ("offset_ns",), ("offset_s", "offset"))


def clock_jitter_s(entry: Mapping[str, Any]) -> float | None:
    """Residual jitter in seconds, if the clock stage reports it."""
    return _num(entry, ("jitter_ns", "residual_jitter_ns", "residual_ns", "rms_ns"),
                ("jitter_s", "residual_jitter_s", "jitter"))


def clock_drift_ppm(entry: Mapping[str, Any]) -> float | None:
    for k in ("skew_ppm", "drift_ppm", "ppm"):
        v = entry.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            return float(v)
    return None


# -- disk and spool -----------------------------------------------------------------------
@dataclass(frozen=True)
class DiskUsage:
    total_bytes: int
    free_bytes: int  # available to an unprivileged writer (f_bavail)

    @property
    def used_bytes(self) -> int:
        return self.total_bytes - self.free_bytes


def disk_usage(path: str | os.PathLike[str],
               statvfs: Callable[[str], os.statvfs_result] = os.statvfs) -> DiskUsage | None:
    """Usage of the filesystem holding ``path`` (or its nearest existing parent); None when
    nothing along the path exists or statvfs fails."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = statvfs(str(p))
    except OSError:
        return None
    return DiskUsage(st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize)


@dataclass(frozen=True)
class SpoolBacklog:
    segments: int
    bytes: int
    uploaded: int


def is_uploaded(segment: Path) -> bool:
    """True when the uploader has marked ``segment`` (``seg.mcap.uploaded`` or
    ``seg.uploaded``) as durably received by the ingest server."""
    return (segment.with_name(segment.name + UPLOADED_SUFFIX).exists()
            or segment.with_name(segment.name.removesuffix(".mcap") + UPLOADED_SUFFIX).exists())


def spool_backlog(root: str | os.PathLike[str], max_depth: int = 3) -> SpoolBacklog:
    """Closed segments (``*.mcap``) under ``root`` not yet marked uploaded. Walks at most
    ``max_depth`` levels (spool/session/segment); unreadable directories are skipped.
    Blocks on directory I/O: callers cache (see :class:`CachedValue`)."""
    segs = nbytes = uploaded = 0
    stack = [(Path(root), 0)]
    while stack:
        d, depth = stack.pop()
        try:
            it = list(os.scandir(d))
        except OSError:
            continue
        names = {e.name for e in it}
        for e in it:
            try:
                if e.is_dir(follow_symlinks=False):
                    if depth < max_depth:
                        stack.append((Path(e.path), depth + 1))
                elif e.name.endswith(".mcap"):
                    stem = e.name.removesuffix(".mcap")
                    if e.name + UPLOADED_SUFFIX in names or stem + UPLOADED_SUFFIX in names:
                        uploaded += 1
                    else:
                        segs += 1
                        nbytes += e.stat(follow_symlinks=False).st_size
            except OSError:
                continue
    return SpoolBacklog(segs, nbytes, uploaded)


class CachedValue:
    """``get()`` returns ``fn()`` at most once per ``ttl_s`` (thread-safe): keeps scrapes
    cheap when a directory walk or statvfs is behind the value."""

    def __init__(self, fn: Callable[[], Any], ttl_s: float = 5.0):
        self.fn = fn
        self.ttl_ns = int(ttl_s * 1e9)
        self._at = 0
        self._value: Any = None
        self._lock = threading.Lock()

    def get(self) -> Any:
        with self._lock:
            now = time.monotonic_ns()
            if self._at == 0 or now - self._at >= self.ttl_ns:
                self._value = self.fn()
                self._at = now
            return self._value
