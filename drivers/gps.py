"""GPS receiver over a serial port speaking NMEA 0183 (``gps.nmea``), with an optional PPS.

    serial bytes ──read──▶ NmeaDecoder.feed ──frames──▶ pynmeagps parse ──▶ epochs
        epoch ──▶ Sample(/gps, LocationFix dict)  +  Sample(/gps/timeref, {utc_ns, host_rx_ns})
    PpsSource.fetch (own thread) ──▶ Sample(/gps/timeref, {pps_assert_ns, pps_seq, utc_ns})

An *epoch* is one fix cycle: the burst of sentences (GGA, RMC, ZDA, GSA, VTG) the
receiver sends for one fix time. ``device_t_ns`` of a fix is the UTC of the fix in ns
since the Unix epoch (from the sentences: time of day from GGA/RMC/ZDA, date from RMC/ZDA
or carried over); ``host_rx_ns`` is the host-monotonic arrival of the first byte of the
epoch's first sentence, measured at the read and back-dated within a read chunk by the
byte time of the configured baud (``10 / baud`` s a character).

Bad input is counted, never raised. ``sentences`` counts the good ones; ``corrupt``
(sentences failing their checksum, cut short or unparsable), ``garbage_bytes`` (bytes
outside any ``$…\\n`` frame), ``ignored`` (well-formed sentences of other types),
``startup_skipped_bytes`` (the tail of a sentence the port was opened in the middle of:
the bytes before the first ``$``, at most a frame's length; not a defect), ``no_fix``
(fixes with quality 0), ``incomplete_epochs`` (an epoch without GGA or RMC:
no position, no fix sample), ``untimed_epochs`` (no sentence with a valid time),
``late_sentences`` (a sentence of an epoch already closed), ``time_jumps`` (UTC not
increasing), ``pps_events`` / ``pps_missed`` (sequence jumps). Missing epochs (a gap in
the UTC sequence) are recorded with ``record_gap(n, "missing_epochs")`` (cause
``"disconnect"`` after a reopen).
"""

from __future__ import annotations

import datetime as _dt
import errno
import math
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator
from urllib.parse import parse_qs, urlsplit

from pydantic import Field, field_validator
from pynmeagps import NMEAReader
from pynmeagps.nmeatypes_core import VALCKSUM

from agent.errors import DriverError
from agent.types import Sample, StreamInfo, StreamKind

from .base import Counters, Driver, DriverOptions
from .pps import PpsEvent, PpsSource, open_pps, serial_open_hint
from .registry import register

NS = 1_000_000_000
DAY_NS = 86_400 * NS
KNOT_MPS = 1852.0 / 3600.0
MAX_FRAME = 256  # NMEA caps a sentence at 82 chars; proprietary ones run longer
#: bytes before the first ``$`` after opening the port that are taken as the tail of a
#: sentence begun before we listened (``startup_skipped_bytes``), not as garbage
SYNC_MAX_BYTES = MAX_FRAME
USED = ("GGA", "RMC", "ZDA", "GSA", "VTG")
TIMED = ("GGA", "RMC", "ZDA")
STANDARD_BAUDS = (4800, 9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600)


# -- framing and parsing -----------------------------------------------------------------
@dataclass
class Epoch:
    """The sentences of one fix cycle, by message id, as the decoder closed it."""

    rx_ns: int
    first_msg: str
    tod_ns: int | None = None
    date: _dt.date | None = None
    msgs: dict[str, Any] = field(default_factory=dict)
    utc_ns: int | None = None


#: fields a timed sentence has at least (NMEA 0183 2.x; later versions append more)
MIN_FIELDS = {"GGA": 14, "RMC": 11, "ZDA": 6}
_TIME_FIELD = re.compile(r"\d{6}(\.\d+)?")


def parse_sentence(line: bytes) -> Any | None:
    """One framed line (``$…\\n``) → a pynmeagps message, or None when it fails its
    checksum, cannot be parsed, or is a timed sentence (GGA/RMC/ZDA) with too few fields or
    a time field that is not ``hhmmss[.ss]``: the 8-bit XOR checksum lets two sentences
    spliced by a lost run of bytes pass now and then, and such a splice must not become a
    fix at a wrong time. Never raises."""
    try:
        msg = NMEAReader.parse(line, validate=VALCKSUM)
    except Exception:
        return None
    mid = getattr(msg, "msgID", "")
    if mid in MIN_FIELDS:
        payload = getattr(msg, "payload", None) or []
        if len(payload) < MIN_FIELDS[mid] or (
                payload[0] and not _TIME_FIELD.fullmatch(str(payload[0]))):
            return None
    return msg


