"""GPS receiver emulator: NMEA 0183 over a serial pty, paced at the baud rate, with faults,
an emulated PPS and ground truth.

    emu = GpsEmulator(world, scenario.devices.gps, run_dir, run_t0_ns)
    emu.start()
    emu.uri       # serial://<run_dir>/gps.tty?baud=115200   (a symlink to /dev/pts/N)
    emu.pps_uri   # pps:emulated?...   (for NmeaGpsOptions.pps; emu.pps() gives the object)
    emu.stop()

Time. The receiver's clock is UTC: ``utc_ns = clock.device_ns(true_ns) + utc_minus_device_ns``
(``clock`` is the scenario's offset/drift :class:`DeviceClock`; the shift maps scenario
t = 0 to the next whole second of the host's realtime clock, or to ``options.utc_start``).
Fixes sit at whole multiples of the epoch period in UTC, as real receivers align them; the
burst of sentences of a fix starts ``latency_ms`` + the scenario's arrival jitter after the
fix instant and leaves at the baud rate (10 bits a character), so the last sentence
arrives a byte-time per character later than the first.

Options (``[devices.gps.options]``): ``baud`` (9600), ``talker`` ("GP"), ``sentences``
(order of a burst, default RMC VTG GGA GSA ZDA), ``latency_ms`` (25), ``high_precision``
(7 instead of 5 decimals of arc-minutes), ``geoid_sep_m`` (47), ``fix_quality`` (1),
``pps_jitter_ns`` (1000), ``utc_start`` (ISO 8601), ``link`` (symlink path).

Faults (``[[devices.gps.faults]]``; ``rate`` is the share of epochs/sentences/gaps hit):
``outage`` (no fix: quality 0, empty position, RMC status V; no PPS), ``dropout`` (whole
epochs omitted), ``stall`` (nothing sent), ``bad_checksum`` (checksum digits wrong),
``corrupt`` (one character changed), ``truncate`` (a sentence cut short; the next ``$``
ends it), ``garbage`` (random bytes, never ``$``, between sentences), ``disconnect``
(the pty is closed and its symlink removed, as a USB receiver unplugged; a new pty and
symlink appear when the fault ends; no PPS meanwhile).

Truth (``truth/gps.jsonl``): the clock record, a ``timescale`` record, per sent epoch
``{"type": "sample", "seq", "true_ns", "device_ns" (UTC of the fix), "lat", "lon", "alt",
"speed", "course", "fix_quality", "hdop", "satellites", "sentences", "corrupted",
"corrupted_ids", "garbage_bytes", "bytes", "tx_start_ns"}``, per omitted epoch a ``fault``
record (kind dropout/stall/disconnect/overrun), and at stop one ``pps`` record per edge.
"""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import termios
import threading
import time
import tty
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pynmeagps import NMEAMessage
from pynmeagps.nmeahelpers import ddd2dmm

from agent.config import _problems
from agent.errors import ConfigError
from drivers.pps import EmulatedPps, EmulatedPpsSpec

from ..scenario import DeviceSettings
from ..world import World
from .base import Emulator

log = logging.getLogger("edgecap.hil.gps")

NS = 1_000_000_000
KNOT_MPS = 1852.0 / 3600.0
SentenceId = Literal["RMC", "VTG", "GGA", "GSA", "ZDA"]
_SVIDS = [2, 5, 7, 9, 12, 13, 15, 18, 20, 24, 25, 29, 30, 31]
_SAFE = b"ABCDEFGHJKLMNPQRSTUVWXYZ0123456789"  # replacement characters for "corrupt"


class GpsOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    baud: Literal[4800, 9600, 19200, 38400, 57600, 115200, 230400] = 9600
    talker: str = Field(default="GP", pattern=r"^[A-Z]{2}$")
    sentences: list[SentenceId] = Field(default_factory=lambda: ["RMC", "VTG", "GGA", "GSA",
                                                                  "ZDA"], min_length=1)
    latency_ms: float = Field(default=25.0, ge=0, le=500)
    high_precision: bool = False
    geoid_sep_m: float = 47.0
    fix_quality: int = Field(default=1, ge=1, le=8)
    pps_jitter_ns: int = Field(default=1000, ge=0)
    utc_start: _dt.datetime | None = None
    link: str | None = None


