"""Upload windows: the times of day (local time) when the uploader may use the link,
e.g. ``["22:00-06:00"]`` for nights only. A window wraps past midnight when its end is
before its start; ``"00:00-24:00"`` (or start == end) is the whole day; no windows means
always open. Pure functions of the ``datetime`` given; safe from any thread."""

from __future__ import annotations

from datetime import datetime, timedelta

_DAY = 24 * 60


def _minutes(hhmm: str) -> int:
    h, m = hhmm.split(":")
    return int(h) * 60 + int(m)


class UploadWindows:
    def __init__(self, specs: list[str]):
        self.specs = list(specs)
        self._spans: list[tuple[int, int]] = []
        for spec in specs:
            a, b = (_minutes(x) for x in spec.split("-"))
            if a == b or (a == 0 and b == _DAY):
                self._spans.append((0, _DAY))
            elif a < b:
                self._spans.append((a, b))
            else:  # wraps midnight
                self._spans += [(a, _DAY), (0, b)]

    def is_open(self, when: datetime) -> bool:
        if not self._spans:
            return True
        m = when.hour * 60 + when.minute
        return any(a <= m < b for a, b in self._spans)

    def seconds_until_open(self, when: datetime) -> float:
        """0 when open now, else the seconds until the next window opens."""
        if self.is_open(when):
            return 0.0
        base = when.replace(second=0, microsecond=0)
        for step in range(1, _DAY + 1):
            t = base + timedelta(minutes=step)
            if self.is_open(t):
                return max(0.0, (t - when).total_seconds())
        return float(_DAY * 60)  # unreachable with at least one span

    def __bool__(self) -> bool:
        return bool(self._spans)
