"""The shared session timebase and the clock stage that puts every Sample on it.

``Timebase.now_ns()`` reads the session's clock: ``monotonic`` (default), ``realtime``,
``tai`` or a PTP hardware clock (``/dev/ptpN`` through its dynamic POSIX clock id).
``Timebase.utc_mapping()`` states how the timebase relates to UTC and how well that is
known (chrony, else the kernel's own error bound, else "unknown"); with a GPS receiver's
PPS edges locked, :meth:`ClockStage.utc_mapping` takes UTC from them instead (source
``gps-pps``) and carries the system clock's view along for comparison.

``ClockStage.stamp(sample, device_clock_is_timebase)`` sets ``sample.t_ns``. It is called
in each driver's reader thread, before the sample is queued, never blocks and costs a few
µs. Per stream it picks, at the stream's first sample:

- the driver's device clock *is* the timebase (synthetic drivers): ``t_ns = device_t_ns``,
  source ``device=timebase``;
- the sample has a device time: a :class:`~agent.clock_estimator.ClockEstimator` maps it
  (source ``estimator``; ``sample-count`` for audio streams declared with
  :meth:`ClockStage.configure_stream`, whose skew is the ADC's rate error);
- otherwise arrival time minus the configured latency, source ``arrival``.

A sample with ``meta["discontinuity"]`` (the driver reopened the device and its clock
restarted) resets that stream's estimator, keeping the skew (same oscillator).

**Clock domains.** Streams that share one device clock (a GPS receiver's fixes and its
``<name>/timeref``) form a domain and map through one estimator. Samples marked
``meta["clock_ref"]`` (PPS edges: device time = the UTC second, arrival = the kernel's
assert time) feed the domain's *reference* estimator and nothing else; every other
member sample is mapped by it (source ``pps``/``reference``). Until a reference arrives,
or when the last one is older than ``ref_holdover_s`` of device time, members fall back to
a second estimator fed by their own arrivals (source ``nmea-arrival`` for GPS, else
``estimator``). Membership: ``StreamInfo.params["clock_domain"]`` at
:meth:`ClockStage.configure_stream`, else a TIMEREF stream ``<base>/timeref`` joins
``<base>``; an unconfigured stream that carries references is its own domain.

``quality(stream)``/``summary()`` report offset, skew, jitter, lock state, jumps and the
stated uncertainty (summary goes into every manifest as ``manifest["clock"]``);
``poll_quality(now_ns)`` yields the per-stream clock-quality samples (topic
``/clock/<stream>``, schema ``edgecap.ClockQuality``, at most once a second) and the
timebase↔UTC samples (``/clock/utc``, schema ``edgecap.TimebaseUtc``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import subprocess
import threading
import time
from fractions import Fraction
from typing import Any, Callable, Mapping

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from .clock_estimator import ArrivalClock, ClockEstimator, EstimatorParams, LockState
from .errors import DriverError
from .types import Sample, StreamInfo, StreamKind

QUALITY_SCHEMA = "edgecap.ClockQuality"
UTC_SCHEMA = "edgecap.TimebaseUtc"
UTC_TOPIC = "/clock/utc"

#: JSON schema of a clock-quality message (one per stream, ≤ 1 Hz).
CLOCK_QUALITY_JSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "stream": {"type": "string"},
        "source": {"enum": ["estimator", "sample-count", "arrival", "device=timebase",
                            "pps", "reference", "nmea-arrival"]},
        "state": {"enum": ["unlocked", "acquiring", "locked", "arrival",
                           "device=timebase"]},
        "offset_ns": {"type": ["integer", "null"], "description": "timebase − device"},
        "skew_ppm": {"type": ["number", "null"],
                     "description": "+ when the device clock runs slow"},
        "drift_ppm": {"type": ["number", "null"],
                      "description": "audio: real sample rate vs nominal"},
        "jitter_ns": {"type": ["integer", "null"],
                      "description": "median arrival delay above the envelope"},
        "uncertainty_ns": {"type": ["integer", "null"],
                           "description": "≈p99 bound on |t_ns − truth|; null: unknown"},
        "latency_ns": {"type": "integer"},
        "jumps": {"type": "integer"}, "samples": {"type": "integer"},
    },
    "required": ["stream", "source", "state"],
}

#: JSON schema of a timebase↔UTC message.
UTC_JSON_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "timebase": {"type": "string"},
        "timebase_ns": {"type": "integer"},
        "utc_minus_timebase_ns": {"type": "integer"},
        "uncertainty_ns": {"type": ["integer", "null"],
                           "description": "bound on the UTC error; null: unknown"},
        "sync": {"type": "string"}, "source": {"type": "string"},
    },
    "required": ["timebase", "timebase_ns", "utc_minus_timebase_ns", "uncertainty_ns"],
}


class TimebaseError(DriverError):
    """The configured timebase cannot be read (no such PTP device, no permission, not a
    PTP clock, clock not supported by this kernel)."""


def ptp_clock_id(fd: int) -> int:
    """The dynamic POSIX clock id of an open ``/dev/ptpN`` (the kernel's FD_TO_CLOCKID)."""
    return ((~fd) << 3) | 3


_REFRESH_NS = 50_000_000  # how often from_monotonic re-measures timebase − monotonic


class Timebase:
    """The session clock. ``kind``: ``monotonic`` (default), ``realtime``, ``tai`` or
    ``ptp`` (``ptp_device``, default ``/dev/ptp0``). Raises :class:`TimebaseError` (a
    DriverError) at construction if the clock cannot be read. ``now_ns`` and
    ``from_monotonic`` may be called from any thread and never block (a PTP clock read is
    a syscall of a few µs)."""

    KINDS = ("monotonic", "realtime", "tai", "ptp")

    def __init__(self, kind: str = "monotonic", ptp_device: str | None = None):
        self.kind = kind
        self.ptp_device: str | None = None
        self._fd: int | None = None
        self._cache: tuple[int, int] | None = None  # (monotonic at measure, tb − mono)
        if kind == "monotonic":
            self._now: Callable[[], int] = time.monotonic_ns
        elif kind == "realtime":
            self._now = time.time_ns
        elif kind == "tai":
            if not hasattr(time, "CLOCK_TAI"):
                raise TimebaseError("timebase 'tai': CLOCK_TAI is not available on this host")
            tai = time.CLOCK_TAI
            self._now = lambda: time.clock_gettime_ns(tai)
        elif kind == "ptp":
            self._open_ptp(ptp_device or "/dev/ptp0")
        else:
            raise TimebaseError(f"timebase {kind!r} unknown; expected one of "
                                f"{', '.join(self.KINDS)}")

    def _open_ptp(self, path: str) -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise TimebaseError(f"timebase 'ptp': {path} does not exist (no PTP hardware "
                                "clock; check `ls /dev/ptp*` and the NIC driver)") from None
        except PermissionError:
            raise TimebaseError(f"timebase 'ptp': no permission to read {path} (add the "
                                "agent's user to the group owning it)") from None
        except OSError as e:
            raise TimebaseError(f"timebase 'ptp': cannot open {path}: {e.strerror}") from None
        cid = ptp_clock_id(fd)
        try:
            time.clock_gettime_ns(cid)
        except OSError as e:
            os.close(fd)
            raise TimebaseError(f"timebase 'ptp': {path} is not a readable PTP clock "
                                f"({e.strerror})") from None
        self._fd, self.ptp_device = fd, path
        self._now = lambda: time.clock_gettime_ns(cid)

    def close(self) -> None:
        """Release the PTP device (no-op for the other kinds). Idempotent."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)

    def now_ns(self) -> int:
        return self._now()

    def _measure(self, clock: Callable[[], int]) -> tuple[int, int]:
        """``clock − timebase`` read as a sandwich (best of three), and half the read gap."""
        best: tuple[int, int] | None = None
        for _ in range(3):
            t0 = self._now()
            c = clock()
            t1 = self._now()
            if best is None or t1 - t0 < best[1] * 2:
                best = (c - (t0 + t1) // 2, (t1 - t0) // 2)
        assert best is not None
        return best

    def from_monotonic(self, mono_ns: int) -> int:
        """Convert a host-monotonic time (``host_rx_ns``) to this timebase. The offset is
        re-measured at most every 50 ms, so a step of the realtime clock shows within that."""
        if self.kind == "monotonic":
            return mono_ns
        now = time.monotonic_ns()
        c = self._cache
        if c is None or now - c[0] > _REFRESH_NS:
            mono_minus_tb = self._measure(time.monotonic_ns)[0]
            c = self._cache = (now, -mono_minus_tb)
        return mono_ns + c[1]

    def describe(self) -> dict[str, Any]:
        """For the bundle metadata: the kind, the PTP device, and for ``tai`` the kernel's
        TAI−UTC offset (0 means it was never set, so CLOCK_TAI reads UTC here)."""
        d: dict[str, Any] = {"timebase": self.kind}
        if self.ptp_device:
            d["ptp_device"] = self.ptp_device
        if self.kind == "tai":
            off_s = round(self._measure(time.time_ns)[0] / -1e9)
            d["tai_minus_utc_s"] = off_s
            if off_s == 0:
                d["note"] = ("kernel TAI offset not set (0 s): CLOCK_TAI equals UTC on this "
                             "host; set it with chrony's leapsectz or ptp4l")
        return d

    def utc_mapping(self) -> dict[str, Any]:
        """``UTC ≈ timebase + utc_minus_timebase_ns`` now, with a stated uncertainty (None
        when the system clock's sync is unknown). A PTP hardware clock timebase whose
        ``ptp4l`` answers ``pmc`` with a grandmaster present on the PTP timescale is TAI:
        UTC is it minus the grandmaster's UTC offset, known to within |master offset|
        (source ``ptp4l``). Otherwise through the system clock (chrony, the kernel).
        Blocks up to ~1 s when ``chronyc``/``pmc`` is installed but slow; call it from a
        housekeeping thread, not a reader thread."""
        if self.kind == "ptp":
            st = ptp4l_state()
            m = ptp_utc_offset(st) if st is not None else None
            if m is not None:
                return {"timebase": self.kind, "timebase_ns": self.now_ns(),
                        "utc_minus_timebase_ns": m[0], "uncertainty_ns": m[1],
                        "sync": "synchronized", "source": "ptp4l", "details": st}
        utc_minus_tb, read_ns = self._measure(time.time_ns)
        sync = system_clock_sync()
        unc = sync["error_bound_ns"]
        return {
            "timebase": self.kind, "timebase_ns": self.now_ns(),
            "utc_minus_timebase_ns": 0 if self.kind == "realtime" else utc_minus_tb,
            "uncertainty_ns": None if unc is None else unc + read_ns,
            "sync": sync["sync"], "source": sync["source"], "details": sync["details"],
        }


# -- system clock sync state --------------------------------------------------------------
def parse_chrony_tracking(csv_line: str) -> dict[str, Any] | None:
    """Parse ``chronyc -c tracking`` (one CSV line) into a sync report, or None if it is
    not that. Error bound per chrony's docs: |system time offset| + root dispersion +
    root delay / 2."""
    f = csv_line.strip().split(",")
    if len(f) < 14:
        return None
    try:
        offset, root_delay, root_disp = float(f[4]), float(f[10]), float(f[11])
        stratum = int(f[2])
    except ValueError:
        return None
    leap = f[13].strip()
    synced = leap != "Not synchronised" and stratum > 0
    bound = abs(offset) + root_disp + root_delay / 2
    return {"sync": "synchronized" if synced else "unsynchronized", "source": "chrony",
            "error_bound_ns": int(bound * 1e9) if synced else None,
            "details": {"reference": f[1], "stratum": stratum, "system_offset_s": offset,
                        "root_delay_s": root_delay, "root_dispersion_s": root_disp,
                        "frequency_ppm": _float(f[7]), "leap_status": leap}}


def _float(s: str) -> float | None:
    try:
        return float(s)
    except ValueError:
        return None


class _Timex(ctypes.Structure):
    _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long),
                ("status", ctypes.c_int), ("constant", ctypes.c_long),
                ("precision", ctypes.c_long), ("tolerance", ctypes.c_long),
                ("time_sec", ctypes.c_long), ("time_usec", ctypes.c_long),
                ("tick", ctypes.c_long), ("ppsfreq", ctypes.c_long),
                ("jitter", ctypes.c_long), ("shift", ctypes.c_int), ("stabil", ctypes.c_long),
                ("jitcnt", ctypes.c_long), ("calcnt", ctypes.c_long),
                ("errcnt", ctypes.c_long), ("stbcnt", ctypes.c_long), ("tai", ctypes.c_int),
                ("_pad", ctypes.c_int * 11)]


_STA_UNSYNC = 0x0040
_TIME_ERROR = 5


def kernel_clock_sync() -> dict[str, Any] | None:
    """The kernel's own view (adjtimex, read-only): synchronised or not, and its maximum
    error bound (maintained by whichever NTP/PTP daemon disciplines the clock)."""
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        tx = _Timex()
        rc = libc.adjtimex(ctypes.byref(tx))
    except (OSError, AttributeError):
        return None
    if rc < 0:
        return None
    synced = not (tx.status & _STA_UNSYNC) and rc != _TIME_ERROR
    return {"sync": "synchronized" if synced else "unsynchronized", "source": "adjtimex",
            "error_bound_ns": tx.maxerror * 1000 if synced else None,
            "details": {"maxerror_us": tx.maxerror, "esterror_us": tx.esterror,
                        "status": tx.status, "tai_s": tx.tai, "clock_state": rc}}


def parse_pmc(text: str) -> dict[str, str]:
    """The ``name value`` fields of ``pmc`` RESPONSE blocks (linuxptp's management
    client), later responses overriding earlier ones."""
    out: dict[str, str] = {}
    in_resp = False
    for line in text.splitlines():
        if "RESPONSE MANAGEMENT" in line:
            in_resp = True
            continue
        if not line.strip():
            continue
        if not line.startswith(("\t", " ")):  # "sending: …": a new request
            in_resp = False
            continue
        f = line.split()
        if in_resp and len(f) >= 2:
            out[f[0]] = f[1]
    return out


def ptp4l_state(timeout_s: float = 1.0) -> dict[str, Any] | None:
    """``ptp4l``'s view through ``pmc -u -b 0`` (TIME_STATUS_NP and
    TIME_PROPERTIES_DATA_SET), or None when pmc is missing, fails or gives no answer:
    ``gm_present``, ``gm_identity``, ``master_offset_ns`` (the PHC against the
    grandmaster), ``utc_offset_s`` (TAI − UTC) and ``ptp_timescale``."""
    exe = shutil.which("pmc")
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "-u", "-b", "0", "GET TIME_STATUS_NP",
                              "GET TIME_PROPERTIES_DATA_SET"], capture_output=True,
                             text=True, timeout=timeout_s)
    except (OSError, subprocess.SubprocessError):
        return None
    f = parse_pmc(out.stdout)
    if out.returncode != 0 or "master_offset" not in f:
        return None
    try:
        return {"gm_present": f.get("gmPresent") == "true",
                "gm_identity": f.get("gmIdentity"),
                "master_offset_ns": int(f["master_offset"]),
                "utc_offset_s": int(f["currentUtcOffset"]) if "currentUtcOffset" in f
                else None,
                "ptp_timescale": f.get("ptpTimescale") == "1" if "ptpTimescale" in f
                else None}
    except ValueError:
        return None


def ptp_utc_offset(state: dict[str, Any]) -> tuple[int, int] | None:
    """``(utc_minus_timebase_ns, uncertainty_ns)`` of a PTP hardware clock that ptp4l
    disciplines, from :func:`ptp4l_state`: a grandmaster present on the PTP timescale
    makes the PHC TAI, so UTC = PHC − the TAI−UTC offset, within |master offset|. None
    when that does not hold (no grandmaster, ARB timescale, offset unknown)."""
    if not state.get("gm_present") or state.get("ptp_timescale") is not True \
            or state.get("utc_offset_s") is None:
        return None
    return -int(state["utc_offset_s"]) * 1_000_000_000, abs(int(state["master_offset_ns"]))


def system_clock_sync(timeout_s: float = 1.0) -> dict[str, Any]:
    """How well the system clock (CLOCK_REALTIME) tracks UTC: chrony if it answers, else
    the kernel's adjtimex view, else unknown. ``error_bound_ns`` is None whenever the
    clock is not known to be synchronised -- an unsynchronised clock has no bound."""
    exe = shutil.which("chronyc")
    if exe:
        try:
            out = subprocess.run([exe, "-c", "tracking"], capture_output=True, text=True,
                                 timeout=timeout_s)
            if out.returncode == 0:
                rep = parse_chrony_tracking(out.stdout.splitlines()[0] if out.stdout else "")
                if rep is not None:
                    return rep
        except (OSError, subprocess.SubprocessError):
            pass
    rep = kernel_clock_sync()
    if rep is not None:
        return rep
    return {"sync": "unknown", "source": "system", "error_bound_ns": None, "details": {}}


# -- the clock stage -----------------------------------------------------------------------
class ClockOptions(BaseModel):
    """``[clock.options]`` of the rig file. ``latency_ms`` maps a stream name to its known
    fixed one-way latency (an audio path's buffering, measured once; docs/clock.md),
    subtracted from that stream's times."""

    model_config = ConfigDict(extra="forbid")

    window_s: float = Field(default=60.0, gt=0, le=3600)
    bucket_s: float = Field(default=1.0, gt=0, le=60)
    jump_threshold_ms: float = Field(default=10.0, gt=0)
    lock_uncertainty_ms: float = Field(default=1.0, gt=0)
    latency_ms: dict[str, float] = Field(default_factory=dict)
    quality_period_s: float = Field(default=1.0, ge=1.0)
    utc_period_s: float = Field(default=10.0, ge=1.0)
    #: a clock domain maps by its reference (PPS) estimator while the newest reference is
    #: at most this much device time away; beyond, by its members' own arrivals
    ref_holdover_s: float = Field(default=60.0, gt=0, le=86_400)

    def params(self, stream: str, sample_count: bool = False) -> EstimatorParams:
        """The estimator settings of ``stream``; ``sample_count``: its device clock is an
        ADC's sample count (see :meth:`EstimatorParams.for_sample_count`)."""
        p = EstimatorParams(
            window_s=self.window_s, bucket_s=self.bucket_s,
            rebuild_s=8.0 * self.bucket_s,
            jump_threshold_ns=int(self.jump_threshold_ms * 1e6),
            lock_uncertainty_ns=int(self.lock_uncertainty_ms * 1e6),
            latency_ns=self.latency_ns(stream))
        return p.for_sample_count() if sample_count else p

    def latency_ns(self, stream: str) -> int:
        return int(round(self.latency_ms.get(stream, 0.0) * 1e6))


def quality_topic(stream: str) -> str:
    """``/camera/front`` → ``/clock/camera/front``."""
    return "/clock/" + stream.lstrip("/")


class _Stream:
    """Per-stream mapping state. Written by the stream's reader thread only."""

    __slots__ = ("name", "source", "est", "arrival", "samples", "no_device_time",
                 "bad_device_time", "rate_num", "rate_den", "last_emit_ns", "emitted",
                 "domain", "kind", "refs")

    def __init__(self, name: str):
        self.name = name
        self.source: str | None = None
        self.est: ClockEstimator | None = None
        self.arrival: ArrivalClock | None = None
        self.samples = 0
        self.no_device_time = 0    # samples of an estimator stream without a device time
        self.bad_device_time = 0   # device times that are not integers
        self.rate_num = 0          # audio: nominal sample rate as a fraction
        self.rate_den = 1
        self.last_emit_ns: int | None = None
        self.emitted = 0
        self.domain: _Domain | None = None
        self.kind: StreamKind | None = None
        self.refs = 0              # reference samples (PPS edges) this stream carried


#: a reference sample whose arrival is further than this from what the domain's arrival
#: fallback maps its device time to is mislabelled (PPS labels assume NMEA < 0.5 s late)
_REF_LABEL_TOL_NS = 500_000_000


class _Domain:
    """Streams sharing one device clock. ``ref`` learns only from reference samples (PPS
    edges); ``fallback`` from the members' other samples (their arrival). Members may be
    stamped from different reader threads: ``lock`` serialises the estimators."""

    __slots__ = ("name", "ref", "fallback", "ref_source", "fallback_source", "lock",
                 "ref_samples", "mapped_ref", "mapped_fallback", "holdover_ns",
                 "ref_rejected")

    def __init__(self, name: str, holdover_ns: int):
        self.name = name
        self.ref: ClockEstimator | None = None
        self.fallback: ClockEstimator | None = None
        self.ref_source = "reference"
        self.fallback_source = "estimator"
        self.lock = threading.Lock()
        self.ref_samples = 0
        self.mapped_ref = 0        # member samples mapped by the reference estimator
        self.mapped_fallback = 0   # ... and by the arrival fallback
        self.ref_rejected = 0      # references the arrival fallback contradicts (> 0.5 s)
        self.holdover_ns = holdover_ns

    def ref_usable(self, dev: int) -> bool:
        """The reference estimator has data within the holdover of ``dev``."""
        r = self.ref
        return (r is not None and r.last_dev_ns is not None
                and abs(dev - r.last_dev_ns) <= self.holdover_ns)


class ClockStage:
    """Sets ``t_ns`` on every sample. One instance per pipeline; ``stamp`` is called from
    several reader threads, each stream only ever from its own thread. ``quality``,
    ``summary``, ``poll_quality`` may be called from any thread."""

    def __init__(self, timebase: Timebase,
                 options: ClockOptions | Mapping[str, Any] | None = None):
        self.timebase = timebase
        if options is None:
            options = ClockOptions()
        elif not isinstance(options, ClockOptions):
            options = ClockOptions.model_validate(dict(options))
        self.options = options
        self._streams: dict[str, _Stream] = {}
        self._configured: dict[str, StreamInfo] = {}
        self._domains: dict[str, _Domain] = {}
        self._lock = threading.Lock()  # stream creation only; stamping takes no lock
        self._utc_last_ns: int | None = None

    # -- set-up (before start) -----------------------------------------------------------
    def configure_stream(self, info: StreamInfo) -> None:
        """Declare a stream before capture (optional but recommended): it then has a
        clock-quality topic, and audio streams (``kind`` AUDIO with ``params
        ["sample_rate"]`` or ``rate_hz``) are mapped from their sample count, learning
        from each block's end."""
        self._configured[info.name] = info
        st = self._get(info.name)
        st.kind = info.kind
        dom = info.params.get("clock_domain") if info.params else None
        if not dom and info.kind == StreamKind.TIMEREF and info.name.endswith("/timeref"):
            dom = info.name[: -len("/timeref")]
        if isinstance(dom, str) and dom:
            self._join(st, dom)
            if dom != info.name and dom in self._streams:
                base = self._streams[dom]
                if base.domain is None:
                    self._join(base, dom)
        elif info.name in self._domains:  # the base of a timeref declared before it
            self._join(st, info.name)
        if info.kind == StreamKind.AUDIO:
            rate = info.params.get("sample_rate", info.rate_hz)
            if rate and float(rate) > 0:
                fr = Fraction(float(rate)).limit_denominator(1_000_000)
                st.rate_num, st.rate_den = fr.numerator, fr.denominator

    def _join(self, st: _Stream, name: str) -> _Domain:
        """Put a stream into the clock domain ``name`` (created on first use)."""
        with self._lock:
            d = self._domains.get(name)
            if d is None:
                d = self._domains[name] = _Domain(
                    name, int(self.options.ref_holdover_s * 1e9))
            st.domain = d
        if st.kind in (StreamKind.GPS, StreamKind.TIMEREF):
            d.fallback_source = "nmea-arrival"
        return d

    def reset_stream(self, stream: str, keep_skew: bool = False) -> None:
        """A driver that knows its device clock changed (switched to PTP, rebooted) says
        so here; see :meth:`ClockEstimator.reset`. Reader thread of that stream (for a
        domain member: both of the domain's estimators)."""
        st = self._streams.get(stream)
        if st is None:
            return
        if st.domain is not None:
            with st.domain.lock:
                for e in (st.domain.ref, st.domain.fallback):
                    if e is not None:
                        e.reset(keep_skew)
        elif st.est is not None:
            st.est.reset(keep_skew)

    def _get(self, name: str) -> _Stream:
        st = self._streams.get(name)
        if st is None:
            with self._lock:
                st = self._streams.get(name)
                if st is None:
                    st = self._streams[name] = _Stream(name)
        return st

    # -- hot path ------------------------------------------------------------------------
    def stamp(self, sample: Sample, device_clock_is_timebase: bool) -> None:
        """Set ``sample.t_ns``. Reader thread of ``sample.stream``; never blocks."""
        st = self._streams.get(sample.stream) or self._get(sample.stream)
        st.samples += 1
        dev = sample.device_t_ns
        if dev is not None and not (isinstance(dev, (int, np.integer))
                                    and not isinstance(dev, bool)):
            st.bad_device_time += 1
            dev = None
        if device_clock_is_timebase and dev is not None:
            if st.source is None:
                st.source = "device=timebase"
            sample.t_ns = int(dev)
            return
        rx = self.timebase.from_monotonic(sample.host_rx_ns)
        meta = sample.meta
        if st.domain is not None or (meta and meta.get("clock_ref")):
            self._stamp_domain(st, sample, dev, rx)
            return
        est = st.est
        if dev is not None:
            if est is None:
                est = st.est = ClockEstimator(self.options.params(
                    sample.stream, sample_count=bool(st.rate_num)))
                st.source = "sample-count" if st.rate_num else "estimator"
            elif meta and meta.get("discontinuity"):
                est.reset(keep_skew=True)  # the driver says its clock restarted (reconnect)
            dev = int(dev)
            span = self._span_ns(st, sample)
            if span:
                # data can only arrive after its last part: learn from the span's end (at
                # the arrival of that part when the driver gives it)
                est.update(dev + span, self._span_rx(sample, rx))
                sample.t_ns = est.map(dev)
            else:
                sample.t_ns = est.update(dev, rx)
            return
        if est is not None:  # an estimator stream without a device time this once
            st.no_device_time += 1
            sample.t_ns = rx - est.latency_ns
            return
        arr = st.arrival
        if arr is None:
            arr = st.arrival = ArrivalClock(self.options.latency_ns(sample.stream))
            st.source = "arrival"
        sample.t_ns = arr.update(rx)

    def _stamp_domain(self, st: _Stream, sample: Sample, dev: Any, rx: int) -> None:
        """A member of a clock domain (see the module doc). Reader thread of the stream;
        takes the domain's lock (uncontended unless members come from several drivers)."""
        d = st.domain
        meta = sample.meta
        ref = bool(meta and meta.get("clock_ref"))
        if d is None:  # references on a stream never declared: it is its own domain
            d = self._join(st, st.name)
        if dev is None:
            st.no_device_time += 1
            lat = self.options.latency_ns(st.name)
            sample.t_ns = rx - (0 if ref else lat)
            if st.source is None:
                st.source = "arrival"
            return
        dev = int(dev)
        with d.lock:
            if ref:
                st.refs += 1
                d.ref_samples += 1
                if isinstance(meta.get("clock_ref"), str):
                    d.ref_source = meta["clock_ref"]
                fb = d.fallback
                if (fb is not None and fb.last_dev_ns is not None
                        and abs(rx - fb.map(dev)) > _REF_LABEL_TOL_NS):
                    # a reference labelled with the wrong second (its label came from a
                    # late NMEA epoch): the members' own arrivals disagree by ~1 s
                    d.ref_rejected += 1
                    sample.t_ns = rx
                    return
                if d.ref is None:
                    d.ref = ClockEstimator(self.options.params(st.name))
                elif meta.get("discontinuity"):
                    d.ref.reset(keep_skew=True)
                sample.t_ns = d.ref.update(dev, rx)
                st.source = d.ref_source
                return
            fb = d.fallback
            if fb is None:
                fb = d.fallback = ClockEstimator(self.options.params(d.name))
            elif meta and meta.get("discontinuity"):
                fb.reset(keep_skew=True)
            span = self._span_ns(st, sample)
            if span:
                fb.update(dev + span, self._span_rx(sample, rx))
                t_fb = fb.map(dev)
            else:
                t_fb = fb.update(dev, rx)
            if d.ref_usable(dev):
                sample.t_ns = d.ref.map(dev)  # type: ignore[union-attr]
                st.source = d.ref_source
                d.mapped_ref += 1
            else:
                sample.t_ns = t_fb
                st.source = d.fallback_source
                d.mapped_fallback += 1

    def _span_rx(self, sample: Sample, rx: int) -> int:
        """Arrival (timebase) of the part that ends the sample's span:
        ``meta["span_rx_ns"]`` (host monotonic) when the driver gives it, else ``rx``."""
        v = sample.meta.get("span_rx_ns") if sample.meta else None
        if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
            return self.timebase.from_monotonic(int(v))
        return rx

    @staticmethod
    def _span_ns(st: _Stream, sample: Sample) -> int:
        """Device-time length of the sample's data: ``meta["device_span_ns"]`` if the driver
        says, else for audio ``frames / sample_rate``."""
        span = sample.meta.get("device_span_ns") if sample.meta else None
        if isinstance(span, int) and span > 0:
            return span
        if st.rate_num:
            p = sample.payload
            frames = p.shape[0] if isinstance(p, np.ndarray) and p.ndim else 0
            return frames * 1_000_000_000 * st.rate_den // st.rate_num
        return 0

    # -- reporting -----------------------------------------------------------------------
    def quality(self, stream: str) -> dict[str, Any]:
        """The stream's clock quality now (empty dict for an unknown stream). Any thread."""
        st = self._streams.get(stream)
        if st is None:
            return {}
        if st.domain is not None and st.source is not None:
            return self._domain_quality(st)
        if st.est is not None:
            q = st.est.quality()
            if st.rate_num:
                s = st.est.skew_ppm * 1e-6
                q["drift_ppm"] = round((1.0 / (1.0 + s) - 1.0) * 1e6, 4)
                q["nominal_rate_hz"] = st.rate_num / st.rate_den
            q["source"] = st.source
        elif st.arrival is not None:
            q = st.arrival.quality()
        elif st.source == "device=timebase":
            q = {"source": "device=timebase", "state": "device=timebase", "offset_ns": 0,
                 "skew_ppm": 0.0, "jitter_ns": None, "uncertainty_ns": 0, "jumps": 0}
        else:
            q = {"source": None, "state": LockState.UNLOCKED.value}
        q["samples"] = st.samples
        if st.no_device_time:
            q["no_device_time"] = st.no_device_time
        if st.bad_device_time:
            q["bad_device_time"] = st.bad_device_time
        return q

    def _domain_quality(self, st: _Stream) -> dict[str, Any]:
        """Quality of a domain member: the estimator its newest sample was mapped by."""
        d = st.domain
        assert d is not None
        use_ref = st.source == d.ref_source and d.ref is not None
        est = d.ref if use_ref else d.fallback
        if st.source == "arrival" or est is None:  # no device time seen on this stream
            q: dict[str, Any] = {"state": "arrival" if st.source == "arrival" else
                                 LockState.UNLOCKED.value, "offset_ns": None,
                                 "skew_ppm": None, "jitter_ns": None, "uncertainty_ns": None,
                                 "jumps": 0}
        else:
            q = est.quality()
        q.update(source=st.source, domain=d.name, ref_samples=d.ref_samples,
                 ref_rejected=d.ref_rejected, mapped_by_ref=d.mapped_ref,
                 mapped_by_fallback=d.mapped_fallback, samples=st.samples)
        if use_ref and d.fallback is not None and d.fallback.last_dev_ns is not None:
            # what the members' own arrivals say: the receiver's output latency
            dv = d.fallback.last_dev_ns
            q["fallback_minus_ref_ns"] = d.fallback.map(dv) - d.ref.map(dv)  # type: ignore
        if st.no_device_time:
            q["no_device_time"] = st.no_device_time
        if st.bad_device_time:
            q["bad_device_time"] = st.bad_device_time
        return q

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per stream quality, for manifests (``manifest["clock"]``) and health. Any thread."""
        return {name: self.quality(name) for name in list(self._streams)}

    def quality_stream_infos(self) -> list[StreamInfo]:
        """The clock-quality streams to declare to the recorder (one per configured stream,
        plus ``/clock/utc``). Call after :meth:`configure_stream` for every stream."""
        rate = 1.0 / self.options.quality_period_s
        infos = [StreamInfo(quality_topic(name), StreamKind.CLOCK, "json", rate_hz=rate,
                            params={"schema": QUALITY_SCHEMA, "stream": name,
                                    "json_schema": CLOCK_QUALITY_JSON_SCHEMA})
                 for name in self._configured]
        infos.append(StreamInfo(UTC_TOPIC, StreamKind.CLOCK, "json",
                                rate_hz=1.0 / self.options.utc_period_s,
                                params={"schema": UTC_SCHEMA,
                                        "json_schema": UTC_JSON_SCHEMA}))
        return infos

    def poll_quality(self, now_ns: int, include_utc: bool = True) -> list[Sample]:
        """Clock-quality samples due at ``now_ns`` (timebase): per stream at most one per
        ``quality_period_s``, and the timebase↔UTC mapping every ``utc_period_s``. Call
        periodically from one housekeeping thread; blocks up to ~1 s when the UTC mapping
        asks a slow ``chronyc``. Streams seen but not configured are reported too."""
        out: list[Sample] = []
        period = int(self.options.quality_period_s * 1e9)
        mono = time.monotonic_ns()
        for name in list(self._streams):
            st = self._streams[name]
            if st.samples == 0:
                continue
            if st.last_emit_ns is not None and now_ns - st.last_emit_ns < period:
                continue
            st.last_emit_ns = now_ns
            payload = {"stream": name, **self.quality(name)}
            out.append(Sample(quality_topic(name), payload, host_rx_ns=mono, seq=st.emitted,
                              t_ns=now_ns))
            st.emitted += 1
        utc_period = int(self.options.utc_period_s * 1e9)
        if include_utc and (self._utc_last_ns is None
                            or now_ns - self._utc_last_ns >= utc_period):
            self._utc_last_ns = now_ns
            out.append(Sample(UTC_TOPIC, self.utc_mapping(), host_rx_ns=mono,
                              t_ns=now_ns))
        return out

    def utc_mapping(self) -> dict[str, Any]:
        """``UTC ≈ timebase + utc_minus_timebase_ns`` now. From GPS + PPS when a clock
        domain's reference estimator (PPS edges labelled with their UTC second) is LOCKED
        and its newest edge is at most ``ref_holdover_s`` old: ``source`` ``gps-pps``,
        ``sync`` ``pps``, the uncertainty that estimator states (growing with the edge's
        age), and in ``details`` the system clock's own mapping (``system``) and how far
        it is off (``system_minus_pps_ns``). Otherwise the system clock's
        (:meth:`Timebase.utc_mapping`). Any thread; blocks like that method (chronyc)."""
        system = self.timebase.utc_mapping()
        pps = self._pps_utc(int(system["timebase_ns"]))
        if pps is None:
            return system
        pps["details"]["system"] = {k: system[k] for k in (
            "utc_minus_timebase_ns", "uncertainty_ns", "sync", "source")}
        pps["details"]["system_minus_pps_ns"] = (int(system["utc_minus_timebase_ns"])
                                                 - pps["utc_minus_timebase_ns"])
        return pps

    def _pps_utc(self, now_tb: int) -> dict[str, Any] | None:
        """The best (least uncertain) UTC mapping any domain's PPS estimator gives at
        timebase ``now_tb``, or None. Its device time is UTC, so UTC at ``now_tb`` is the
        device time that maps there (solved by two fixed-point steps: exact to skew²)."""
        holdover = int(self.options.ref_holdover_s * 1e9)
        best: dict[str, Any] | None = None
        for d in list(self._domains.values()):
            with d.lock:
                r = d.ref
                if r is None or r.state is not LockState.LOCKED or r.last_dev_ns is None:
                    continue
                last = r.last_dev_ns
                last_tb = r.map(last)
                age = now_tb - last_tb
                if not -holdover <= age <= holdover:
                    continue
                utc = now_tb - (last_tb - last)
                utc = now_tb - (r.map(utc) - utc)
                unc = r.uncertainty_at(utc)
                n = d.ref_samples
            if unc is None or (best is not None and unc >= best["uncertainty_ns"]):
                continue
            best = {"timebase": self.timebase.kind, "timebase_ns": now_tb,
                    "utc_minus_timebase_ns": utc - now_tb, "uncertainty_ns": unc,
                    "sync": "pps", "source": "gps-pps",
                    "details": {"domain": d.name, "pps_edges": n,
                                "edge_age_ms": round(age / 1e6, 3)}}
        return best
