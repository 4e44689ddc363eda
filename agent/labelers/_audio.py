"""Shared audio plumbing for the audio labelers: PCM → mono float, a streaming resampler,
block timing from sample counts, and the ``edgecap.AudioLabels`` JSON schema.

Timing: a block's ``t_ns`` is the shared-timebase time of its first sample. Within a run of
contiguous blocks, the time of sample ``k`` is taken from the newest block anchor at or
before ``k`` plus ``(k - anchor) / rate`` — sample counts between anchors, the shared clock
at every block, so device drift cannot accumulate. A block whose ``t_ns`` is more than
``gap_ns`` away from where the sample count predicts starts a new run (labelers reset).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import numpy as np

AUDIO_LABELS_SCHEMA: dict[str, Any] = {
    "title": "edgecap.AudioLabels",
    "type": "object",
    "properties": {
        "labeler": {"type": "string"}, "source": {"type": "string"},
        "model": {"type": "object", "properties": {
            "name": {"type": "string"}, "version": {"type": "string"},
            "sha256": {"type": "string"}, "thresholds": {"type": "object"}}},
        "privacy": {"type": ["string", "null"]},
        "segments": {"type": "array", "items": {"type": "object", "properties": {
            "start_ns": {"type": "integer"}, "end_ns": {"type": ["integer", "null"]},
            "kind": {"type": "string"}, "score": {"type": "number"},
            "open": {"type": "boolean"}, "privacy": {"type": ["string", "null"]}}}},
    },
}


def to_mono(payload: Any, channel: int | None = None) -> np.ndarray | None:
    """int16 PCM (frames, or frames × channels) → float32 mono in [-1, 1]; None if the
    payload is not PCM."""
    if not isinstance(payload, np.ndarray) or payload.size == 0 or payload.ndim > 2:
        return None
    x = payload.astype(np.float32) / 32768.0
    if x.ndim == 2:
        x = x[:, channel] if channel is not None and channel < x.shape[1] else x.mean(1)
    return x


def lowpass_taps(cutoff: float, numtaps: int) -> np.ndarray:
    """Windowed-sinc (Hamming) low-pass FIR; ``cutoff`` in cycles per sample (< 0.5)."""
    n = np.arange(numtaps) - (numtaps - 1) / 2
    h = 2 * cutoff * np.sinc(2 * cutoff * n) * np.hamming(numtaps)
    return (h / h.sum()).astype(np.float32)


class Resampler:
    """Streaming resampler to ``out_rate``: low-pass FIR at 0.45 × the output rate (when
    down-sampling; 64 dB-ish Hamming stop band), then linear interpolation at the output
    instants. For integer ratios (48 kHz → 16 kHz) the interpolation lands on input
    samples: it is plain decimation after the anti-alias filter. Output sample ``j`` is at
    input position ``j × in_rate / out_rate`` (filter delay compensated)."""

    def __init__(self, in_rate: int, out_rate: int = 16000, numtaps: int = 63):
        self.in_rate, self.out_rate = int(in_rate), int(out_rate)
        self.ratio = self.in_rate / self.out_rate
        self.taps = (lowpass_taps(0.45 / self.ratio, numtaps) if self.ratio > 1
                     else np.ones(1, np.float32))
        self.delay = (len(self.taps) - 1) // 2
        self.reset()

    def reset(self) -> None:
        self._hist = np.zeros(len(self.taps) - 1, np.float32)
        self._n_in = 0        # filtered samples produced so far (aligned to input index)
        self._n_out = 0
        self._last = np.zeros(0, np.float32)

    def process(self, x: np.ndarray) -> np.ndarray:
        if self.in_rate == self.out_rate:
            return x.astype(np.float32, copy=False)
        buf = np.concatenate([self._hist, x])
        self._hist = buf[len(buf) - (len(self.taps) - 1):] if len(self.taps) > 1 else \
            self._hist
        y = np.convolve(buf, self.taps, mode="valid") if len(self.taps) > 1 else buf
        # y[i] is the filtered value at input index (n_in + i - delay); start at -delay
        base = self._n_in - self.delay
        self._n_in += len(x)
        seq = np.concatenate([self._last, y])
        seq_base = base - len(self._last)
        end = base + len(y)  # exclusive, in input index
        # outputs j whose position p = j·ratio has both neighbours known: p + 1 < end
        j_end = max(self._n_out, math.ceil((end - 1) / self.ratio - 1e-9))
        pos = np.arange(self._n_out, j_end) * self.ratio
        self._n_out = j_end
        self._last = seq[-1:]
        pos = pos[pos >= seq_base]
        if not len(pos):
            return np.zeros(0, np.float32)
        p = pos - seq_base
        i0 = np.floor(p).astype(np.int64)
        f = (p - i0).astype(np.float32)
        return (seq[i0] * (1 - f) + seq[np.minimum(i0 + 1, len(seq) - 1)] * f).astype(
            np.float32)


class BlockClock:
    """Maps sample indices of one stream at ``rate`` to shared-timebase ns (module doc)."""

    def __init__(self, rate: float, gap_ns: int = 50_000_000):
        self.rate = float(rate)
        self.gap_ns = gap_ns
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self._anchors: deque[tuple[int, int]] = deque(maxlen=256)

    def add(self, t_ns: int, n_samples: int) -> bool:
        """Register a block; returns False when it breaks the run (caller resets first,
        then calls again)."""
        if self._anchors:
            k0, t0 = self._anchors[-1]
            expect = t0 + int((self.n - k0) * 1e9 / self.rate)
            if abs(t_ns - expect) > self.gap_ns:
                return False
        self._anchors.append((self.n, int(t_ns)))
        self.n += n_samples
        return True

    def time_of(self, k: float) -> int:
        """Shared-timebase ns of (fractional) sample index ``k``."""
        if not self._anchors:
            return 0
        best = self._anchors[0]
        for a in reversed(self._anchors):
            if a[0] <= k:
                best = a
                break
        return best[1] + int(round((k - best[0]) * 1e9 / self.rate))


def sample_rate_of(params: dict[str, Any], rate_hz: float | None, override: int | None,
                   default: int = 48000) -> int:
    """The PCM sample rate: option, ``params["sample_rate"]``, else ``rate_hz`` when it
    looks like an audio rate (≥ 4 kHz; synthetic drivers give blocks/s there)."""
    if override:
        return int(override)
    if params.get("sample_rate"):
        return int(params["sample_rate"])
    if rate_hz and rate_hz >= 4000:
        return int(rate_hz)
    return default


def audio_payload(labeler: str, source: str, model: dict[str, Any],
                  segments: list[dict[str, Any]], privacy: str | None) -> dict[str, Any]:
    return {"labeler": labeler, "source": source, "model": model, "privacy": privacy,
            "segments": segments}


class AudioLabelerMixin:
    """What audio labelers share: they take pcm-s16 audio streams, remember each stream's
    sample rate (``self._rates``) and write ``edgecap.AudioLabels`` JSON. Mixed in before
    :class:`agent.labelers.Labeler`; needs ``options.sample_rate`` and ``options``."""

    _rates: dict[str, int]

    def accepts(self, info: Any) -> bool:
        from agent.types import StreamKind

        ok = info.kind == StreamKind.AUDIO and info.encoding == "pcm-s16"
        if ok:
            self._rates[info.name] = sample_rate_of(info.params, info.rate_hz,
                                                    self.options.sample_rate)  # type: ignore
        return ok

    def output_encoding(self) -> tuple[str, dict[str, Any]]:
        return "json", {"schema": "edgecap.AudioLabels", "json_schema": AUDIO_LABELS_SCHEMA}
