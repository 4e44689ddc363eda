"""``audio.onset``: impulsive sound events (clicks, knocks, bangs, a horn's attack) by
spectral-flux onset detection, in numpy at the stream's own sample rate. No model file.

Per stream: mono PCM → frames of ``frame`` samples every ``hop`` (Hann window) → log
magnitude spectrum ``log1p(100·|X|)`` → flux = sum of positive bin-wise increases over the
previous frame. A frame is an onset when its flux is a local maximum over ±``peak_frames``
(so decisions lag by that many hops), exceeds ``median + k · MAD`` of the last
``history_s`` of flux and ``min_flux``, and its energy is at least ``min_rise_db`` above the
mean of the preceding 50 ms. Onsets closer than ``min_interval_ms`` merge into the first.
Speech plosives can pass these rules; a speech-free click track cannot pass silence.

Labels (``/labels/<mic>/onset``, JSON ``edgecap.AudioLabels``): segments with ``kind:
"onset"``, ``start_ns`` = the first sample of the onset frame reaching half its peak
amplitude (the attack), ``end_ns`` = start + one hop, ``score``
= ``1 - exp(-(flux/threshold - 1))``.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import Field

from agent.types import Sample

from . import Labeler, LabelerOptions, ModelInfo, detection, make_label, register
from ._audio import AudioLabelerMixin, BlockClock, audio_payload, sample_rate_of, to_mono

VERSION = "1.0"


class OnsetOptions(LabelerOptions):
    frame: int = Field(default=1024, ge=64, le=16384)
    hop: int = Field(default=512, ge=16, le=16384)
    k: float = Field(default=6.0, gt=0, description="MAD multiplier of the threshold")
    min_flux: float = Field(default=40.0, ge=0)
    min_rise_db: float = Field(default=9.0, ge=0)
    history_s: float = Field(default=1.5, gt=0)
    peak_frames: int = Field(default=2, ge=1, le=20)
    min_interval_ms: float = Field(default=100.0, ge=0)
    channel: int | None = Field(default=None, ge=0)
    sample_rate: int | None = Field(default=None, ge=4000)


@dataclass
class _Stream:
    rate: int
    clock: BlockClock
    buf: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float32))
    buf_start: int = 0                 # sample index of buf[0]
    prev_mag: np.ndarray | None = None
    flux: deque[tuple[int, float, float]] = field(default_factory=deque)  # (start, flux, dB)
    history: deque[float] = field(default_factory=deque)
    energies: deque[float] = field(default_factory=deque)
    last_onset: int = -(1 << 62)


class OnsetDetector:
    """Streaming detector for one stream; ``feed(x)`` returns ``[(sample_index, score)]``."""

    def __init__(self, o: OnsetOptions, rate: int):
        self.o = o
        self.rate = rate
        self.win = np.hanning(o.frame).astype(np.float32)
        self.hist_len = max(8, int(o.history_s * rate / o.hop))
        self.pre_frames = max(1, int(0.05 * rate / o.hop))
        self.st = _Stream(rate, BlockClock(rate))

    def reset(self) -> None:
        self.st = _Stream(self.rate, BlockClock(self.rate))

    def feed(self, x: np.ndarray) -> list[tuple[int, float]]:
        o, st = self.o, self.st
        st.buf = np.concatenate([st.buf, x])
        out: list[tuple[int, float]] = []
        n = (len(st.buf) - o.frame) // o.hop + 1 if len(st.buf) >= o.frame else 0
        if n <= 0:
            return out
        frames = np.lib.stride_tricks.sliding_window_view(st.buf, o.frame)[::o.hop][:n]
        mags = np.log1p(100.0 * np.abs(np.fft.rfft(frames * self.win, axis=1)))
        energy_db = 10 * np.log10(np.mean(frames ** 2, axis=1) + 1e-10)
        a = np.abs(frames)
        first_loud = np.argmax(a >= 0.5 * a.max(1, keepdims=True), axis=1)  # attack sample
        for i in range(n):
            prev = st.prev_mag if st.prev_mag is not None else mags[i]
            flux = float(np.maximum(mags[i] - prev, 0).sum())
            st.prev_mag = mags[i]
            st.flux.append((st.buf_start + i * o.hop + int(first_loud[i]), flux,
                            float(energy_db[i])))
            out += self._decide()
        st.buf = st.buf[n * o.hop:]
        st.buf_start += n * o.hop
        return out

    def _decide(self) -> list[tuple[int, float]]:
        """Judge the frame ``peak_frames`` back, now that its neighbours are known."""
        o, st = self.o, self.st
        p = o.peak_frames
        if len(st.flux) < 2 * p + 1:
            return []
        start, f, e = st.flux[-p - 1]
        window = [v[1] for v in st.flux]
        res: list[tuple[int, float]] = []
        if st.history:
            h = np.fromiter(st.history, np.float64)
            med = float(np.median(h))
            mad = float(np.median(np.abs(h - med))) + 1e-6
            thr = max(o.min_flux, med + o.k * mad)
            pre = list(st.energies)[-self.pre_frames:]
            rise = e - (10 * math.log10(np.mean(np.power(10, np.array(pre) / 10)))
                        if pre else -100.0)
            if (f >= thr and f >= max(window) and rise >= o.min_rise_db
                    and len(st.history) >= min(self.hist_len, 8)
                    and (start - st.last_onset) * 1000 / self.rate >= o.min_interval_ms):
                st.last_onset = start
                res.append((start, 1.0 - math.exp(-(f / thr - 1.0))))
        st.history.append(f)
        if len(st.history) > self.hist_len:
            st.history.popleft()
        st.energies.append(e)
        if len(st.energies) > self.pre_frames + 1:
            st.energies.popleft()
        while len(st.flux) > 2 * p + 1:
            st.flux.popleft()
        return res


@register("audio.onset")
class AudioOnset(AudioLabelerMixin, Labeler):
    """Impulsive events on ``/labels/<mic>/onset``."""

    suffix = "onset"
    stateful = True
    Options = OnsetOptions

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        o = self.options
        self.model = ModelInfo("spectral-flux-onset", VERSION, "", {
            "k": o.k, "min_flux": o.min_flux, "min_rise_db": o.min_rise_db,
            "frame": o.frame, "hop": o.hop, "min_interval_ms": o.min_interval_ms})
        self._rates: dict[str, int] = {}
        self._det: dict[str, OnsetDetector] = {}

    def label(self, sample: Sample) -> list[Sample]:
        x = to_mono(sample.payload, self.options.channel)
        if x is None:
            self.bad_input += 1
            return []
        det = self._det.get(sample.stream)
        if det is None:
            rate = self._rates.get(sample.stream) or sample_rate_of({}, None,
                                                                     self.options.sample_rate)
            det = self._det[sample.stream] = OnsetDetector(self.options, rate)
        if not det.st.clock.add(sample.t_ns, len(x)):
            det.reset()
            det.st.clock.add(sample.t_ns, len(x))
        events = det.feed(x)
        if not events:
            return []
        hop_ns = int(self.options.hop * 1e9 / det.rate)
        segs = [{"start_ns": det.st.clock.time_of(k), "end_ns": det.st.clock.time_of(k) + hop_ns,
                 "kind": "onset", "score": round(s, 4), "open": False, "privacy": None}
                for k, s in events]
        dets = [detection(sample.stream, sample.t_ns, self.kind, "onset", s["score"],
                          start_ns=s["start_ns"], end_ns=s["end_ns"]) for s in segs]
        payload = audio_payload(self.kind, sample.stream, self.model.as_dict(), segs, None)
        return [make_label(sample, self.out_stream(sample.stream), payload, dets)]
