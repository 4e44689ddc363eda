"""PPS (pulse-per-second) sources: one small interface, three implementations.

    src = open_pps("/dev/pps0")          # LinuxPps: the kernel PPS API (PPS_FETCH ioctl)
    src = open_pps("dcd:", "/dev/ttyS0") # SerialDcdPps: the DCD line of a serial port
    src = open_pps("pps:emulated?...")   # EmulatedPps: what the HIL GPS emulator's PPS would give
    ev = src.fetch(timeout_s=1.5)        # blocks until the next edge or the timeout
    src.close()

A :class:`PpsEvent` carries what the Linux PPS API reports: the assert time on the host's
``CLOCK_REALTIME`` (``assert_ns``) and the kernel's assert sequence number, plus the same
instant on ``CLOCK_MONOTONIC`` (``mono_ns``; converted by reading both clocks right after
the fetch where the source does not measure it directly). The edge marks the start of a
UTC second of the receiver; which second is for the GPS driver to label (from NMEA).

A pty has no modem-status lines, so HIL runs cannot carry a real DCD pulse: the GPS
emulator instead hands out a ``pps:emulated?...`` URI whose :class:`EmulatedPps` computes
the edges from the emulated receiver's clock parameters. It works in any process on the
host, because ``CLOCK_MONOTONIC`` is shared system-wide.
"""

from __future__ import annotations

import errno
import fcntl
import os
import queue
import random
import struct
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from urllib.parse import parse_qs, urlsplit

from agent.errors import DriverError

NS = 1_000_000_000


@dataclass(frozen=True)
class PpsEvent:
    """One assert edge. ``assert_ns``: host ``CLOCK_REALTIME`` as the kernel stamped it;
    ``mono_ns``: the same instant on ``CLOCK_MONOTONIC`` (None if unknown); ``seq``: the
    assert sequence number (increments by one per edge the source saw)."""

    assert_ns: int
    seq: int
    mono_ns: int | None = None


class PpsSource(ABC):
    """A source of PPS edges. ``fetch`` is called from one thread (the GPS driver's PPS
    thread); ``close`` may be called from any thread and makes a pending ``fetch`` return
    None soon (within its timeout at the latest)."""

    uri: str = ""

    @abstractmethod
    def fetch(self, timeout_s: float) -> PpsEvent | None:
        """Block up to ``timeout_s`` for an edge newer than the last one returned.
        Returns None on timeout or after ``close``. When several edges passed since the
        last call only the newest is returned (as the kernel does); the gap shows in
        ``seq``."""

    def close(self) -> None:
        """Release the device. Idempotent."""

    def __enter__(self) -> "PpsSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _mono_of_realtime(rt_ns: int) -> int:
    """Map a recent ``CLOCK_REALTIME`` instant to ``CLOCK_MONOTONIC`` by reading both
    clocks back to back (good to a microsecond or so unless the clock is being stepped)."""
    m0 = time.monotonic_ns()
    r = time.time_ns()
    m1 = time.monotonic_ns()
    return rt_ns - r + (m0 + m1) // 2


# -- Linux PPS API ---------------------------------------------------------------------
# <linux/pps.h>:
#   struct pps_ktime { __s64 sec; __s32 nsec; __u32 flags; };
#   struct pps_kinfo { __u32 assert_sequence; __u32 clear_sequence;
#                      struct pps_ktime assert_tu; struct pps_ktime clear_tu; int current_mode; };
#   struct pps_fdata { struct pps_kinfo info; struct pps_ktime timeout; };
#   #define PPS_FETCH _IOWR('p', 0xa4, struct pps_fdata *)   (size field = sizeof(pointer))
# Native alignment ("@") reproduces the C layout: 64 bytes on x86_64 and arm64.
PPS_FDATA = struct.Struct("@II qiI qiI i qiI")
PPS_TIME_INVALID = 1 << 0
_IOC_WRITE, _IOC_READ = 1, 2
PPS_FETCH = ((_IOC_READ | _IOC_WRITE) << 30) | (struct.calcsize("P") << 16) | (ord("p") << 8) | 0xA4


def pack_pps_fdata(timeout_s: float | None) -> bytearray:
    """An input ``struct pps_fdata``: zero info, the timeout (None waits forever)."""
    if timeout_s is None:
        sec, nsec, flags = 0, 0, PPS_TIME_INVALID
    else:
        t = max(0, int(round(timeout_s * NS)))
        sec, nsec, flags = t // NS, t % NS, 0
    return bytearray(PPS_FDATA.pack(0, 0, 0, 0, 0, 0, 0, 0, 0, sec, nsec, flags))