def _tod_ns(t: Any) -> int | None:
    if not isinstance(t, _dt.time):
        return None
    return ((t.hour * 60 + t.minute) * 60 + t.second) * NS + t.microsecond * 1000


def _days_ns(d: _dt.date) -> int:
    return (d - _dt.date(1970, 1, 1)).days * DAY_NS


class NmeaDecoder:
    """Bytes from the port → closed :class:`Epoch` s. Called from one thread (the driver's
    reader); never raises on any input; counts into ``counters``.

    Framing: a frame runs from ``$`` to ``\\n``; a ``$`` inside a frame cuts it (counted
    corrupt) and starts a new one; bytes outside frames are ``garbage_bytes``.

    Epoch boundaries, in order: a timed sentence (GGA/RMC/ZDA) with another time of day, or
    a sentence type already in the epoch, starts a new epoch; the type that ended the last
    clean epoch (learned, like gpsd's cycle end) closes it at once; so does ``idle`` when
    the line has been quiet for ``idle_ns``.
    """

    def __init__(self, counters: Counters, char_ns: int = 1_041_667):
        self.counters = counters
        self.char_ns = char_ns
        self.cycle_end: str | None = None
        self.last_date: _dt.date | None = None
        self.last_tod: int | None = None
        self.last_closed_tod: int | None = None
        self.reset_stream()

    def reset_stream(self) -> None:
        """Forget a partial frame and the open epoch (after a reopen of the port)."""
        self._frame: bytearray | None = None
        self._skip = False
        self._frame_rx = 0
        self._prev_read_ns = 0
        self._last_byte_ns = 0
        self._cur: Epoch | None = None
        self._last_added = ""
        self._dirty = False

    # -- bytes → frames --------------------------------------------------------------
    def feed(self, data: bytes, t_read_ns: int) -> list[Epoch]:
        """Take one read's bytes (``t_read_ns``: monotonic time the read returned)."""
        out: list[Epoch] = []
        n = len(data)
        if not n:
            return out
        floor = self._prev_read_ns
        self._prev_read_ns = self._last_byte_ns = t_read_ns

        def rx(i: int) -> int:
            return max(floor, t_read_ns - (n - 1 - i) * self.char_ns)

        i = 0
        while i < n:
            if self._skip:  # the rest of an overlong frame, up to its '\n' or a new '$'
                nl, dl = data.find(b"\n", i), data.find(b"$", i)
                if dl >= 0 and (nl < 0 or dl < nl):
                    self._skip, i = False, dl
                elif nl >= 0:
                    self._skip, i = False, nl + 1
                else:
                    break
                continue
            if self._frame is None:
                j = data.find(b"$", i)
                if j < 0:
                    self._garbage(n - i)
                    break
                if j > i:
                    self._garbage(j - i)
                self._frame, self._frame_rx = bytearray(b"$"), rx(j)
                i = j + 1
                continue
            nl, dl = data.find(b"\n", i), data.find(b"$", i)
            if dl >= 0 and (nl < 0 or dl < nl):  # a new '$' cuts the frame short
                self._corrupt()
                self._frame = None
                i = dl
                continue
            if nl < 0:
                self._frame += data[i:]
                if len(self._frame) > MAX_FRAME:
                    self._corrupt()
                    self._frame, self._skip = None, True
                break
            self._frame += data[i:nl + 1]
            i = nl + 1
            line, line_rx, self._frame = bytes(self._frame), self._frame_rx, None
            if len(line) > MAX_FRAME:
                self._corrupt()
                continue
            out.extend(self._sentence(line, line_rx))
        return out

    def idle(self, now_ns: int, idle_ns: int) -> list[Epoch]:
        """Close the open epoch when no byte came for ``idle_ns`` (call on empty reads)."""
        if self._cur is not None and now_ns - self._last_byte_ns >= idle_ns:
            return [self._close()]
        return []

    def flush(self) -> list[Epoch]:
        """Close the open epoch now (end of input)."""
        return [self._close()] if self._cur is not None else []

    def _garbage(self, k: int) -> None:
        self.counters.inc("garbage_bytes", k)
        self._dirty = True

    def _corrupt(self) -> None:
        self.counters.inc("corrupt")
        self._dirty = True

    # -- frames → epochs -------------------------------------------------------------
    def _sentence(self, line: bytes, rx_ns: int) -> list[Epoch]:
        msg = parse_sentence(line)
        if msg is None:
            self._corrupt()
            return []
        mid = getattr(msg, "msgID", "")
        if mid not in USED:
            self.counters.inc("ignored")
            return []
        self.counters.inc("sentences")
        tod = _tod_ns(getattr(msg, "time", None)) if mid in TIMED else None
        out: list[Epoch] = []
        cur = self._cur
        if cur is not None and ((tod is not None and cur.tod_ns is not None
                                 and tod != cur.tod_ns) or mid in cur.msgs):
            learn = not self._dirty
            last = self._last_added
            out.append(self._close())
            if learn:
                self.cycle_end = last
        if tod is not None and tod == self.last_closed_tod and (
                self._cur is None or self._cur.tod_ns is None):
            # the tail of an epoch already closed (by an idle flush or a wrong cycle end)
            late = [mid] + (list(self._cur.msgs) if self._cur is not None else [])
            self.counters.inc("late_sentences", len(late))
            self._cur = None
            if self.cycle_end is not None and self.cycle_end not in late:
                self.cycle_end = None  # it ended too early: learn it again
            return out
        if self._cur is None:
            self._cur = Epoch(rx_ns, mid)
            self._dirty = False
        cur = self._cur
        cur.msgs[mid] = msg
        self._last_added = mid
        if tod is not None and cur.tod_ns is None:
            cur.tod_ns = tod
        if cur.date is None:
            cur.date = _date_of(mid, msg)
        if mid == self.cycle_end:
            out.append(self._close())
        return out

    def _close(self) -> Epoch:
        ep, self._cur = self._cur, None
        assert ep is not None
        self.last_closed_tod = ep.tod_ns
        if ep.tod_ns is None:
            self.counters.inc("untimed_epochs")
            return ep
        date = ep.date
        if date is None and self.last_date is not None and self.last_tod is not None:
            date = self.last_date
            if ep.tod_ns < self.last_tod - DAY_NS // 2:  # midnight passed since
                date = date + _dt.timedelta(days=1)
        if date is not None:
            ep.utc_ns = _days_ns(date) + ep.tod_ns
            self.last_date, self.last_tod = date, ep.tod_ns
        return ep


