"""What every emulator shares: lifecycle, its device clock, jitter, faults and truth log.

    emu = SomeEmulator(world, settings, run_dir, run_t0_ns)
    emu.start()      # returns once the interface is up (port bound, pty created, ...)
    emu.uri          # what the agent's rig file should point at
    emu.stop()       # idempotent; joins its threads; closes the truth log

``run_t0_ns`` is the monotonic time of scenario t = 0; an emulator sends the state of the
world at true time ``t_s = (time.monotonic_ns() - run_t0_ns) / 1e9``.
"""

from __future__ import annotations

import threading
import time
import zlib
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from agent.realtime import realtime_thread

from ..scenario import DeviceSettings
from ..truth import TruthLog
from ..world import DeviceClock, Jitter, World


#: a sender sleeps until this long before its send instant, then spins: a timer wake-up
#: in a VM is tens of µs late, and that lateness would look like transport delay
SPIN_NS = 150_000


def punctual_thread() -> None:
    """Let the calling (sender) thread leave on time on a loaded host: SCHED_FIFO where
    allowed, else nice −10, and a 0.2 ms interpreter switch interval
    (:func:`agent.realtime.realtime_thread`). A real device's timing does not suffer from
    the host; the emulator's must not either."""
    realtime_thread(10, nice_fallback=True)


def sleep_until(deadline_ns: int, stop: threading.Event | None = None) -> bool:
    """Sleep until monotonic ``deadline_ns``: the last :data:`SPIN_NS` spinning (~0.5 %
    of a core per 30 sends/s). Returns True if ``stop`` was set meanwhile (not sent)."""
    delay = (deadline_ns - SPIN_NS - time.monotonic_ns()) / 1e9
    if delay > 0:
        if stop is not None:
            if stop.wait(delay):
                return True
        else:
            time.sleep(delay)
    while time.monotonic_ns() < deadline_ns:
        pass
    return False


class Emulator(ABC):
    """Base class. Subclasses set ``device`` (e.g. "camera") and implement ``_start`` and
    ``_stop``; they count what they send in ``self.sent`` (sent, dropped, corrupted, …)."""

    device = ""

    def __init__(self, world: World, settings: DeviceSettings, run_dir: Path, run_t0_ns: int):
        self.world = world
        self.settings = settings
        self.run_dir = Path(run_dir)
        self.run_t0_ns = run_t0_ns
        self.clock = DeviceClock(settings.clock_offset_s, settings.drift_ppm, run_t0_ns)
        seed = world.sc.seed * 1000 + zlib.crc32(self.device.encode()) % 1000
        self.jitter = Jitter(settings, seed)
        self.truth = TruthLog(self.run_dir / "truth" / f"{self.device}.jsonl")
        self.truth.write({"type": "clock", "device": self.device, **self.clock.to_dict()})
        self.sent: dict[str, int] = {"sent": 0}
        self.stop_event = threading.Event()
        self.uri = ""
        self._started = False

    def t_s(self, mono_ns: int | None = None) -> float:
        """Scenario time of a monotonic instant (now by default)."""
        return ((time.monotonic_ns() if mono_ns is None else mono_ns) - self.run_t0_ns) / 1e9

    def wait_for_t0(self) -> None:
        """Sleep until scenario time 0 (for an emulator built with t = 0 ahead of its start,
        which can take a second: the camera's render process, the LiDAR's warm-up)."""
        time.sleep(max(0.0, -self.t_s()))

    def true_ns(self, t_s: float) -> int:
        return self.run_t0_ns + int(round(t_s * 1e9))

    def count(self, key: str, n: int = 1) -> None:
        self.sent[key] = self.sent.get(key, 0) + n

    def faults(self, t_s: float) -> dict[str, Any]:
        """Active faults at ``t_s`` by kind → the Fault."""
        return {f.kind: f for f in self.world.active_faults(self.settings, t_s)}

    def start(self) -> None:
        self.stop_event.clear()
        self._start()
        self._started = True

    def stop(self) -> None:
        if self.stop_event.is_set() and not self._started:
            return
        self.stop_event.set()
        if self._started:
            self._started = False
            self._stop()
        self.truth.write({"type": "summary", "device": self.device, **self.sent})
        self.truth.close()

    def __enter__(self) -> "Emulator":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @abstractmethod
    def _start(self) -> None: ...

    @abstractmethod
    def _stop(self) -> None: ...