def unpack_pps_fdata(buf: bytes) -> tuple[int, int, int, int]:
    """``(assert_sequence, assert_ns, clear_sequence, clear_ns)`` of an output pps_fdata."""
    (aseq, cseq, asec, ansec, _af, csec, cnsec, _cf, _mode,
     _ts, _tn, _tf) = PPS_FDATA.unpack(bytes(buf[:PPS_FDATA.size]))
    return aseq, asec * NS + ansec, cseq, csec * NS + cnsec


class LinuxPps(PpsSource):
    """``/dev/ppsN`` through the ``PPS_FETCH`` ioctl (kernel-stamped, ±1 µs with a GPIO or
    serial-ldisc source). The device must capture assert edges (the default of pps-gpio
    and pps-ldisc)."""

    def __init__(self, path: str, ioctl=fcntl.ioctl):
        self.path = path
        self.uri = path
        self._ioctl = ioctl
        self._last_seq: int | None = None
        self._closed = threading.Event()
        try:
            self._fd = os.open(path, os.O_RDWR)
        except OSError as e:
            raise DriverError(_pps_open_hint(path, e)) from None

    def fetch(self, timeout_s: float) -> PpsEvent | None:
        deadline = time.monotonic() + timeout_s
        while not self._closed.is_set():
            left = deadline - time.monotonic()
            if left < 0:
                return None
            buf = pack_pps_fdata(min(left, 0.5))  # bounded waits so close() is honoured
            try:
                self._ioctl(self._fd, PPS_FETCH, buf, True)
            except OSError as e:
                if e.errno in (errno.ETIMEDOUT, errno.EINTR, errno.EAGAIN):
                    continue
                if self._closed.is_set() or e.errno == errno.EBADF:
                    return None
                raise DriverError(f"{self.path}: PPS_FETCH failed: {e}") from None
            seq, assert_ns, _, _ = unpack_pps_fdata(buf)
            if seq == 0 or seq == self._last_seq:
                continue  # no edge yet, or the same edge again (timeout 0 semantics)
            self._last_seq = seq
            return PpsEvent(assert_ns, seq, _mono_of_realtime(assert_ns))
        return None

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            try:
                os.close(self._fd)
            except OSError:
                pass


def _pps_open_hint(path: str, e: OSError) -> str:
    if e.errno == errno.ENOENT:
        return (f"{path}: no such PPS device (ls /dev/pps*; load pps-gpio from the device "
                f"tree, or attach the serial line discipline: ldattach 18 /dev/ttyS0)")
    if e.errno in (errno.EACCES, errno.EPERM):
        return (f"{path}: permission denied (add a udev rule giving the agent's user or "
                f"group access to /dev/pps*)")
    return f"{path}: cannot open PPS device: {e}"


# -- DCD line of a serial port -----------------------------------------------------------
TIOCM_CD = 0x040


class SerialDcdPps(PpsSource):
    """The DCD modem line of a serial port, stamped in user space.

    ``mode="wait"`` (default) blocks in ``TIOCMIWAIT`` in a helper thread and stamps both
    clocks when it returns (tens of µs of latency); ``mode="poll"`` polls the line every
    ``poll_ms`` (only ±poll_ms). The kernel's PPS line discipline (``ldattach 18 PORT`` →
    ``/dev/ppsN``) is better than either where it is available. A pty has no modem lines:
    opening one raises DriverError. With ``mode="wait"`` the helper thread ends at the
    first DCD change after ``close`` (a blocked TIOCMIWAIT cannot be interrupted).
    """

    def __init__(self, path: str, mode: str = "wait", poll_ms: float = 1.0):
        if mode not in ("wait", "poll"):
            raise DriverError(f"dcd:{path}: mode must be wait or poll, not {mode!r}")
        self.path, self.mode, self.poll_s = path, mode, poll_ms / 1e3
        self.uri = f"dcd:{path}"
        self._seq = 0
        self._events: queue.Queue[PpsEvent] = queue.Queue(maxsize=64)
        self._closed = threading.Event()
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        except OSError as e:
            raise DriverError(serial_open_hint(path, e)) from None
        try:
            self._cd()
        except OSError as e:
            os.close(self._fd)
            raise DriverError(f"{path}: the port has no modem-status lines ({e.strerror}); "
                              f"a pty or a USB adapter without DCD cannot carry PPS") from None
        self._thread = threading.Thread(target=self._run, name=f"pps-dcd {path}", daemon=True)
        self._thread.start()

    def _cd(self) -> bool:
        import termios
        st = struct.unpack("I", fcntl.ioctl(self._fd, termios.TIOCMGET, struct.pack("I", 0)))[0]
        return bool(st & TIOCM_CD)

    def _run(self) -> None:
        import termios
        prev = self._cd()
        while not self._closed.is_set():
            try:
                if self.mode == "wait":
                    fcntl.ioctl(self._fd, termios.TIOCMIWAIT, TIOCM_CD)
                else:
                    time.sleep(self.poll_s)
                mono, rt = time.monotonic_ns(), time.time_ns()
                cur = self._cd()
            except OSError:
                return
            if cur and not prev:
                self._seq += 1
                try:
                    self._events.put_nowait(PpsEvent(rt, self._seq, mono))
                except queue.Full:
                    pass
            prev = cur

    def fetch(self, timeout_s: float) -> PpsEvent | None:
        ev = None
        try:
            ev = self._events.get(timeout=timeout_s)
            while True:  # newest only, like the kernel
                ev = self._events.get_nowait()
        except queue.Empty:
            return None if self._closed.is_set() else ev

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            if self.mode == "poll":
                self._thread.join(1.0)
                try:
                    os.close(self._fd)
                except OSError:
                    pass
            # wait mode: the thread owns the fd until TIOCMIWAIT returns; the process's
            # exit or the next DCD change releases it


