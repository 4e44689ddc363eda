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

- **Jumps.** A sample whose residual is beyond the jump threshold (``jump_threshold_ns``
  or 6× the measured mean delay, whichever is larger) either way is *suspect* and not
  used. ``jump_confirm`` consecutive suspects spanning ``jump_confirm_s`` of device time
  whose floor is flat (a queue draining after a stall is not; a late-looking run under
  0.5 s needs twice as many suspects over 0.8 s, so that a stall cannot pass) and tight
  (most within a few delay scales of the floor) mean the device clock
  stepped (reboot, a LiDAR switching to PTP): the estimator restarts from them with the old
  skew as a prior (precision-weighted against the new data, dropped if they disagree) and
  is LOCKED again once ``lock_min_samples`` samples span ``lock_span_s`` -- about 1.1 s
  after the jump at 10 Hz. A "jump" back that was a burst of late samples is undone when
  the old line fits again within 5 s (``false_jumps``). Drivers that *know* the clock
  changed call :meth:`ClockEstimator.reset`.
- **Skew** is the hull edge's slope, precision-weighted with a prior: nominal ±200 ppm at
  first, later the skew from before a jump or cut, its error growing with age.
- **Steps and skew changes** below the jump threshold show as the floor of the newer
  buckets leaving the floor of the older ones (at the current skew); the window is then
  cut to its newer part and ``steps`` counts it (a second cut soon after says the skew,
  not the offset, changed: the skew is then re-measured).
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
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any

_LN2 = math.log(2.0)
#: assumed spread of oscillator skews before one is measured (±200 ppm)
_SKEW_SPREAD = 200e-6
#: a suspect run this many ``jump_confirm_s`` long is a jump even if not flat
_FORCE_RUN = 25
#: a run of *late* suspects (device time stepped back, or everything arrives late) smaller
#: than this needs twice ``jump_confirm`` suspects over 4× ``jump_confirm_s``: a host or
#: device stall of tens of ms (frames late, then none, then late again) can look flat for a
#: few hundred ms, while real clock changes (reboot, PTP switch) are mostly far larger, and
#: lateness never makes samples look early. The new segment still starts at the run's
#: first point, so the re-lock time (~1 s at 10 Hz) does not grow
_SMALL_JUMP_NS = 500_000_000
#: a skew known better than this (1σ) is kept as the prior across a jump or step
_PRIOR_MAX = 20e-6
#: least 1σ of the skew carried over a jump: the device may have changed its time source
_JUMP_PRIOR_MIN = 3e-6
#: assumed random wander of an oscillator's skew, per second (for aging priors)
_SKEW_WANDER = 0.05e-6
#: least span of device time over which a sample count's fitted skew may overrule a
#: known prior (s)
COUNT_AFRESH_SPAN_S = 20.0
#: floor of the delay-scale estimate (ns): below this the envelope is exact anyway
_MIN_DELAY_SCALE = 1_000.0
#: device time after a jump during which it may still be undone
_UNDO_NS = 5_000_000_000
#: everything that describes the current segment (restored when a jump is undone)
_SEGMENT_STATE = (
    "_line", "_fit_a", "_sigma", "_buckets", "_cur", "_hull", "_hxa", "_hya", "_sum_n",
    "_sum_nx", "_closes", "_xbar", "_n_window", "_span_ns", "_seg_samples",
    "_seg_first_dev", "_dev0", "_off0", "_recent", "_prior_s", "_prior_sigma",
    "_prior_dev", "_last_trim_dev", "state", "uncertainty_ns", "_early_mode",
    "_delay_scale", "_thr", "added_latency_ns")


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
    rebuild_s: float = 8.0          #: full hull rebuild / window trim / step check period
    jump_threshold_ns: int = 10_000_000   #: suspect beyond this (or 6× the mean delay)
    jump_confirm: int = 3           #: consecutive agreeing suspects that make a jump ...
    jump_confirm_s: float = 0.2     #: ... spanning at least this much device time
    lock_min_samples: int = 10
    lock_span_s: float = 1.0        #: span needed to lock when a skew prior is known
    acquire_span_s: float = 3.0     #: span needed to lock from scratch (skew unknown)
    lock_uncertainty_ns: int = 1_000_000  #: LOCKED needs the stated uncertainty below this
    step_min_ns: int = 300_000      #: smallest floor shift treated as a step
    #: a floor that rises may be the device clock stepping back; False for a clock that
    #: cannot step while it counts on (an ADC's sample count without a gap): there a
    #: rising floor is added latency (a sound server's buffer grew), not time
    floor_rises_are_steps: bool = True
    #: a fitted skew that disagrees with a well-known prior (the skew from before a jump
    #: or a cut) replaces it only once the window spans this much device time; 0: from
    #: six buckets on. See :meth:`for_sample_count`
    skew_afresh_span_s: float = 0.0
    latency_ns: int = 0             #: known fixed one-way latency, subtracted when mapping
    max_skew_ppm: float = 1000.0    #: fitted skews are clamped to ±this (no oscillator is
    #:                                 further off; a steeper hull edge is a floor change)
    residual_ring: int = 64         #: recent residuals kept for the jitter estimate

    def for_sample_count(self) -> "EstimatorParams":
        """These settings for an ADC's sample count: it cannot step while it counts (a
        rising floor is latency, not time), and its rate is steady -- a re-plugged mic is
        the same oscillator -- while a new stream's blocks come in bursts for its first
        seconds: a skew fitted on those may overrule the skew carried over only from
        ``COUNT_AFRESH_SPAN_S`` of data on (after a re-plug, 6 s of bursts fitted 230 ppm
        against the 5 ppm measured before)."""
        return replace(self, floor_rises_are_steps=False,
                       skew_afresh_span_s=max(self.skew_afresh_span_s, COUNT_AFRESH_SPAN_S))

    def __post_init__(self) -> None:
        if not (self.bucket_s > 0 and self.window_s >= 4 * self.bucket_s):
            raise ValueError("bucket_s must be > 0 and window_s at least 4 buckets")
        if self.rebuild_s < self.bucket_s:
            raise ValueError("rebuild_s must be at least bucket_s")
        if self.jump_threshold_ns <= 0 or self.jump_confirm < 1 or self.lock_min_samples < 2:
            raise ValueError("jump_threshold_ns > 0, jump_confirm >= 1, lock_min_samples >= 2")


