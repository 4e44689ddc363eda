"""Microphone emulator: a continuous PCM stream played into a PulseAudio null sink; the
agent records the sink's monitor (through the unpluggable mic source
:attr:`hil.pulse.PulseServer.source`) as its microphone.

    emu = AudioEmulator(world, scenario.devices.audio, run_dir, run_t0_ns, pulse=pa)
    emu.start()            # synthesises the sounds, starts `pacat` and the writer thread
    emu.uri                # "pulse:edgecap_hil_mic"   (the audio.sounddevice URI)
    emu.driver_options     # {"pulse_server": "unix:/…/native", "sample_rate": 48000, …}
    emu.stop()

Without ``pulse`` the emulator starts its own :class:`hil.pulse.PulseServer` (reusing a
server that already runs) and stops it again.

Stream model. The emitted stream is s16le at ``rate_hz`` (48 kHz) with ``channels`` from the
options. Emitted sample index ``i`` is *scheduled* to play at host-monotonic
``run_t0_ns + i/rate`` (index 0 = scenario t = 0; an emulator started late begins at the
index of "now"). Play-out is started on time: the first chunk is written to ``pacat`` (whose
stream is already connected) exactly at its scheduled time, the next ones ``lead_ms``
before theirs, and the sound server plays them on its own (host-monotonic) clock, so chunk
``i`` enters the sink at ``sched(i)`` + the sink's render latency (≤ ~20 ms with the
keeper). A chunk that would be written after its scheduled time (the writer stalled longer
than ``lead_ms``, the player ran dry) is skipped, counted ``late_chunks`` and
``unplayed_samples``, and play-out restarts on time with the next one.
The device clock's drift is applied as a resampling ratio of the *content*: what the world
sounds like at true time ``t`` is placed at emitted index ``t·rate·(1 + drift_ppm·1e-6)``
(a fast ADC takes more samples per true second). The sound server's clock is the host's,
so block *arrival* cannot carry the drift: an estimator that maps the sample index by arrival
times alone sees 0 ppm, and content then shows an error that grows as ``drift_ppm·t`` (15 ppm
→ 1.8 ms after 120 s); the clapper clicks reveal it. ``clock_offset_s`` has no meaning for a
sample counter and is ignored (the truth's clock record still carries it).

Content: low background noise (``noise_dbfs`` RMS, seeded per chunk), the scenario's sound
events (horn, click, siren; :mod:`hil.sounds`), speech (espeak-ng, synthesised at start and
cached in ``run_dir/audio``) and a slate click (:func:`hil.sounds.click`, onset = first
sample) at every ``clapper_s``. Mixed in float, then converted to s16 with hard clipping.

Faults (``settings.faults``, by content time): ``silence`` (digital zeros), ``dropout``
(each 10 ms chunk zeroed with probability ``rate``), ``clip`` (the input overdriven:
gain ``clip_gain`` plus a loud 80 Hz wind rumble, hard-limited at full scale) and
``disconnect`` (the mic source is unplugged for the duration — every stream recording it
dies and reopening fails — then plugged back; the sink and the player keep running, so
play-out timing is undisturbed). Other kinds are recorded as unsupported and ignored.

Truth (``truth/audio.jsonl``): ``{"type": "stream", rate, channels, sink, source,
first_index, lead_ms, model}``; ``{"type": "anchor", "index", "content_true_ns",
"sched_mono_ns", "written_mono_ns", "played"}`` at the first chunk and every ``anchor_every_s``;
``{"type": "event", "kind", "text"?, "true_start_ns", "true_end_ns", "index_start",
"index_end"}`` when an event starts being emitted (kinds ``horn``/``click``/``siren``/
``speech``/``clapper``); ``{"type": "fault", "kind", "phase": "begin"|"end", "true_ns",
"index"}`` (a disconnect adds ``"phase": "unplugged"`` with ``mono_ns`` and
``streams_killed``, and ``"phase": "plugged"`` with ``mono_ns``);
``{"type": "unplayed", "index", "samples", "content_true_ns"}`` per chunk written too late
to be played (the sound server played zeros instead); ``{"type": "player_restart",
"index", "cause"}`` when ``pacat`` had to be started again
(e.g. after a sound-server restart; play-out restarts on time). With ``save_wav`` (default) what was played is also written to
``run_dir/audio/emitted.wav`` (WAV sample 0 = emitted index ``first_index``; zeros for
chunks that were not played, counted ``unplayed_samples``).

The unplug and plug of a disconnect happen at the scheduled play time of the chunk where
the fault begins or ends (not when that chunk is written, ``lead_ms`` earlier), within the
writer's 10 ms granularity.
"""