def serial_open_hint(path: str, e: OSError) -> str:
    if e.errno == errno.ENOENT:
        return (f"{path}: no such serial device (ls /dev/ttyUSB* /dev/ttyACM* "
                f"/dev/serial/by-id/; is the receiver plugged in?)")
    if e.errno in (errno.EACCES, errno.EPERM):
        return (f"{path}: permission denied; the user is probably not in group dialout "
                f"(sudo usermod -aG dialout $USER, then log in again)")
    if e.errno == errno.EBUSY:
        return f"{path}: busy; another process holds it (gpsd? ModemManager?)"
    return f"{path}: cannot open: {e}"


# -- the HIL emulator's PPS ---------------------------------------------------------------
@dataclass(frozen=True)
class EmulatedPpsSpec:
    """The emulated receiver's UTC clock against host monotonic time and its PPS output.

    ``utc = epoch_ns + offset_ns + dt + round(dt·drift_ppm·1e-6)`` with ``dt = mono −
    epoch_ns`` (the formula of :class:`hil.world.DeviceClock`). Edges sit at whole UTC
    seconds in ``(start_ns, end_ns]``, except inside ``off`` windows (UTC ns, half-open)
    where the receiver has no lock. The host stamps an edge ``|N(0, jitter_ns)|`` after it.
    """

    epoch_ns: int
    offset_ns: int
    drift_ppm: float = 0.0
    jitter_ns: int = 1000
    seed: int = 0
    start_ns: int = 0
    end_ns: int | None = None
    off: tuple[tuple[int, int], ...] = field(default_factory=tuple)

    def to_uri(self) -> str:
        q = (f"epoch_ns={self.epoch_ns}&offset_ns={self.offset_ns}&drift_ppm={self.drift_ppm!r}"
             f"&jitter_ns={self.jitter_ns}&seed={self.seed}&start_ns={self.start_ns}")
        if self.end_ns is not None:
            q += f"&end_ns={self.end_ns}"
        if self.off:
            q += "&off=" + ",".join(f"{a}-{b}" for a, b in self.off)
        return "pps:emulated?" + q

    @classmethod
    def from_uri(cls, uri: str) -> "EmulatedPpsSpec":
        q = {k: v[-1] for k, v in parse_qs(urlsplit(uri).query).items()}
        try:
            off = tuple(tuple(int(x) for x in w.split("-", 1)) for w in q["off"].split(",")
                        ) if q.get("off") else ()
            return cls(int(q["epoch_ns"]), int(q["offset_ns"]), float(q.get("drift_ppm", 0)),
                       int(q.get("jitter_ns", 1000)), int(q.get("seed", 0)),
                       int(q.get("start_ns", 0)),
                       int(q["end_ns"]) if "end_ns" in q else None, off)  # type: ignore[arg-type]
        except (KeyError, ValueError) as e:
            raise DriverError(f"{uri}: bad emulated PPS URI ({e!r}); expected "
                              f"pps:emulated?epoch_ns=..&offset_ns=..[&drift_ppm=..&jitter_ns=.."
                              f"&seed=..&start_ns=..&end_ns=..&off=a-b,c-d]") from None

    # -- the clock ---------------------------------------------------------------------
    def utc_ns(self, mono_ns: int) -> int:
        dt = mono_ns - self.epoch_ns
        return self.epoch_ns + self.offset_ns + dt + int(round(dt * self.drift_ppm * 1e-6))

    def mono_ns(self, utc_ns: int) -> int:
        d = utc_ns - self.epoch_ns - self.offset_ns
        return self.epoch_ns + int(round(d / (1 + self.drift_ppm * 1e-6)))

    # -- the edges ---------------------------------------------------------------------
    @property
    def first_s(self) -> int:
        """The first whole UTC second with an edge (ignoring ``off``)."""
        return self.start_ns // NS + 1

    def suppressed(self, s: int) -> bool:
        return any(a <= s * NS < b for a, b in self.off) or (
            self.end_ns is not None and s * NS > self.end_ns)

    def seq(self, s: int) -> int:
        """Assert sequence number of the edge at UTC second ``s`` (1 for the first)."""
        n = s - self.first_s + 1
        for a, b in self.off:
            lo = max(self.first_s, -(-a // NS))
            hi = min(s, -(-b // NS) - 1)
            n -= max(0, hi - lo + 1)
        return n

    def assert_mono_ns(self, s: int) -> int:
        """Host monotonic time the edge at UTC second ``s`` is stamped at."""
        d = abs(random.Random(self.seed * 1_000_003 + s).gauss(0.0, self.jitter_ns))
        return self.mono_ns(s * NS) + int(round(d))


class EmulatedPps(PpsSource):
    """Edges of :class:`EmulatedPpsSpec`, delivered in real time as the kernel would:
    ``assert_ns`` on ``CLOCK_REALTIME`` (host realtime at the stamped instant) and the
    exact ``mono_ns``. Only edges after construction are returned."""

    def __init__(self, spec: EmulatedPpsSpec):
        self.spec = spec
        self.uri = spec.to_uri()
        self._closed = threading.Event()
        self._last_s = max(spec.first_s - 1, self._latest_s(time.monotonic_ns()))

    @classmethod
    def from_uri(cls, uri: str) -> "EmulatedPps":
        return cls(EmulatedPpsSpec.from_uri(uri))

    def _latest_s(self, now_mono: int) -> int:
        """The newest second whose (possibly suppressed) edge is stamped by ``now_mono``."""
        s = self.spec.utc_ns(now_mono) // NS
        while s > self.spec.first_s - 1 and self.spec.assert_mono_ns(s) > now_mono:
            s -= 1
        return s

    def fetch(self, timeout_s: float) -> PpsEvent | None:
        sp = self.spec
        deadline = time.monotonic_ns() + int(timeout_s * NS)
        while not self._closed.is_set():
            now = time.monotonic_ns()
            latest = self._latest_s(now)
            s = latest
            while s > self._last_s and sp.suppressed(s):
                s -= 1
            if s > self._last_s:
                self._last_s = latest
                mono = sp.assert_mono_ns(s)
                return PpsEvent(mono + time.time_ns() - time.monotonic_ns(), sp.seq(s), mono)
            self._last_s = max(self._last_s, latest)
            nxt = sp.assert_mono_ns(latest + 1)
            if now >= deadline or (sp.end_ns is not None and (latest + 1) * NS > sp.end_ns):
                if now < deadline:
                    self._closed.wait((deadline - now) / NS)
                return None
            self._closed.wait(max(0, min(nxt, deadline) - now) / NS)
        return None

    def close(self) -> None:
        self._closed.set()


# -- selection by URI ------------------------------------------------------------------------
def open_pps(uri: str, serial_path: str | None = None) -> PpsSource:
    """Open a PPS source by URI: ``/dev/ppsN`` or ``pps:///dev/ppsN`` (Linux PPS API),
    ``dcd:`` (DCD of ``serial_path``, the GPS's own port) or ``dcd:/dev/ttyS1[?mode=poll]``,
    ``pps:emulated?...`` (HIL). Raises DriverError for an unknown form or a missing device."""
    if uri.startswith("pps:emulated"):
        return EmulatedPps.from_uri(uri)
    if uri.startswith("pps://"):
        return LinuxPps(urlsplit(uri).path)
    if uri.startswith("/dev/"):
        return LinuxPps(uri)
    if uri.startswith("dcd:"):
        u = urlsplit(uri)
        path = u.path or serial_path
        if not path:
            raise DriverError(f"{uri}: no serial port to watch DCD on")
        q = {k: v[-1] for k, v in parse_qs(u.query).items()}
        return SerialDcdPps(path, q.get("mode", "wait"), float(q.get("poll_ms", 1.0)))
    raise DriverError(f"{uri!r}: unknown PPS source; use /dev/ppsN, dcd:[PORT] or "
                      f"pps:emulated?...")