class GpsEmulator(Emulator):
    """NMEA receiver on a pty. A sender thread paces epochs in real time; ``uri`` points at
    a stable symlink so a reconnecting driver finds the new pty after a disconnect."""

    device = "gps"

    def __init__(self, world: World, settings: DeviceSettings, run_dir: Path, run_t0_ns: int):
        try:
            self.opts = GpsOptions.model_validate(settings.options)
        except ValidationError as e:
            raise ConfigError(world.sc.source_path,
                              [(f"devices.gps.options.{k}".rstrip("."), m)
                               for k, m in _problems(e)]) from None
        rate = settings.rate_hz or 1.0
        self.period_ns = int(round(NS / rate))
        if not 1 <= rate <= 10 or self.period_ns % 10_000_000:
            raise ConfigError(world.sc.source_path, [(
                "devices.gps.rate_hz", f"{rate} Hz: use 1-10 Hz with a period that is a "
                "whole number of 10 ms (NMEA times have two decimals): 1, 2, 4, 5, 10")])
        super().__init__(world, settings, run_dir, run_t0_ns)
        self.host_realtime_at_t0_ns = time.time_ns() + run_t0_ns - time.monotonic_ns()
        if self.opts.utc_start is not None:
            u = self.opts.utc_start
            if u.tzinfo is None:
                u = u.replace(tzinfo=_dt.timezone.utc)
            d = u - _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
            utc0 = (d.days * 86_400 + d.seconds) * NS + d.microseconds * 1000
        else:
            utc0 = -(-self.host_realtime_at_t0_ns // NS) * NS  # next whole second
        # the device clock (offset, drift) stays exact in ints; UTC is it shifted by a
        # constant, so UTC at t = 0 is utc0 + the scenario's clock offset
        self.utc_shift_ns = utc0 - run_t0_ns
        self.rng = np.random.default_rng([world.sc.seed, 0x6E6D6561])
        self.char_ns = 10 * NS // self.opts.baud
        self.link = Path(self.opts.link) if self.opts.link else self.run_dir / "gps.tty"
        self.pps_spec = self._pps_spec()
        self.pps_uri = self.pps_spec.to_uri()
        self.truth.write({"type": "timescale", "device_clock": "utc",
                          "utc_minus_device_ns": self.utc_shift_ns,
                          "utc_at_t0_ns": self.utc_ns(run_t0_ns),
                          "host_realtime_at_t0_ns": self.host_realtime_at_t0_ns,
                          "period_ns": self.period_ns, "baud": self.opts.baud,
                          "sentences": list(self.opts.sentences), "pps_uri": self.pps_uri})
        burst = sum(map(len, self.sentences(self.utc_ns(run_t0_ns), self.state(0.0))))
        self.burst_ns = burst * self.char_ns
        if self.burst_ns > self.period_ns:
            msg = (f"a burst of {burst} bytes takes {self.burst_ns / 1e6:.0f} ms at "
                   f"{self.opts.baud} baud, longer than the {self.period_ns / 1e6:.0f} ms "
                   f"epoch: epochs will be skipped (overrun); raise the baud or send fewer "
                   f"sentences")
            log.warning("gps emulator: %s", msg)
            self.truth.write({"type": "warning", "kind": "burst_exceeds_period", "msg": msg})
        self.done = threading.Event()
        self._thread: threading.Thread | None = None
        self._master = self._slave = -1
        self.tty_path = ""
        self.sent.update({"epochs": 0, "sentences": 0, "corrupted": 0, "garbage_bytes": 0,
                          "no_fix": 0, "dropped": 0, "stalled": 0, "disconnected": 0,
                          "overrun": 0, "bytes": 0, "tx_overflow_bytes": 0})

    # -- clocks -----------------------------------------------------------------------
    def utc_ns(self, true_ns: int) -> int:
        """The receiver's UTC (ns since 1970) at a true (host monotonic) instant."""
        return self.clock.device_ns(true_ns) + self.utc_shift_ns

    def true_of_utc(self, utc_ns: int) -> int:
        return self.clock.true_ns(utc_ns - self.utc_shift_ns)

    def _pps_spec(self) -> EmulatedPpsSpec:
        wins = sorted((self.utc_ns(self.true_ns(f.t_s)),
                       self.utc_ns(self.true_ns(f.t_s + f.duration_s)))
                      for f in self.settings.faults if f.kind in ("outage", "disconnect"))
        merged: list[list[int]] = []
        for a, b in wins:
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        return EmulatedPpsSpec(
            epoch_ns=self.clock.epoch_ns, offset_ns=self.clock.offset_ns + self.utc_shift_ns,
            drift_ppm=self.clock.drift_ppm, jitter_ns=self.opts.pps_jitter_ns,
            seed=self.world.sc.seed, start_ns=self.utc_ns(self.run_t0_ns) - 1,
            end_ns=self.utc_ns(self.true_ns(self.world.sc.duration_s)),
            off=tuple((a, b) for a, b in merged))

    def pps(self) -> EmulatedPps:
        """A PPS source for an in-process driver (same as ``open_pps(self.pps_uri)``)."""
        return EmulatedPps(self.pps_spec)

    # -- the pty ----------------------------------------------------------------------
    def _open_pty(self) -> None:
        m, s = os.openpty()
        tty.setraw(s)
        attrs = termios.tcgetattr(s)
        speed = getattr(termios, f"B{self.opts.baud}")
        attrs[4] = attrs[5] = speed
        termios.tcsetattr(s, termios.TCSANOW, attrs)
        os.set_blocking(m, False)
        self._master, self._slave = m, s
        self.tty_path = os.ttyname(s)
        self.link.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.link.with_name(self.link.name + ".new")
        tmp.unlink(missing_ok=True)
        os.symlink(self.tty_path, tmp)
        os.replace(tmp, self.link)

    def _close_pty(self) -> None:
        self.link.unlink(missing_ok=True)
        for fd in (self._master, self._slave):
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._master = self._slave = -1

    def _start(self) -> None:
        self._open_pty()
        self.uri = f"serial://{self.link.absolute()}?baud={self.opts.baud}"
        self._thread = threading.Thread(target=self._run, name="emu-gps", daemon=True)
        self._thread.start()

    def _stop(self) -> None:
        if self._thread is not None:
            self._thread.join(5.0)
        self._close_pty()
        self._write_pps_truth()

    def _write_pps_truth(self) -> None:
        sp = self.pps_spec
        last = min(self.utc_ns(time.monotonic_ns()), sp.end_ns or 0) // NS
        for s in range(sp.first_s, last + 1):
            if not sp.suppressed(s):
                self.truth.write({"type": "pps", "seq": sp.seq(s), "utc_ns": s * NS,
                                  "true_ns": sp.mono_ns(s * NS),
                                  "assert_mono_ns": sp.assert_mono_ns(s)})

    # -- the sender thread ------------------------------------------------------------
    def _wait_until(self, mono_ns: int) -> bool:
        """Sleep until ``mono_ns``; False when stopped meanwhile."""
        d = (mono_ns - time.monotonic_ns()) / NS
        return not (d > 0 and self.stop_event.wait(d)) and not self.stop_event.is_set()

    def _run(self) -> None:
        try:
            self._loop()
        finally:
            self.done.set()

    def _loop(self) -> None:
        p = self.period_ns
        utc = -(-self.utc_ns(self.run_t0_ns) // p) * p
        seq = 0
        connected = True
        while not self.stop_event.is_set():
            true = self.true_of_utc(utc)
            t_s = (true - self.run_t0_ns) / NS
            if t_s >= self.world.sc.duration_s:
                return
            if not self._wait_until(true):
                return
            faults = self.faults(t_s)
            rec = {"seq": seq, "true_ns": true, "device_ns": utc}
            if "disconnect" in faults:
                if connected:
                    self._close_pty()
                    connected = False
                    self.truth.write({"type": "disconnect", "true_ns": true})
                self.count("disconnected")
                self.truth.write({"type": "fault", "kind": "disconnect", **rec})
            else:
                if not connected:
                    self._open_pty()
                    connected = True
                    self.count("reconnects")
                    self.truth.write({"type": "reconnect", "true_ns": true})
                self._epoch(seq, utc, true, t_s, faults, rec)
            seq += 1
            utc += p

    def _epoch(self, seq: int, utc: int, true: int, t_s: float, faults: dict[str, Any],
               rec: dict[str, Any]) -> None:
        if "stall" in faults:
            self.count("stalled")
            self.truth.write({"type": "fault", "kind": "stall", **rec})
            return
        f = faults.get("dropout")
        if f is not None and self.rng.random() < f.rate:
            self.count("dropped")
            self.truth.write({"type": "fault", "kind": "dropout", **rec})
            return
        state = self.state(t_s, outage="outage" in faults)
        lines = self.sentences(utc, state)
        data, info = self._apply_faults(lines, faults)
        send_at = true + int(self.opts.latency_ms * 1e6) + int(self.jitter.delay_s() * NS)
        if not self._wait_until(send_at):
            return
        if time.monotonic_ns() - send_at > self.period_ns:
            self.count("overrun")  # a real receiver's TX buffer would overflow: drop it
            self.truth.write({"type": "fault", "kind": "overrun", **rec})
            return
        self._check_baud()
        tx_start = self._paced_write(data)
        self.count("sent")
        self.count("epochs")
        self.count("sentences", len(lines))
        self.count("corrupted", info["corrupted"])
        self.count("garbage_bytes", info["garbage_bytes"])
        self.count("bytes", len(data))
        if state["fix_quality"] == 0:
            self.count("no_fix")
        self.truth.write({"type": "sample", **rec, **state, "sentences": len(lines), **info,
                          "bytes": len(data), "tx_start_ns": tx_start})

    # -- content ----------------------------------------------------------------------
    def state(self, t_s: float, outage: bool = False) -> dict[str, Any]:
        """What the receiver reports for a fix at scenario time ``t_s``."""
        pose = self.world.pose(t_s)
        lat, lon, alt = self.world.geodetic(pose.x, pose.y, pose.z)
        course = (90.0 - math.degrees(pose.yaw)) % 360.0
        sats = 8 + int(round(3 + 3 * math.sin(2 * math.pi * t_s / 60.0)))
        hdop = round(0.5 + 5.0 / sats, 2)
        if outage:
            return {"lat": None, "lon": None, "alt": None, "speed": None, "course": None,
                    "fix_quality": 0, "hdop": None, "satellites": int(self.rng.integers(0, 4))}
        return {"lat": lat, "lon": lon, "alt": alt, "speed": pose.speed, "course": course,
                "fix_quality": self.opts.fix_quality, "hdop": hdop, "satellites": sats}

    def sentences(self, utc_ns: int, st: dict[str, Any]) -> list[bytes]:
        """The burst of one epoch, in the configured order (checksums by pynmeagps)."""
        d = _dt.datetime.fromtimestamp(utc_ns // NS, _dt.timezone.utc)
        hhmmss = f"{d:%H%M%S}.{(utc_ns % NS) // 10_000_000:02d}"
        ddmmyy = f"{d:%d%m%y}"
        fix = st["fix_quality"] > 0
        hp = self.opts.high_precision
        if fix:
            lat = ddd2dmm(st["lat"], "LA", hp)
            lon = ddd2dmm(st["lon"], "LN", hp)
            ns, ew = ("N" if st["lat"] >= 0 else "S"), ("E" if st["lon"] >= 0 else "W")
            kn = st["speed"] / KNOT_MPS
            spd, kmh, cog = f"{kn:.3f}", f"{st['speed'] * 3.6:.3f}", f"{st['course']:.2f}"
            alt = f"{st['alt'] - self.opts.geoid_sep_m:.{3 if hp else 1}f}"
            sep = f"{self.opts.geoid_sep_m:.1f}"
            hdop = f"{st['hdop']:.2f}"
            pdop, vdop = f"{st['hdop'] * 1.8:.2f}", f"{st['hdop'] * 1.5:.2f}"
            mode = "D" if st["fix_quality"] == 2 else "A"
        else:
            lat = lon = ns = ew = spd = kmh = cog = alt = sep = ""
            hdop = pdop = vdop = "99.99"
            mode = "N"
        svs = [f"{v:02d}" for v in _SVIDS[:min(12, st["satellites"])]] if fix else []
        fields = {
            "GGA": [hhmmss, lat, ns, lon, ew, str(st["fix_quality"]),
                    f"{st['satellites']:02d}", hdop if fix else "", alt, "M", sep, "M", "", ""],
            "RMC": [hhmmss, "A" if fix else "V", lat, ns, lon, ew, spd, cog, ddmmyy, "", "",
                    mode],
            "VTG": [cog, "T", "", "M", spd, "N", kmh, "K", mode],
            "GSA": ["A", "3" if fix else "1"] + svs + [""] * (12 - len(svs)) + [pdop, hdop, vdop],
            "ZDA": [hhmmss, f"{d:%d}", f"{d:%m}", f"{d:%Y}", "00", "00"],
        }
        return [NMEAMessage(self.opts.talker, sid, 0, payload=fields[sid]).serialize()
                for sid in self.opts.sentences]

    def _apply_faults(self, lines: list[bytes], faults: dict[str, Any]
                      ) -> tuple[bytes, dict[str, Any]]:
        out = bytearray()
        corrupted: list[str] = []
        garbage = 0
        g = faults.get("garbage")
        cut_before = False  # a truncated sentence must be ended by the next '$'
        for k, line in enumerate(lines):
            if g is not None and not cut_before and self.rng.random() < g.rate:
                junk = self.rng.integers(0, 256, int(self.rng.integers(1, 41)), dtype=np.uint8)
                junk[junk == 0x24] = 0x23  # never a '$': the receiver count stays exact
                out += junk.tobytes()
                garbage += len(junk)
            sid = line[3:6].decode("ascii", "replace")
            line, kind = self._damage(line, faults, last=k == len(lines) - 1)
            if kind:
                corrupted.append(f"{sid}:{kind}")
            cut_before = kind == "truncate"
            out += line
        return bytes(out), {"corrupted": len(corrupted), "corrupted_ids": corrupted,
                            "garbage_bytes": garbage}

    def _damage(self, line: bytes, faults: dict[str, Any], last: bool) -> tuple[bytes, str]:
        for kind in ("bad_checksum", "corrupt", "truncate"):
            f = faults.get(kind)
            if f is None or self.rng.random() >= f.rate:
                continue
            if kind == "truncate" and last:
                continue  # nothing after it would end the frame until the next burst
            star = line.rindex(b"*")
            if kind == "bad_checksum":
                good = int(line[star + 1:star + 3], 16)
                bad = (good + int(self.rng.integers(1, 256))) % 256
                return line[:star + 1] + f"{bad:02X}".encode() + line[star + 3:], kind
            if kind == "corrupt":
                i = int(self.rng.integers(1, star))
                choices = [c for c in _SAFE if c != line[i]]
                c = choices[int(self.rng.integers(0, len(choices)))]
                return line[:i] + bytes([c]) + line[i + 1:], kind
            cut = int(self.rng.integers(2, len(line) - 1))  # keeps '$' and drops the '\n'
            return line[:cut], kind
        return line, ""

    # -- the wire ---------------------------------------------------------------------
    def _check_baud(self) -> None:
        try:
            sp = termios.tcgetattr(self._slave)[4]
        except (termios.error, OSError):
            return
        if sp != getattr(termios, f"B{self.opts.baud}") and not self.sent.get("baud_mismatch"):
            self.count("baud_mismatch")
            self.truth.write({"type": "warning", "kind": "baud_mismatch",
                              "expected": self.opts.baud, "port_speed_code": sp})

    def _paced_write(self, data: bytes) -> int:
        """Write ``data`` at the baud rate (one byte per ``char_ns``), in writes of at
        least ~1 ms worth of bytes. Returns the monotonic time of the first write. Bytes
        the pty cannot take (nobody reads it) are dropped and counted."""
        m = self._master
        self._drain_input()
        t0 = time.monotonic_ns()
        i, n = 0, len(data)
        while i < n and not self.stop_event.is_set():
            due = min(n, (time.monotonic_ns() - t0) // self.char_ns + 1)
            if due > i:
                try:
                    w = os.write(m, data[i:due])
                except (BlockingIOError, OSError):
                    w = 0
                if w < due - i:
                    self.count("tx_overflow_bytes", n - i - w)
                    return t0
                i = due
            if i < n:
                time.sleep(max(0.001, (t0 + i * self.char_ns - time.monotonic_ns()) / NS))
        return t0

    def _drain_input(self) -> None:
        """Discard what the agent wrote to the receiver (configuration commands)."""
        try:
            while os.read(self._master, 4096):
                pass
        except (BlockingIOError, OSError):
            pass


def main(argv: list[str] | None = None) -> int:
    """Run the emulator alone (for ``cat``, ``gpsd -N``, ``cgps`` or the driver): prints
    the serial URI and the PPS URI on the first two lines of stdout, then sends until the
    duration ends (or SIGTERM / Ctrl-C)."""
    import argparse
    import signal
    import tempfile

    from ..scenario import load_scenario

    ap = argparse.ArgumentParser(prog="python -m hil.emulators.gps")
    ap.add_argument("--scenario", default="city-drive")
    ap.add_argument("--rate", type=float, help="epochs per second (1, 2, 4, 5, 10)")
    ap.add_argument("--baud", type=int)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--run-dir")
    a = ap.parse_args(argv)
    sc = load_scenario(a.scenario, duration_s=a.duration)
    s = sc.devices.gps
    opts = dict(s.options)
    if a.baud:
        opts["baud"] = a.baud
    s = s.model_copy(update={"options": opts, "rate_hz": a.rate or s.rate_hz})
    run_dir = Path(a.run_dir or tempfile.mkdtemp(prefix="edgecap-gps-"))
    emu = GpsEmulator(World(sc), s, run_dir, time.monotonic_ns())
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with emu:
        print(emu.uri, flush=True)
        print(emu.pps_uri, flush=True)
        try:
            while not stop.is_set() and not emu.done.is_set():
                stop.wait(0.2)
        except KeyboardInterrupt:
            pass
    print(f"sent {emu.sent}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
