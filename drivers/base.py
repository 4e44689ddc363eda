"""The driver interface: one device (or a recorded source) turned into timestamped Samples.

A driver is built from its registry key, a URI and a validated options object, then used as:

    drv.open()                 # raises DriverError with a fix hint when the device is absent
    for sample in drv:         # blocks in the pipeline's reader thread; ends after close()
        ...
    drv.close()                # may be called from any thread; makes iteration end soon

Drivers never raise for bad device data: they count it in ``counters`` and keep going.
Losses the device reveals (frame-counter jumps, missing packets, audio overflows) are
counted in ``counters`` *and* reported as gap events (``gap_events``) with their cause.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from typing import Any, ClassVar, Iterator

from pydantic import BaseModel, ConfigDict

from agent.types import Sample, StreamInfo


class DriverOptions(BaseModel):
    """Base of every driver's options model (the ``[streams.options]`` table). Unknown keys
    are rejected so that a typo in a rig file is an error, not a silent default."""

    model_config = ConfigDict(extra="forbid")


class Counters:
    """Named monotonically increasing counts, written by one driver thread and read by
    others (plain ints under the GIL; readers take a snapshot with ``as_dict``).

    Standard names: ``received``, ``gaps`` (samples lost on the device side), ``corrupt``,
    ``errors``, ``reconnects``; drivers add their own (``late_packets``, ``overflows``…).
    """

    STANDARD = ("received", "gaps", "corrupt", "errors", "reconnects")

    def __init__(self) -> None:
        self._c: dict[str, int] = {k: 0 for k in self.STANDARD}

    def inc(self, name: str, n: int = 1) -> None:
        self._c[name] = self._c.get(name, 0) + n

    def __getitem__(self, name: str) -> int:
        return self._c.get(name, 0)

    def as_dict(self) -> dict[str, int]:
        return dict(self._c)


class Driver(ABC):
    """Base class of every driver. Subclasses set ``key`` and ``Options`` and implement
    ``streams``, ``_open``, ``_close`` and ``_samples``.

    ``is_live`` is False for recorded sources (replay, files): the pipeline then paces by
    the source, not by the wall clock.
    """

    key: ClassVar[str] = ""
    Options: ClassVar[type[DriverOptions]] = DriverOptions
    is_live: ClassVar[bool] = True
    #: True when ``device_t_ns`` is already on the session timebase (synthetic drivers);
    #: the clock stage then uses it as is.
    device_clock_is_timebase: ClassVar[bool] = False
    #: True when samples arrive with ``t_ns`` already set on the session timebase
    #: (recorded sessions, ``replay.mcap``): the clock stage leaves them alone.
    t_ns_final: ClassVar[bool] = False

    def __init__(self, name: str, uri: str, options: DriverOptions | None = None,
                 rate_hz: float | None = None, calibration: dict[str, Any] | None = None):
        self.name = name
        self.uri = uri
        self.options = options if options is not None else self.Options()
        self.rate_hz = rate_hz
        self.calibration = calibration
        self.counters = Counters()
        self.gap_events: deque[dict[str, Any]] = deque(maxlen=1000)
        self._stop = threading.Event()
        self._opened = False

    # -- public lifecycle -------------------------------------------------------------
    def open(self) -> None:
        """Open the device. Blocks until it answers or fails; raises DriverError."""
        self._stop.clear()
        self._open()
        self._opened = True

    def close(self) -> None:
        """Ask the sample loop to end and release the device. Idempotent, any thread."""
        self._stop.set()
        if self._opened:
            self._opened = False
            self._close()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def __iter__(self) -> Iterator[Sample]:
        return self._samples()

    def record_gap(self, count: int, cause: str, **extra: Any) -> None:
        """Count ``count`` samples lost on the device side and remember why."""
        self.counters.inc("gaps", count)
        self.gap_events.append({"host_ns": time.monotonic_ns(), "count": count,
                                "cause": cause, **extra})

    # -- for subclasses ---------------------------------------------------------------
    @abstractmethod
    def streams(self) -> list[StreamInfo]:
        """The streams this driver produces (valid after ``open``)."""

    @abstractmethod
    def _open(self) -> None: ...

    @abstractmethod
    def _close(self) -> None: ...

    @abstractmethod
    def _samples(self) -> Iterator[Sample]:
        """Yield samples until ``stopping``; called in the pipeline's reader thread."""
