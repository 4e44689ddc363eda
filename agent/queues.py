"""Bounded per-stream queues that never block the producer.

``put`` is called by a driver's reader thread and returns at once: when the queue is full
(by count or by bytes) it drops by policy and counts the drop. ``drain`` is called by the
single writer thread. A shared :class:`threading.Event` wakes the writer.
"""

from __future__ import annotations

import threading
from collections import deque

from .types import Sample


class StreamQueue:
    """FIFO of Samples bounded by ``max_items`` and ``max_bytes``.

    ``policy``: ``drop_oldest`` keeps the newest data (live view semantics, default),
    ``drop_newest`` refuses the incoming sample (keeps a contiguous past).
    """

    def __init__(self, name: str, max_items: int, max_bytes: int,
                 policy: str = "drop_oldest", wake: threading.Event | None = None):
        self.name = name
        self.max_items = max_items
        self.max_bytes = max_bytes
        self.policy = policy
        self.wake = wake or threading.Event()
        self._q: deque[tuple[Sample, int]] = deque()
        self._bytes = 0
        self._lock = threading.Lock()
        self.put_count = 0
        self.dropped = 0
        self.dropped_bytes = 0
        self.high_water = 0

    def put(self, sample: Sample) -> bool:
        """Enqueue without blocking. Returns False if ``sample`` itself was dropped."""
        size = sample.nbytes()
        with self._lock:
            self.put_count += 1
            if self.policy == "drop_newest" and self._full(size):
                self.dropped += 1
                self.dropped_bytes += size
                return False
            while self._q and self._full(size):
                _, old = self._q.popleft()
                self._bytes -= old
                self.dropped += 1
                self.dropped_bytes += old
            self._q.append((sample, size))
            self._bytes += size
            self.high_water = max(self.high_water, len(self._q))
        self.wake.set()
        return True

    def _full(self, incoming: int) -> bool:
        return len(self._q) >= self.max_items or (self._q and self._bytes + incoming >
                                                  self.max_bytes)

    def drain(self, limit: int = 1_000_000) -> list[Sample]:
        """Remove and return up to ``limit`` queued samples, oldest first."""
        with self._lock:
            n = min(limit, len(self._q))
            items = [self._q.popleft() for _ in range(n)]
            self._bytes -= sum(size for _, size in items)
        return [s for s, _ in items]

    def __len__(self) -> int:
        return len(self._q)

    @property
    def depth_bytes(self) -> int:
        return self._bytes
