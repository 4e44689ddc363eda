"""The shared session timebase and the clock stage that puts every Sample on it.

``Timebase.now_ns()`` reads the session's clock. ``ClockStage.stamp(sample, driver)`` sets
``sample.t_ns``; it is called in each driver's reader thread, before the sample is queued,
and never blocks.

Mapping rules, per stream:
- the driver's device clock *is* the timebase (synthetic drivers): ``t_ns = device_t_ns``;
- otherwise a per-stream estimator maps the device clock onto the timebase (see
  :mod:`agent.clock_estimator` where present); without a device clock the arrival time is
  used and the stream's quality says ``source = "arrival"``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .types import Sample

_CLOCKS: dict[str, Callable[[], int]] = {
    "monotonic": time.monotonic_ns,
    "realtime": time.time_ns,
}


class Timebase:
    """The session clock. ``kind`` is ``monotonic`` (default) or ``realtime``; ``tai`` and
    ``ptp`` are provided by the clock module when the host supports them."""

    def __init__(self, kind: str = "monotonic"):
        self.kind = kind
        if kind == "tai" and hasattr(time, "CLOCK_TAI"):
            self._now = lambda: time.clock_gettime_ns(time.CLOCK_TAI)
        elif kind in _CLOCKS:
            self._now = _CLOCKS[kind]
        else:
            raise ValueError(f"timebase {kind!r} is not available on this host")

    def now_ns(self) -> int:
        return self._now()

    def from_monotonic(self, mono_ns: int) -> int:
        """Convert a host-monotonic time (``host_rx_ns``) to this timebase."""
        if self.kind == "monotonic":
            return mono_ns
        return mono_ns + (self._now() - time.monotonic_ns())


@dataclass
class StreamClock:
    """Per-stream mapping state and quality, as reported in manifests."""

    source: str  # "device=timebase" | "arrival" | "estimator"
    samples: int = 0
    quality: dict[str, Any] = field(default_factory=dict)


class ClockStage:
    """Sets ``t_ns`` on every sample. One instance per pipeline; ``stamp`` is called from
    several reader threads but each stream only ever from its own thread."""

    def __init__(self, timebase: Timebase):
        self.timebase = timebase
        self.streams: dict[str, StreamClock] = {}

    def stamp(self, sample: Sample, device_clock_is_timebase: bool) -> None:
        st = self.streams.get(sample.stream)
        if st is None:
            src = "device=timebase" if device_clock_is_timebase else "arrival"
            st = self.streams[sample.stream] = StreamClock(source=src)
        if device_clock_is_timebase and sample.device_t_ns is not None:
            sample.t_ns = sample.device_t_ns
        else:
            sample.t_ns = self.timebase.from_monotonic(sample.host_rx_ns)
        st.samples += 1

    def summary(self) -> dict[str, dict[str, Any]]:
        return {k: {"source": v.source, "samples": v.samples, **v.quality}
                for k, v in self.streams.items()}
