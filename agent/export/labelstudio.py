"""Label Studio export: tasks with pre-annotations (``predictions``) for review.

Layout::

    OUT/images/<camera_slug>/<t_ns>.jpg        JPEG bytes as recorded
    OUT/audio/<mic_slug>/<clip_start_ns>.wav   PCM clips of ``clip_s`` seconds
    OUT/tasks.json                             one task per image and per audio clip
    OUT/label_config_image.xml                 labeling configs to create the projects
    OUT/label_config_audio.xml

Image task: ``data.image`` (``url_prefix`` + relative path; for Label Studio's local
files use ``url_prefix="/data/local-files/?d=<dir>/"``), ``data.stream``/``t_ns``; one
prediction per label stream with ``model_version`` and ``score`` (mean of its boxes),
results of type ``rectanglelabels`` with ``x y width height`` in percent of the image and
``original_width``/``original_height``. Audio task: ``data.audio``; predictions with
results of type ``labels`` (``start``/``end`` in seconds from the clip start) for the
speech segments that overlap the clip (clipped to it). Validated against
:data:`TASKS_SCHEMA`, a JSON schema written from Label Studio's task-format docs
(label-studio-sdk pulls in pandas, nltk and more, so it is not a test dependency).
"""

from __future__ import annotations

import json
import os
import wave
from json.encoder import encode_basestring_ascii as _str
from pathlib import Path
from typing import Any

import numpy as np

from agent.types import StreamKind

from .common import (NS, AudioLabel, ExportOptions, FileWriter, Frame, LabelSet, Progress,
                     SessionView, image_data, json_text, slug)

_RESULT = {
    "type": "object",
    "required": ["id", "type", "from_name", "to_name", "value"],
    "properties": {
        "id": {"type": "string", "minLength": 1},
        "type": {"enum": ["rectanglelabels", "labels"]},
        "from_name": {"type": "string"}, "to_name": {"type": "string"},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "original_width": {"type": "integer", "minimum": 1},
        "original_height": {"type": "integer", "minimum": 1},
        "image_rotation": {"type": "number"},
        "value": {"type": "object"},
    },
    "allOf": [
        {"if": {"properties": {"type": {"const": "rectanglelabels"}}},
         "then": {"required": ["original_width", "original_height"],
                  "properties": {"value": {
                      "required": ["x", "y", "width", "height", "rectanglelabels"],
                      "properties": {
                          "x": {"type": "number", "minimum": 0, "maximum": 100},
                          "y": {"type": "number", "minimum": 0, "maximum": 100},
                          "width": {"type": "number", "minimum": 0, "maximum": 100},
                          "height": {"type": "number", "minimum": 0, "maximum": 100},
                          "rotation": {"type": "number"},
                          "rectanglelabels": {"type": "array", "minItems": 1,
                                              "items": {"type": "string"}}}}}}},
        {"if": {"properties": {"type": {"const": "labels"}}},
         "then": {"properties": {"value": {
             "required": ["start", "end", "labels"],
             "properties": {"start": {"type": "number", "minimum": 0},
                            "end": {"type": "number", "minimum": 0},
                            "labels": {"type": "array", "minItems": 1,
                                       "items": {"type": "string"}}}}}}},
    ],
}

#: JSON schema of the tasks file (Label Studio "basic JSON format" with predictions).
TASKS_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "array",
    "items": {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {"type": "object", "minProperties": 1},
            "predictions": {"type": "array", "items": {
                "type": "object",
                "required": ["model_version", "result"],
                "properties": {"model_version": {"type": "string", "minLength": 1},
                               "score": {"type": "number", "minimum": 0, "maximum": 1},
                               "result": {"type": "array", "items": _RESULT}}}},
        },
    },
}

IMAGE_CONFIG = """<View>
  <Image name="image" value="$image" zoom="true"/>
  <RectangleLabels name="label" toName="image">
{labels}  </RectangleLabels>
</View>
"""

AUDIO_CONFIG = """<View>
  <Audio name="audio" value="$audio"/>
  <Labels name="label" toName="audio">
{labels}  </Labels>
</View>
"""


