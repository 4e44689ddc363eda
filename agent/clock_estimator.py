"""Online mapping of one device clock onto the session timebase.

A driver gives, per sample, the device's own time ``device_t_ns`` and the arrival time
``rx_ns`` on the session timebase. Arrival is always *after* the event and its delay is
one-sided (USB, network and scheduler queues only ever add time)::

    rx_ns   = true_ns + delay,                         delay >= 0, mostly small, rare spikes
    true_ns = device_t_ns + offset + skew * (device_t_ns - anchor)

A least-squares fit would be biased by the mean delay and dragged by every spike.
:class:`ClockEstimator` fits the **lower envelope** of the points ``(device_t, rx − device_t)``
instead: the line below every point that is highest at the window's centroid (the linear
programme of Moon, Skelly & Towsley, 1999). That is the maximum-likelihood line when the
delay is exponential, and spikes cannot move it. The line is an edge of the lower convex
hull, and only the lowest point of each ``bucket_s`` of device time can be on the hull, so
memory is a fixed number of buckets whatever the sample rate.

Beyond the fit:

- **Jumps.** A sample whose residual is beyond ``jump_threshold_ns`` either way is
  *suspect* and not used. ``jump_confirm`` consecutive suspects that agree with each other
  (spread below the threshold) and span ``jump_confirm_s`` of device time mean the device
  clock stepped (reboot, a LiDAR switching to PTP): the estimator restarts from them, keeps
  the old skew as a prior (dropped if the new data disagrees) and is LOCKED again once
  ``lock_min_samples`` samples span ``lock_span_s`` -- about 1.3 s of data at 10 Hz.
- **Steps and skew changes** below the jump threshold show as the floor of the recent
  buckets leaving the floor of the older ones (at the current skew); the window is then cut
  to its recent part and ``steps`` counts it.
- **Uncertainty** is model-based: the expected envelope error for exponential delays of
  the measured scale and the number of samples in the window, plus the skew error times
  the distance from the window's centroid. The tests check that it covers the real error.
- **Fixed latency.** ``latency_ns`` is a known one-way latency (an audio path's buffering,
  measured once; see docs/clock.md) subtracted from every mapped time: the envelope finds
  the *fastest* path, and a constant part of it cannot be seen from arrival times alone.

Times are ``int`` nanoseconds. The fit works on integers relative to an anchor inside the
window, so offsets of hours and device epochs of 1e18 ns lose no precision.

Threading: one estimator per stream. ``update``/``map`` are called from that stream's
reader thread only and never block (a few µs; a hull rebuild over at most
``window_s / bucket_s`` points every ``rebuild_s``). ``quality()`` may be called from any
thread: it reads a line tuple and scalars published by the reader thread.
"""

from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

_LN2 = math.log(2.0)
#: assumed spread of oscillator skews before one is measured (±200 ppm)
_SKEW_SPREAD = 200e-6


class LockState(str, enum.Enum):
    """``UNLOCKED``: no data yet. ``ACQUIRING``: mapping usable but not yet to spec (just
    started, just restarted after a jump, or uncertainty above ``lock_uncertainty_ns``).
    ``LOCKED``: enough data and the stated uncertainty within ``lock_uncertainty_ns``."""

    UNLOCKED = "unlocked"
    ACQUIRING = "acquiring"
    LOCKED = "locked"


