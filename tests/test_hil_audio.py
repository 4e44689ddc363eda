"""HIL microphone on the real interface: a private PulseAudio server, the null sink the
emulator plays into and sounddevice recording its monitor (issue 3 acceptance)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from hil import sounds
from hil.pulse import PulseError, PulseServer, pulse_unavailable
from hil.scenario import Fault, Scenario, SoundEvent, Speech
from hil.truth import read_truth
from hil.world import World

RATE = 48_000


def _scenario(**kw: object) -> Scenario:
    base = {"name": "mic-test", "duration_s": 30, "seed": 3,
            "origin": {"lat": 48.1, "lon": 11.5}, "trajectory": [{"x": 0, "y": 0}]}
    base.update(kw)
    return Scenario.model_validate(base)


@pytest.fixture(scope="module")
def pa():
    why = pulse_unavailable()
    if why:
        pytest.skip(why)
    try:
        server = PulseServer(rate=RATE).start()
    except PulseError as e:
        pytest.skip(f"PulseAudio cannot start here: {e}")
    yield server
    server.stop()


def _sd_for(pa: PulseServer):
    """sounddevice with the ALSA 'pulse' device pointed at ``pa``'s monitor source."""
    import sounddevice as sd

    os.environ["PULSE_SERVER"] = pa.server or ""
    os.environ["PULSE_SOURCE"] = pa.source
    if not any(d["name"] == "pulse" for d in sd.query_devices()):
        sd._terminate()  # PortAudio listed devices before the server ran: rescan
        sd._initialize()
    return sd


@pytest.fixture
def recorder(pa):
    """``record(seconds, during=callable)`` → int16 mono recorded from the sink monitor."""
    sd = _sd_for(pa)
    yield lambda seconds, during=None: _record(sd, seconds, during)
    os.environ.pop("PULSE_SOURCE", None)
    os.environ.pop("PULSE_SERVER", None)


def _record(sd, seconds: float, during=None) -> tuple[np.ndarray, int]:
    blocks: list[np.ndarray] = []
    first_rx: list[int] = []

    def cb(indata, frames, ti, status):
        if not first_rx:
            first_rx.append(time.monotonic_ns())
        blocks.append(indata[:, 0].copy())

    with sd.InputStream(device="pulse", samplerate=RATE, channels=1, dtype="int16",
                        blocksize=480, latency=0.3, callback=cb):
        t_end = time.monotonic() + seconds
        if during is not None:
            during()
        while time.monotonic() < t_end:
            time.sleep(0.01)
    return np.concatenate(blocks) if blocks else np.zeros(0, np.int16), first_rx[0]


def _play(pa: PulseServer, x: np.ndarray) -> subprocess.Popen:
    p = subprocess.Popen(["pacat", "--playback", "--raw", "--format=s16le", f"--rate={RATE}",
                          "--channels=1", f"--device={pa.sink}", "--latency-msec=300"],
                         stdin=subprocess.PIPE, env={**os.environ, **pa.env})
    assert p.stdin is not None
    p.stdin.write(sounds.to_s16(x).tobytes())
    p.stdin.close()
    return p


