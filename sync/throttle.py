"""Bandwidth shaping and flow control for the uploader: a token bucket over payload
bytes, and the credit window (chunks in flight), fixed or sized from the path's
bandwidth-delay product.

The bucket may go into debt by one send, so the long-run rate is exactly ``rate`` and a
send is never split; the burst after idling is capped at ``burst`` bytes. Nothing here is
thread-safe: one uploader thread owns it all. Times are on ``clock`` (monotonic seconds).
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Callable


class TokenBucket:
    def __init__(self, rate_bytes_s: float, burst_bytes: float,
                 clock: Callable[[], float] = time.monotonic):
        if rate_bytes_s <= 0 or burst_bytes <= 0:
            raise ValueError("rate and burst must be > 0")
        self.rate = float(rate_bytes_s)
        self.burst = float(burst_bytes)
        self._clock = clock
        self._tokens = 0.0  # start empty: a fresh uploader does not burst past its cap
        self._t = clock()

    @classmethod
    def from_kbps(cls, kbps: float, chunk_bytes: int,
                  clock: Callable[[], float] = time.monotonic) -> "TokenBucket":
        """``kbps`` in kilobits per second (1 kbps = 1000 bit/s)."""
        rate = kbps * 1000.0 / 8.0
        return cls(rate, max(float(chunk_bytes), rate * 0.1), clock)

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._t) * self.rate)
        self._t = now

    def try_take(self, n: int) -> float:
        """Take ``n`` bytes now and return 0.0, or take nothing and return the seconds to
        wait before asking again. Never blocks."""
        self._refill()
        if self._tokens >= -0.5:  # within half a byte: float rounding, not debt
            self._tokens -= n
            return 0.0
        return -self._tokens / self.rate


def chunk_for_rate(rate_bytes_s: float, chunk_bytes: int, floor: int = 16 << 10) -> int:
    """A chunk size that keeps a throttled stream smooth: at most ~0.1 s of budget, but
    not below ``floor`` and not above ``chunk_bytes``."""
    return int(max(floor, min(chunk_bytes, rate_bytes_s * 0.1)))


class CreditWindow:
    """A fixed ``window = N``: how many chunks the uploader keeps in flight, between
    ``min(2, max_chunks)`` and ``max_chunks`` (so exactly 1 when ``max_chunks`` is 1). It
    grows while acks come back about as fast as the fastest recent one and shrinks when
    they slow down, i.e. when a queue builds at the receiver or on the link. That keeps the
    standing queue short — and with it what a crashed receiver loses and how long a newly
    triggered bundle waits — without starving a long, fat link, where acks stay fast until
    the window covers the round trip. ``window = "auto"`` is :class:`AutoWindow`.

    Owned by the uploader thread; times on ``clock`` (monotonic seconds)."""

    def __init__(self, max_chunks: int, clock: Callable[[], float] = time.monotonic):
        self.max = max(1, max_chunks)
        self.chunks = min(2, self.max)
        self._clock = clock
        self._sent: deque[tuple[int, float]] = deque()
        self._rtts: deque[float] = deque(maxlen=64)

    def on_send(self, end_offset: int) -> None:
        self._sent.append((end_offset, self._clock()))

    def on_ack(self, offset: int) -> None:
        t = None
        while self._sent and self._sent[0][0] <= offset:
            t = self._sent.popleft()[1]
        if t is None:
            return
        rtt = self._clock() - t
        self._rtts.append(rtt)
        base = min(self._rtts)
        if rtt <= 1.5 * base + 0.0005:
            self.chunks = min(self.max, self.chunks + 1)
        elif rtt > 2.5 * base + 0.002:
            self.chunks = max(min(2, self.max), self.chunks - 1)

    def restart(self, offset: int = 0) -> None:
        """Forget chunks in flight (after a rewind or a new transfer, which goes on from
        ``offset``); keep what was learnt about the path."""
        self._sent.clear()


#: a need of W + SLACK chunks still rounds down to W, i.e. one chunk less re-sent per crash
#: of the server is worth up to SLACK / (W + SLACK) of the path's rate. On loopback a
#: ping's round trip under load is 0.1-0.5 ms of Python and ZeroMQ wake-ups: 0.03-0.14 of
#: a 1 MiB chunk's time at 300 MB/s, so loopback stays at window 1.
SLACK = 0.15


def bdp_window(chunk_bytes: int, rate_bytes_s: float, rtt_s: float, limit: int) -> int:
    """The chunks that keep a path busy: one chunk being served plus rate × round trip on
    the way, ``ceil((chunk + rate × rtt) / chunk)`` rounded down within :data:`SLACK`,
    clamped to ``1..limit``."""
    need = (chunk_bytes + max(0.0, rate_bytes_s) * max(0.0, rtt_s)) / chunk_bytes
    return max(1, min(limit, math.ceil(need - SLACK)))


class PathEstimate:
    """The round trip and delivery rate of the path to the server.

    ``rtt``: the least sample of the last ``rtt_window_s`` (the newest one when all are
    older), so a route change that lengthens the round trip shows within that time; the
    samples must be network round trips (hello → welcome, ping → pong on an idle
    connection), not a chunk's service time. ``rate``: payload bytes acknowledged per
    second over the last ``rate_window_s``, measured once the acks in it span at least
    half of it (by then the round trip has had a few samples too) and kept from then on
    until the next measurement (an idle spell does not read as a slow link). Both None
    until measured."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 rtt_window_s: float = 30.0, rate_window_s: float = 1.0):
        self._clock = clock
        self.rtt_window_s, self.rate_window_s = rtt_window_s, rate_window_s
        self._rtts: deque[tuple[float, float]] = deque()  # (t, rtt), rtt increasing
        self._acks: deque[tuple[float, int]] = deque()  # (t, bytes acked so far)
        self._acked = 0
        self.rate: float | None = None

    def on_rtt(self, seconds: float) -> None:
        while self._rtts and self._rtts[-1][1] >= seconds:
            self._rtts.pop()  # never the least again: a newer sample is as small
        self._rtts.append((self._clock(), seconds))

    @property
    def rtt(self) -> float | None:
        old = self._clock() - self.rtt_window_s
        while len(self._rtts) > 1 and self._rtts[0][0] < old:
            self._rtts.popleft()
        return self._rtts[0][1] if self._rtts else None

    def on_acked(self, nbytes: int) -> None:
        now = self._clock()
        self._acked += nbytes
        self._acks.append((now, self._acked))
        while self._acks[0][0] < now - self.rate_window_s:
            self._acks.popleft()
        (t0, b0), (t1, b1) = self._acks[0], self._acks[-1]
        if t1 - t0 >= self.rate_window_s / 2:
            self.rate = (b1 - b0) / (t1 - t0)