@dataclass(frozen=True)
class EstimatorParams:
    """Tuning of :class:`ClockEstimator`. The defaults suit 1 Hz..10 kHz streams with
    arrival delays of milliseconds and oscillators within a few hundred ppm."""

    window_s: float = 60.0          #: span of data the envelope is fitted over
    bucket_s: float = 1.0           #: one envelope candidate (the lowest point) per bucket
    rebuild_s: float = 4.0          #: full hull rebuild / window trim / step check period
    jump_threshold_ns: int = 10_000_000   #: a residual beyond this either way is suspect
    jump_confirm: int = 3           #: consecutive agreeing suspects that make a jump ...
    jump_confirm_s: float = 0.2     #: ... spanning at least this much device time
    lock_min_samples: int = 10
    lock_span_s: float = 1.0        #: span needed to lock when a skew prior is known
    acquire_span_s: float = 3.0     #: span needed to lock from scratch (skew unknown)
    free_span_s: float = 6.0        #: below this span a known skew prior is used as is
    lock_uncertainty_ns: int = 1_000_000  #: LOCKED needs the stated uncertainty below this
    step_min_ns: int = 300_000      #: smallest floor shift treated as a step
    latency_ns: int = 0             #: known fixed one-way latency, subtracted when mapping
    residual_ring: int = 64         #: recent residuals kept for the jitter estimate

    def __post_init__(self) -> None:
        if not (self.bucket_s > 0 and self.window_s >= 4 * self.bucket_s):
            raise ValueError("bucket_s must be > 0 and window_s at least 4 buckets")
        if self.rebuild_s < self.bucket_s:
            raise ValueError("rebuild_s must be at least bucket_s")
        if self.jump_threshold_ns <= 0 or self.jump_confirm < 1 or self.lock_min_samples < 2:
            raise ValueError("jump_threshold_ns > 0, jump_confirm >= 1, lock_min_samples >= 2")


class _Bucket:
    """The lowest point (detrended at the skew of the time) of one bucket of device time,
    and how many samples fell in it. ``dev``/``off``: device time and ``rx − dev``."""

    __slots__ = ("idx", "dev", "off", "key", "n")

    def __init__(self, idx: int, dev: int, off: int, key: float):
        self.idx, self.dev, self.off, self.key, self.n = idx, dev, off, key, 1