from __future__ import annotations

import math
import os
import subprocess
import threading
import time
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.config import _problems
from agent.errors import ConfigError

from .. import sounds
from ..pulse import PulseServer
from ..scenario import DeviceSettings
from ..world import World
from .base import Emulator

SUPPORTED_FAULTS = ("silence", "dropout", "clip", "disconnect")
PIPE_BUF = 4096  # pipe writes up to this size are atomic: a chunk goes whole or not at all


class AudioEmulatorOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    channels: int = Field(default=1, ge=1, le=2)
    lead_ms: float = Field(default=100.0, ge=20, le=2000,
                           description="chunks are written this long before they play")
    noise_dbfs: float | None = Field(default=-50.0, le=0,
                                     description="background noise RMS; None for none")
    anchor_every_s: float = Field(default=1.0, gt=0)
    save_wav: bool = True
    voice: str = "en"
    wpm: int = Field(default=165, ge=80, le=450)
    clip_gain: float = Field(default=40.0, ge=1)


@dataclass
class _Event:
    kind: str
    t_s: float  # true start time (content)
    wave: np.ndarray  # mono float32 at ``rate``
    rate: int
    text: str = ""
    announced: bool = False

    @property
    def end_s(self) -> float:
        return self.t_s + len(self.wave) / self.rate


