"""What every exporter shares: a recorded session read as frames with their pre-labels.

    SessionView(uri, options)
      └─ SessionReader records (time order) ──▶ decoded Samples
           └─ grouping: a label sample attaches to the frame of its source stream with the
              same t_ns (labels carry their source's t_ns); projected labels (fusion) to the
              nearest frame within half a period ──▶ Frame / AudioLabel events

``SessionView.events()`` yields :class:`Frame` (camera image, LiDAR scan, audio block, GPS
fix; each with the :class:`LabelSet` of every label stream that describes it) and
:class:`AudioLabel` (speech segments of an ``edgecap.AudioLabels`` stream) in time order,
within ``[from, to)`` and, with ``only_triggered``, only inside trigger windows
(``triggers.jsonl`` of the session, else the windows of segments whose manifest lists
triggers). Blocking file I/O on the caller's thread.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from agent.replay import (NS, ReplaySourceOptions, Session, SessionReader, open_session,
                          select_streams)
from agent.triggers import Window, merge_windows
from agent.types import Sample, StreamInfo, StreamKind

log = logging.getLogger("edgecap.export")

IMAGE_EXT = {"jpeg": ".jpg", "png": ".png"}


class ExportError(Exception):
    """An export cannot run (no matching streams, empty window, output not writable)."""


@dataclass
class ExportOptions:
    """What to export. ``streams``: names or globs of sensor streams (default all);
    ``labels``: names or globs of label streams to include (default all); ``from_s``/
    ``to_s``: seconds after the session's first sample; ``progress``: a progress bar on
    stderr."""

    out_dir: Path
    streams: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    from_s: float | None = None
    to_s: float | None = None
    only_triggered: bool = False
    progress: bool = True
    source: ReplaySourceOptions = field(default_factory=ReplaySourceOptions)


@dataclass
class LabelSet:
    """The detections one label stream gives for one frame, with the model that made
    them. Detections are dicts with ``cls``, ``score`` and ``box`` (image pixels
    ``[x0, y0, x1, y1]``), ``bbox3d`` (``{center, size, yaw}``, sensor frame, m/rad) or
    ``start_ns``/``end_ns`` (audio segments)."""

    stream: str
    labeler: str
    model: dict[str, str]
    detections: list[dict[str, Any]]
    t_ns: int

    @property
    def model_version(self) -> str:
        m = self.model
        name = m.get("name") or self.labeler or "model"
        v = f"{name}:{m.get('version') or '0'}"
        sha = m.get("sha256") or ""
        return v + (f"@{sha[:8]}" if sha else "")


@dataclass
class Frame:
    """One sensor sample to export and the label sets attached to it."""

    sample: Sample
    info: StreamInfo
    labels: list[LabelSet] = field(default_factory=list)

    @property
    def stream(self) -> str:
        return self.sample.stream

    @property
    def t_ns(self) -> int:
        return self.sample.t_ns


@dataclass
class AudioLabel:
    """Speech (or other) segments of an audio label stream."""

    source: str
    labels: LabelSet


def slug(name: str) -> str:
    """``/camera/front`` → ``camera_front`` (file-name safe)."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip("/"))
    return s or "stream"


def image_size(data: bytes, encoding: str) -> tuple[int, int] | None:
    """``(width, height)`` of compressed image bytes without decoding (JPEG SOF, PNG
    IHDR); None when the bytes are not an image."""
    if encoding == "png" or data[:8] == b"\x89PNG\r\n\x1a\n":
        if len(data) >= 24 and data[12:16] == b"IHDR":
            return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        return None
    from agent.labelers.camera_yolo import jpeg_size

    return jpeg_size(data)


# -- label messages → LabelSets ----------------------------------------------------------

