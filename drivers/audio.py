"""Microphone driver ``audio.sounddevice``: a PortAudio input stream (python-sounddevice)
turned into pcm-s16 blocks whose device clock is the sample index.

URI (``[[streams]] uri``):

- ``""`` or ``default``: PortAudio's default input;
- ``pulse``: the ALSA ``pulse`` device (PulseAudio's default source);
- ``pulse:SOURCE``: the ALSA ``pulse`` device recording PulseAudio source ``SOURCE``
  (e.g. ``pulse:edgecap_hil.monitor``). PortAudio (19.6, ALSA host API) lists only the
  ALSA devices ``pulse`` and ``default``, not PulseAudio's sources, so the source is chosen
  with the ``PULSE_SOURCE`` environment variable while the stream opens;
- a number: a PortAudio device index; anything else: a device name or a unique part of it
  (``hw:1,0``, ``USB Audio``), as python-sounddevice matches names.

Data flow::

    PortAudio thread ─callback─▶ copy + arrival time ─put_nowait─▶ bounded queue (drops counted)
    reader thread (_samples) ◀─get─┘  sample index, gaps, ADC check ─▶ Sample(pcm-s16 block)

Clocks. ``seq`` and ``meta["sample_index"]`` are the index of the block's first frame since
the stream opened; ``device_t_ns = sample_index·1e9 // sample_rate`` (the device clock).
``host_rx_ns`` is ``time.monotonic_ns()`` at the start of the callback. ``meta["adc_time_ns"]``
is PortAudio's ``inputBufferAdcTime`` moved onto the monotonic clock (through the callback's
``currentTime``, which is on the same clock as the ADC time); ``meta["adc_usable"]`` says
whether it can be trusted: it must increase and its residual against the sample index
(``adc_time_ns − sample_index·1e9/rate``) must stay within ``adc_tolerance_us`` (3 ms)
over the last ``adc_window_s`` (1 s) of blocks. On PulseAudio through ALSA the ADC time
comes from the wall clock, starts ~15 ms off and converges over the first ~2 s, then
scatters by ~0.3 ms (480-frame blocks) to ~2.5 ms (1024); many host APIs give 0.

Losses. Every loss advances the sample index, is counted in ``counters["gaps"]`` (frames)
with a ``gap_events`` entry, and is marked on the next block with ``meta["gap_before"]``
(frames): ``queue_full`` (the reader fell behind; exact), ``input_overflow`` (PortAudio
reported an overrun; the lost frames are estimated from the ADC time when usable, else from
arrival times when the hole exceeds two blocks, else 0 and ``meta["gap_estimated"]``) and
``reconnect`` (estimated from arrival times; the block also carries
``meta["discontinuity"] = True`` and ``meta["epoch"]``, the reconnect count: the device
clock restarted, an estimator must re-anchor). Counters: ``received`` (blocks),
``frames``, ``gaps``, ``overflows``, ``queue_drops`` (blocks), ``disconnects``,
``reconnects``, ``errors`` (failed reopen attempts).

Device loss. When the stream ends on its own (PortAudio's finished callback: PulseAudio
killed the stream, the server went away, a USB device was unplugged) or no block arrives for
``stall_timeout_ms``, the reader closes it and reopens with exponential backoff
(``reconnect_min_ms``…``reconnect_max_ms``) until it works or the driver is closed.

Caveats. ``PULSE_SERVER``/``PULSE_SOURCE`` are process-wide: they are set under a lock only
while a stream opens and restored right after. If the wanted device is not listed (PortAudio
enumerates devices once, e.g. before the sound server started), PortAudio is re-initialised
once to rescan, but only while no stream of this driver is open, because that closes every
PortAudio stream in the process. The first stream a process opens on the ALSA ``pulse``
device delivers its first block after 1–2 s (PortAudio polls the plugin in a busy loop
meanwhile); later opens take ~40 ms.
"""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import threading
import time
from collections import deque
from typing import Any, Iterator, Literal, NamedTuple

import numpy as np
from pydantic import Field

from agent.errors import DriverError
from agent.types import Sample, StreamInfo, StreamKind