def xcorr(x: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """``np.correlate(x, ref, "valid")`` through the FFT (fast for long references)."""
    n = len(x) + len(ref)
    nfft = 1 << (n - 1).bit_length()
    c = np.fft.irfft(np.fft.rfft(x, nfft) * np.conj(np.fft.rfft(ref, nfft)), nfft)
    return c[: len(x) - len(ref) + 1]


def _peak_hz(x: np.ndarray, lo: float = 50, hi: float = 20_000) -> float:
    spec = np.abs(np.fft.rfft(x.astype(np.float64) * np.hanning(len(x))))
    f = np.fft.rfftfreq(len(x), 1 / RATE)
    band = (f >= lo) & (f <= hi)
    return float(f[band][np.argmax(spec[band])])


# -- the server -----------------------------------------------------------------------
def test_private_server_stops_even_when_the_body_fails():
    if pulse_unavailable():
        pytest.skip(pulse_unavailable())
    srv = PulseServer(sink="edgecap_lifecycle")
    with pytest.raises(RuntimeError, match="boom"):
        with srv:
            proc, d = srv._proc, srv._dir
            assert srv.has_sink()
            assert srv.source in srv.pactl("list", "short", "sources").stdout
            raise RuntimeError("boom")
    assert proc is not None and proc.poll() is not None  # server process gone
    assert d is not None and not d.exists()  # its runtime dir removed
    assert srv._keeper is None
    srv.stop()  # idempotent


@pytest.mark.realtime
def test_mic_carries_the_played_sound_and_can_be_unplugged(pa):
    """What is played comes out of the monitor and of the mic alike. The sink runs at its
    own 50 kHz clock (hil.pulse), so both are resampled copies: compared by correlation
    and level, not bit for bit."""
    def rec(dev: str) -> subprocess.Popen:
        return subprocess.Popen(["parec", "--raw", "--format=s16le", f"--rate={RATE}",
                                 "--channels=1", f"--device={dev}", "--latency-msec=100"],
                                env={**os.environ, **pa.env}, stdout=subprocess.PIPE)
    recs = [rec(pa.monitor), rec(pa.source)]
    time.sleep(0.2)
    x = np.random.default_rng(1).uniform(-0.5, 0.5, RATE // 2)
    x = np.convolve(x, np.ones(4) / 4, "same")  # sound, not noise at the Nyquist rate
    player = _play(pa, x)
    player.wait(5)
    time.sleep(0.5)
    ref = sounds.to_s16(x)[: RATE // 10].astype(np.float64)
    for r in recs:
        r.terminate()
        g = np.frombuffer(r.stdout.read(), "<i2").astype(np.float64)
        r.wait(2)
        # compared over 0.1 s, as an overloaded machine may make pulse drop data for a
        # starved recorder later on
        start = int(np.argmax(xcorr(g, ref)))
        seg = g[start:start + len(ref)]
        assert len(seg) == len(ref)
        corr = float(seg @ ref) / math.sqrt(float(seg @ seg) * float(ref @ ref))
        assert corr > 0.99, corr
        assert 0.9 < math.sqrt(float(seg @ seg) / float(ref @ ref)) < 1.1  # same level
    pa.unplug_mic()
    assert not pa.has_source() and pa.has_sink()
    pa.plug_mic()
    assert pa.has_source()


def test_reuses_a_running_server_and_leaves_it_running(pa, monkeypatch):
    monkeypatch.setenv("PULSE_SERVER", pa.server or "")
    with PulseServer(sink="edgecap_reuse", private=None) as other:
        assert not other.owned and other._proc is None
        assert pa.has_source("edgecap_reuse_mic")  # loaded into the running server
    assert not pa.has_source("edgecap_reuse_mic") and pa.running  # unloaded, server alive
    monkeypatch.setenv("PULSE_SERVER", "unix:/nonexistent/native")
    with pytest.raises(PulseError, match="no PulseAudio server answers"):
        PulseServer(private=False).start()


# -- sounds ---------------------------------------------------------------------------
def test_synthesised_sounds_have_their_frequencies():
    h = sounds.horn(0.5, RATE)
    spec = np.abs(np.fft.rfft(h))
    f = np.fft.rfftfreq(len(h), 1 / RATE)
    top2 = sorted(f[np.argsort(spec)[-2:]])
    assert top2 == pytest.approx(list(sounds.HORN_HZ), abs=3)
    c = sounds.click(RATE)
    assert np.argmax(np.abs(c)) == 0 and np.abs(c[-1]) < 0.05 * np.abs(c[0])
    s = sounds.siren(2 * sounds.SIREN_PERIOD_S, RATE)
    assert sounds.SIREN_HZ[0] - 20 <= _peak_hz(s, 300, 1800) <= sounds.SIREN_HZ[1] + 20
    assert np.array_equal(sounds.horn(0.3, RATE), sounds.horn(0.3, RATE))
    with pytest.raises(ValueError, match="unknown sound kind"):
        sounds.sound("bell", 1, RATE)


def test_speech_is_synthesised_once_and_cached(tmp_path: Path):
    if subprocess.run(["which", "espeak-ng"], capture_output=True).returncode:
        pytest.skip("espeak-ng not installed")
    x = sounds.speech("Hello from the cabin.", RATE, tmp_path)
    cached = list(tmp_path.glob("speech-*.wav"))
    assert len(cached) == 1
    mtime = cached[0].stat().st_mtime_ns
    y = sounds.speech("Hello from the cabin.", RATE, tmp_path)
    assert np.array_equal(x, y) and cached[0].stat().st_mtime_ns == mtime
    assert 0.5 < len(x) / RATE < 3.0
    assert abs(x[0]) > 0.001 and np.max(np.abs(x)) == pytest.approx(0.5, abs=0.01)  # trimmed


# -- recording from the null sink (acceptance) ----------------------------------------
@pytest.mark.realtime
def test_sounddevice_records_a_tone_from_the_null_sink(pa, recorder):
    tone = sounds.tone(1000.0, 1.2, RATE, 0.5)
    procs: list[subprocess.Popen] = []
    x, _ = recorder(1.6, during=lambda: procs.append(_play(pa, tone)))
    procs[0].wait(5)
    loud = x[np.abs(x) > 3000]
    assert len(loud) > 0.5 * RATE * 0.5  # the tone is there for most of its length
    seg = x[np.argmax(np.abs(x) > 3000):][: RATE // 2]
    assert _peak_hz(seg) == pytest.approx(1000.0, abs=4)


@pytest.mark.realtime
def test_sounddevice_records_speech_from_the_null_sink(pa, recorder, tmp_path):
    if subprocess.run(["which", "espeak-ng"], capture_output=True).returncode:
        pytest.skip("espeak-ng not installed")
    sp = sounds.speech("Parking lot is full.", RATE, tmp_path)
    procs: list[subprocess.Popen] = []
    x, _ = recorder(len(sp) / RATE + 0.6, during=lambda: procs.append(_play(pa, sp)))
    procs[0].wait(5)
    rec = x.astype(np.float64) / 32767
    ref = sounds.to_s16(sp).astype(np.float64) / 32767
    # the recording carries the speech sample for sample (after the path delay)
    corr = xcorr(rec, ref[: RATE // 2])
    lag = int(np.argmax(np.abs(corr)))
    seg = rec[lag:lag + len(ref)]
    assert len(seg) > 0.9 * len(ref)
    ncc = np.dot(seg, ref[: len(seg)]) / np.linalg.norm(seg) / np.linalg.norm(ref[: len(seg)])
    assert ncc > 0.99
    assert 80 <= _peak_hz(seg, 50, 8000) <= 4000  # voiced energy sits in the speech band


# -- the emulator ---------------------------------------------------------------------
def test_emulator_content_is_deterministic_and_drift_is_a_resampling_ratio(tmp_path):
    from hil.emulators.audio import AudioEmulator

    sc = _scenario(clapper_s=[2.0], devices={"audio": {"rate_hz": RATE, "drift_ppm": 1000}})
    emus = [AudioEmulator(World(sc), sc.devices.audio, tmp_path / f"r{i}", 0) for i in (0, 1)]
    for e in emus:
        e.events = e._render_events()
    i_click = emus[0].index_of(2.0)
    assert i_click == 96_096  # 2 s × 48 kHz × (1 + 1000 ppm)
    a = emus[0].compose(i_click - 480, 960)
    b = emus[1].compose(i_click - 480, 960)
    assert np.array_equal(a, b)
    assert int(np.argmax(np.abs(a))) == 480  # the click's onset sits at the drifted index
    for e in emus:
        e.stop()
    ev = [r for r in read_truth(tmp_path / "r0" / "truth" / "audio.jsonl")
          if r["type"] == "event"]
    assert ev and ev[0]["kind"] == "clapper" and ev[0]["index_start"] == i_click


def test_emulator_dropout_and_clip_faults_shape_the_samples(tmp_path):
    from hil.emulators.audio import AudioEmulator

    sc = _scenario(devices={"audio": {"rate_hz": RATE, "faults": [
        Fault(kind="dropout", t_s=1.0, duration_s=1.0, rate=0.5),
        Fault(kind="clip", t_s=3.0, duration_s=0.5)]}})
    emu = AudioEmulator(World(sc), sc.devices.audio, tmp_path, 0)
    n = emu.chunk
    chunks = {k: emu._apply_faults(emu.compose(k * n, n), k * n, k) for k in range(400)}
    emu.stop()
    zeroed = [k for k, x in chunks.items() if not x.any()]
    assert all(100 <= k < 200 for k in zeroed) and 30 < len(zeroed) < 70  # ~half of 1 s
    assert emu.sent["dropout_samples"] == len(zeroed) * n
    clip = np.concatenate([chunks[k] for k in range(300, 350)])
    assert np.count_nonzero(np.abs(clip) >= 1.0) > 0.3 * len(clip)  # flat tops
    assert np.abs(np.concatenate([chunks[k] for k in range(250, 300)])).max() < 0.05
    again = AudioEmulator(World(sc), sc.devices.audio, tmp_path / "b", 0)
    assert np.array_equal(again._apply_faults(again.compose(150 * n, n), 150 * n, 150),
                          chunks[150])
    again.stop()


@pytest.mark.realtime
def test_emulator_plays_events_on_schedule_with_truth(pa, recorder, tmp_path):
    from hil.emulators.audio import AudioEmulator

    sc = _scenario(sounds=[SoundEvent(kind="horn", t_s=0.6, duration_s=0.4)],
                   clapper_s=[1.4],
                   speech=[Speech(t_s=1.8, text="Stop.")],
                   devices={"audio": {"rate_hz": RATE, "drift_ppm": 15.0,
                                      "faults": [Fault(kind="silence", t_s=2.6,
                                                       duration_s=0.3)]}})
    run = tmp_path / "run"
    t0 = time.monotonic_ns() + 300_000_000
    emu = AudioEmulator(World(sc), sc.devices.audio, run, t0, pulse=pa)
    emu.start()
    try:
        assert emu.uri == f"pulse:{pa.source}"
        assert emu.driver_options["pulse_server"] == pa.server
        x, rx0 = recorder(3.3)
    finally:
        emu.stop()
    truth = list(read_truth(run / "truth" / "audio.jsonl"))
    kinds = [r["type"] for r in truth]
    assert kinds[0] == "clock" and "stream" in kinds and kinds[-1] == "summary"
    anchors = [r for r in truth if r["type"] == "anchor"]
    assert len(anchors) >= 3 and all(a["played"] for a in anchors)
    # play-out starts on time (first chunk written at its scheduled instant), later chunks
    # go out ahead of theirs
    assert 0 <= anchors[0]["written_mono_ns"] - anchors[0]["sched_mono_ns"] < 5_000_000
    assert all(a["written_mono_ns"] < a["sched_mono_ns"] for a in anchors[1:])
    events = {r["kind"]: r for r in truth if r["type"] == "event"}
    assert set(events) == {"horn", "clapper", "speech"}
    assert events["speech"]["text"] == "Stop."
    assert events["horn"]["true_end_ns"] - events["horn"]["true_start_ns"] == 400_000_000
    faults = [r for r in truth if r["type"] == "fault"]
    assert [f["phase"] for f in faults] == ["begin", "end"]
    assert emu.sent["silenced_samples"] == pytest.approx(0.3 * RATE, abs=480)
    assert emu.sent["unplayed_samples"] == 0 and emu.sent["late_chunks"] == 0

    # what was recorded is what was emitted (emitted.wav), delayed by the sound server path
    w, _ = sounds.read_wav(run / "audio" / "emitted.wav")
    first = truth[[r["type"] for r in truth].index("stream")]["first_index"]
    ci = events["clapper"]["index_start"] - first  # clapper onset in the WAV
    ref = w[ci - 2400: ci + 2400]
    rec = x.astype(np.float64) / 32767
    corr = xcorr(rec, ref)
    at = int(np.argmax(corr)) + 2400  # clapper onset in the recording
    assert corr.max() / np.dot(ref, ref) > 0.95
    # horn: its fundamentals dominate the recording where the truth says it is
    hi = events["horn"]["index_start"] - events["clapper"]["index_start"] + at
    horn = x[hi + 2000: hi + 2000 + 9600]
    assert _peak_hz(horn, 300, 700) == pytest.approx(sounds.HORN_HZ[0], abs=15) or \
        _peak_hz(horn, 300, 700) == pytest.approx(sounds.HORN_HZ[1], abs=15)
    # silence fault: digital zeros in the recording where the truth puts it
    si = faults[0]["index"] - events["clapper"]["index_start"] + at
    assert np.count_nonzero(x[si + 960: si + int(0.3 * RATE) - 960]) == 0
    assert np.count_nonzero(x[si - 9600: si - 4800]) > 4000  # background noise elsewhere


@pytest.mark.realtime
def test_emulator_disconnect_fault_unplugs_the_mic(pa, tmp_path):
    from hil.emulators.audio import AudioEmulator

    sc = _scenario(devices={"audio": {"rate_hz": RATE, "faults": [
        Fault(kind="disconnect", t_s=0.4, duration_s=0.6),
        Fault(kind="stall", t_s=0.2, duration_s=0.1)]}})
    t0 = time.monotonic_ns()
    emu = AudioEmulator(World(sc), sc.devices.audio, tmp_path, t0, pulse=pa)
    emu.start()
    rec = subprocess.Popen(["parec", "--raw", f"--device={pa.source}"],
                           env={**os.environ, **pa.env},
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        seen = []
        while time.monotonic_ns() - t0 < 1_500_000_000:
            seen.append(((time.monotonic_ns() - t0) / 1e9, pa.has_source()))
            time.sleep(0.02)
        rec_rc = rec.wait(2)  # a recorder of the unplugged mic ends, as with a pulled USB mic
    finally:
        rec.kill()
        emu.stop()
    gone = [t for t, has in seen if not has]
    assert gone and 0.38 < gone[0] < 0.5 and 0.9 < gone[-1] < 1.1
    assert seen[-1][1] and pa.has_sink() and pa.has_source()
    assert rec_rc != 0
    assert emu.sent["disconnects"] == 1 and emu.sent["unsupported_faults"] == 1
    assert emu.sent["unplayed_samples"] == 0  # the sink kept playing through it
    truth = [json.loads(ln) for ln in (tmp_path / "truth" / "audio.jsonl").read_text().splitlines()]
    f = [(r["kind"], r["phase"]) for r in truth if r["type"] == "fault"]
    assert f == [("stall", "begin"), ("stall", "end"), ("disconnect", "begin"),
                 ("disconnect", "unplugged"), ("disconnect", "end"), ("disconnect", "plugged")]
    assert [r["streams_killed"] for r in truth if r.get("phase") == "unplugged"] == [1]