def label_set(sample: Sample, info: StreamInfo) -> LabelSet | None:
    """Detections of a replayed label sample (ImageAnnotations, SceneUpdate or
    edgecap.AudioLabels), or None for a label encoding we do not read."""
    from agent.labelers._foxglove import (detections_from_image_annotations,
                                          detections_from_scene_update)

    p = sample.payload
    params = info.params
    model = {"name": str(params.get("model", "")), "version": str(params.get("model_version", "")),
             "sha256": str(params.get("model_sha256", ""))}
    labeler = str(params.get("labeler", ""))
    name = type(p).__name__
    if name == "ImageAnnotations":
        head = {kv.key: kv.value for kv in p.metadata}
        dets = [d for d in detections_from_image_annotations(p, sample.t_ns) if d.get("box")]
        return LabelSet(info.name, head.get("labeler", labeler), _model_of(head, model), dets,
                        sample.t_ns)
    if name == "SceneUpdate":
        dets = detections_from_scene_update(p, sample.t_ns)
        head = {kv.key: kv.value for kv in p.entities[0].metadata} if p.entities else {}
        return LabelSet(info.name, head.get("labeler", labeler), _model_of(head, model), dets,
                        sample.t_ns)
    if isinstance(p, dict) and "segments" in p:
        m = p.get("model") or {}
        model = {"name": str(m.get("name", model["name"])),
                 "version": str(m.get("version", model["version"])),
                 "sha256": str(m.get("sha256", model["sha256"]))}
        dets = [{"cls": s.get("kind", "speech"), "score": float(s.get("score", 0.0)),
                 "start_ns": s.get("start_ns"), "end_ns": s.get("end_ns"),
                 "open": bool(s.get("open"))} for s in p.get("segments", [])
                if isinstance(s, dict)]
        return LabelSet(info.name, str(p.get("labeler", labeler)), model, dets, sample.t_ns)
    return None


def _model_of(head: dict[str, str], default: dict[str, str]) -> dict[str, str]:
    return {"name": head.get("model", default["name"]),
            "version": head.get("model_version", default["version"]),
            "sha256": head.get("model_sha256", default["sha256"])}


# -- trigger windows --------------------------------------------------------------------

def trigger_windows(session: Session) -> list[tuple[int, int]]:
    """Merged trigger windows ``[start, end)`` of the session (see module doc)."""
    wins: list[Window] = []
    p = session.triggers_path()
    if p.exists():
        for line in p.read_text().splitlines():
            try:
                d = json.loads(line)
                wins.append(Window(int(d["start_ns"]), int(d["end_ns"]), {d.get("name", "")}))
            except (ValueError, KeyError, TypeError):
                continue
    if not wins:
        for seg in session.segments:
            m = seg.manifest or {}
            if m.get("triggers") and seg.window is not None:
                wins.append(Window(*seg.window, set(m["triggers"])))
    return [(w.start_ns, w.end_ns) for w in merge_windows(wins)]


# -- the view -----------------------------------------------------------------------------

