"""Online mapping of one device clock onto the session timebase.

A driver gives, per sample, the device's own time ``device_t_ns`` and the arrival time
``rx_ns`` on the session timebase. Arrival is always *after* the event and its delay is
one-sided (USB, network and scheduler queues only ever add time)::

    rx_ns = true_ns + delay,   delay >= 0 (mostly small, sometimes tens of ms)
    true_ns = device_t_ns + offset + skew * (device_t_ns - anchor)

so a least-squares fit would be biased by the mean delay and dragged by every spike.
:class:`ClockEstimator` instead fits the **lower envelope** of the points
``(device_t, rx - device_t)``: the line below every point that is highest at the centroid
of the window (the linear programme of Moon, Skelly & Towsley, 1999), which is the maximum
likelihood line when the delay is exponential and ignores spikes by construction. Only the
lowest point of each short bucket can be on that envelope, so memory is a fixed number of
buckets whatever the sample rate.

Beyond the fit:

- **Jumps.** A sample whose residual is beyond ``jump_threshold_ns`` either way is
  *suspect* and not used for the fit. ``jump_confirm`` consecutive suspects that agree with
  each other (spread below the threshold) and span ``jump_confirm_s`` of device time mean
  the device clock stepped (reboot, LiDAR switching to PTP): the estimator restarts from
  the suspects, keeps the old skew as a prior (checked against the new data and dropped if
  it disagrees) and is LOCKED again once ``lock_min_samples`` samples span
  ``lock_span_s`` -- about 1 s of data at 10 Hz.
- **Steps and drift changes** smaller than the jump threshold show up as the recent floor
  of residuals leaving the line; the window is then cut to its recent part (``steps``).
- **Uncertainty** is model-based: the expected envelope error for exponential delays of the
  measured scale with the number of points in the window, plus the skew error times the
  distance from the window's centroid. Tests check it covers the actual error.
- **Fixed latency.** ``latency_ns`` is a known one-way latency (e.g. an audio path's
  buffer, measured once; see docs/clock.md) subtracted from every mapped time.

All device and timebase times are ``int`` nanoseconds; the fit works on small integers
relative to an anchor so that offsets of hours (or epochs of 1e18 ns) lose no precision.

Threading: one estimator per stream; ``update``/``map`` are called from that stream's
reader thread only, never block, and cost a few microseconds. ``quality()`` may be called
from any thread; it reads scalars published by the reader thread (a snapshot that may be
one update old).
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass
from typing import Any

_LN2 = math.log(2.0)
#: assumed spread of oscillator skews before one is measured (±200 ppm)
_SKEW_SPREAD = 200e-6


class LockState(str, enum.Enum):
    """``UNLOCKED``: no data yet. ``ACQUIRING``: mapping usable but not yet to spec (just
    started, just re-locked after a jump, or uncertainty above ``lock_uncertainty_ns``).
    ``LOCKED``: enough data and the stated uncertainty is within bounds."""

    UNLOCKED = "unlocked"
    ACQUIRING = "acquiring"
    LOCKED = "locked"


@dataclass(frozen=True)
class EstimatorParams:
    """Tuning of :class:`ClockEstimator`. The defaults suit 1 Hz..10 kHz streams whose
    arrival delay is milliseconds and whose oscillator is within a few hundred ppm."""

    window_s: float = 20.0          #: span of data the envelope is fitted over
    bucket_s: float = 0.5           #: one envelope candidate (lowest point) per bucket
    jump_threshold_ns: int = 10_000_000   #: residual beyond this either way is suspect
    jump_confirm: int = 3           #: consecutive agreeing suspects that make a jump ...
    jump_confirm_s: float = 0.2     #: ... spanning at least this much device time
    lock_min_samples: int = 10
    lock_span_s: float = 1.0        #: span needed to lock when a skew prior is known
    acquire_span_s: float = 3.0     #: span needed to lock from scratch (skew unknown)
    free_span_s: float = 6.0        #: below this span a known skew prior is used as is
    lock_uncertainty_ns: int = 1_000_000  #: LOCKED needs the stated uncertainty below this
    step_min_ns: int = 300_000      #: smallest residual-floor shift treated as a step
    latency_ns: int = 0             #: known fixed one-way latency, subtracted when mapping
    residual_ring: int = 64         #: recent residuals kept for the jitter estimate

    def __post_init__(self) -> None:
        if not (self.window_s > 0 and self.bucket_s > 0 and self.window_s >= 4 * self.bucket_s):
            raise ValueError("window_s must be > 0 and at least 4 buckets (bucket_s)")
        if self.jump_threshold_ns <= 0 or self.jump_confirm < 1:
            raise ValueError("jump_threshold_ns must be > 0 and jump_confirm >= 1")


class _Bucket:
    """Lowest (detrended) point of one bucket of device time, and how many samples fell in
    it. ``dev``/``off`` are absolute ints: device time and ``rx - dev`` (latency not
    removed)."""

    __slots__ = ("idx", "dev", "off", "key", "n")

    def __init__(self, idx: int, dev: int, off: int, key: float):
        self.idx, self.dev, self.off, self.key, self.n = idx, dev, off, key, 1


class ClockEstimator:
    """Maps one device clock (int ns) onto the session timebase (int ns). See the module
    docstring for the method. Feed every sample with :meth:`update`, which returns the
    mapped time; :meth:`map` maps without learning. Not thread-safe: one reader thread."""

    def __init__(self, params: EstimatorParams | None = None):
        p = self.params = params or EstimatorParams()
        self._bucket_ns = max(1, int(p.bucket_s * 1e9))
        self._window_ns = int(p.window_s * 1e9)
        self._confirm_span_ns = int(p.jump_confirm_s * 1e9)
        self._thr = int(p.jump_threshold_ns)
        self.latency_ns = int(p.latency_ns)
        # counters (public, read-only for others)
        self.samples = 0
        self.used = 0            # samples that fed the envelope
        self.suspects = 0        # samples beyond the jump threshold (spikes, glitches)
        self.out_of_order = 0    # device time before the current bucket
        self.jumps = 0
        self.steps = 0
        self.last_jump: dict[str, int] | None = None
        self._reset_segment(keep_prior=False)
        self._suspect: deque[tuple[int, int, float]] = deque(maxlen=max(1, p.jump_confirm))
        self._resid: deque[float] = deque(maxlen=p.residual_ring)
        self._delay_scale = 5e6  # mean arrival delay above the envelope, ns (prior guess)
        self.state = LockState.UNLOCKED
        self.uncertainty_ns: int | None = None
        self.jitter_ns: int | None = None
        self.last_dev_ns: int | None = None
        self.last_rx_ns: int | None = None

    # -- state of one continuous segment of the device clock ----------------------------
    def _reset_segment(self, keep_prior: bool) -> None:
        if keep_prior and getattr(self, "_seg_samples", 0) >= self.params.lock_min_samples:
            self._prior_s: float | None = self._s
            self._prior_sigma = max(self._skew_sigma, 1e-6)
        elif not keep_prior:
            self._prior_s = None
            self._prior_sigma = 0.0
        self._buckets: deque[_Bucket] = deque()
        self._cur: _Bucket | None = None
        self._xa = 0     # anchor: device time
        self._ya = 0     # anchor: offset rx - dev
        self._a = 0.0    # line: offset(x) = ya + a + s * (dev - xa)
        self._s = self._prior_s if self._prior_s is not None else 0.0
        self._skew_sigma = self._prior_sigma if self._prior_s is not None else _SKEW_SPREAD
        self._xbar = 0.0
        self._seg_first_dev: int | None = None
        self._seg_samples = 0
        self._span_ns = 0
        self._n_window = 0

    # -- hot path -----------------------------------------------------------------------
    def update(self, device_t_ns: int, rx_ns: int) -> int:
        """Learn from one (device time, arrival time on the timebase) pair and return the
        device time mapped onto the timebase (latency removed). Reader thread; O(1) except
        at bucket boundaries (a fit over at most ``window_s / bucket_s`` points)."""
        dev = int(device_t_ns)
        rx = int(rx_ns)
        self.samples += 1
        self.last_dev_ns, self.last_rx_ns = dev, rx
        if self._seg_first_dev is None:
            self._start(dev, rx)
            return self.map(dev)
        x = dev - self._xa
        r = (rx - dev - self._ya) - self._a - self._s * x
        if r > self._thr or r < -self._thr:
            self._on_suspect(dev, rx, r)
            return self.map(dev)
        self._suspect.clear()
        self._resid.append(r if r > 0.0 else 0.0)
        if r < 0.0:
            self._a += r  # the envelope is below every point: lower it at once
        self._feed(dev, rx - dev, x)
        return self.map(dev)

    def map(self, device_t_ns: int) -> int:
        """Device time → timebase (int ns) with the current line; no learning. Before any
        data this returns the device time unchanged."""
        dev = int(device_t_ns)
        return dev + self._ya + int(round(self._a + self._s * (dev - self._xa))) - self.latency_ns

    # -- internals ----------------------------------------------------------------------
    def _start(self, dev: int, rx: int) -> None:
        self._xa, self._ya, self._a = dev, rx - dev, 0.0
        self._seg_first_dev = dev
        self.state = LockState.ACQUIRING
        self._feed(dev, rx - dev, 0)

    def _feed(self, dev: int, off: int, x: int) -> None:
        self.used += 1
        self._seg_samples += 1
        idx = dev // self._bucket_ns
        key = (off - self._ya) - self._s * x
        cur = self._cur
        if cur is None:
            self._cur = _Bucket(idx, dev, off, key)
            self._refit()
            return
        if idx == cur.idx:
            cur.n += 1
            if key < cur.key:
                cur.dev, cur.off, cur.key = dev, off, key
            if self._seg_samples <= self.params.lock_min_samples:
                self._refit()  # early on, every sample counts
            return
        if idx < cur.idx:
            self.out_of_order += 1
            return
        self._buckets.append(cur)
        self._cur = _Bucket(idx, dev, off, key)
        self._refit()

    def _on_suspect(self, dev: int, rx: int, r: float) -> None:
        self.suspects += 1
        sus = self._suspect
        sus.append((dev, rx, r))
        if len(sus) < self.params.jump_confirm:
            return
        rs = [e[2] for e in sus]
        devs = [e[0] for e in sus]
        if max(rs) - min(rs) > self._thr:
            return  # not one consistent new offset (spikes, a stall draining)
        if max(devs) - min(devs) < self._confirm_span_ns:
            return
        self._jump(list(sus), int(round(min(rs))))

    def _jump(self, pts: list[tuple[int, int, float]], size: int) -> None:
        self.jumps += 1
        first_dev, first_rx, _ = pts[0]
        self.last_jump = {"device_t_ns": first_dev, "rx_ns": first_rx, "size_ns": size}
        self._reset_segment(keep_prior=True)
        self._suspect.clear()
        self.state = LockState.ACQUIRING
        pts.sort(key=lambda e: e[0])
        self._start(pts[0][0], pts[0][1])
        for dev, rx, _ in pts[1:]:
            x = dev - self._xa
            r = (rx - dev - self._ya) - self._a - self._s * x
            if r < 0.0:
                self._a += r
            self._resid.append(max(r, 0.0))
            self._feed(dev, rx - dev, x)

    def _points(self) -> list[_Bucket]:
        pts = list(self._buckets)
        if self._cur is not None:
            pts.append(self._cur)
        return pts

    def _refit(self) -> None:
        p = self.params
        bs = self._buckets
        if self._cur is not None:
            while bs and bs[0].dev < self._cur.dev - self._window_ns:
                bs.popleft()
        self._check_step()
        pts = self._points()
        if not pts:
            return
        # re-anchor on the oldest point: the fit then works on small exact integers
        xa, ya = pts[0].dev, pts[0].off
        xs = [b.dev - xa for b in pts]
        ys = [b.off - ya for b in pts]
        ns = [b.n for b in pts]
        n = sum(ns)
        xbar = sum(x * k for x, k in zip(xs, ns)) / n
        span = xs[-1] - xs[0]
        self._span_ns, self._n_window = span, n
        if len(self._resid) >= 8:
            med = sorted(self._resid)[len(self._resid) // 2]
            self._delay_scale = max(med / _LN2, 1_000.0)
        mu = self._delay_scale
        # skew error of an envelope fit: each end is the lowest of ~n/2 delays (mean mu),
        # and the ends are ~span/2 apart
        sig_lp = 4.0 * mu / (n * span) if span > 0 else 1.0
        s_lp = a_lp = None
        if len(pts) >= 2 and span > 0:
            s_lp, a_lp = _envelope_lp(xs, ys, xbar)
        if (self._prior_s is not None and s_lp is not None and span >= p.lock_span_s * 1e9
                and abs(s_lp - self._prior_s) > 3.0 * sig_lp + 3.0 * self._prior_sigma):
            self._prior_s = None  # the skew changed with the jump: measure it afresh
        if self._prior_s is not None and span < p.free_span_s * 1e9:
            s, sig = self._prior_s, self._prior_sigma
            a = min(y - s * x for x, y in zip(xs, ys))
        elif s_lp is not None and sig_lp <= _SKEW_SPREAD:
            s, a, sig = s_lp, a_lp, sig_lp
            self._prior_s = None
        else:  # too little data to measure skew: assume nominal until there is
            s, sig = 0.0, _SKEW_SPREAD
            a = min(y - s * x for x, y in zip(xs, ys))
        self._xa, self._ya, self._a, self._s = xa, ya, a, s
        self._skew_sigma = sig
        self._xbar = xbar
        self.jitter_ns = int(round(mu * _LN2)) if len(self._resid) >= 8 else None
        # uncertainty at the newest point: envelope bias + skew error x distance from the
        # centroid (plus one bucket of extrapolation until the next fit)
        dist = abs(xs[-1] - xbar) + self._bucket_ns
        u = 3.0 * mu / n + 2.0 * sig * dist
        self.uncertainty_ns = int(round(u))
        need_span = p.lock_span_s if self._prior_s is not None else p.acquire_span_s
        if (self._seg_samples >= p.lock_min_samples and span >= need_span * 1e9
                and u <= p.lock_uncertainty_ns):
            self.state = LockState.LOCKED
        else:
            self.state = LockState.ACQUIRING

    def _check_step(self) -> None:
        """Cut the window to its recent part when the floor of the recent buckets has moved
        off the floor of the older ones (a step below the jump threshold, or a skew change
        faster than the window follows). Compared at the current skew, at several scales."""
        bs = self._buckets
        m = len(bs)
        if m < 6 or self._n_window == 0:
            return
        s, xa, ya = self._s, self._xa, self._ya
        keys = [(b.off - ya) - s * (b.dev - xa) for b in bs]
        mu = self._delay_scale
        u = self.uncertainty_ns or 0
        step_min = float(self.params.step_min_ns)
        tol_neg = max(4.0 * u, step_min)
        k = 2
        while k <= m // 2:
            rec = min(keys[m - k:])
            d = rec - min(keys[:m - k])
            n_rec = sum(b.n for b in list(bs)[m - k:])
            if d > max(10.0 * mu / n_rec, step_min) or d < -tol_neg:
                self.steps += 1
                if self._seg_samples >= self.params.lock_min_samples:
                    self._prior_s, self._prior_sigma = s, max(self._skew_sigma, 1e-6)
                for _ in range(m - k):
                    bs.popleft()
                return
            k *= 2

    # -- reporting ----------------------------------------------------------------------
    @property
    def offset_ns(self) -> int | None:
        """timebase − device at the newest device time (latency removed), or None."""
        if self.last_dev_ns is None:
            return None
        return self.map(self.last_dev_ns) - self.last_dev_ns

    @property
    def skew_ppm(self) -> float:
        """d(timebase − device)/d(device) × 1e6: positive when the device clock runs slow."""
        return self._s * 1e6

    def quality(self) -> dict[str, Any]:
        """Snapshot for manifests and the clock-quality stream. Any thread."""
        return {
            "source": "estimator", "state": self.state.value,
            "offset_ns": self.offset_ns, "skew_ppm": round(self.skew_ppm, 4),
            "jitter_ns": self.jitter_ns, "uncertainty_ns": self.uncertainty_ns,
            "latency_ns": self.latency_ns, "jumps": self.jumps, "steps": self.steps,
            "samples": self.samples, "suspects": self.suspects,
            "out_of_order": self.out_of_order, "window_samples": self._n_window,
            "window_span_ns": self._span_ns, "last_jump": self.last_jump,
        }


def _envelope_lp(xs: list[int], ys: list[int], xbar: float) -> tuple[float, float]:
    """The line ``y = a + s·x`` below every point that is highest at ``xbar``: the lower
    convex hull edge that spans ``xbar``. ``xs`` strictly increasing ints."""
    hull: list[tuple[int, int]] = []
    for p in zip(xs, ys):
        while len(hull) >= 2:
            (ox, oy), (ax, ay) = hull[-2], hull[-1]
            if (ax - ox) * (p[1] - oy) - (ay - oy) * (p[0] - ox) <= 0:
                hull.pop()
            else:
                break
        hull.append(p)
    if len(hull) == 1:
        return 0.0, float(hull[0][1])
    i = 0
    while i < len(hull) - 2 and hull[i + 1][0] <= xbar:
        i += 1
    (x0, y0), (x1, y1) = hull[i], hull[i + 1]
    s = (y1 - y0) / (x1 - x0)
    return s, y0 - s * x0
