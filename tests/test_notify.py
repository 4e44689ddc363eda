"""sd_notify and the data-driven watchdog, against a real unix datagram NOTIFY_SOCKET.

The stall comes from a fake driver registered like a real one (``test.stallable``) that
stops delivering on request while a real Pipeline records."""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Iterator

import pytest

from agent.config import OperationsConfig, parse_config
from agent.notify import Heartbeat, Notifier, Supervisor, watchdog_usec
from agent.ops import Operations
from agent.pipeline import Pipeline
from agent.types import Sample, StreamInfo, StreamKind
from drivers.base import Driver, DriverOptions
from drivers.registry import register

# -- a fake device that stalls on request --------------------------------------------------
STALL: dict[str, threading.Event] = {}
FIRST_RX: dict[str, int] = {}


class StallableOptions(DriverOptions):
    start_delay_s: float = 0.0


@register("test.stallable")
class StallableDriver(Driver):
    """Emits at ``rate_hz``; while ``STALL[name]`` is set it delivers nothing (like a
    camera whose USB link hangs) but stays open."""

    Options = StallableOptions
    device_clock_is_timebase = True

    def streams(self) -> list[StreamInfo]:
        return [StreamInfo(self.name, StreamKind.EVENT, "json", self.rate_hz)]

    def _open(self) -> None:
        self._n = 0

    def _close(self) -> None:
        return None

    def _samples(self) -> Iterator[Sample]:
        if self._stop.wait(self.options.start_delay_s):
            return
        period = 1.0 / (self.rate_hz or 50.0)
        stall = STALL.setdefault(self.name, threading.Event())
        while not self._stop.wait(period):
            if stall.is_set():
                continue
            now = time.monotonic_ns()
            FIRST_RX.setdefault(self.name, now)
            self.counters.inc("received")
            self._n += 1
            yield Sample(self.name, {"n": self._n}, now, device_t_ns=now, seq=self._n)


# -- a real NOTIFY_SOCKET -------------------------------------------------------------------
class NotifySocket:
    """Binds an AF_UNIX datagram socket (path or abstract) and records every message with
    its arrival time (monotonic ns), like systemd's manager end."""

    def __init__(self, address: str | bytes):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.settimeout(0.05)
        self.messages: list[tuple[int, str]] = []
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            self.messages.append((time.monotonic_ns(), data.decode()))

    def times(self, field: str) -> list[int]:
        return [t for t, m in list(self.messages) if field in m.split("\n")]

    def statuses(self) -> list[str]:
        return [line[7:] for _, m in list(self.messages) for line in m.split("\n")
                if line.startswith("STATUS=")]

    def wait_for(self, field: str, timeout_s: float) -> int | None:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            ts = self.times(field)
            if ts:
                return ts[0]
            time.sleep(0.01)
        return None

    def close(self) -> None:
        self._stop.set()
        self._t.join(1)
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path):
    ns = NotifySocket(str(tmp_path / "notify.sock"))
    yield ns, str(tmp_path / "notify.sock")
    ns.close()


# -- protocol --------------------------------------------------------------------------------
def test_notifier_sends_datagrams_to_path_socket(notify_socket):
    ns, path = notify_socket
    n = Notifier(path)
    assert n.enabled
    assert n.ready("hello\nworld")
    assert n.watchdog()
    assert ns.wait_for("WATCHDOG=1", 2)
    msgs = [m for _, m in ns.messages]
    assert msgs[0] == "READY=1\nSTATUS=hello world"  # newline in a value cannot split fields
    assert n.sent == 2 and n.errors == 0


def test_notifier_abstract_namespace_address():
    name = f"edgecap-test-{os.getpid()}-{time.monotonic_ns()}"
    ns = NotifySocket(b"\0" + name.encode())
    try:
        n = Notifier("@" + name)
        assert n.stopping("bye")
        assert ns.wait_for("STOPPING=1", 2)
    finally:
        ns.close()


def test_notifier_env_default_and_noop(monkeypatch, notify_socket):
    ns, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert Notifier().status("x")
    monkeypatch.delenv("NOTIFY_SOCKET")
    off = Notifier()
    assert not off.enabled and not off.ready() and off.errors == 0
    assert not Notifier("relative/path").enabled  # unsupported address: disabled, no crash