def export_labelstudio(uri: str, opts: ExportOptions, url_prefix: str = "",
                       clip_s: float = 30.0) -> dict[str, Any]:
    """Write the Label Studio export of a session into ``opts.out_dir``; returns a
    summary."""
    view = SessionView(uri, opts, (StreamKind.CAMERA, StreamKind.AUDIO))
    out = Path(opts.out_dir)
    out_s = str(out)
    tasks: list[str] = []  # each task as JSON (image tasks are written as text directly)
    n_img = n_preds = 0
    img_classes: set[str] = set()
    audio_classes: set[str] = set()
    clips: dict[str, _Clip] = {}
    done: list[_Clip] = []
    audio_labels: list[AudioLabel] = []
    clip_ns = int(clip_s * NS)
    bar = Progress(view.expected_records(), "Label Studio export", opts.progress)
    files = FileWriter()
    try:
        for ev in view.events(bar.advance):
            if isinstance(ev, AudioLabel):
                audio_labels.append(ev)
                continue
            if ev.info.kind == StreamKind.CAMERA:
                t = _image_task(ev, out_s, url_prefix, img_classes, files)
                if t is None:
                    view.counts["decode_errors"] += 1
                else:
                    tasks.append(t[0])
                    n_img += 1
                    n_preds += t[1]
            elif ev.info.kind == StreamKind.AUDIO and isinstance(ev.sample.payload, np.ndarray):
                c = clips.get(ev.stream)
                if c is not None and (ev.t_ns - c.start_ns >= clip_ns or not c.contiguous(ev)):
                    c.write(out)
                    done.append(c)
                    c = None
                if c is None:
                    c = clips[ev.stream] = _Clip(ev)
                c.add(ev)
        for c in clips.values():
            c.write(out)
            done.append(c)
        bar.close()
        # speech segments are labelled when they end: tasks are built once all are known
        for c in sorted(done, key=lambda c: (c.start_ns, c.stream)):
            t = c.task(url_prefix, audio_labels, audio_classes)
            tasks.append(json_text(t))
            n_preds += len(t["predictions"])
        out.mkdir(parents=True, exist_ok=True)
        (out / "label_config_image.xml").write_text(IMAGE_CONFIG.format(labels="".join(
            f'    <Label value="{c}"/>\n' for c in sorted(img_classes))))
        (out / "label_config_audio.xml").write_text(AUDIO_CONFIG.format(labels="".join(
            f'    <Label value="{c}"/>\n' for c in sorted(audio_classes or {"speech"}))))
        # encoded while the last images are copied; renamed once all are written
        files.write_last(out / "tasks.json", ("[" + ",".join(tasks) + "]\n").encode())
    finally:
        bar.close()
        files.close()
    return {"format": "labelstudio", "out": str(out), "tasks": len(tasks),
            "image_tasks": n_img, "audio_tasks": len(tasks) - n_img,
            "predictions": n_preds,
            "images_copied": files.copied, **view.counts}


#: one rectanglelabels result as :func:`json_text` writes its dict (keys sorted)
_RECT = ('{"from_name":"label","id":%s,"image_rotation":0,"original_height":%d,'
         '"original_width":%d,"score":%s,"to_name":"image","type":"rectanglelabels",'
         '"value":{"height":%s,"rectanglelabels":[%s],"rotation":0,"width":%s,"x":%s,'
         '"y":%s}}')


def _json_float(v: float) -> str:
    """A float as json writes it (NaN and infinities as JavaScript spells them)."""
    return json.dumps(v)


def _image_task(fr: Frame, out: str, url_prefix: str, classes: set[str],
                files: FileWriter) -> tuple[str, int] | None:
    """The frame's image task as JSON text (what :func:`json_text` gives for its dict,
    without building the dict: the results are most of Label Studio's export time) and
    its number of predictions."""
    got = image_data(fr)
    if got is None:
        return None
    data, ext, size = got
    if size is None or not size[0] or not size[1]:
        return None
    w, h = size
    rel = f"images/{slug(fr.stream)}/{fr.t_ns}{ext}"
    files.write(os.path.join(out, rel), data)
    preds = []
    for ls in fr.labels:
        results = []
        scores = []
        prefix = f"{slug(ls.stream)}-{fr.t_ns}-"
        for i, d in enumerate(ls.detections):
            box = d.get("box")
            if not box:
                continue
            x0, y0, x1, y1 = map(float, box)
            # clipped to the image: min(max(v, 0.0), w), NaN kept as those would
            x0 = 0.0 if x0 < 0.0 else x0
            x0 = w if w < x0 else x0
            x1 = 0.0 if x1 < 0.0 else x1
            x1 = w if w < x1 else x1
            y0 = 0.0 if y0 < 0.0 else y0
            y0 = h if h < y0 else y0
            y1 = 0.0 if y1 < 0.0 else y1
            y1 = h if h < y1 else y1
            if x1 <= x0 or y1 <= y0:
                continue
            cls = d["cls"]
            classes.add(cls)
            score = round(float(d["score"]), 4)
            x, y = round(100 * x0 / w, 4), round(100 * y0 / h, 4)
            bw, bh = round(100 * (x1 - x0) / w, 4), round(100 * (y1 - y0) / h, 4)
            scores.append(score)
            total = score + x + y + bw + bh
            num = repr if total - total == 0.0 else _json_float  # all finite: repr
            results.append(_RECT % (_str(f"{prefix}{i}"), h, w, num(score), num(bh),
                                    _str(cls), num(bw), num(x), num(y)))
        mean = round(sum(scores) / len(scores), 4) if scores else 0.0
        preds.append('{"model_version":%s,"result":[%s],"score":%s}'
                     % (_str(ls.model_version), ",".join(results), _json_float(mean)))
    return ('{"data":{"image":%s,"seq":%s,"stream":%s,"t_ns":%d},"predictions":[%s]}'
            % (_str(url_prefix + rel), json_text(fr.sample.seq), _str(fr.stream), fr.t_ns,
               ",".join(preds))), len(preds)


