"""Bandwidth shaping for the uploader: a token bucket over payload bytes.

The bucket may go into debt by one send, so the long-run rate is exactly ``rate`` and a
send is never split; the burst after idling is capped at ``burst`` bytes. Not
thread-safe: one uploader thread owns it. Times are on ``clock`` (monotonic seconds).
"""

from __future__ import annotations

import time
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
    """How many chunks the uploader keeps in flight: between 2 and ``max_chunks`` (the
    configured ``window``). It grows while acks come back about as fast as the fastest
    recent one and shrinks when they slow down, i.e. when a queue builds at the receiver
    or on the link. That keeps the standing queue short — and with it what a crashed
    receiver loses and how long a newly triggered bundle waits — without starving a long,
    fat link, where acks stay fast until the window covers the round trip.

    Owned by the uploader thread; times on ``clock`` (monotonic seconds)."""

    def __init__(self, max_chunks: int, clock: Callable[[], float] = time.monotonic):
        from collections import deque

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

    def restart(self) -> None:
        """Forget chunks in flight (after a rewind or a new transfer); keep what was
        learnt about the path."""
        self._sent.clear()
