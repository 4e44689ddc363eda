"""Synthesised sounds for the HIL microphone: horn, click, siren, tone, and speech through
espeak-ng. Every function returns mono float32 in [-1, 1] at the requested rate and is
deterministic (same arguments, same samples), so what the emulator plays is known exactly.

Speech is synthesised once per (text, voice, speed, rate) into a WAV file in a cache
directory (the run directory's ``audio/`` in the emulator), trimmed to the voiced part, so a
scenario's speech segments have exact true start and end times.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np

SOUND_KINDS = ("horn", "click", "siren")

# Fundamentals of the synthesised horn (a dual-tone car horn); tests look for them by FFT.
HORN_HZ = (420.0, 500.0)
# The siren sweeps between these (a "wail" with period SIREN_PERIOD_S).
SIREN_HZ = (650.0, 1400.0)
SIREN_PERIOD_S = 1.2
# The click (and clapper) is a decaying cosine burst at this frequency.
CLICK_HZ = 3000.0


class SpeechError(RuntimeError):
    """espeak-ng is missing or failed."""


def _envelope(n: int, rate: int, attack_s: float = 0.01, release_s: float = 0.02) -> np.ndarray:
    env = np.ones(n, np.float32)
    a = min(n // 2, max(1, int(attack_s * rate)))
    r = min(n // 2, max(1, int(release_s * rate)))
    env[:a] = np.linspace(0, 1, a, dtype=np.float32)
    env[n - r:] = np.linspace(1, 0, r, dtype=np.float32)
    return env


def tone(freq_hz: float, duration_s: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    """A sine at ``freq_hz`` with 10 ms fades."""
    n = max(1, int(round(duration_s * rate)))
    t = np.arange(n) / rate
    return (amplitude * np.sin(2 * np.pi * freq_hz * t) * _envelope(n, rate)).astype(np.float32)


def horn(duration_s: float, rate: int, amplitude: float = 0.5) -> np.ndarray:
    """A dual-tone car horn: two soft-clipped tones at :data:`HORN_HZ`."""
    n = max(1, int(round(duration_s * rate)))
    t = np.arange(n) / rate
    x = sum(np.tanh(2.5 * np.sin(2 * np.pi * f * t)) for f in HORN_HZ) / 2
    return (amplitude * x * _envelope(n, rate, 0.015, 0.03)).astype(np.float32)


def siren(duration_s: float, rate: int, amplitude: float = 0.4) -> np.ndarray:
    """A wailing siren sweeping :data:`SIREN_HZ` with period :data:`SIREN_PERIOD_S`."""
    n = max(1, int(round(duration_s * rate)))
    t = np.arange(n) / rate
    lo, hi = SIREN_HZ
    f = lo + (hi - lo) * 0.5 * (1 - np.cos(2 * np.pi * t / SIREN_PERIOD_S))
    phase = 2 * np.pi * np.cumsum(f) / rate
    x = np.sin(phase) + 0.3 * np.sin(2 * phase)
    return (amplitude * x / 1.3 * _envelope(n, rate, 0.05, 0.1)).astype(np.float32)


def click(rate: int, duration_s: float = 0.004, amplitude: float = 0.9) -> np.ndarray:
    """A slate click: a 3 kHz cosine burst that starts at its peak and decays in ~1 ms.
    Its onset is the first sample (what clapper scoring looks for); being band-limited it
    keeps its shape when the emulator places it at a fractional sample position."""
    n = max(2, int(round(duration_s * rate)))
    t = np.arange(n) / rate
    x = np.cos(2 * np.pi * CLICK_HZ * t) * np.exp(-t / 0.0008)
    return (amplitude * x).astype(np.float32)


def sound(kind: str, duration_s: float, rate: int) -> np.ndarray:
    """The waveform of a scenario sound event (``horn``, ``click`` or ``siren``)."""
    if kind == "horn":
        return horn(duration_s, rate)
    if kind == "siren":
        return siren(duration_s, rate)
    if kind == "click":
        return click(rate)
    raise ValueError(f"unknown sound kind {kind!r}; known: {', '.join(SOUND_KINDS)}")


# -- speech ------------------------------------------------------------------------------
def speech(text: str, rate: int, cache_dir: Path, voice: str = "en", wpm: int = 165,
           amplitude: float = 0.5) -> np.ndarray:
    """``text`` spoken by espeak-ng at ``rate``, trimmed to the voiced part and normalised to
    peak ``amplitude``. Cached as ``cache_dir/speech-<hash>.wav``; blocks while espeak-ng
    runs (~0.1–0.5 s a sentence). Raises SpeechError when espeak-ng is missing or fails."""
    key = hashlib.sha256(f"{text}|{voice}|{wpm}|{rate}|{amplitude}".encode()).hexdigest()[:16]
    cache_dir = Path(cache_dir)
    path = cache_dir / f"speech-{key}.wav"
    if path.exists():
        x, r = read_wav(path)
        if r == rate:
            return x
    exe = shutil.which("espeak-ng") or shutil.which("espeak")
    if exe is None:
        raise SpeechError("espeak-ng not installed (apt-get install espeak-ng)")
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as td:
        raw = Path(td) / "raw.wav"
        try:
            r = subprocess.run([exe, "-v", voice, "-s", str(wpm), "-w", str(raw), "--", text],
                               capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            raise SpeechError(f"espeak-ng timed out on {text[:40]!r}") from None
        if r.returncode != 0 or not raw.exists():
            raise SpeechError(f"espeak-ng failed ({r.returncode}): {r.stderr.strip()[:300]}")
        x, src_rate = read_wav(raw)
    x = resample(x, src_rate, rate)
    x = trim(x, rate)
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak > 0:
        x = (x * (amplitude / peak)).astype(np.float32)
    write_wav(path, x, rate)
    return read_wav(path)[0]  # what is cached is exactly what is returned (s16 quantised)


def trim(x: np.ndarray, rate: int, threshold: float = 0.01, pad_s: float = 0.0) -> np.ndarray:
    """Drop leading and trailing samples quieter than ``threshold`` (full scale = 1)."""
    loud = np.flatnonzero(np.abs(x) > threshold * max(1e-9, float(np.max(np.abs(x), initial=0))))
    if loud.size == 0:
        return x[:0]
    pad = int(pad_s * rate)
    return x[max(0, loud[0] - pad):loud[-1] + 1 + pad]


def resample(x: np.ndarray, src_rate: int, dst_rate: int) -> np.ndarray:
    """Band-limited resampling through the FFT (zero-padding or truncating the spectrum).
    Treats ``x`` as periodic, which is harmless for clips that start and end in silence
    (espeak-ng output before trimming)."""
    if src_rate == dst_rate or len(x) == 0:
        return x.astype(np.float32)
    n_out = int(round(len(x) * dst_rate / src_rate))
    spec = np.fft.rfft(x.astype(np.float64))
    out = np.fft.irfft(spec, n_out) * (n_out / len(x))
    return out.astype(np.float32)


# -- WAV ---------------------------------------------------------------------------------
def to_s16(x: np.ndarray) -> np.ndarray:
    """Float [-1, 1] → int16 with hard clipping at full scale."""
    return np.clip(np.round(np.asarray(x, np.float64) * 32767), -32768, 32767).astype("<i2")


def write_wav(path: Path, x: np.ndarray, rate: int) -> None:
    """Mono (or frames × channels) float or int16 samples → 16-bit PCM WAV."""
    pcm = x if x.dtype == np.int16 else to_s16(x)
    ch = 1 if pcm.ndim == 1 else pcm.shape[1]
    with wave.open(str(path), "wb") as w:
        w.setnchannels(ch)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm.astype("<i2").tobytes())


def read_wav(path: Path) -> tuple[np.ndarray, int]:
    """A 16-bit PCM WAV → (mono float32 in [-1, 1], rate); channels are averaged."""
    with wave.open(str(path), "rb") as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{path}: only 16-bit PCM WAV is supported")
        ch, rate = w.getnchannels(), w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2")
    x = pcm.reshape(-1, ch).mean(axis=1) / 32767.0
    return x.astype(np.float32), rate