class AudioEmulator(Emulator):
    """Plays the world's sounds into a PulseAudio null sink on schedule (see module doc).
    ``start``/``stop`` block; one writer thread does the rest."""

    device = "audio"

    def __init__(self, world: World, settings: DeviceSettings, run_dir: Path, run_t0_ns: int,
                 pulse: PulseServer | None = None):
        super().__init__(world, settings, run_dir, run_t0_ns)
        try:
            self.opts = AudioEmulatorOptions.model_validate(settings.options)
        except ValidationError as e:
            self.truth.close()
            raise ConfigError(world.sc.source_path,
                              _problems(e, ("devices", "audio", "options"))) from None
        self.rate = int(settings.rate_hz or 48_000)
        self.channels = self.opts.channels
        self.ratio = 1.0 + settings.drift_ppm * 1e-6
        # 10 ms chunks, kept within PIPE_BUF so a chunk is never written in part
        self.chunk = max(1, min(self.rate // 100, PIPE_BUF // (2 * self.channels)))
        self.pulse = pulse
        self._own_pulse = pulse is None
        self.sent.update({"samples": 0, "late_chunks": 0, "silenced_samples": 0,
                          "dropout_samples": 0, "clipped_samples": 0, "disconnects": 0,
                          "player_restarts": 0, "unplayed_samples": 0,
                          "unsupported_faults": 0})
        self.events: list[_Event] = []
        self.first_index: int | None = None
        self._player: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._wav: wave.Wave_write | None = None
        self._disconnected = False
        self._actions: list[tuple[int, Callable[[], None]]] = []
        self._mic_unplugged = False
        #: CPU seconds the writer thread has used (composing, converting, writing)
        self.writer_cpu_s = 0.0
        self._next_player_try = 0.0
        self.errors: list[str] = []

    # -- public -----------------------------------------------------------------------
    @property
    def driver_options(self) -> dict[str, object]:
        """Options for ``audio.sounddevice`` that record this emulator's sink monitor."""
        opts: dict[str, object] = {"sample_rate": self.rate, "channels": self.channels}
        if self.pulse is not None and self.pulse.server:
            opts["pulse_server"] = self.pulse.server
        return opts

    def index_of(self, true_s: float) -> int:
        """Emitted sample index that carries the content of true time ``true_s``."""
        return int(round(true_s * self.rate * self.ratio))

    # -- lifecycle --------------------------------------------------------------------
    def _start(self) -> None:
        if self.pulse is None:
            self.pulse = PulseServer(rate=self.rate, channels=self.channels, private=None)
        if not self.pulse.active:
            self.pulse.start()
        self.events = self._render_events()
        self.uri = f"pulse:{self.pulse.source}"
        audio_dir = self.run_dir / "audio"
        audio_dir.mkdir(parents=True, exist_ok=True)
        if self.opts.save_wav:
            self._wav = wave.open(str(audio_dir / "emitted.wav"), "wb")
            self._wav.setnchannels(self.channels)
            self._wav.setsampwidth(2)
            self._wav.setframerate(self.rate)
        self._spawn_player()
        self._thread = threading.Thread(target=self._run, name="hil-audio", daemon=True)
        self._thread.start()

    def _stop(self) -> None:
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        self._kill_player()
        if self._mic_unplugged:  # stopped during a disconnect: leave the server as found
            self._plug()
        if self._wav is not None:
            self._wav.close()
            self._wav = None
        if self._own_pulse and self.pulse is not None:
            self.pulse.stop()

    # -- content ----------------------------------------------------------------------
    def _render_events(self) -> list[_Event]:
        sc = self.world.sc
        cache = self.run_dir / "audio"
        r = self.rate
        evs = [_Event(s.kind, s.t_s, sounds.sound(s.kind, s.duration_s, r), r)
               for s in sc.sounds]
        evs += [_Event("speech", sp.t_s, sounds.speech(sp.text, r, cache, self.opts.voice,
                                                       self.opts.wpm), r, text=sp.text)
                for sp in sc.speech]
        evs += [_Event("clapper", t, sounds.click(r), r) for t in sc.clapper_s]
        return sorted(evs, key=lambda e: e.t_s)

    def compose(self, i0: int, n: int) -> np.ndarray:
        """Float mono content of emitted indices ``[i0, i0+n)`` before faults; pure apart
        from marking events as announced in the truth."""
        idx = np.arange(i0, i0 + n, dtype=np.float64)
        tc = idx / (self.rate * self.ratio)
        if self.opts.noise_dbfs is not None:
            rng = np.random.default_rng([self.world.sc.seed, i0 // self.chunk])
            x = rng.normal(0.0, 10 ** (self.opts.noise_dbfs / 20), n)
        else:
            x = np.zeros(n)
        t_lo, t_hi = tc[0], tc[-1]
        for e in self.events:
            if e.t_s > t_hi:
                break
            if e.end_s < t_lo:
                continue
            pos = (tc - e.t_s) * self.rate
            x += np.interp(pos, np.arange(len(e.wave)), e.wave, left=0.0, right=0.0)
            if not e.announced and e.t_s <= t_hi:
                e.announced = True
                rec = {"type": "event", "kind": e.kind, "t_s": e.t_s,
                       "true_start_ns": self.true_ns(e.t_s), "true_end_ns": self.true_ns(e.end_s),
                       "index_start": math.ceil(e.t_s * self.rate * self.ratio),
                       "index_end": math.ceil(e.end_s * self.rate * self.ratio)}
                if e.text:
                    rec["text"] = e.text
                self.truth.write(rec)
        return x

    def _apply_faults(self, x: np.ndarray, i0: int, k: int) -> np.ndarray:
        tc = np.arange(i0, i0 + len(x)) / (self.rate * self.ratio)
        for f in self.settings.faults:
            if f.kind not in ("silence", "dropout", "clip"):
                continue
            m = (tc >= f.t_s) & (tc < f.t_s + f.duration_s)
            if not m.any():
                continue
            if f.kind == "silence":
                x[m] = 0.0
                self.count("silenced_samples", int(m.sum()))
            elif f.kind == "dropout":
                hit = np.random.default_rng([self.world.sc.seed, 7, k]).random() < f.rate
                if hit:
                    x[m] = 0.0
                    self.count("dropout_samples", int(m.sum()))
            else:
                rumble = 1.5 * np.sin(2 * np.pi * 80.0 * tc[m])
                x[m] = np.clip(x[m] * self.opts.clip_gain + rumble, -1.0, 1.0)
                self.count("clipped_samples", int((np.abs(x[m]) >= 1.0).sum()))
        return x

    # -- writer -----------------------------------------------------------------------
    def _run(self) -> None:
        rate, n = self.rate, self.chunk
        lead_ns = int(self.opts.lead_ms * 1e6)
        chunk_ns = n * 1_000_000_000 // rate
        self._wait_player_ready()
        now = time.monotonic_ns()
        k = max(0, math.ceil((now + 50_000_000 - self.run_t0_ns) * rate / 1e9 / n))
        self.first_index = k * n
        self.truth.write({
            "type": "stream", "rate": rate, "channels": self.channels,
            "sink": self.pulse.sink if self.pulse else "", "source": self.pulse.source
            if self.pulse else "", "first_index": self.first_index, "chunk": n,
            "lead_ms": self.opts.lead_ms, "drift_ppm": self.settings.drift_ppm,
            "model": "content of true t at index round(t*rate*(1+drift_ppm*1e-6)); index i "
                     "scheduled to play at run_t0_ns + i/rate (host monotonic)"})
        state = [0] * len(self.settings.faults)
        next_anchor = 0
        silence = np.zeros(n * self.channels, "<i2").tobytes()
        resync = True  # the next write starts (or restarts) play-out: do it on time
        cpu0 = time.thread_time()
        while not self.stop_event.is_set():
            self.writer_cpu_s = time.thread_time() - cpu0
            i0 = k * n
            k += 1
            sched_ns = self._sched_ns(i0)
            self._run_due_actions()
            delay = (sched_ns - (0 if resync else lead_ns) - time.monotonic_ns()) / 1e9
            if delay > 0 and self.stop_event.wait(delay):
                break
            self._run_due_actions()
            t_s = i0 / (rate * self.ratio)
            self._fault_transitions(t_s, i0, state)
            x = self._apply_faults(self.compose(i0, n), i0, k - 1)
            pcm = sounds.to_s16(x)
            if self.channels > 1:
                pcm = np.repeat(pcm[:, None], self.channels, axis=1)
            written_ns = time.monotonic_ns()
            if written_ns > sched_ns + chunk_ns // 2:
                # by the schedule this chunk has played already: the player ran dry, so
                # skip it and restart play-out on time with a later chunk
                self.count("late_chunks")
                played = False
            else:
                played = self._play(pcm.tobytes(), i0)
            if self._wav is not None:
                self._wav.writeframes(pcm.tobytes() if played else silence)
            if played:
                resync = False
                self.count("sent")
                self.count("samples", n)
            else:
                resync = True
                self.count("unplayed_samples", n)
                self.truth.write({"type": "unplayed", "index": i0, "samples": n,
                                  "content_true_ns": self.true_ns(t_s)})
            if i0 >= next_anchor:
                self.truth.write({"type": "anchor", "index": i0,
                                  "content_true_ns": self.true_ns(t_s),
                                  "sched_mono_ns": sched_ns, "written_mono_ns": written_ns,
                                  "played": played})
                next_anchor = i0 + int(self.opts.anchor_every_s * rate)

    def _fault_transitions(self, t_s: float, i0: int, state: list[int]) -> None:
        """Begin/end records for every fault (state per fault: 0 pending, 1 on, 2 over)."""
        for j, f in enumerate(self.settings.faults):
            end_s = f.t_s + f.duration_s
            if state[j] == 0 and t_s >= f.t_s:
                state[j] = 1
                ok = f.kind in SUPPORTED_FAULTS
                self.truth.write({"type": "fault", "kind": f.kind, "phase": "begin",
                                  "true_ns": self.true_ns(f.t_s), "index": i0,
                                  "duration_s": f.duration_s, "rate": f.rate,
                                  "supported": ok})
                if not ok:
                    self.count("unsupported_faults")
                elif f.kind == "disconnect" and t_s < end_s:
                    self.count("disconnects")
                    self._disconnected = True
                    self._actions.append((self._sched_ns(i0), self._unplug))
            if state[j] == 1 and t_s >= end_s:
                state[j] = 2
                self.truth.write({"type": "fault", "kind": f.kind, "phase": "end",
                                  "true_ns": self.true_ns(end_s), "index": i0})
                if f.kind == "disconnect" and self._disconnected:
                    self._disconnected = False
                    self._actions.append((self._sched_ns(i0), self._plug))

    def _sched_ns(self, i: int) -> int:
        return self.run_t0_ns + i * 1_000_000_000 // self.rate

    def _run_due_actions(self) -> None:
        now = time.monotonic_ns()
        while self._actions and self._actions[0][0] <= now:
            self._actions.pop(0)[1]()

    def _unplug(self) -> None:
        self._mic_unplugged = True
        killed = self.pulse.unplug_mic() if self.pulse is not None else 0
        self.truth.write({"type": "fault", "kind": "disconnect", "phase": "unplugged",
                          "mono_ns": time.monotonic_ns(), "streams_killed": killed})

    def _plug(self) -> None:
        self._mic_unplugged = False
        try:
            if self.pulse is not None:
                self.pulse.plug_mic()
        except Exception as e:  # noqa: BLE001 - recorded; the writer goes on
            self.errors.append(f"plug mic: {e}")
        self.truth.write({"type": "fault", "kind": "disconnect", "phase": "plugged",
                          "mono_ns": time.monotonic_ns()})

    # -- player -----------------------------------------------------------------------
    def _spawn_player(self) -> bool:
        assert self.pulse is not None
        cmd = ["pacat", "--playback", "--raw", "--format=s16le", f"--rate={self.rate}",
               f"--channels={self.channels}", f"--device={self.pulse.sink}",
               f"--latency-msec={max(10, int(self.opts.lead_ms))}",
               "--client-name=edgecap-hil", "--stream-name=microphone-emulator"]
        try:
            p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, env={**os.environ, **self.pulse.env})
        except OSError as e:
            raise RuntimeError(f"cannot start pacat (apt-get install pulseaudio-utils): {e}") \
                from None
        assert p.stdin is not None
        os.set_blocking(p.stdin.fileno(), False)
        self._player = p
        return True

    def _wait_player_ready(self, timeout_s: float = 2.0) -> bool:
        """Block until the server lists the player's stream (its connection is up), so the
        first chunk starts play-out when it is written."""
        p = self._player
        if p is None or self.pulse is None:
            return False
        pid = f'application.process.id = "{p.pid}"'
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and p.poll() is None:
            if pid in self.pulse.pactl("list", "sink-inputs").stdout:
                return True
            time.sleep(0.01)
        return False

    def _kill_player(self) -> None:
        p, self._player = self._player, None
        if p is None:
            return
        try:
            if p.stdin is not None:
                p.stdin.close()
        except OSError:
            pass
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(2)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(2)

    def _play(self, data: bytes, i0: int) -> bool:
        """Write one chunk to the player without blocking; restart a dead player (at most
        every 0.5 s). Returns whether the chunk went out."""
        p = self._player
        if p is None or p.poll() is not None:
            if time.monotonic() < self._next_player_try:
                return False
            self._next_player_try = time.monotonic() + 0.5
            self._kill_player()
            if self.pulse is None or not self.pulse.has_sink():
                return False
            self._spawn_player()
            self._wait_player_ready(1.0)
            self.count("player_restarts")
            self.truth.write({"type": "player_restart", "index": i0,
                              "mono_ns": time.monotonic_ns(), "cause": "player exited"})
            return False  # this chunk is late by now; play-out restarts on time after it
        assert p is not None and p.stdin is not None
        try:
            os.write(p.stdin.fileno(), data)
            return True
        except BlockingIOError:
            return False
        except OSError:  # broken pipe: the player died (sink gone, server restarted)
            self._kill_player()
            return False


def main(argv: list[str] | None = None) -> int:
    """Run the emulator alone on its own sound server: prints ``PULSE_SERVER=…`` and the
    driver URI on the first two lines of stdout, then plays until the duration ends
    (``PULSE_SERVER=… parec -d edgecap_hil_mic | …`` listens in)."""
    import argparse
    import signal
    import tempfile

    from ..scenario import load_scenario

    ap = argparse.ArgumentParser(prog="python -m hil.emulators.audio")
    ap.add_argument("--scenario", default="city-drive")
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--run-dir")
    a = ap.parse_args(argv)
    sc = load_scenario(a.scenario)
    run_dir = Path(a.run_dir or tempfile.mkdtemp(prefix="edgecap-audio-"))
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with PulseServer(rate=int(sc.devices.audio.rate_hz or 48_000)) as pa:
        emu = AudioEmulator(World(sc), sc.devices.audio, run_dir, time.monotonic_ns(), pulse=pa)
        with emu:
            print(f"PULSE_SERVER={pa.server}", flush=True)
            print(emu.uri, flush=True)
            try:
                done.wait(a.duration)
            except KeyboardInterrupt:
                pass
    print(f"truth: {run_dir / 'truth' / 'audio.jsonl'}; sent: {emu.sent}; "
          f"writer_cpu_s={emu.writer_cpu_s:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