def test_notifier_counts_errors_when_socket_is_gone(tmp_path):
    n = Notifier(str(tmp_path / "missing.sock"))
    assert n.watchdog() is False
    assert n.errors == 1


def test_watchdog_usec_respects_pid():
    assert watchdog_usec({"WATCHDOG_USEC": "2000000"}) == 2_000_000
    assert watchdog_usec({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": str(os.getpid())}) == 2_000_000
    assert watchdog_usec({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_usec({"WATCHDOG_USEC": "junk"}) is None
    assert watchdog_usec({}) is None


def test_heartbeat_rate_limits_to_half_interval(notify_socket):
    ns, path = notify_socket
    t = [0]
    hb = Heartbeat(Notifier(path), usec=1_000_000, now_ns=lambda: t[0])
    for step in range(0, 2_000_000_000, 100_000_000):  # 2 s of beats every 100 ms
        t[0] = step + 1
        hb.beat()
    time.sleep(0.2)
    assert len(ns.times("WATCHDOG=1")) == 4  # at 0, 0.5, 1.0, 1.5 s


# -- supervisor logic with a fake clock (fast, exact) ----------------------------------------
class FakeTime:
    def __init__(self) -> None:
        self.ns = 1_000_000_000

    def __call__(self) -> int:
        return self.ns

    def advance(self, s: float) -> None:
        self.ns += int(s * 1e9)


def _stats(**counts: int) -> dict:
    return {"streams": {f"/{k}": {"enqueued": v, "queue_drops": 0, "gaps": 0}
                        for k, v in counts.items()}}


def _run(sup: Supervisor, clock: FakeTime, counts: dict[str, int], seconds: float,
         rate: dict[str, float], dt: float = 0.1) -> list:
    out = []
    for _ in range(int(round(seconds / dt))):
        clock.advance(dt)
        for k, r in rate.items():
            counts[k] += int(r * dt)
        out.append(sup.tick(_stats(**counts)))
    return out


def _sup(ns_path: str, ops: OperationsConfig, clock: FakeTime, summary=dict) -> Supervisor:
    return Supervisor({"/a": 20.0, "/b": None}, ops, Notifier(ns_path), summary,
                      interval_usec=1_000_000, now_ns=clock)


def test_supervisor_ready_waits_for_every_required_stream(notify_socket):
    ns, path = notify_socket
    clock = FakeTime()
    sup = _sup(path, OperationsConfig(), clock)
    counts = {"a": 0, "b": 0}
    hs = _run(sup, clock, counts, 1.0, {"a": 20})
    assert not any(h.ready for h in hs) and not any(h.fed for h in hs)
    assert "waiting for /b" in hs[-1].status
    hs = _run(sup, clock, counts, 1.0, {"a": 20, "b": 10})
    assert hs[0].ready and hs[-1].healthy
    time.sleep(0.1)
    assert len(ns.times("READY=1")) == 1


def test_supervisor_degraded_mode_keeps_feeding_loudly(notify_socket):
    ns, path = notify_socket
    clock = FakeTime()
    sup = _sup(path, OperationsConfig(degraded_ok=True), clock)
    counts = {"a": 0, "b": 0}
    _run(sup, clock, counts, 1.0, {"a": 20, "b": 10})
    hs = _run(sup, clock, counts, 10.0, {"a": 20})  # /b (unknown rate → 5 s) stalls
    assert hs[-1].degraded and not hs[-1].healthy
    assert sum(h.fed for h in hs) >= 19  # every 0.5 s, all along
    assert hs[-1].status.startswith("DEGRADED (watchdog kept fed): /b stalled")


def test_supervisor_starves_watchdog_when_clock_unlocked_after_grace(notify_socket):
    ns, path = notify_socket
    clock = FakeTime()
    # the clock stage's own quality words (agent.clock_estimator): state locked/acquiring
    lock = {"/a": {"source": "estimator", "state": "locked"},
            "/b": {"source": "arrival", "state": "arrival"}}
    sup = _sup(path, OperationsConfig(clock_lock_grace_s=2.0), clock, lambda: lock)
    counts = {"a": 0, "b": 0}
    flow = {"a": 20, "b": 10}
    assert _run(sup, clock, counts, 1.0, flow)[-1].healthy  # arrival: nothing to lock
    lock["/a"]["state"] = "acquiring"  # e.g. restarted after a device clock jump
    hs = _run(sup, clock, counts, 0.5, flow)  # still inside the 2 s grace after READY
    assert hs[-1].healthy and "clock acquiring: /a" in hs[-1].status
    hs = _run(sup, clock, counts, 3.0, flow)
    assert not hs[-1].healthy and not any(h.fed for h in hs[10:])
    assert "clock unlocked: /a" in hs[-1].status
    lock["/a"]["state"] = "locked"
    hs = _run(sup, clock, counts, 1.0, flow)
    assert hs[-1].healthy and any(h.fed for h in hs)


def test_supervisor_global_clock_entry_and_broken_summary(notify_socket):
    ns, path = notify_socket
    clock = FakeTime()
    summary = {"timebase": {"lock_state": "holdover"}}
    sup = _sup(path, OperationsConfig(clock_lock_grace_s=0), clock, lambda: summary)
    hs = _run(sup, clock, {"a": 0, "b": 0}, 1.0, {"a": 20, "b": 10})
    assert hs[-1].ready and not hs[-1].healthy  # a global entry applies to every stream

    def boom():
        raise RuntimeError("bug")

    sup2 = _sup(path, OperationsConfig(clock_lock_grace_s=0), clock, boom)
    hs = _run(sup2, clock, {"a": 0, "b": 0}, 1.0, {"a": 20, "b": 10})
    assert hs[-1].ready and not hs[-1].healthy  # a failing clock stage is not "locked"


# -- the real thing: pipeline + fake stalling device + real socket ---------------------------
def test_watchdog_with_real_pipeline_and_stall(tmp_path, notify_socket, monkeypatch):
    ns, path = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # feed every 0.2 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    cfg = parse_config({
        "device_id": "wd-test",
        "streams": [
            {"name": "/fake/cam", "driver": "test.stallable", "rate_hz": 50,
             "options": {"start_delay_s": 0.3}},
            {"name": "/gps", "driver": "gps.synthetic", "rate_hz": 5, "required": False},
        ],
        "recorder": {"out_dir": str(tmp_path / "rec"), "window_s": 1.0, "late_grace_s": 0.2},
        "operations": {"stall_min_s": 0.5, "metrics_port": 0},
    })
    STALL["/fake/cam"] = threading.Event()
    FIRST_RX.pop("/fake/cam", None)
    pipe = Pipeline(cfg)
    pipe.open()
    ops = Operations.attach(pipe)
    assert ops.metrics is None  # metrics_port = 0: no endpoint
    stop = threading.Event()

    def loop() -> None:  # what edgecap record's loop does, faster
        while not stop.wait(0.05):
            ops.tick()

    t = threading.Thread(target=loop, daemon=True)
    try:
        pipe.start()
        t.start()
        ready = ns.wait_for("READY=1", 5)
        assert ready is not None
        assert ready >= FIRST_RX["/fake/cam"]  # not before the required stream delivered
        time.sleep(0.7)
        assert len([x for x in ns.times("WATCHDOG=1") if x > ready]) >= 2

        stall_at = time.monotonic_ns()
        STALL["/fake/cam"].set()
        time.sleep(1.8)
        resume_at = time.monotonic_ns()
        STALL["/fake/cam"].clear()
        # deadline 0.5 s + tick resolution (+ margin for a loaded machine); then nothing
        starved = [x for x in ns.times("WATCHDOG=1") if stall_at + 1_000_000_000 < x < resume_at]
        assert starved == []
        assert any("UNHEALTHY (watchdog starved): /fake/cam stalled" in s for s in ns.statuses())

        time.sleep(1.0)
        resumed = [x for x in ns.times("WATCHDOG=1") if x > resume_at]
        assert resumed and resumed[0] - resume_at < 800_000_000
        assert ns.statuses()[-1].startswith("ok")
    finally:
        stop.set()
        t.join(2)
        ops.close()
        pipe.stop()
    assert ns.wait_for("STOPPING=1", 2)
    assert len(ns.times("READY=1")) == 1
