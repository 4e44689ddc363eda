"""``audio.vad``: speech segments from Silero VAD, the ONNX file the ``silero-vad`` package
ships (installed with ``pip install --no-deps silero-vad``: no torch; we only read its
``data/silero_vad.onnx`` and run it with onnxruntime).

Per stream: PCM → mono → 16 kHz (:class:`agent.labelers._audio.Resampler`: FIR low-pass
then decimation, so 48 kHz needs no scipy) → 512-sample windows (32 ms), each run with the
previous window's last 64 samples as context and the recurrent ``state`` carried over, as
Silero's own ``OnnxWrapper`` does. Speech probability → segments with hysteresis (the
rules of Silero's ``get_speech_timestamps``): speech starts at ``p ≥ threshold``, ends
after ``min_silence_ms`` of ``p < neg_threshold``; segments shorter than ``min_speech_ms``
are dropped; ``speech_pad_ms`` widens each side.

Labels (``/labels/<mic>/vad``, JSON ``edgecap.AudioLabels``): one when speech starts
(``open: true``, ``end_ns: null`` — so triggers need not wait) and one when it ends with
the whole segment. Every speech segment carries ``privacy: "speech"`` (a consent flag the
recorder's manifest can carry). A label's ``t_ns`` is that of the audio block whose
processing produced it; the segment's ``start_ns``/``end_ns`` are exact to a window.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from agent.types import Sample

from . import (Labeler, LabelerError, LabelerOptions, ModelInfo, detection, make_label,
               register)
from ._audio import (AudioLabelerMixin, BlockClock, Resampler, audio_payload,
                     sample_rate_of, to_mono)
from ._onnx import session

WINDOW = 512
CONTEXT = 64
SR = 16000


def silero_model_path() -> Path:
    """``silero_vad/data/silero_vad.onnx`` of the installed package (not imported: the
    package's ``__init__`` wants torch)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise LabelerError("the silero-vad package is not installed; run "
                           "'.venv/bin/pip install --no-deps silero-vad'")
    p = Path(list(spec.submodule_search_locations)[0]) / "data" / "silero_vad.onnx"
    if not p.is_file():
        raise LabelerError(f"silero-vad is installed but {p} is missing")
    return p


class VadOptions(LabelerOptions):
    threshold: float = Field(default=0.5, gt=0, lt=1)
    neg_threshold: float | None = Field(default=None, gt=0, lt=1,
                                        description="default threshold - 0.15")
    min_speech_ms: float = Field(default=250.0, ge=0)
    min_silence_ms: float = Field(default=100.0, ge=0)
    speech_pad_ms: float = Field(default=30.0, ge=0)
    channel: int | None = Field(default=None, ge=0, description="default: mean of channels")
    sample_rate: int | None = Field(default=None, ge=8000)
    emit_open: bool = True


class SileroVad:
    """The model with its recurrent state for one audio stream: ``probs(x16k)`` returns one
    speech probability per complete 512-sample window (leftover samples wait)."""

    def __init__(self, sess: Any):
        self.sess = sess
        self.reset()

    def reset(self) -> None:
        self.state = np.zeros((2, 1, 128), np.float32)
        self.context = np.zeros(CONTEXT, np.float32)
        self.pending = np.zeros(0, np.float32)
        self._sr = np.array(SR, dtype=np.int64)

    def probs(self, x16: np.ndarray) -> np.ndarray:
        buf = np.concatenate([self.pending, x16])
        n = len(buf) // WINDOW
        out = np.empty(n, np.float32)
        for i in range(n):
            w = buf[i * WINDOW:(i + 1) * WINDOW]
            inp = np.concatenate([self.context, w])[None, :]
            p, self.state = self.sess.run(None, {"input": inp, "state": self.state,
                                                 "sr": self._sr})
            out[i] = float(p.reshape(-1)[0])
            self.context = w[-CONTEXT:]
        self.pending = buf[n * WINDOW:].copy()
        return out


@dataclass
class _Stream:
    """Per-stream state (worker thread only)."""

    rate: int
    vad: SileroVad
    resampler: Resampler
    clock: BlockClock
    k16: int = 0                     # 16 kHz windows consumed (in samples)
    triggered: bool = False
    start16: int = 0
    temp_end16: int | None = None
    probs: list[float] = field(default_factory=list)