class SessionView:
    """A session opened for export (module doc). ``sensor_streams`` and ``label_streams``
    are the selected streams (``kinds`` limits sensor streams to what an exporter uses, so
    nothing else is read or decoded); ``counts`` tallies frames, labels attached and labels
    that found no frame (``labels_unmatched``)."""

    #: how long a frame waits for late-matching labels (projected labels of other sensors)
    HOLD_NS = 300_000_000

    def __init__(self, uri: str, opts: ExportOptions,
                 kinds: tuple[StreamKind, ...] | None = None):
        self.opts = opts
        self.session = open_session(uri, opts.source)
        self.reader = SessionReader(self.session)
        infos = self.reader.infos
        sensors = [n for n, i in infos.items() if i.kind != StreamKind.LABEL
                   and (kinds is None or i.kind in kinds)]
        labels = [n for n, i in infos.items() if i.kind == StreamKind.LABEL]
        self.sensor_streams = select_streams(sensors, opts.streams)
        chosen_labels = select_streams(labels, opts.labels)
        self.label_streams = {n for n in chosen_labels
                              if infos[n].params.get("source") in self.sensor_streams
                              or _audio_label(infos[n])}
        if not self.sensor_streams:
            raise ExportError(f"no stream matches {opts.streams}; streams: {', '.join(sensors)}")
        t0, t1 = self.reader.span_ns()
        self.t_first_ns, self.t_last_ns = t0, t1
        start = t0 + int((opts.from_s or 0.0) * NS)
        end = t0 + int(opts.to_s * NS) if opts.to_s is not None else t1 + 1
        if end <= start:
            raise ExportError(f"empty window: from {opts.from_s} s to {opts.to_s} s")
        windows = [(start, end)]
        if opts.only_triggered:
            trig = trigger_windows(self.session)
            windows = [(max(a, start), min(b, end)) for a, b in trig
                       if min(b, end) > max(a, start)]
        self.windows = windows
        self.counts: dict[str, int] = {"frames": 0, "labels_attached": 0,
                                       "labels_unmatched": 0, "decode_errors": 0}

    @property
    def infos(self) -> dict[str, StreamInfo]:
        return self.reader.infos

    def metadata(self) -> dict[str, Any]:
        sess = self.reader.metadata.get("edgecap.session", {})
        return {"session_id": self.session.session_id,
                "device_id": sess.get("device_id", ""),
                "agent_version": sess.get("agent_version", ""),
                "provenance": self.reader.metadata.get("edgecap.provenance", {})}

    def expected_records(self) -> int:
        """Messages of the selected streams per the manifests (for progress bars)."""
        want = self.sensor_streams | self.label_streams
        n = 0
        for seg in self.session.segments:
            for name, st in ((seg.manifest or {}).get("streams") or {}).items():
                if name in want:
                    n += int(st.get("messages") or 0)
        return n

    def events(self, progress: Any = None) -> Iterator[Frame | AudioLabel]:
        """Frames and audio labels in time order (module doc). ``progress(n)`` is called
        with the number of records read since the last call."""
        want = self.sensor_streams | self.label_streams
        infos = self.infos
        pending: deque[Frame] = deque()
        unmatched: deque[tuple[str, LabelSet]] = deque()
        by_key: dict[tuple[str, int], Frame] = {}
        for start, end in self.windows:
            for rec in self.reader.records(start, end, want):
                if progress is not None:
                    progress(1)
                s = self.reader.sample(rec)
                if s is None:
                    self.counts["decode_errors"] += 1
                    continue
                info = infos[s.stream]
                if s.stream in self.label_streams:
                    ls = label_set(s, info)
                    if ls is None:
                        continue
                    if _audio_label(info):
                        yield AudioLabel(str(info.params.get("source", "")), ls)
                        continue
                    src = str(info.params.get("source", ""))
                    fr = by_key.get((src, s.t_ns))
                    if fr is not None:
                        fr.labels.append(ls)
                        self.counts["labels_attached"] += 1
                    else:
                        unmatched.append((src, ls))
                else:
                    fr = Frame(s, info)
                    pending.append(fr)
                    by_key[(s.stream, s.t_ns)] = fr
                yield from self._flush(pending, unmatched, by_key, s.t_ns - self.HOLD_NS)
            yield from self._flush(pending, unmatched, by_key, None)
        self.counts["labels_unmatched"] += len(unmatched)

    def _flush(self, pending: deque[Frame], unmatched: deque[tuple[str, LabelSet]],
               by_key: dict[tuple[str, int], Frame], before_ns: int | None
               ) -> Iterator[Frame]:
        while pending and (before_ns is None or pending[0].t_ns < before_ns):
            fr = pending.popleft()
            by_key.pop((fr.stream, fr.t_ns), None)
            if unmatched:
                tol = int(0.5 * NS / fr.info.rate_hz) if fr.info.rate_hz else 50_000_000
                keep: deque[tuple[str, LabelSet]] = deque()
                for src, ls in unmatched:
                    if src == fr.stream and abs(ls.t_ns - fr.t_ns) <= tol:
                        fr.labels.append(ls)
                        self.counts["labels_attached"] += 1
                    else:
                        keep.append((src, ls))
                unmatched.clear()
                unmatched.extend(keep)
            self.counts["frames"] += 1
            yield fr
        if before_ns is not None:  # labels older than any frame still to come
            while unmatched and unmatched[0][1].t_ns < before_ns - self.HOLD_NS:
                unmatched.popleft()
                self.counts["labels_unmatched"] += 1


