"""systemd integration: the sd_notify protocol and a watchdog fed only while data flows.

    record loop ──every tick──▶ Supervisor.tick(pipeline.stats())
                                   ├─ READY=1 once every required stream has delivered
                                   ├─ WATCHDOG=1 every WATCHDOG_USEC/2 while healthy
                                   │    (each required stream within its deadline, clock locked)
                                   └─ STATUS=… rates, drops, what is wrong

A required stream is *stalled* when no sample arrived for ``max(stall_periods / rate_hz,
stall_min_s)`` (``stall_unknown_rate_s`` without a rate). When it stalls or its clock loses
lock, feeding stops and systemd restarts the service after ``WatchdogSec``; with
``[operations] degraded_ok = true`` feeding goes on and STATUS says loudly what is wrong.

The protocol (sd_notify(3)) is a newline-separated ``KEY=VALUE`` datagram sent to the
AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract
namespace). Without ``$NOTIFY_SOCKET`` every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .config import OperationsConfig
from .health import RateMeter, clock_locked

log = logging.getLogger("edgecap.notify")


def _address(raw: str | None) -> str | bytes | None:
    if not raw:
        return None
    if raw.startswith("@"):
        return b"\0" + raw[1:].encode()
    if raw.startswith("/"):
        return raw
    return None  # vsock and relative addresses are not supported


class Notifier:
    """Sends sd_notify messages. ``send`` never raises and blocks at most
    ``send_timeout_s`` (0.5 s) when the manager's queue is full; failures (full queue,
    missing socket) are counted in ``errors`` and logged sparingly. Thread-safe.

    ``address``: the NOTIFY_SOCKET value; default ``$NOTIFY_SOCKET``.
    """

    def __init__(self, address: str | None = None):
        raw = os.environ.get("NOTIFY_SOCKET") if address is None else address
        self.address = _address(raw)
        if raw and self.address is None:
            log.warning("NOTIFY_SOCKET=%r not supported; systemd notifications disabled", raw)
        self.errors = 0
        self.sent = 0
        self.send_timeout_s = 0.5
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *fields: str) -> bool:
        """Send ``KEY=VALUE`` fields in one datagram; True when it was sent."""
        if self.address is None:
            return False
        msg = "\n".join(f.replace("\n", " ") for f in fields).encode("utf-8", "replace")
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    self._sock.settimeout(self.send_timeout_s)
                self._sock.sendto(msg, self.address)
            except OSError as e:
                self.errors += 1
                if self.errors in (1, 10, 100) or self.errors % 1000 == 0:
                    log.warning("sd_notify to %s failed (%d so far): %s", self.address,
                                self.errors, e)
                return False
            self.sent += 1
            return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def watchdog_usec(environ: Mapping[str, str] | None = None) -> int | None:
    """The watchdog interval systemd asks for (``$WATCHDOG_USEC``), or None when there is
    none or it is meant for another process (``$WATCHDOG_PID``)."""
    env = os.environ if environ is None else environ
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid and pid.strip() != str(os.getpid()):
        return None
    return usec if usec > 0 else None


class Heartbeat:
    """Liveness-only watchdog for services without streams (``sync run``, ``sync serve``):
    call ``beat()`` from the main loop; WATCHDOG=1 goes out at most every half interval.
    ``ready()`` once serving. Same thread rules as :class:`Notifier`."""

    def __init__(self, notifier: Notifier | None = None, usec: int | None = None,
                 now_ns: Callable[[], int] = time.monotonic_ns):
        self.notifier = notifier or Notifier()
        self.half_ns = (usec if usec is not None else (watchdog_usec() or 0)) * 500
        self.now_ns = now_ns
        self._last: int | None = None

    def ready(self, status: str | None = None) -> None:
        self.notifier.ready(status)

    def beat(self, status: str | None = None) -> None:
        now = self.now_ns()
        if self.half_ns and (self._last is None or now - self._last >= self.half_ns):
            self.notifier.send("WATCHDOG=1", *([f"STATUS={status}"] if status else []))
            self._last = now


@dataclass
class StreamHealth:
    """One stream as the supervisor sees it at a tick."""

    name: str
    required: bool
    samples: int
    rate_hz: float | None
    deadline_s: float
    silent_s: float
    stalled: bool
    locked: bool
    drops: int
    gaps: int


@dataclass
class Health:
    """Outcome of one :meth:`Supervisor.tick`."""

    ready: bool
    healthy: bool
    degraded: bool
    fed: bool
    streams: dict[str, StreamHealth] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    status: str = ""


class Supervisor:
    """Decides READY, WATCHDOG and STATUS from pipeline stats.

    ``tick(stats)`` is called by the owner's loop (``edgecap record``: every 0.5 s) from
    one thread; it does not wait on the pipeline (a notify send waits at most 0.5 s, only
    when systemd's queue is full). The loop period must stay below ``WATCHDOG_USEC / 2``.
    ``interval_usec``: the watchdog interval; None reads ``$WATCHDOG_USEC``, 0 never feeds.
    ``required``: stream name → nominal rate in Hz (None if unknown). ``clock_summary``:
    ``ClockStage.summary`` (stream → dict; a missing lock field counts as locked; entries
    whose key is not a topic path are global and apply to every stream). Times are host
    ``time.monotonic_ns()`` (``now_ns`` for tests).
    """

    def __init__(self, required: Mapping[str, float | None],
                 ops: OperationsConfig | None = None, notifier: Notifier | None = None,
                 clock_summary: Callable[[], Mapping[str, Any]] = dict,
                 interval_usec: int | None = None,
                 now_ns: Callable[[], int] = time.monotonic_ns):
        self.required = dict(required)
        self.ops = ops or OperationsConfig()
        self.notifier = notifier or Notifier()
        self.clock_summary = clock_summary
        usec = watchdog_usec() if interval_usec is None else interval_usec
        self.feed_every_ns = usec * 500 if usec else 0
        self.now_ns = now_ns
        self.rates = RateMeter(window_s=5.0, min_span_s=0.25)
        self.started_ns = now_ns()
        self.ready_ns: int | None = None
        self.last_feed_ns: int | None = None
        self.last_status_ns = 0
        self.last_status = ""
        self.feeds = 0
        self._last_count: dict[str, int] = {}
        self._last_change: dict[str, int] = {}
        self._was_healthy = True
        self._last_tick_ns = 0
        self._warned_period = False
        self._status_key: tuple[str, tuple[str, ...]] = ("", ())

    @classmethod
    def for_pipeline(cls, pipe: Any, notifier: Notifier | None = None,
                     **kw: Any) -> "Supervisor":
        """A supervisor for ``pipe`` (opened): required streams and rates from its config
        and stream infos, lock state from its clock stage, rules from ``[operations]``."""
        required: dict[str, float | None] = {}
        for sc in pipe.cfg.streams:
            if sc.required:
                info = pipe.infos.get(sc.name)
                required[sc.name] = sc.rate_hz or (info.rate_hz if info else None)
        return cls(required, pipe.cfg.operations, notifier, pipe.clock.summary, **kw)

    def deadline_s(self, rate_hz: float | None) -> float:
        o = self.ops
        if not rate_hz:
            return max(o.stall_unknown_rate_s, o.stall_min_s)
        return max(o.stall_periods / rate_hz, o.stall_min_s)

    def tick(self, stats: Mapping[str, Any]) -> Health:
        """Evaluate ``stats`` (``Pipeline.stats()``) and send what is due."""
        now = self.now_ns()
        if (self.feed_every_ns and self._last_tick_ns and not self._warned_period
                and now - self._last_tick_ns > self.feed_every_ns):
            self._warned_period = True
            log.warning("watchdog ticks %.2f s apart, longer than half the watchdog interval",
                        (now - self._last_tick_ns) / 1e9)
        self._last_tick_ns = now
        sstats: Mapping[str, Mapping[str, Any]] = stats.get("streams", {}) or {}
        counts = {n: int(s.get("enqueued", s.get("received", 0)) or 0) for n, s in sstats.items()}
        self.rates.observe(counts, now)
        rates = self.rates.rates()
        try:
            clock = dict(self.clock_summary() or {})
        except Exception as e:  # a clock stage bug must not starve the watchdog silently
            log.error("clock summary failed: %s", e)
            clock = {"_summary": {"locked": False}}
        global_locked = all(clock_locked(v) for k, v in clock.items()
                            if not str(k).startswith("/") and isinstance(v, Mapping))

        streams: dict[str, StreamHealth] = {}
        for name in list(self.required) + [n for n in sstats if n not in self.required]:
            c = counts.get(name, 0)
            if c > self._last_count.get(name, 0):
                self._last_change[name] = now
            self._last_count[name] = max(c, self._last_count.get(name, 0))
            since = self._last_change.get(name, self.started_ns)
            rate = self.required.get(name)
            entry = clock.get(name)
            locked = global_locked and (clock_locked(entry) if isinstance(entry, Mapping)
                                        else True)
            s = sstats.get(name, {})
            deadline = self.deadline_s(rate)
            silent = (now - since) / 1e9
            streams[name] = StreamHealth(
                name, name in self.required, c, rates.get(name), deadline, silent,
                stalled=c > 0 and silent > deadline, locked=locked,
                drops=int(s.get("queue_drops", 0) or 0), gaps=int(s.get("gaps", 0) or 0))

        req = [streams[n] for n in self.required]
        problems: list[str] = []
        if self.ready_ns is None and all(s.samples > 0 for s in req):
            self.ready_ns = now
            text = self._status_text(streams, [], "ready")
            self.notifier.ready(text)
            self.last_status, self.last_status_ns = text, now
            log.info("ready: every required stream delivers", extra={
                "streams": len(req), "startup_s": round((now - self.started_ns) / 1e9, 3)})
        ready = self.ready_ns is not None
        if not ready:
            waiting = [s.name for s in req if s.samples == 0]
            problems.append("waiting for " + ", ".join(waiting))
        for s in req:
            if s.stalled:
                problems.append(f"{s.name} stalled {s.silent_s:.1f}s")
        in_grace = ready and (now - self.ready_ns) / 1e9 < self.ops.clock_lock_grace_s
        lock_problem = False
        if self.ops.require_clock_lock:
            unlocked = [s.name for s in req if not s.locked]
            if unlocked:
                problems.append(("clock acquiring: " if in_grace else "clock unlocked: ")
                                + ", ".join(unlocked))
                lock_problem = not in_grace
        healthy = ready and not any(s.stalled for s in req) and not lock_problem
        degraded = ready and not healthy and self.ops.degraded_ok
        feed = ready and (healthy or degraded)

        fed = False
        if feed and self.feed_every_ns and (self.last_feed_ns is None
                                            or now - self.last_feed_ns >= self.feed_every_ns):
            fed = self.notifier.watchdog()
            self.last_feed_ns = now
            self.feeds += 1

        state = ("starting" if not ready else "ok" if healthy else
                 "DEGRADED (watchdog kept fed)" if degraded else "UNHEALTHY (watchdog starved)")
        text = self._status_text(streams, problems, state)
        if ready and healthy != self._was_healthy:
            if healthy:
                log.warning("recovered: every required stream flows")
            else:
                log.error("unhealthy: %s", "; ".join(problems),
                          extra={"degraded_ok": self.ops.degraded_ok})
            self._was_healthy = healthy
        key = (state, tuple(s.name for s in req if s.stalled or not s.locked))
        if ready and (key != self._status_key
                      or now - self.last_status_ns >= self.ops.status_interval_s * 1e9):
            self.notifier.status(text)
            self.last_status, self.last_status_ns, self._status_key = text, now, key
        return Health(ready, healthy, degraded, fed, streams, problems, text)

    @staticmethod
    def _status_text(streams: Mapping[str, StreamHealth], problems: list[str],
                     state: str) -> str:
        parts = []
        for s in streams.values():
            rate = f"{s.rate_hz:.1f}Hz" if s.rate_hz is not None else "?Hz"
            loss = f" drop {s.drops}" if s.drops else ""
            loss += f" gap {s.gaps}" if s.gaps else ""
            parts.append(f"{s.name} {rate}{loss}")
        head = state + (": " + "; ".join(problems) if problems else "")
        return " | ".join([head] + parts)[:1000]

    def stopping(self) -> None:
        """Tell systemd the service is stopping (owner thread, at shutdown)."""
        self.notifier.stopping("stopping: closing segments")