from .base import Driver, DriverOptions
from .registry import register

_ENV_LOCK = threading.Lock()
_OPEN_STREAMS = 0  # streams of this driver currently open in the process (under _ENV_LOCK)


class SoundDeviceMicOptions(DriverOptions):
    sample_rate: int = Field(default=48_000, ge=8000, le=192_000)
    channels: int = Field(default=1, ge=1, le=32)
    block: int = Field(default=1024, ge=32, le=65_536, description="frames per block")
    latency: Literal["low", "high"] | float = Field(
        default="low", description="PortAudio suggested input latency ('low', 'high' or s)")
    pulse_server: str | None = Field(
        default=None, description="PULSE_SERVER while opening, e.g. unix:/run/…/native")
    queue_blocks: int = Field(default=256, ge=2, le=100_000)
    stall_timeout_ms: int = Field(default=1500, ge=100, le=60_000)
    startup_timeout_ms: int = Field(default=4000, ge=100, le=60_000,
                                    description="wait for the first block after an open")
    reconnect_min_ms: int = Field(default=100, ge=10)
    reconnect_max_ms: int = Field(default=2000, ge=10)
    adc_tolerance_us: int = Field(default=3000, ge=1,
                                  description="max spread of ADC time − index time")
    adc_window_s: float = Field(default=1.0, gt=0, le=60,
                                description="window the ADC check looks back over")


class _Block(NamedTuple):
    gen: int  # which opened stream it came from
    data: np.ndarray
    rx_ns: int
    adc_ns: int | None  # inputBufferAdcTime on the monotonic clock, None when absent
    overflow: bool
    dropped_total: int  # frames the callback had dropped (queue full) before this block


def parse_uri(uri: str) -> tuple[str | int | None, str | None]:
    """``(sounddevice device, PulseAudio source or None)`` for a driver URI."""
    u = uri.strip()
    if u in ("", "default"):
        return (None if u == "" else "default"), None
    if u.startswith("pulse:"):
        src = u[len("pulse:"):].lstrip("/")
        return "pulse", (src or None)
    if u.lstrip("-").isdigit():
        return int(u), None
    return u, None


def _import_sounddevice() -> Any:
    try:
        import sounddevice as sd
    except OSError as e:  # the PortAudio shared library is missing
        raise DriverError(f"PortAudio library not found ({e}); install it with "
                          f"'apt-get install libportaudio2'") from None
    except ImportError as e:
        raise DriverError(f"python-sounddevice is not installed: {e}") from None
    return sd