class ClockEstimator:
    """Maps one device clock (int ns) onto the session timebase (int ns); see the module
    docstring. Feed every sample through :meth:`update`, which returns its mapped time;
    :meth:`map` maps without learning. One reader thread (not thread-safe)."""

    def __init__(self, params: EstimatorParams | None = None):
        p = self.params = params or EstimatorParams()
        self._bucket_ns = max(1, int(p.bucket_s * 1e9))
        self._window_ns = int(p.window_s * 1e9)
        self._rebuild_every = max(1, int(round(p.rebuild_s / p.bucket_s)))
        self._confirm_span_ns = int(p.jump_confirm_s * 1e9)
        self._thr = float(p.jump_threshold_ns)
        self.latency_ns = int(p.latency_ns)
        # counters, read by anyone
        self.samples = 0
        self.used = 0            # samples that fed the envelope
        self.suspects = 0        # beyond the jump threshold: spikes, glitches, jump starts
        self.out_of_order = 0    # device time before the current bucket (not used)
        self.restarts = 0        # early restarts: the first samples were late
        self.jumps = 0
        self.steps = 0
        self.last_jump: dict[str, int] | None = None
        self.state = LockState.UNLOCKED
        self.uncertainty_ns: int | None = None
        self.jitter_ns: int | None = None
        self.last_dev_ns: int | None = None
        self._suspect: deque[tuple[int, int, float]] = deque(maxlen=p.jump_confirm)
        self._resid: deque[float] = deque(maxlen=p.residual_ring)
        self._delay_scale = 2e6  # mean arrival delay above the envelope (ns); measured later
        self._prior_s: float | None = None
        self._prior_sigma = 0.0
        #: the mapping line, published as one tuple: offset(dev) = ya + a + s·(dev − xa)
        self._line: tuple[int, int, float, float] = (0, 0, 0.0, 0.0)
        self._sigma = _SKEW_SPREAD
        self._seg_samples = 0
        self._n_window = 0
        self._span_ns = 0
        self._xbar = 0.0
        self._early_mode = True
        self._started = False

    # -- hot path -----------------------------------------------------------------------
    def update(self, device_t_ns: int, rx_ns: int) -> int:
        """Learn from one pair (device time, arrival on the timebase) and return the device
        time mapped onto the timebase, latency removed. Reader thread; never blocks."""
        dev = int(device_t_ns)
        rx = int(rx_ns)
        self.samples += 1
        self.last_dev_ns = dev
        if not self._started:
            self._new_segment(dev, rx)
            return self.map(dev)
        xa, ya, a, s = self._line
        x = dev - xa
        off = rx - dev
        key = (off - ya) - s * x  # detrended offset
        r = key - a               # residual above the line
        if (r > self._thr or r < -self._thr) and self._suspicious(r, x):
            if r < 0.0 and self._seg_samples < self.params.lock_min_samples:
                self.restarts += 1  # the few samples so far were late, not these
                self._new_segment(dev, rx)
            else:
                self._on_suspect(dev, rx, r)
            return self.map(dev)
        if self._suspect:
            self._suspect.clear()
        if r < 0.0:
            a = key  # the envelope lies below every point: lower it at once
            self._line = (xa, ya, a, s)
            self._resid.append(0.0)
        else:
            self._resid.append(r)
        cur = self._cur
        if cur is not None and not self._early_mode and dev // self._bucket_ns == cur.idx:
            cur.n += 1  # fast path: same bucket
            if key < cur.key:
                cur.dev, cur.off, cur.key = dev, off, key
            self.used += 1
            self._seg_samples += 1
        else:
            self._accept(dev, off, key)
            xa, ya, a, s = self._line
            x = dev - xa
        return dev + ya + round(a + s * x) - self.latency_ns

    def map(self, device_t_ns: int) -> int:
        """Device time → timebase (int ns) on the current line, latency removed; no
        learning. Before any data the device time is returned unchanged."""
        dev = int(device_t_ns)
        xa, ya, a, s = self._line
        return dev + ya + round(a + s * (dev - xa)) - self.latency_ns

    # -- segments, buckets, suspects ----------------------------------------------------
    def _suspicious(self, r: float, x: int) -> bool:
        """Beyond the threshold once the line's own extrapolation error is allowed for
        (matters for slow streams while the skew is still unknown)."""
        slack = 3.0 * self._sigma * abs(x - self._xbar)
        return abs(r) > self._thr + slack

    def _new_segment(self, dev: int, rx: int) -> None:
        """Forget the window and start again at this point (first sample, a jump, or an
        early restart). The skew of a long enough previous segment becomes the prior."""
        if self._started and self._seg_samples >= self.params.lock_min_samples:
            self._prior_s = self._line[3]
            self._prior_sigma = max(self._sigma, 1e-6)
        s = self._prior_s if self._prior_s is not None else 0.0
        self._sigma = self._prior_sigma if self._prior_s is not None else _SKEW_SPREAD
        self._line = (dev, rx - dev, 0.0, s)
        self._buckets: deque[_Bucket] = deque()
        self._cur: _Bucket | None = None
        self._hull: list[tuple[int, int]] = []
        self._hxa, self._hya = dev, rx - dev
        self._sum_n = 0
        self._sum_nx = 0
        self._closes = 0
        self._xbar = 0.0
        self._n_window = 0
        self._span_ns = 0
        self._seg_samples = 0
        self._seg_first_dev = dev
        self._started = True
        self.state = LockState.ACQUIRING
        self._accept(dev, rx - dev, 0.0)

    def _accept(self, dev: int, off: int, key: float) -> None:
        self.used += 1
        self._seg_samples += 1
        idx = dev // self._bucket_ns
        cur = self._cur
        if cur is not None and idx == cur.idx:
            cur.n += 1
            if key < cur.key:
                cur.dev, cur.off, cur.key = dev, off, key
            if self._early():
                self._rebuild(include_current=True)
            return
        if cur is not None and idx < cur.idx:
            self.out_of_order += 1
            self.used -= 1
            self._seg_samples -= 1
            return
        if cur is not None:
            self._close(cur)
        self._cur = _Bucket(idx, dev, off, key)
        if self._early():
            self._rebuild(include_current=True)

    def _early(self) -> bool:
        e = self._early_mode = self.state is not LockState.LOCKED and len(self._buckets) < 8
        return e

    def _close(self, b: _Bucket) -> None:
        self._buckets.append(b)
        self._sum_n += b.n
        self._sum_nx += b.n * (b.dev - self._hxa)
        self._closes += 1
        if self._early():
            return  # the per-sample rebuild covers it
        if self._closes >= self._rebuild_every:
            self._rebuild(include_current=False)
        else:
            _hull_push(self._hull, b.dev - self._hxa, b.off - self._hya)
            self._fit()

    def _on_suspect(self, dev: int, rx: int, r: float) -> None:
        self.suspects += 1
        sus = self._suspect
        sus.append((dev, rx, r))
        if len(sus) < self.params.jump_confirm:
            return
        rs = [e[2] for e in sus]
        if max(rs) - min(rs) > self._thr:
            return  # not one consistent new offset (spikes, a stalled queue draining)
        devs = [e[0] for e in sus]
        if max(devs) - min(devs) < self._confirm_span_ns:
            return
        pts = sorted(sus)
        sus.clear()
        self.jumps += 1
        self.last_jump = {"device_t_ns": pts[0][0], "rx_ns": pts[0][1],
                          "size_ns": int(round(min(rs)))}
        self._new_segment(pts[0][0], pts[0][1])
        for d, t, _ in pts[1:]:
            xa, ya, a, s = self._line
            x = d - xa
            rr = (t - d - ya) - a - s * x
            if rr < 0.0:
                self._line = (xa, ya, a + rr, s)
            self._resid.append(max(rr, 0.0))
            self._accept(d, t - d, (t - d - ya) - s * x)

    # -- fitting ------------------------------------------------------------------------
    def _rebuild(self, include_current: bool) -> None:
        """Trim the window, check for steps, rebuild the hull from the buckets and fit."""
        self._closes = 0
        bs = self._buckets
        newest = self._cur.dev if self._cur is not None else (bs[-1].dev if bs else 0)
        while bs and bs[0].dev < newest - self._window_ns:
            bs.popleft()
        if not include_current:
            self._check_step()
        if self._resid and len(self._resid) >= 8:
            med = sorted(self._resid)[len(self._resid) // 2]
            self._delay_scale = max(med / _LN2, 1_000.0)
        pts = list(bs)
        if include_current and self._cur is not None:
            pts.append(self._cur)
        if not pts:
            return
        xa, ya = pts[0].dev, pts[0].off
        self._hxa, self._hya = xa, ya
        xs = [b.dev - xa for b in pts]
        ns = [b.n for b in pts]
        sum_n = sum(ns)
        sum_nx = sum(map(int.__mul__, ns, xs))
        hull: list[tuple[int, int]] = []
        pop, push = hull.pop, hull.append
        for x, b in zip(xs, pts):
            y = b.off - ya
            while len(hull) >= 2:
                ox, oy = hull[-2]
                ax, ay = hull[-1]
                if (ax - ox) * (y - oy) - (ay - oy) * (x - ox) > 0:
                    break
                pop()
            push((x, y))
        self._hull = hull
        if include_current and self._cur is not None:  # keep the sums over closed buckets
            self._sum_n, self._sum_nx = sum_n - self._cur.n, sum_nx - self._cur.n * (
                self._cur.dev - xa)
        else:
            self._sum_n, self._sum_nx = sum_n, sum_nx
        self._fit(sum_n, sum_nx, pts[-1].dev - xa)

    def _fit(self, n: int | None = None, sum_nx: int | None = None,
             x_last: int | None = None) -> None:
        p = self.params
        hull = self._hull
        if not hull:
            return
        if n is None:
            n, sum_nx = self._sum_n, self._sum_nx
            x_last = hull[-1][0]
        assert sum_nx is not None and x_last is not None
        xbar = sum_nx / n
        span = x_last
        mu = self._delay_scale
        self._span_ns, self._n_window, self._xbar = span, n, xbar
        # skew error of the envelope: each end is the lowest of ~n/2 delays of mean mu, and
        # the ends are ~span/2 apart
        sig_lp = 4.0 * mu / (n * span) if span > 0 else 1.0
        s_lp = a_lp = None
        if len(hull) >= 2:
            s_lp, a_lp = _envelope_lp(hull, xbar)
        prior = self._prior_s
        if (prior is not None and s_lp is not None and span >= p.lock_span_s * 1e9
                and abs(s_lp - prior) > 3.0 * sig_lp + 3.0 * self._prior_sigma):
            prior = self._prior_s = None  # the skew changed with the jump: measure afresh
        if prior is not None and span < p.free_span_s * 1e9:
            s, sig = prior, self._prior_sigma
            a = min(y - s * x for x, y in hull)
        elif s_lp is not None and a_lp is not None and sig_lp <= _SKEW_SPREAD:
            s, a, sig = s_lp, a_lp, sig_lp
            self._prior_s = None
        else:  # too little data to measure the skew: assume nominal until there is
            s, sig = 0.0, _SKEW_SPREAD
            a = min(y - s * x for x, y in hull)
        self._line = (self._hxa, self._hya, a, s)
        self._sigma = sig
        if len(self._resid) >= 8:
            self.jitter_ns = int(round(mu * _LN2))
        # at the newest point: envelope bias, plus skew error × distance from the centroid
        # (one bucket more: the line is used until the next fit)
        dist = abs(x_last - xbar) + self._bucket_ns
        u = 3.0 * mu / n + 2.0 * sig * dist
        self.uncertainty_ns = int(round(u))
        need = p.lock_span_s if self._prior_s is not None else p.acquire_span_s
        locked = (self._seg_samples >= p.lock_min_samples and span >= need * 1e9
                  and u <= p.lock_uncertainty_ns)
        self.state = LockState.LOCKED if locked else LockState.ACQUIRING
        self._early_mode = not locked and len(self._buckets) < 8

    def _check_step(self) -> None:
        """Cut the window to its recent part when the floor of the recent buckets has left
        the floor of the older ones at the current skew: a step below the jump threshold,
        or a skew change faster than the window follows. Checked at 2, 4, 8, … buckets."""
        bs = self._buckets
        m = len(bs)
        if m < 6:
            return
        xa, ya, _, s = self._line
        keys = [(b.off - ya) - s * (b.dev - xa) for b in bs]
        pre = keys[:]
        for i in range(1, m):
            if pre[i - 1] < pre[i]:
                pre[i] = pre[i - 1]
        mu = self._delay_scale
        step_min = float(self.params.step_min_ns)
        tol_neg = max(4.0 * (self.uncertainty_ns or 0), step_min)
        rec = math.inf
        n_rec = 0
        k = 0
        scale = 2
        for i in range(m - 1, m // 2 - 1, -1):
            k += 1
            n_rec += bs[i].n
            if keys[i] < rec:
                rec = keys[i]
            if k == scale:
                d = rec - pre[i - 1]
                if d > max(10.0 * mu / n_rec, step_min) or d < -tol_neg:
                    self.steps += 1
                    if self._seg_samples >= self.params.lock_min_samples:
                        self._prior_s, self._prior_sigma = s, max(self._sigma, 1e-6)
                    for _ in range(m - k):
                        bs.popleft()
                    return
                scale *= 2

    # -- reporting ----------------------------------------------------------------------
    @property
    def offset_ns(self) -> int | None:
        """timebase − device at the newest device time (latency removed), or None."""
        dev = self.last_dev_ns
        return None if dev is None else self.map(dev) - dev

    @property
    def skew_ppm(self) -> float:
        """d(timebase − device)/d(device) × 1e6: positive when the device clock runs slow."""
        return self._line[3] * 1e6

    def quality(self) -> dict[str, Any]:
        """Snapshot for manifests and the clock-quality stream. Any thread."""
        return {
            "source": "estimator", "state": self.state.value,
            "offset_ns": self.offset_ns, "skew_ppm": round(self.skew_ppm, 4),
            "jitter_ns": self.jitter_ns, "uncertainty_ns": self.uncertainty_ns,
            "latency_ns": self.latency_ns, "jumps": self.jumps, "steps": self.steps,
            "samples": self.samples, "suspects": self.suspects,
            "out_of_order": self.out_of_order, "restarts": self.restarts,
            "window_samples": self._n_window, "last_jump": self.last_jump,
        }


def _hull_push(hull: list[tuple[int, int]], x: int, y: int) -> None:
    """Append a point (x strictly increasing) to a lower convex hull, exact in ints."""
    while len(hull) >= 2:
        ox, oy = hull[-2]
        ax, ay = hull[-1]
        if (ax - ox) * (y - oy) - (ay - oy) * (x - ox) <= 0:
            hull.pop()
        else:
            break
    hull.append((x, y))


def _envelope_lp(hull: list[tuple[int, int]], xbar: float) -> tuple[float, float]:
    """The line ``y = a + s·x`` below every point that is highest at ``xbar``: the lower
    hull edge spanning ``xbar`` (the first or last edge when ``xbar`` lies outside)."""
    i = 0
    last = len(hull) - 2
    while i < last and hull[i + 1][0] <= xbar:
        i += 1
    (x0, y0), (x1, y1) = hull[i], hull[i + 1]
    s = (y1 - y0) / (x1 - x0)
    return s, y0 - s * x0


class AudioClock:
    """Audio time from the sample count. The ADC's frame index is the device clock,
    converted to ns at the nominal rate; the estimator's skew is then the rate error, so
    ``drift_ppm`` is how far the real sample rate is from nominal (+ = faster).

    ``update(first_index, frames, rx_ns)`` takes one block (the index of its first frame
    counted *including* frames lost to overruns, its length, and its arrival on the
    timebase), learns from the block's *end* (that is when it can arrive) and returns the
    timebase time of its first frame. Reader thread; never blocks."""

    def __init__(self, sample_rate_hz: float, params: EstimatorParams | None = None):
        if not sample_rate_hz or sample_rate_hz <= 0:
            raise ValueError("sample_rate_hz must be > 0")
        self.sample_rate_hz = float(sample_rate_hz)
        fr = Fraction(sample_rate_hz).limit_denominator(1_000_000)
        self._num, self._den = fr.numerator, fr.denominator
        self.estimator = ClockEstimator(params)

    def index_to_ns(self, index: int) -> int:
        """Frame index → device ns at the nominal rate, exact integer arithmetic."""
        return int(index) * 1_000_000_000 * self._den // self._num

    def update(self, first_index: int, frames: int, rx_ns: int) -> int:
        self.estimator.update(self.index_to_ns(first_index + frames), rx_ns)
        return self.estimator.map(self.index_to_ns(first_index))

    @property
    def drift_ppm(self) -> float:
        """Real sample rate relative to nominal, in ppm (+ = the ADC runs fast)."""
        return (1.0 / (1.0 + self.estimator._line[3]) - 1.0) * 1e6

    @property
    def measured_rate_hz(self) -> float:
        return self.sample_rate_hz * (1.0 + self.drift_ppm * 1e-6)

    def quality(self) -> dict[str, Any]:
        q = self.estimator.quality()
        q.update(source="sample-count", drift_ppm=round(self.drift_ppm, 4),
                 nominal_rate_hz=self.sample_rate_hz,
                 measured_rate_hz=round(self.measured_rate_hz, 4))
        return q


class ArrivalClock:
    """For streams without a device clock: ``t = arrival − latency_ns`` (configured, or 0).
    Honest about it: quality says ``source = "arrival"`` and ``uncertainty_ns`` is None
    (the delay is not observable); ``jitter_ns`` is the median deviation of inter-arrival
    intervals from their median, a lower bound on the timing noise. Reader thread."""

    def __init__(self, latency_ns: int = 0, ring: int = 64):
        self.latency_ns = int(latency_ns)
        self.samples = 0
        self._last_rx: int | None = None
        self._intervals: deque[int] = deque(maxlen=ring)

    def update(self, rx_ns: int) -> int:
        rx = int(rx_ns)
        self.samples += 1
        if self._last_rx is not None:
            self._intervals.append(rx - self._last_rx)
        self._last_rx = rx
        return rx - self.latency_ns

    def quality(self) -> dict[str, Any]:
        iv = sorted(self._intervals)
        jitter = None
        if len(iv) >= 8:
            med = iv[len(iv) // 2]
            dev = sorted(abs(v - med) for v in iv)
            jitter = dev[len(dev) // 2]
        return {"source": "arrival", "state": "arrival" if self.samples else "unlocked",
                "offset_ns": -self.latency_ns, "skew_ppm": None,
                "jitter_ns": jitter, "uncertainty_ns": None, "latency_ns": self.latency_ns,
                "jumps": 0, "samples": self.samples}
