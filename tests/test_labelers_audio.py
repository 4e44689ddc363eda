"""Audio labelers on real input: Silero VAD on espeak-ng speech and on noise, onsets on a
click track, the 48 kHz → 16 kHz resampler, sample-count timing across blocks."""

from __future__ import annotations

import shutil
import subprocess
import wave
from pathlib import Path

import numpy as np
import pytest

from agent.config import LabelerConfig
from agent.labelers import create
from agent.labelers._audio import BlockClock, Resampler
from agent.labelers.score import vad_scores
from agent.types import Sample, StreamInfo, StreamKind

SR = 48000
T0 = 5_000_000_000  # the stream starts 5 s into the session timebase


def _espeak(tmp: Path, text: str) -> np.ndarray:
    """Speech at 48 kHz int16 from espeak-ng (22.05 kHz), by linear interpolation."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (scripts/bootstrap.sh installs it)")
    wav = tmp / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), text], check=True, capture_output=True)
    with wave.open(str(wav)) as w:
        sr = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float64)
    n = int(len(pcm) * SR / sr)
    return np.interp(np.arange(n) * sr / SR, np.arange(len(pcm)), pcm).astype("<i2")


def _run(kind: str, pcm: np.ndarray, block: int = 960, **opts: object) -> list[Sample]:
    lab = create(LabelerConfig(kind=kind, streams=["/mic"], options=dict(opts)))
    assert lab.accepts(StreamInfo("/mic", StreamKind.AUDIO, "pcm-s16", SR / block,
                                  params={"sample_rate": SR}))
    out = []
    for i in range(0, len(pcm) - block + 1, block):
        out += lab.label(Sample("/mic", pcm[i:i + block, None], 1,
                                t_ns=T0 + i * 1_000_000_000 // SR))
    out += lab.flush()
    return out


def _speech_truth(pcm: np.ndarray, offset: int) -> tuple[int, int]:
    """First and last sample above 2 % of full scale: where espeak's voice is."""
    loud = np.nonzero(np.abs(pcm.astype(np.int32)) > 650)[0]
    return offset + int(loud[0]), offset + int(loud[-1])


def test_vad_finds_speech_and_flags_privacy(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    speech = _espeak(tmp_path, "Turning left at the next intersection, watch the cyclist.")
    lead = rng.normal(0, 40, 2 * SR)
    pcm = np.concatenate([lead, speech, rng.normal(0, 40, 2 * SR)]).astype("<i2")
    a, b = _speech_truth(speech, len(lead))
    labels = _run("audio.vad", pcm)
    assert labels and all(s.stream == "/labels/mic/vad" for s in labels)
    closed = [seg for s in labels for seg in s.payload["segments"] if not seg["open"]]
    assert closed and all(seg["kind"] == "speech" for seg in closed)
    truth = [{"start_ns": T0 + a * 10**9 // SR, "end_ns": T0 + b * 10**9 // SR}]
    sc = vad_scores(truth, closed)
    assert sc["f1"] == 1.0 and sc["frame_f1"] > 0.8, sc
    first = labels[0].payload
    assert first["segments"][0]["open"] and first["privacy"] == "speech"
    assert abs(first["segments"][0]["start_ns"] - truth[0]["start_ns"]) < 150_000_000
    assert first["model"]["name"] == "silero_vad" and len(first["model"]["sha256"]) == 64
    assert first["model"]["thresholds"]["threshold"] == 0.5
    dets = labels[-1].meta["detections"]
    assert dets[0]["privacy"] == "speech" and dets[0]["cls"] == "speech"
    assert all(s.t_ns >= T0 for s in labels)


def test_vad_ignores_noise_and_counts_bad_input() -> None:
    rng = np.random.default_rng(1)
    noise = rng.normal(0, 2000, 6 * SR).astype("<i2")
    hum = (3000 * np.sin(2 * np.pi * 50 * np.arange(4 * SR) / SR)).astype("<i2")
    labels = _run("audio.vad", np.concatenate([noise, hum]))
    assert [seg for s in labels for seg in s.payload["segments"]
            if seg["kind"] == "speech"] == []
    lab = create(LabelerConfig(kind="audio.vad", streams=["/mic"]))
    assert lab.label(Sample("/mic", b"not pcm", 1, t_ns=1)) == []
    assert lab.bad_input == 1


def test_onsets_find_clicks_exactly() -> None:
    rng = np.random.default_rng(2)
    pcm = rng.normal(0, 200, 6 * SR)
    clicks = [0.7, 1.9, 2.05, 3.3, 4.8]
    for c in clicks:
        i = int(c * SR)
        pcm[i:i + 48] += 12000 * np.exp(-np.arange(48) / 10) * np.sign(rng.normal(size=48))
    labels = _run("audio.onset", pcm.astype("<i2"))
    got = [seg["start_ns"] for s in labels for seg in s.payload["segments"]]
    assert len(got) == len(clicks)
    for g, c in zip(got, clicks):
        assert abs(g - (T0 + int(c * 1e9))) < 2_000_000  # within 2 ms
    assert all(s.stream == "/labels/mic/onset" for s in labels)
    assert labels[0].payload["model"]["name"] == "spectral-flux-onset"
    # steady noise and a steady tone have no onsets
    steady = (rng.normal(0, 800, 4 * SR) + 4000 * np.sin(
        2 * np.pi * 440 * np.arange(4 * SR) / SR)).astype("<i2")
    assert _run("audio.onset", steady) == []


def test_resampler_streams_like_one_shot_and_filters_alias() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=SR).astype(np.float32)
    whole = Resampler(SR).process(x)
    r = Resampler(SR)
    parts = np.concatenate([r.process(x[i:i + 777]) for i in range(0, SR, 777)])
    n = min(len(whole), len(parts))
    assert n > 15900 and np.allclose(whole[:n], parts[:n], atol=1e-6)
    ref = np.convolve(x, Resampler(SR).taps)[Resampler(SR).delay:][:SR:3]
    assert np.allclose(parts[:n], ref[:n], atol=1e-5)
    tone = np.sin(2 * np.pi * 10_000 * np.arange(SR) / SR).astype(np.float32)
    assert Resampler(SR).process(tone)[200:].std() < 0.01  # above 8 kHz: gone
    ok = np.sin(2 * np.pi * 1000 * np.arange(SR) / SR).astype(np.float32)
    assert abs(Resampler(SR).process(ok)[200:].std() - ok.std()) < 0.01


def test_block_clock_anchors_and_gaps() -> None:
    c = BlockClock(48000)
    assert c.add(1_000_000_000, 960)
    assert c.add(1_020_000_500, 960)  # 0.5 µs of clock wobble is absorbed
    assert c.time_of(960 + 480) == 1_020_000_500 + 10_000_000
    assert not c.add(1_200_000_000, 960), "a 160 ms hole breaks the run"