def _set_env(env: dict[str, str]) -> dict[str, str | None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    return saved


def _restore_env(saved: dict[str, str | None]) -> None:
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _rescan_portaudio(sd: Any, env: dict[str, str]) -> bool:
    """Re-initialise PortAudio (with ``env`` set) so that it lists devices again; only
    while no stream of this driver is open in the process (it would close them all)."""
    with _ENV_LOCK:
        if _OPEN_STREAMS > 0:
            return False
        saved = _set_env(env)
        try:
            sd._terminate()
            sd._initialize()
        finally:
            _restore_env(saved)
    return True


def list_devices(pulse_server: str | None = None) -> list[dict[str, Any]]:
    """Audio inputs for ``edgecap devices``: PortAudio's input devices (``uri`` = index) and,
    when ``pactl`` reaches a PulseAudio server, its sources (``uri`` = ``pulse:NAME``).
    Blocks briefly; raises DriverError only when PortAudio itself is missing."""
    sd = _import_sounddevice()
    if pulse_server and not any(d["name"] == "pulse" for d in sd.query_devices()):
        _rescan_portaudio(sd, {"PULSE_SERVER": pulse_server})
    out: list[dict[str, Any]] = []
    apis = sd.query_hostapis()
    for i, d in enumerate(sd.query_devices()):
        if d["max_input_channels"] > 0:
            out.append({"uri": str(i), "name": d["name"], "api": apis[d["hostapi"]]["name"],
                        "channels": d["max_input_channels"],
                        "default_rate": d["default_samplerate"]})
    if shutil.which("pactl"):
        env = {**os.environ, **({"PULSE_SERVER": pulse_server} if pulse_server else {})}
        try:
            r = subprocess.run(["pactl", "list", "short", "sources"], capture_output=True,
                               text=True, timeout=5, env=env)
        except (OSError, subprocess.TimeoutExpired):
            r = None
        for ln in (r.stdout.splitlines() if r is not None and r.returncode == 0 else []):
            f = ln.split("\t")
            if len(f) >= 4:
                out.append({"uri": f"pulse:{f[1]}", "name": f[1], "api": "PulseAudio",
                            "spec": f[3], "monitor": f[1].endswith(".monitor")})
    return out


@register("audio.sounddevice")
class SoundDeviceMic(Driver):
    """A microphone through PortAudio; see the module docstring for URI, clocks and losses.
    ``open``/``close`` block briefly; the PortAudio callback never blocks; ``_samples``
    runs in the pipeline's reader thread and also does the reconnecting."""

    Options = SoundDeviceMicOptions

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        o: SoundDeviceMicOptions = self.options  # type: ignore[assignment]
        self.o = o
        self._device, self._source = parse_uri(self.uri)
        self._q: queue.Queue[_Block] = queue.Queue(maxsize=o.queue_blocks)
        self._stream: Any = None
        self._gen = 0
        self._finished_gen = -1  # gen of a stream that ended on its own
        self._dropped_total = 0  # written by the callback only
        self._dropped_seen = 0
        self._index = 0
        self._last: tuple[int, int, int | None] | None = None  # (rx_ns, frames, adc_ns)
        self._opened_ns = 0
        self._last_rx_ns = 0
        self._pending_reconnect = False
        self._adc_res: deque[int] = deque(
            maxlen=max(2, round(o.adc_window_s * o.sample_rate / o.block)))
        self._adc_prev: int | None = None
        self._lock = threading.Lock()
        self._sd: Any = None
        self.device_name = ""

    def streams(self) -> list[StreamInfo]:
        o = self.o
        return [StreamInfo(self.name, StreamKind.AUDIO, "pcm-s16", o.sample_rate / o.block,
                           params={"sample_rate": o.sample_rate, "channels": o.channels,
                                   "block": o.block, "device": self.device_name or self.uri})]

    # -- lifecycle --------------------------------------------------------------------
    def _open(self) -> None:
        self._sd = _import_sounddevice()
        if self._source is not None:
            self._check_pulse_source()
        self._resolve_device()
        try:
            self._open_stream()
        except Exception as e:  # noqa: BLE001 - PortAudio raises several kinds
            raise DriverError(f"{self.name}: cannot open input {self.uri or 'default'!r} "
                              f"({self.device_name}) at {self.o.sample_rate} Hz × "
                              f"{self.o.channels} ch: {e}") from None

    def _close(self) -> None:
        self._close_stream()

    # -- device selection -------------------------------------------------------------
    def _pulse_env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        if self.o.pulse_server:
            env["PULSE_SERVER"] = self.o.pulse_server
        if self._source:
            env["PULSE_SOURCE"] = self._source
        return env

    def _check_pulse_source(self) -> None:
        """With pactl at hand, name a missing source or an unreachable server clearly."""
        if shutil.which("pactl") is None:
            return
        try:
            r = subprocess.run(["pactl", "list", "short", "sources"], capture_output=True,
                               text=True, timeout=5, env={**os.environ, **self._pulse_env()})
        except (OSError, subprocess.TimeoutExpired):
            return
        server = self.o.pulse_server or os.environ.get("PULSE_SERVER", "the default server")
        if r.returncode != 0:
            raise DriverError(f"{self.name}: no PulseAudio server answers at {server} "
                              f"({r.stderr.strip()[:200]}); start one or set "
                              f"options.pulse_server")
        names = [ln.split("\t")[1] for ln in r.stdout.splitlines() if "\t" in ln]
        if self._source not in names:
            raise DriverError(f"{self.name}: no PulseAudio source {self._source!r} on "
                              f"{server}; sources: {', '.join(names) or 'none'}")

    def _input_devices(self) -> list[str]:
        return [f"{i}: {d['name']}" for i, d in enumerate(self._sd.query_devices())
                if d["max_input_channels"] > 0]

    def _resolve_device(self) -> None:
        sd = self._sd
        for attempt in range(2):
            try:
                info = sd.query_devices(self._device, "input")
                self.device_name = str(info["name"])
                if info["max_input_channels"] < self.o.channels:
                    raise DriverError(f"{self.name}: device {self.device_name!r} has "
                                      f"{info['max_input_channels']} input channels, "
                                      f"{self.o.channels} requested")
                return
            except (ValueError, sd.PortAudioError) as e:
                err = e
            if attempt == 0 and not self._rescan():
                break
        devs = "; ".join(self._input_devices()) or "none"
        hint = (" (the ALSA 'pulse' device appears only while a PulseAudio server answers)"
                if self._device in ("pulse", "default") else "")
        raise DriverError(f"{self.name}: no input device {self.uri or 'default'!r}{hint}: "
                          f"{err}; input devices: {devs}")

    def _rescan(self) -> bool:
        return _rescan_portaudio(self._sd, self._pulse_env())

    # -- stream -----------------------------------------------------------------------
    def _open_stream(self) -> None:
        global _OPEN_STREAMS
        sd, o = self._sd, self.o
        with self._lock:
            self._gen += 1
            gen = self._gen
        with _ENV_LOCK:
            saved = _set_env(self._pulse_env())
            try:
                stream = sd.InputStream(
                    device=self._device, samplerate=o.sample_rate, channels=o.channels,
                    dtype="int16", blocksize=o.block, latency=o.latency,
                    callback=self._make_callback(gen),
                    finished_callback=lambda: self._on_finished(gen))
                try:
                    stream.start()
                except Exception:
                    stream.close(ignore_errors=True)
                    raise
            finally:
                _restore_env(saved)
            _OPEN_STREAMS += 1
        self._stream = stream
        self._opened_ns = time.monotonic_ns()

    def _close_stream(self) -> None:
        global _OPEN_STREAMS
        with self._lock:
            stream, self._stream = self._stream, None
            self._gen += 1  # late callbacks of the old stream are ignored
        if stream is None:
            return
        try:
            stream.abort(ignore_errors=True)
            stream.close(ignore_errors=True)
        except Exception:  # noqa: BLE001 - a dead stream may fail to close; it is gone anyway
            pass
        with _ENV_LOCK:
            _OPEN_STREAMS = max(0, _OPEN_STREAMS - 1)

    def _make_callback(self, gen: int) -> Any:
        q = self._q

        def callback(indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
            # PortAudio's thread: copy and hand over, never block
            rx = time.monotonic_ns()
            adc, cur = time_info.inputBufferAdcTime, time_info.currentTime
            adc_ns = rx + int((adc - cur) * 1e9) if adc > 0 and cur > 0 else None
            blk = _Block(gen, indata.copy(), rx, adc_ns, bool(status.input_overflow),
                         self._dropped_total)
            try:
                q.put_nowait(blk)
            except queue.Full:
                self._dropped_total += frames

        return callback

    def _on_finished(self, gen: int) -> None:
        self._finished_gen = gen

    # -- reader -----------------------------------------------------------------------
    def _samples(self) -> Iterator[Sample]:
        while not self.stopping:
            try:
                blk = self._q.get(timeout=0.1)
            except queue.Empty:
                if self._unhealthy():
                    self._reconnect()
                continue
            if blk.gen != self._gen:
                continue
            yield self._to_sample(blk)
            if self._finished_gen == self._gen and self._q.empty():
                self._reconnect()

    def _unhealthy(self) -> bool:
        if self.stopping:
            return False
        if self._stream is None:
            return True
        if self._finished_gen == self._gen:
            return True
        now = time.monotonic_ns()
        if self._last_rx_ns < self._opened_ns:  # no block since this stream opened
            return now - self._opened_ns > self.o.startup_timeout_ms * 1_000_000
        return now - self._last_rx_ns > self.o.stall_timeout_ms * 1_000_000

    def _reconnect(self) -> None:
        """Close the dead stream and reopen with backoff until it works or ``close()``."""
        self.counters.inc("disconnects")
        self._close_stream()
        delay = self.o.reconnect_min_ms / 1000
        while not self.stopping:
            if self._stop.wait(delay):
                return
            try:
                if self._sd.query_devices(self._device, "input") is None:
                    raise ValueError("gone")
            except Exception:  # noqa: BLE001 - device list stale: rescan if allowed
                self._rescan()
            try:
                self._open_stream()
            except Exception:  # noqa: BLE001 - still gone; try again later
                self.counters.inc("errors")
                delay = min(delay * 2, self.o.reconnect_max_ms / 1000)
                continue
            if self.stopping:  # close() ran meanwhile: do not leave this stream open
                self._close_stream()
                return
            self.counters.inc("reconnects")
            self._pending_reconnect = True
            return

    def _to_sample(self, blk: _Block) -> Sample:
        o = self.o
        rate = o.sample_rate
        frames = len(blk.data)
        meta: dict[str, Any] = {}
        gap = 0
        dropped = blk.dropped_total - self._dropped_seen
        if dropped > 0:
            self._dropped_seen = blk.dropped_total
            self.counters.inc("queue_drops", max(1, dropped // max(1, o.block)))
            self.record_gap(dropped, "queue_full", sample_index=self._index)
            gap += dropped
        if self._pending_reconnect:
            self._pending_reconnect = False
            est = 0
            if self._last is not None:
                est = max(0, round((blk.rx_ns - self._last[0]) * rate / 1e9) - frames)
            self.record_gap(est, "reconnect", sample_index=self._index + gap, estimated=True)
            gap += est
            meta["discontinuity"] = True
            meta["epoch"] = self.counters["reconnects"]
            meta["gap_estimated"] = True
            self._adc_res.clear()
            self._adc_prev = None
        elif blk.overflow:
            self.counters.inc("overflows")
            est, how = self._overflow_loss(blk)
            self.record_gap(est, "input_overflow", sample_index=self._index + gap,
                            estimated=True, method=how)
            gap += est
            meta["overflow"] = True
            meta["gap_estimated"] = True
        self._index += gap
        if gap:
            meta["gap_before"] = gap
        idx = self._index
        meta["sample_index"] = idx
        if blk.adc_ns is not None:
            meta["adc_time_ns"] = blk.adc_ns
        meta["adc_usable"] = self._adc_check(blk.adc_ns, idx)
        self._last = (blk.rx_ns, frames, blk.adc_ns)
        self._last_rx_ns = blk.rx_ns
        self._index += frames
        self.counters.inc("received")
        self.counters.inc("frames", frames)
        return Sample(self.name, blk.data, blk.rx_ns, device_t_ns=idx * 1_000_000_000 // rate,
                      seq=idx, meta=meta)

    def _overflow_loss(self, blk: _Block) -> tuple[int, str]:
        """Frames lost before ``blk`` by an input overflow, estimated."""
        if self._last is None:
            return 0, "none"
        rate = self.o.sample_rate
        last_rx, last_frames, last_adc = self._last
        if blk.adc_ns is not None and last_adc is not None and self._adc_usable_now():
            return max(0, round((blk.adc_ns - last_adc) * rate / 1e9) - last_frames), "adc"
        hole = round((blk.rx_ns - last_rx) * rate / 1e9) - last_frames
        if hole > 2 * self.o.block:
            return hole, "arrival"
        return 0, "unknown"

    def _adc_usable_now(self) -> bool:
        r = self._adc_res
        return len(r) == r.maxlen and max(r) - min(r) <= self.o.adc_tolerance_us * 1000

    def _adc_check(self, adc_ns: int | None, idx: int) -> bool:
        if adc_ns is None:
            self._adc_res.clear()
            self._adc_prev = None
            return False
        if self._adc_prev is not None and adc_ns <= self._adc_prev:
            self._adc_res.clear()
        self._adc_prev = adc_ns
        self._adc_res.append(adc_ns - idx * 1_000_000_000 // self.o.sample_rate)
        return self._adc_usable_now()