@register("audio.vad")
class AudioVad(AudioLabelerMixin, Labeler):
    """Speech segments on ``/labels/<mic>/vad``."""

    suffix = "vad"
    stateful = True
    Options = VadOptions

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        o = self.options
        path = Path(cfg.model) if cfg.model else silero_model_path()
        self.sess = session(path, cfg.threads)
        try:
            version = importlib.metadata.version("silero-vad") if not cfg.model else "custom"
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        self.neg = o.neg_threshold if o.neg_threshold is not None else max(0.01,
                                                                           o.threshold - 0.15)
        self.model = ModelInfo.of_file(path, "silero_vad", version, {
            "threshold": o.threshold, "neg_threshold": self.neg,
            "min_speech_ms": o.min_speech_ms, "min_silence_ms": o.min_silence_ms,
            "speech_pad_ms": o.speech_pad_ms})
        self._streams: dict[str, _Stream] = {}
        self._rates: dict[str, int] = {}

    def _state(self, stream: str) -> _Stream:
        st = self._streams.get(stream)
        if st is None:
            rate = self._rates.get(stream) or sample_rate_of({}, None, self.options.sample_rate)
            st = self._streams[stream] = _Stream(rate, SileroVad(self.sess), Resampler(rate),
                                                 BlockClock(rate))
        return st

    def label(self, sample: Sample) -> list[Sample]:
        x = to_mono(sample.payload, self.options.channel)
        if x is None:
            self.bad_input += 1
            return []
        st = self._state(sample.stream)
        segs: list[dict[str, Any]] = []
        if not st.clock.add(sample.t_ns, len(x)):
            segs += self._close(st, st.k16, forced=True)  # a gap: end what was open
            st.vad.reset()
            st.resampler.reset()
            st.clock.reset()
            st.k16 = 0
            st.clock.add(sample.t_ns, len(x))
        probs = st.vad.probs(st.resampler.process(x))
        for p in probs:
            segs += self._step(st, float(p))
            st.k16 += WINDOW
        if not segs:
            return []
        return [self._label(sample, segs)]

    # -- hysteresis -------------------------------------------------------------------
    def _ms(self, ms: float) -> int:
        return int(ms * SR / 1000)

    def _step(self, st: _Stream, p: float) -> list[dict[str, Any]]:
        o = self.options
        out: list[dict[str, Any]] = []
        if st.triggered:
            st.probs.append(p)
        if p >= o.threshold:
            st.temp_end16 = None
            if not st.triggered:
                st.triggered = True
                st.start16 = max(0, st.k16 - self._ms(o.speech_pad_ms))
                st.probs = [p]
                if o.emit_open:
                    out.append(self._seg(st, st.start16, None, p))
        elif p < self.neg and st.triggered:
            if st.temp_end16 is None:
                st.temp_end16 = st.k16
            if st.k16 + WINDOW - st.temp_end16 >= self._ms(o.min_silence_ms):
                out += self._close(st, st.temp_end16)
        return out

    def _close(self, st: _Stream, end16: int, forced: bool = False) -> list[dict[str, Any]]:
        if not st.triggered:
            return []
        st.triggered = False
        st.temp_end16 = None
        end16 = end16 + (0 if forced else self._ms(self.options.speech_pad_ms))
        score = float(np.mean(st.probs)) if st.probs else 0.0
        if end16 - st.start16 < self._ms(self.options.min_speech_ms):
            # too short to be speech: retract an open segment that was announced
            return [self._seg(st, st.start16, end16, score, kind="retracted")] \
                if self.options.emit_open else []
        return [self._seg(st, st.start16, end16, score)]

    def _seg(self, st: _Stream, s16: int, e16: int | None, score: float,
             kind: str = "speech") -> dict[str, Any]:
        ratio = st.rate / SR
        seg = {"start_ns": st.clock.time_of(s16 * ratio),
               "end_ns": None if e16 is None else st.clock.time_of(e16 * ratio),
               "kind": kind, "score": round(score, 4), "open": e16 is None,
               "privacy": "speech" if kind == "speech" else None}
        return seg

    def _label(self, sample: Sample, segs: list[dict[str, Any]]) -> Sample:
        dets = [detection(sample.stream, sample.t_ns, self.kind, s["kind"], s["score"],
                          start_ns=s["start_ns"], end_ns=s["end_ns"], open=s["open"],
                          **({"privacy": s["privacy"]} if s["privacy"] else {}))
                for s in segs]
        privacy = "speech" if any(s["privacy"] for s in segs) else None
        payload = audio_payload(self.kind, sample.stream, self.model.as_dict(), segs, privacy)
        return make_label(sample, self.out_stream(sample.stream), payload, dets)

    def flush(self) -> list[Sample]:
        """End open segments at the last audio seen (called by the pool at stop)."""
        out = []
        for name, st in self._streams.items():
            segs = self._close(st, st.k16, forced=True)
            if segs:
                t = st.clock.time_of(st.k16 * st.rate / SR)
                out.append(self._label(Sample(name, None, 0, t_ns=t), segs))
        return out