def _date_of(mid: str, msg: Any) -> _dt.date | None:
    try:
        if mid == "RMC":
            d = getattr(msg, "date", None)
            return d if isinstance(d, _dt.date) else None
        if mid == "ZDA":
            return _dt.date(int(msg.year), int(msg.month), int(msg.day))
    except (AttributeError, TypeError, ValueError):
        return None
    return None


def _num(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else math.nan


def epoch_fix(ep: Epoch, uere_m: float) -> dict[str, Any] | None:
    """The LocationFix payload of an epoch, or None without GGA and RMC. Missing values
    are NaN (no fix: lat/lon NaN, fix_quality 0, covariance None). ``alt`` is above the
    WGS84 ellipsoid (GGA altitude + geoid separation). Covariance: ENU diagonal from
    HDOP×UERE (horizontal) and VDOP×UERE (vertical; 1.5× horizontal without GSA)."""
    gga, rmc = ep.msgs.get("GGA"), ep.msgs.get("RMC")
    if gga is None and rmc is None:
        return None
    gsa, vtg = ep.msgs.get("GSA"), ep.msgs.get("VTG")
    src = gga if gga is not None else rmc
    lat, lon = _num(getattr(src, "lat", None)), _num(getattr(src, "lon", None))
    if gga is not None:
        q = getattr(gga, "quality", 0)
        quality = q if isinstance(q, int) else 0
    else:
        status, mode = getattr(rmc, "status", ""), getattr(rmc, "posMode", "")
        quality = 0 if status != "A" else (2 if mode == "D" else 1)
    if math.isnan(lat) or math.isnan(lon):
        quality = 0
    alt = _num(getattr(gga, "alt", None))
    sep = _num(getattr(gga, "sep", None))
    if not math.isnan(sep):
        alt += sep
    hdop = _num(getattr(gga, "HDOP", None))
    if math.isnan(hdop):
        hdop = _num(getattr(gsa, "HDOP", None))
    vdop = _num(getattr(gsa, "VDOP", None))
    sats = getattr(gga, "numSV", None)
    if not isinstance(sats, int) and gsa is not None:
        sats = sum(1 for k in range(1, 13) if isinstance(getattr(gsa, f"svid_{k:02d}", ""), int))
    speed = _num(getattr(rmc, "spd", None)) * KNOT_MPS
    if math.isnan(speed) and vtg is not None:
        speed = _num(getattr(vtg, "sogk", None)) / 3.6
        if math.isnan(speed):
            speed = _num(getattr(vtg, "sogn", None)) * KNOT_MPS
    course = _num(getattr(rmc, "cog", None))
    if math.isnan(course):
        course = _num(getattr(vtg, "cogt", None))
    cov = None
    if quality > 0 and not math.isnan(hdop):
        h = (hdop * uere_m) ** 2
        v = (vdop * uere_m) ** 2 if not math.isnan(vdop) else 2.25 * h
        cov = [h, 0.0, 0.0, 0.0, h, 0.0, 0.0, 0.0, v]
    return {"lat": lat if quality else math.nan, "lon": lon if quality else math.nan,
            "alt": alt if quality else math.nan, "fix_quality": quality, "hdop": hdop,
            "satellites": sats if isinstance(sats, int) else 0, "speed_mps": speed,
            "course_deg": course, "covariance": cov, "utc_ns": ep.utc_ns}


# -- the driver ------------------------------------------------------------------------------
def parse_serial_uri(uri: str, default_baud: int) -> tuple[str, int]:
    """``serial:///dev/ttyUSB0?baud=9600`` or a plain path → ``(path, baud)``."""
    if uri.startswith("serial:"):
        u = urlsplit(uri)
        path = u.path
        q = parse_qs(u.query)
        try:
            baud = int(q["baud"][-1]) if "baud" in q else default_baud
        except ValueError:
            raise DriverError(f"{uri}: baud must be an integer") from None
    elif uri.startswith("/"):
        path, baud = uri, default_baud
    else:
        raise DriverError(f"{uri!r}: expected serial:///dev/ttyX?baud=N or a device path")
    if not path:
        raise DriverError(f"{uri!r}: no device path")
    if baud not in STANDARD_BAUDS:
        raise DriverError(f"{uri}: baud {baud} is not one of {STANDARD_BAUDS}")
    return path, baud


class NmeaGpsOptions(DriverOptions):
    baud: int = Field(default=9600, description="used when the URI has no ?baud=")
    #: PPS source URI: /dev/ppsN, dcd:[PORT], pps:emulated?... (None: no PPS)
    pps: str | None = None
    #: user equivalent range error (m) that HDOP/VDOP scale into the covariance
    uere_m: float = Field(default=4.0, gt=0)
    read_timeout_ms: float = Field(default=20.0, gt=0, le=1000)
    #: close an epoch after this much line silence; None: 0.4 × the epoch period
    idle_flush_ms: float | None = Field(default=None, gt=0)

    @field_validator("baud")
    @classmethod
    def _baud(cls, v: int) -> int:
        if v not in STANDARD_BAUDS:
            raise ValueError(f"baud must be one of {STANDARD_BAUDS}")
        return v

    @field_validator("pps")
    @classmethod
    def _pps(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("/dev/", "pps://", "dcd:", "pps:emulated")):
            raise ValueError("expected /dev/ppsN, pps:///dev/ppsN, dcd:[PORT] or "
                             "pps:emulated?...")
        return v


@register("gps.nmea")
class NmeaGps(Driver):
    """NMEA 0183 receiver on a serial port (pyserial) parsed with pynmeagps; streams
    ``<name>`` (kind gps, encoding fix) and ``<name>/timeref`` (kind timeref, json,
    schema edgecap.TimeRef). ``rate_hz`` (the stream's) sets the epoch period for gap
    counting; without it the period is learned from the UTC spacing.

    Iteration runs in the pipeline's reader thread and blocks in the serial read for at
    most ``read_timeout_ms``; a PPS source is read in a helper thread. A lost port raises
    DriverError from the iterator (the pipeline reopens it; the missing epochs are then
    recorded as a gap with cause ``disconnect``).
    """

    Options = NmeaGpsOptions

    def __init__(self, name: str, uri: str, options: NmeaGpsOptions | None = None,
                 rate_hz: float | None = None, calibration: dict[str, Any] | None = None):
        super().__init__(name, uri, options, rate_hz, calibration)
        o: NmeaGpsOptions = self.options  # type: ignore[assignment]
        self.path, self.baud = parse_serial_uri(uri, o.baud)
        self.char_ns = 10 * NS // self.baud
        self.decoder = NmeaDecoder(self.counters, self.char_ns)
        self.period_ns: int | None = int(round(NS / rate_hz)) if rate_hz else None
        self._learned_period: int | None = None
        self._last_utc: int | None = None
        self._last_rx: int | None = None
        self._reopened = False
        self._ever_opened = False
        self._synced, self._sync_skipped = False, 0
        self._ser: Any = None
        self._pps: PpsSource | None = None
        self._pps_q: queue.Queue[PpsEvent] = queue.Queue(maxsize=256)
        self._pps_thread: threading.Thread | None = None
        self._last_pps_seq: int | None = None

    @property
    def timeref_name(self) -> str:
        return f"{self.name}/timeref"

    def streams(self) -> list[StreamInfo]:
        return [StreamInfo(self.name, StreamKind.GPS, "fix", self.rate_hz, frame_id="gps",
                           params={"uri": self.uri, "baud": self.baud}),
                StreamInfo(self.timeref_name, StreamKind.TIMEREF, "json", self.rate_hz,
                           params={"schema": "edgecap.TimeRef",
                                   "pps": self.options.pps})]  # type: ignore[attr-defined]

    # -- lifecycle ---------------------------------------------------------------------
    def _open(self) -> None:
        import serial

        o: NmeaGpsOptions = self.options  # type: ignore[assignment]
        try:
            self._ser = serial.Serial(self.path, self.baud, timeout=o.read_timeout_ms / 1e3)
        except serial.SerialException as e:
            err = OSError(e.errno or errno.EIO, str(e))
            raise DriverError(serial_open_hint(self.path, err)) from None
        except (OSError, ValueError) as e:
            raise DriverError(f"{self.path}: cannot open: {e}") from None
        try:
            self._ser.reset_input_buffer()  # bytes from before we listened have no arrival time
        except Exception:
            pass
        self.decoder.reset_stream()
        self._synced, self._sync_skipped = False, 0
        self._reopened = self._ever_opened
        self._ever_opened = True
        if o.pps:
            try:
                self._pps = open_pps(o.pps, self.path)
            except DriverError:
                self._ser.close()
                raise
            self._pps_thread = threading.Thread(target=self._pps_loop, daemon=True,
                                                name=f"pps {self.name}")
            self._pps_thread.start()

    def _close(self) -> None:
        ser, self._ser = self._ser, None
        if ser is not None:
            try:
                ser.cancel_read()
            except Exception:
                pass
            try:
                ser.close()
            except Exception:
                pass
        if self._pps is not None:
            self._pps.close()
            if self._pps_thread is not None:
                self._pps_thread.join(2.0)
            self._pps, self._pps_thread = None, None

    def _pps_loop(self) -> None:
        src = self._pps
        while src is not None and not self.stopping:
            try:
                ev = src.fetch(0.5)
            except Exception:
                self.counters.inc("pps_errors")
                if self._stop.wait(0.5):
                    return
                continue
            if ev is not None:
                try:
                    self._pps_q.put_nowait(ev)
                except queue.Full:
                    self.counters.inc("pps_dropped")

    # -- samples ---------------------------------------------------------------------
    def _idle_ns(self) -> int:
        ms = self.options.idle_flush_ms  # type: ignore[attr-defined]
        if ms is not None:
            return int(ms * 1e6)
        p = self.period_ns or self._learned_period
        return int(min(max(0.4 * p, 20e6), 300e6)) if p else 100_000_000

    def _samples(self) -> Iterator[Sample]:
        idle_ns = self._idle_ns()
        while not self.stopping:
            ser = self._ser
            try:
                waiting = ser.in_waiting
                data = ser.read(waiting if waiting > 0 else 1)
            except Exception as e:
                if self.stopping:
                    return
                raise DriverError(f"{self.path}: serial port lost ({e}); check the cable "
                                  f"or USB adapter") from None
            now = time.monotonic_ns()
            if data and not self._synced:
                data = self._sync(data)
            epochs = self.decoder.feed(data, now) if data else self.decoder.idle(now, idle_ns)
            for ep in epochs:
                yield from self._epoch_samples(ep)
                idle_ns = self._idle_ns()
            while not self._pps_q.empty():
                yield self._pps_sample(self._pps_q.get_nowait())

    def _sync(self, data: bytes) -> bytes:
        """The port was opened mid-stream: the bytes before the first ``$`` are the tail of
        a sentence the receiver began before we listened, not line noise. They are counted
        as ``startup_skipped_bytes``; past :data:`SYNC_MAX_BYTES` without a ``$`` the line
        is sending something else, and the decoder counts it as garbage from then on."""
        j = data.find(b"$")
        skip = len(data) if j < 0 else j
        room = SYNC_MAX_BYTES - self._sync_skipped
        skip = min(skip, max(0, room))
        if skip:
            self._sync_skipped += skip
            self.counters.inc("startup_skipped_bytes", skip)
        if j >= 0 or skip >= room:
            self._synced = True
        return data[skip:]

    def drain(self) -> Iterator[Sample]:
        """Samples of an epoch still open (after the input ended); reader thread only."""
        for ep in self.decoder.flush():
            yield from self._epoch_samples(ep)

    def _epoch_samples(self, ep: Epoch) -> Iterator[Sample]:
        utc = ep.utc_ns
        if utc is not None:
            self._count_gap(utc)
            self._last_utc, self._last_rx = utc, ep.rx_ns
            yield Sample(self.timeref_name, {"kind": "nmea", "utc_ns": utc, "host_rx_ns": ep.rx_ns,
                                             "first_msg": ep.first_msg,
                                             "sentences": len(ep.msgs)},
                         ep.rx_ns, device_t_ns=utc)
        fix = epoch_fix(ep, self.options.uere_m)  # type: ignore[attr-defined]
        if fix is None:
            if ep.tod_ns is not None:
                self.counters.inc("incomplete_epochs")
            return
        self.counters.inc("received")
        if fix["fix_quality"] == 0:
            self.counters.inc("no_fix")
        if utc is None:
            self.counters.inc("undated")
        yield Sample(self.name, fix, ep.rx_ns, device_t_ns=utc,
                     meta={"first_msg": ep.first_msg, "sentences": sorted(ep.msgs)})

    def _count_gap(self, utc: int) -> None:
        last = self._last_utc
        if last is None:
            return
        d = utc - last
        if d <= 0:
            self.counters.inc("time_jumps")
            return
        if self.period_ns is None:
            p = round(d / 10_000_000) * 10_000_000
            if p > 0 and (self._learned_period is None or p < self._learned_period):
                self._learned_period = p
        period = self.period_ns or self._learned_period
        if not period:
            return
        n = int(round(d / period)) - 1
        if n > 0:
            cause = "disconnect" if self._reopened else "missing_epochs"
            self.record_gap(n, cause, utc_ns=utc)
        self._reopened = False

    def _pps_sample(self, ev: PpsEvent) -> Sample:
        self.counters.inc("pps_events")
        if self._last_pps_seq is not None and ev.seq > self._last_pps_seq + 1:
            self.counters.inc("pps_missed", ev.seq - self._last_pps_seq - 1)
        self._last_pps_seq = ev.seq
        mono = ev.mono_ns if ev.mono_ns is not None else time.monotonic_ns()
        label = None
        if self._last_utc is not None and self._last_rx is not None \
                and abs(mono - self._last_rx) < 10 * NS:
            # the NMEA of the last epoch arrived late by its latency (< 0.5 s) → nearest
            label = round((self._last_utc + mono - self._last_rx) / NS) * NS
        # meta clock_ref: the clock stage maps this receiver's fixes by its PPS edges
        # (one clock domain: <name> and <name>/timeref), not by the NMEA's late arrival
        return Sample(self.timeref_name, {"kind": "pps", "utc_ns": label, "host_rx_ns": mono,
                                          "pps_assert_ns": ev.assert_ns, "pps_seq": ev.seq},
                      mono, device_t_ns=label, seq=ev.seq, meta={"clock_ref": "pps"})


def decode_bytes(data: bytes, counters: Counters | None = None,
                 chunk: int = 64, t0_ns: int = 0) -> tuple[list[Epoch], Counters]:
    """Run the decoder over a byte string in ``chunk``-sized reads (tests, benchmarks,
    offline logs); returns the closed epochs (the last one flushed) and the counters."""
    c = counters if counters is not None else Counters()
    dec = NmeaDecoder(c)
    eps: list[Epoch] = []
    for k in range(0, len(data), chunk):
        eps.extend(dec.feed(data[k:k + chunk], t0_ns + k * dec.char_ns))
    eps.extend(dec.flush())
    return eps, c