class _Bucket:
    """The lowest point (detrended at the skew of the time) of one bucket of device time,
    and how many samples fell in it. ``dev``/``off``: device time and ``rx − dev``;
    ``key``: the detrended offset in the segment's frame."""

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
        self._afresh_span_ns = int(p.skew_afresh_span_s * 1e9)
        self._thr = float(p.jump_threshold_ns)
        self._max_skew = p.max_skew_ppm * 1e-6
        self.latency_ns = int(p.latency_ns)
        # counters, read by anyone
        self.samples = 0
        self.used = 0            # samples that fed the envelope
        self.suspects = 0        # beyond the jump threshold: spikes, glitches, jump starts
        self.out_of_order = 0    # device time before the current bucket (not used)
        self.restarts = 0        # early restarts: the first samples were late
        self.resets = 0          # reset() calls (announced clock changes)
        self.false_jumps = 0     # jumps undone: late bursts that looked like a step back
        self.jumps = 0
        self.steps = 0
        #: latency steps absorbed (``floor_rises_are_steps=False``) and their sum now (ns)
        self.latency_steps = 0
        self.added_latency_ns = 0
        self.last_jump: dict[str, int] | None = None
        self.state = LockState.UNLOCKED
        self.uncertainty_ns: int | None = None
        self.jitter_ns: int | None = None
        self.last_dev_ns: int | None = None
        self._suspect: deque[tuple[int, int, float]] = deque(maxlen=max(16, p.jump_confirm))
        self._run_first_dev = 0
        self._recent: deque[tuple[int, int]] = deque(maxlen=p.residual_ring)  # (dev, off)
        self._delay_scale = 2e6  # mean arrival delay above the envelope (ns); measured later
        self._scale_measured = False
        # skew prior: centre, 1σ and the device time it was set (it ages from there)
        self._prior_s = 0.0
        self._prior_sigma = _SKEW_SPREAD
        self._prior_dev = 0
        self._last_trim_dev: int | None = None
        #: the mapping line, published as one tuple: offset(dev) = ya + a + s·(dev − xa)
        self._line: tuple[int, int, float, float] = (0, 0, 0.0, 0.0)
        self._sigma = _SKEW_SPREAD
        self._seg_samples = 0
        self._n_window = 0
        self._span_ns = 0
        self._xbar = 0.0
        self._fit_a = 0.0
        self._early_mode = True
        self._undo: tuple[dict[str, Any], int] | None = None
        self._started = False

    # -- hot path -----------------------------------------------------------------------
    def update(self, device_t_ns: int, rx_ns: int) -> int:
        """Learn from one pair (device time, arrival on the timebase) and return the device
        time mapped onto the timebase, latency removed. Reader thread; never blocks."""
        dev = int(device_t_ns)
        rx = int(rx_ns) - self.added_latency_ns
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
        if r < 0.0 and self._undo is not None and self._undo_fits(dev, rx):
            return self.update(dev, rx)  # the "jump" was a burst of late samples
        if (r < -self._thr or (r > self._thr and self.params.floor_rises_are_steps)) \
                and self._suspicious(r, x):
            if r < 0.0 and self._seg_samples < self.params.lock_min_samples:
                self.restarts += 1  # the few samples so far were late, not these
                self._new_segment(dev, rx)
            else:
                self._on_suspect(dev, rx, r)
            return self.map(dev)
        if self._suspect:
            self._suspect.clear()
        if r < 0.0 and self.added_latency_ns:
            # on a count: an arrival below the line says the added latency has shrunk
            give = min(-r, float(self.added_latency_ns))
            self._add_latency(-int(round(give)), dev)
            off += int(round(give))
            key += give
            r += give
        if r < 0.0:
            a = key  # the envelope lies below every point: lower it at once
            self._line = (xa, ya, a, s)
        self._recent.append((dev, off))
        cur = self._cur
        if cur is not None and not self._early_mode and dev // self._bucket_ns == cur.idx:
            cur.n += 1  # fast path: same bucket
            k = (off - self._off0) - s * (dev - self._dev0)  # segment frame
            if k < cur.key:
                cur.dev, cur.off, cur.key = dev, off, k
            self.used += 1
            self._seg_samples += 1
        else:
            self._accept(dev, off)
            xa, ya, a, s = self._line
            x = dev - xa
        return dev + ya + round(a + s * x) - self.latency_ns

    def map(self, device_t_ns: int) -> int:
        """Device time → timebase (int ns) on the current line, latency removed; no
        learning. Before any data the device time is returned unchanged."""
        dev = int(device_t_ns)
        xa, ya, a, s = self._line
        return dev + ya + round(a + s * (dev - xa)) - self.latency_ns

    def reset(self, keep_skew: bool = False) -> None:
        """Forget the mapping; the next sample starts a new segment. For drivers that
        *know* the device clock changed (a LiDAR switched to PTP, a device rebooted):
        faster and safer than waiting for the jump detector. ``keep_skew`` keeps the skew
        as a prior (same oscillator); otherwise it is measured afresh. Reader thread."""
        if self._started:
            self._set_prior(self._line[3], trust=keep_skew)
        self._started = False
        self._suspect.clear()
        self._undo = None
        self.resets += 1

    # -- segments, buckets, suspects ----------------------------------------------------
    def _suspicious(self, r: float, x: int) -> bool:
        """Beyond the threshold once the line's own extrapolation error is allowed for
        (matters for slow streams while the skew is still unknown)."""
        slack = 3.0 * self._sigma * abs(x - self._xbar)
        return abs(r) > self._thr + slack

    def _undo_fits(self, dev: int, rx: int) -> bool:
        """Within ``_UNDO_NS`` of device time after a jump, a sample far *below* the new
        line but on the old one means the jump was false: restore the old segment."""
        state, until = self._undo  # type: ignore[misc]
        if dev > until:
            self._undo = None
            return False
        xa, ya, a, s = state["_line"]
        r = (rx - dev - ya) - a - s * (dev - xa)
        size = abs(self.last_jump["size_ns"]) if self.last_jump else 0
        if abs(r) > min(self._thr, size / 2):
            return False
        for k, v in state.items():
            setattr(self, k, v)
        self._undo = None
        self._suspect.clear()
        self.jumps -= 1
        self.false_jumps += 1
        return True

    def _set_prior(self, s: float, trust: bool = True) -> None:
        """Carry the current skew over a jump or a step as the prior of what follows:
        with its measured error if ``trust`` and it was measured well, else as a weak
        prior (±200 ppm) that only says where to start."""
        good = trust and self._seg_samples >= self.params.lock_min_samples and (
            self._sigma <= _PRIOR_MAX)
        # a weak prior starts within the nominal spread: a skew fitted to a few bad points
        # (mislabelled PPS edges, a burst) must not pull what follows
        self._prior_s = s if good else max(-_SKEW_SPREAD, min(_SKEW_SPREAD, s))
        self._prior_sigma = max(self._sigma, 1e-7) if good else _SKEW_SPREAD
        self._prior_dev = self.last_dev_ns or 0

    @property
    def _prior_known(self) -> bool:
        return self._prior_sigma <= _PRIOR_MAX

    def _new_segment(self, dev: int, rx: int) -> None:
        """Forget the window and start again at this point (first sample, a jump, or an
        early restart). The skew of a long enough previous segment becomes the prior."""
        if self._started:  # a jump: same oscillator (reboot) or not (switch to PTP)
            self._set_prior(self._line[3])
            self._prior_sigma = max(self._prior_sigma, _JUMP_PRIOR_MIN)
        s, self._sigma = self._prior_s, self._prior_sigma
        self._line = (dev, rx - dev, 0.0, s)
        self._fit_a = 0.0
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
        self._dev0, self._off0 = dev, rx - dev
        self._recent = deque(maxlen=self.params.residual_ring)
        self.added_latency_ns = 0
        self._started = True
        self.state = LockState.ACQUIRING
        self._accept(dev, rx - dev)

    def _accept(self, dev: int, off: int) -> None:
        """Put a sample into its bucket; the bucket keeps its lowest point at the current
        skew (compared in the segment's fixed frame, which fits never move)."""
        key = (off - self._off0) - self._line[3] * (dev - self._dev0)
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
        """While acquiring with few buckets, refit on every sample (every 16th once there
        are plenty, to bound the cost on fast streams)."""
        e = self._early_mode = self.state is not LockState.LOCKED and len(self._buckets) < 8
        return e and (self._seg_samples < 64 or not self._seg_samples & 15)

    def _close(self, b: _Bucket) -> None:
        self._buckets.append(b)
        self._sum_n += b.n
        self._sum_nx += b.n * (b.dev - self._hxa)
        self._closes += 1
        if self._early():
            return  # the per-sample rebuild covers it
        xa, ya, _, s = self._line
        rb = (b.off - ya) - s * (b.dev - xa) - self._fit_a  # this bucket's floor vs the fit
        step_min = self.params.step_min_ns
        if (self._closes >= self._rebuild_every
                or rb > max(10.0 * self._delay_scale / b.n, step_min)
                or rb < -max(4.0 * (self.uncertainty_ns or 0), step_min)):
            self._rebuild(include_current=False)
        else:
            _hull_push(self._hull, b.dev - self._hxa, b.off - self._hya)
            self._fit()

    def _on_suspect(self, dev: int, rx: int, r: float) -> None:
        """A run of consecutive suspects is a jump once it has ``jump_confirm`` samples,
        spans ``jump_confirm_s`` of device time and is *flat*: the floor of its older half
        matches the floor of its newer half (a queue draining after a stall is not flat;
        spikes do not move a floor) and two thirds of it lie within a few delay scales of
        that floor (a burst of late samples is scattered). A run that lasts ``_FORCE_RUN``
        confirm spans is taken as a jump regardless."""
        self.suspects += 1
        sus = self._suspect
        if not sus:
            self._run_first_dev = dev
        sus.append((dev, rx, r))
        # late-looking (r > 0) and small: could be a stall; early-looking runs cannot
        small = 0.0 < r < _SMALL_JUMP_NS
        if len(sus) < self.params.jump_confirm * (2 if small else 1):
            return
        span = abs(dev - self._run_first_dev)
        if span < self._confirm_span_ns * (4 if small else 1):
            return
        rs = [e[2] for e in sus]
        h = len(rs) // 2
        lo = min(rs[h:])
        flat = abs(min(rs[:h]) - lo) <= self._thr / 2
        # after a real jump the delays are the path's usual ones: most residuals sit within
        # a few delay scales of the new floor; a burst of late samples (host or device
        # stall) scatters over tens of ms and is not a jump
        near = max(3.0 * self._delay_scale, 1_000_000.0)
        tight = 3 * sum(1 for v in rs if v - lo <= near) >= 2 * len(rs)
        if not (flat and tight) and span < _FORCE_RUN * self._confirm_span_ns:
            return
        pts = sorted(e for e in sus if abs(e[2] - lo) <= self._thr)
        sus.clear()
        self.jumps += 1
        self.last_jump = {"device_t_ns": pts[0][0], "rx_ns": pts[0][1], "size_ns": round(lo)}
        # keep the old segment for a while: a burst of late samples can pass for a jump
        # backwards, and is undone when the old line fits again (see update)
        self._undo = ({k: getattr(self, k) for k in _SEGMENT_STATE}, dev + _UNDO_NS)
        self._new_segment(pts[0][0], pts[0][1])
        for d, t, _ in pts[1:]:
            xa, ya, a, s = self._line
            key = (t - d - ya) - s * (d - xa)
            if key < a:
                self._line = (xa, ya, key, s)
            self._recent.append((d, t - d))
            self._accept(d, t - d)

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
        # the delay scale: median residual of the recent samples (a path property, so it
        # survives a jump; re-measured once there are enough samples again)
        if len(self._recent) >= (32 if self._scale_measured else 8):
            self._scale_measured = True
            xa, ya, a, s = self._line
            rs = sorted((o - ya) - a - s * (d - xa) for d, o in self._recent)
            self._delay_scale = max(rs[len(rs) // 2] / _LN2, _MIN_DELAY_SCALE)
            # exponential delays pass 6× their mean once in 400 samples: not a jump
            self._thr = max(float(self.params.jump_threshold_ns), 6.0 * self._delay_scale)
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
        # The envelope's skew and its error: the hull edge's ends are each about the lowest
        # of n/2 delays (mean mu), ~span/2 apart; x2 for the heavy tail (checked in tests).
        # Fewer than 3 closed buckets say nothing reliable about the skew.
        s0, sp = self._skew_prior(x_last)
        if len(self._buckets) >= 3 and len(hull) >= 2 and span > 0:
            s_lp = _envelope_lp(hull, xbar)[0]
            sig_lp = 8.0 * mu / (n * span)
            if (self._prior_known and len(self._buckets) >= 6
                    and span >= self._afresh_span_ns
                    and abs(s_lp - s0) > 8.0 * math.hypot(sig_lp, sp)):
                self._prior_sigma = sp = _SKEW_SPREAD  # the skew changed: measure afresh
            # precision-weighted with the prior (the old skew, or nominal ±200 ppm)
            w_lp, w0 = 1.0 / (sig_lp * sig_lp), 1.0 / (sp * sp)
            s = (s_lp * w_lp + s0 * w0) / (w_lp + w0)
            s = max(-self._max_skew, min(self._max_skew, s))
            sig = 1.0 / math.sqrt(w_lp + w0)
        else:
            # no oscillator is further off than the nominal spread, however old the prior
            # (a device clock counting from the unix epoch ages it by decades)
            s, sig = s0, min(sp, _SKEW_SPREAD)
        a = min(y - s * x for x, y in hull)  # the line at that skew touching the envelope
        self._line = (self._hxa, self._hya, a, s)
        self._fit_a = a
        self._sigma = sig
        if len(self._recent) >= 8:
            self.jitter_ns = int(round(mu * _LN2))
        # at the newest point: envelope bias, plus skew error × distance from the centroid
        # (one bucket more: the line is used until the next fit)
        dist = abs(x_last - xbar) + self._bucket_ns
        u = 4.5 * mu / n + 3.0 * sig * dist
        self.uncertainty_ns = int(round(u))
        need = p.lock_span_s if self._prior_known else p.acquire_span_s
        data_span = (self.last_dev_ns or 0) - self._seg_first_dev
        locked = (self._seg_samples >= p.lock_min_samples and data_span >= need * 1e9
                  and u <= p.lock_uncertainty_ns)
        self.state = LockState.LOCKED if locked else LockState.ACQUIRING
        self._early_mode = not locked and len(self._buckets) < 8

    def _skew_prior(self, x_last: int) -> tuple[float, float]:
        """The skew prior and its 1σ: the skew from before the last jump/step, its error
        growing with the time since (oscillator wander); nominal ±200 ppm at first."""
        age_s = max(0, self._hxa + x_last - self._prior_dev) * 1e-9
        return self._prior_s, math.hypot(self._prior_sigma, _SKEW_WANDER * age_s)

    def _check_step(self) -> None:
        """Cut the window where the floor of the newer buckets leaves the floor of the
        older ones at the current skew: a step below the jump threshold, or a skew change
        faster than the window follows. A floor that drops is cut at the newest such split,
        one that rises at the oldest; either must beat the floor noise of the side that
        could be high by chance (``10..15·delay/n``, n its samples) and the line's own
        uncertainty. A rise must show in three buckets."""
        bs = self._buckets
        m = len(bs)
        if m < 8:  # too little to judge (this also spaces cuts at least 8 buckets apart)
            return
        xa, ya, _, s = self._line
        keys = [(b.off - ya) - s * (b.dev - xa) for b in bs]
        pre = keys[:]
        pre_n = [b.n for b in bs]
        for i in range(1, m):
            if pre[i - 1] < pre[i]:
                pre[i] = pre[i - 1]
            pre_n[i] += pre_n[i - 1]
        mu = self._delay_scale
        step_min = float(self.params.step_min_ns)
        u = float(self.uncertainty_ns or 0)
        tol_neg = max(4.0 * u, step_min)
        suf = math.inf
        n_suf = 0
        cut_neg = cut_pos = 0
        for i in range(m - 1, 0, -1):
            n_suf += bs[i].n
            if keys[i] < suf:
                suf = keys[i]
            d = suf - pre[i - 1]
            if d < -max(tol_neg, 10.0 * mu / pre_n[i - 1]) and not cut_neg:
                cut_neg = i
            elif d > max(15.0 * mu / n_suf, step_min) + 2.0 * u and i <= m - 3:
                cut_pos = i  # a rise needs three buckets: slow buckets are not a step
        if not self.params.floor_rises_are_steps and cut_pos:
            self._absorb_rise(cut_pos, keys)
            cut_pos = 0
        cut = cut_neg or cut_pos
        if cut:
            self.steps += 1
            # a second cut soon after the first says the skew, not the offset, is off
            dev = self.last_dev_ns or 0
            again = (self._last_trim_dev is not None
                     and dev - self._last_trim_dev < self._window_ns // 4)
            self._last_trim_dev = dev
            # (not on a count: an ADC's rate does not change; its arrivals' floor dropping
            # twice is a sound server's buffer draining, and the short window left after
            # a cut would measure the rate from a few seconds of bursty arrivals)
            self._set_prior(s, trust=not again or not self.params.floor_rises_are_steps)
            for _ in range(cut):
                bs.popleft()

    def _absorb_rise(self, i: int, keys: list[float]) -> None:
        """For a clock that cannot step while it counts (``floor_rises_are_steps=False``):
        the floor rose from bucket ``i`` on, which is latency added on the way (a sound
        server's buffer grew): the newer buckets and every later arrival are taken that
        much earlier, and the line stays where it was. The size is measured across the
        boundary (three buckets each side), where a skew the rise has tilted matters
        least; what is left over shows at a later check. (A shrinking latency is given
        back as soon as an arrival falls below the line: see :meth:`update`.)"""
        if i < 3 or len(keys) - i < 3:
            return
        d = min(keys[i:i + 3]) - min(keys[i - 3:i])
        if d > 0:
            self._add_latency(int(round(d)), self._buckets[i].dev)

    def _add_latency(self, shift: int, since_dev: int) -> None:
        """Take every arrival from device time ``since_dev`` on (buckets, the open one,
        the residual ring, and all later samples) ``shift`` ns earlier."""
        if not shift:
            return
        self.added_latency_ns += shift
        if shift > 0:
            self.latency_steps += 1
        bs = self._buckets
        # the open bucket too (while a bucket closes it is still ``_cur``: not twice); a
        # bucket is its lowest point, so it moves if that point came late enough
        cur = self._cur if self._cur is not None and (not bs or self._cur is not bs[-1]) \
            else None
        for b in [b for b in bs if b.dev >= since_dev] + ([cur] if cur is not None else []):
            if b.dev >= since_dev:
                b.off -= shift
                b.key -= shift
        self._recent = deque(((dv, o - shift) if dv >= since_dev else (dv, o)
                              for dv, o in self._recent), maxlen=self.params.residual_ring)

    # -- reporting ----------------------------------------------------------------------
    @property
    def offset_ns(self) -> int | None:
        """timebase − device at the newest device time (latency removed), or None."""
        dev = self.last_dev_ns
        return None if dev is None else self.map(dev) - dev

    def uncertainty_at(self, device_t_ns: int) -> int | None:
        """Stated uncertainty (ns) of ``map(device_t_ns)``: the newest point's, plus three
        times the skew's 1σ over the distance beyond the newest device time (holdover).
        None before any fit."""
        if self.uncertainty_ns is None or self.last_dev_ns is None:
            return None
        beyond = abs(int(device_t_ns) - self.last_dev_ns)
        return self.uncertainty_ns + int(round(3.0 * self._sigma * beyond))

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
            "latency_steps": self.latency_steps, "added_latency_ns": self.added_latency_ns,
            "samples": self.samples, "suspects": self.suspects,
            "out_of_order": self.out_of_order, "restarts": self.restarts,
            "resets": self.resets, "false_jumps": self.false_jumps,
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


def _envelope_lp(hull: list[tuple[int, int]], xbar: float) -> tuple[float, float, int]:
    """The line ``y = a + s·x`` below every point that is highest at ``xbar``: the lower
    hull edge spanning ``xbar`` (the first or last edge when ``xbar`` lies outside).
    Returns ``(s, a, edge length)``."""
    i = 0
    last = len(hull) - 2
    while i < last and hull[i + 1][0] <= xbar:
        i += 1
    (x0, y0), (x1, y1) = hull[i], hull[i + 1]
    s = (y1 - y0) / (x1 - x0)
    return s, y0 - s * x0, x1 - x0


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
        self.estimator = ClockEstimator((params or EstimatorParams()).for_sample_count())

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