class AutoWindow:
    """``window = "auto"``: the chunks in flight are :func:`bdp_window` of ``path``'s
    least round trip and a rate that is the higher of the measured one and ``cap_rate``
    (the bandwidth cap, if any: a link starved by a small window measures low), clamped to
    ``1..limit`` (``window_max`` and the server's window). One chunk until the round trip
    is known; until a rate is measured, the cap alone (none: one chunk).

    The same interface as :class:`CreditWindow`; ``chunks`` is read before every send.
    ``on_ack`` feeds the bytes it acknowledges to ``path``. Owned by the uploader thread."""

    def __init__(self, path: PathEstimate, chunk_bytes: int, limit: int,
                 cap_rate: float | None = None):
        self.path = path
        self.chunk = chunk_bytes
        self.max = max(1, limit)
        self.cap_rate = cap_rate or 0.0
        self._acked = 0

    @property
    def chunks(self) -> int:
        rtt = self.path.rtt
        if rtt is None:
            return 1
        return bdp_window(self.chunk, max(self.path.rate or 0.0, self.cap_rate), rtt,
                          self.max)

    def on_send(self, end_offset: int) -> None:
        """Nothing to learn from a send: the window follows ``path``, which acks and
        pings feed."""

    def on_ack(self, offset: int) -> None:
        if offset > self._acked:
            self.path.on_acked(offset - self._acked)
            self._acked = offset

    def restart(self, offset: int = 0) -> None:
        self._acked = offset