def _audio_label(info: StreamInfo) -> bool:
    return info.encoding == "json" and info.params.get("schema") == "edgecap.AudioLabels"


# -- progress ------------------------------------------------------------------------------

class Progress:
    """A rich progress bar on stderr (only when enabled and stderr is a terminal, or
    ``force``); ``advance(n)`` from the exporting thread."""

    def __init__(self, total: int, description: str, enabled: bool = True,
                 force: bool = False):
        import sys

        self._p = None
        if enabled and (force or sys.stderr.isatty()):
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RP,
                                       TimeRemainingColumn)

            self._p = RP("[progress.description]{task.description}", BarColumn(),
                         MofNCompleteColumn(), TimeRemainingColumn(),
                         console=Console(stderr=True), transient=True)
            self._task = self._p.add_task(description, total=total or None)
            self._p.start()

    def advance(self, n: int = 1) -> None:
        if self._p is not None:
            self._p.advance(self._task, n)

    def close(self) -> None:
        if self._p is not None:
            self._p.stop()
            self._p = None


class FileWriter:
    """Writes export files on helper threads (file creation and writes release the GIL,
    so they overlap with reading and decoding). ``write`` blocks only while
    ``max_pending`` files wait; ``close`` waits for all and raises the first error."""

    def __init__(self, threads: int = 2, max_pending: int = 64):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="export-write")
        self._slots = threading.BoundedSemaphore(max_pending)
        self._dirs: set[Path] = set()
        self._dirs_lock = threading.Lock()
        self._errors: list[BaseException] = []
        self.files = 0
        self.bytes = 0

    def write(self, path: Path, data: bytes) -> None:
        parent = path.parent
        if parent not in self._dirs:
            parent.mkdir(parents=True, exist_ok=True)
            with self._dirs_lock:
                self._dirs.add(parent)
        if self._errors:
            raise self._errors[0]
        self._slots.acquire()
        self.files += 1
        self.bytes += len(data)
        self._pool.submit(self._write, path, data)

    def _write(self, path: Path, data: bytes) -> None:
        try:
            with open(path, "wb") as f:
                f.write(data)
        except BaseException as e:  # reported by the next write or close
            self._errors.append(e)
        finally:
            self._slots.release()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._errors:
            raise self._errors[0]

    def __enter__(self) -> "FileWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_json(path: Path, obj: Any) -> None:
    """Deterministic JSON (sorted keys, compact) written via a temp file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    # compact: the C encoder (an indent would fall back to the pure-Python one, ~5× slower)
    tmp.write_text(json.dumps(obj, separators=(",", ":"), sort_keys=True, default=_default)
                   + "\n")
    tmp.replace(path)


def _default(o: Any) -> Any:
    import numpy as np

    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def image_bytes(frame: Frame) -> tuple[bytes, str] | None:
    """``(bytes, file extension)`` of a camera frame: compressed images as recorded, raw
    images encoded as PNG (lossless). None when the payload is not an image."""
    p = frame.sample.payload
    enc = frame.info.encoding
    if enc in IMAGE_EXT and isinstance(p, (bytes, bytearray, memoryview)):
        return bytes(p), IMAGE_EXT[enc]
    import numpy as np

    if enc in ("bgr8", "rgb8", "mono8") and isinstance(p, np.ndarray):
        import cv2

        img = cv2.cvtColor(p, cv2.COLOR_RGB2BGR) if enc == "rgb8" else p
        ok, buf = cv2.imencode(".png", img)
        return (buf.tobytes(), ".png") if ok else None
    return None