def _prediction(ls: LabelSet, results: list[dict[str, Any]]) -> dict[str, Any]:
    scores = [r["score"] for r in results]
    return {"model_version": ls.model_version,
            "score": round(sum(scores) / len(scores), 4) if scores else 0.0,
            "result": results}


class _Clip:
    """Consecutive PCM blocks of one audio stream gathered into one WAV clip."""

    def __init__(self, fr: Frame):
        p = fr.info.params
        self.stream = fr.stream
        self.rate = int(p.get("sample_rate") or (fr.info.rate_hz if (fr.info.rate_hz or 0) >= 4000
                                                 else 48000))
        self.start_ns = fr.t_ns
        self.blocks: list[np.ndarray] = []
        self.frames = 0
        self.channels = fr.sample.payload.shape[1] if fr.sample.payload.ndim == 2 else 1

    def contiguous(self, fr: Frame) -> bool:
        """False when ``fr`` does not start where the clip ends (a gap of > 50 ms)."""
        expect = self.start_ns + self.frames * NS // self.rate
        return abs(fr.t_ns - expect) <= 50_000_000

    def add(self, fr: Frame) -> None:
        pcm = fr.sample.payload
        pcm = pcm.reshape(-1, 1) if pcm.ndim == 1 else pcm
        if pcm.shape[1] != self.channels:
            pcm = pcm[:, :1].repeat(self.channels, axis=1)
        self.blocks.append(pcm.astype("<i2", copy=False))
        self.frames += len(pcm)

    @property
    def end_ns(self) -> int:
        return self.start_ns + self.frames * NS // self.rate

    @property
    def rel(self) -> str:
        return f"audio/{slug(self.stream)}/{self.start_ns}.wav"

    def write(self, out: Path) -> None:
        """Write the clip's WAV and release its PCM."""
        p = out / self.rel
        p.parent.mkdir(parents=True, exist_ok=True)
        with wave.open(str(p), "wb") as w:
            w.setnchannels(self.channels)
            w.setsampwidth(2)
            w.setframerate(self.rate)
            w.writeframes(np.concatenate(self.blocks).tobytes() if self.blocks else b"")
        self.blocks = []

    def task(self, url_prefix: str, labels: list[AudioLabel], classes: set[str]
             ) -> dict[str, Any]:
        """The clip's task with the speech segments that overlap it."""
        rel = self.rel
        dur = self.frames / self.rate
        per_model: dict[str, tuple[LabelSet, list[dict[str, Any]]]] = {}
        for al in labels:
            if al.source != self.stream:
                continue
            for i, d in enumerate(al.labels.detections):
                if d.get("open") or d.get("start_ns") is None or d.get("end_ns") is None \
                        or d["cls"] == "retracted":
                    continue
                a = max(d["start_ns"], self.start_ns)
                b = min(d["end_ns"], self.end_ns)
                if b <= a:
                    continue
                classes.add(d["cls"])
                key = al.labels.model_version
                per_model.setdefault(key, (al.labels, []))[1].append({
                    "id": f"{slug(al.labels.stream)}-{d['start_ns']}-{i}", "type": "labels",
                    "from_name": "label", "to_name": "audio",
                    "score": round(float(d["score"]), 4),
                    "value": {"start": round((a - self.start_ns) / NS, 4),
                              "end": round(min((b - self.start_ns) / NS, dur), 4),
                              "labels": [d["cls"]]}})
        preds = [_prediction(ls, res) for ls, res in per_model.values()]
        return {"data": {"audio": url_prefix + rel, "stream": self.stream,
                         "t_ns": self.start_ns, "duration_s": round(dur, 4)},
                "predictions": preds}


def validate_tasks(tasks: Any) -> list[str]:
    """Problems of a tasks document against :data:`TASKS_SCHEMA` (empty when valid)."""
    import jsonschema

    v = jsonschema.Draft202012Validator(TASKS_SCHEMA)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in v.iter_errors(tasks)]
