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

Compressed images are not read into memory when their bytes lie as they are in the
segment file (an uncompressed chunk, which the recorder's ``auto`` compression gives every
session with JPEG cameras): the frame's payload is then a :class:`MessageRef` to the
``data`` field of the ``foxglove.CompressedImage`` message (found by walking the message's
protobuf fields; any surprise falls back to decoding the message), and
:meth:`FileWriter.write` copies those bytes file to file in the kernel
(``os.copy_file_range``). The exported file is byte for byte the recorded image either way.
LiDAR points in such chunks are the same read-only array the decoder gives, but over the
mapped segment file instead of two copies of it.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from agent.errors import BundleError
from agent.realtime import SWITCH_INTERVAL_S
from agent.replay import (NS, MessageRef, ReplaySourceOptions, Record, Session,
                          SessionReader, open_session, select_streams)
from agent.triggers import Window, merge_windows
from agent.types import Sample, StreamInfo, StreamKind

from . import _copier

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


@functools.lru_cache(maxsize=4096)
def slug(name: str) -> str:
    """``/camera/front`` → ``camera_front`` (file-name safe)."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", name.strip("/"))
    return s or "stream"


def image_size(data: bytes, encoding: str) -> tuple[int, int] | None:
    """``(width, height)`` of compressed image bytes without decoding (JPEG SOF, PNG
    IHDR); None when the bytes are not an image. For the first bytes of an image it is
    the whole image's answer when the header lies within them, else None."""
    if encoding == "png" or data[:8] == b"\x89PNG\r\n\x1a\n":
        if len(data) >= 24 and data[12:16] == b"IHDR":
            return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        return None
    from agent.labelers.camera_yolo import jpeg_size

    return jpeg_size(data)


# -- compressed images left in their segment file ---------------------------------------

def _varint(b: bytes, i: int) -> tuple[int, int]:
    """The protobuf varint at ``b[i]``: ``(value, next index)``; IndexError past the end of
    ``b``, ValueError when longer than 10 bytes."""
    v = shift = 0
    while shift < 70:
        c = b[i]
        i += 1
        v |= (c & 0x7F) << shift
        if c < 0x80:
            return v, i
        shift += 7
    raise ValueError("varint longer than 10 bytes")


def _fields(b: bytes, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """``(field number, wire type, field start, value start, value end)`` of the protobuf
    fields that fill ``[0, end)`` of a message whose first bytes are ``b`` (a value may
    run past ``b``). ValueError for a field that runs past ``end`` or a group; IndexError
    when a field's key or length lies past ``b``."""
    i = 0
    while i < end:
        start = i
        key, i = _varint(b, i)
        wt = key & 7
        if wt == 0:
            _v, j = _varint(b, i)
        elif wt == 1:
            j = i + 8
        elif wt == 5:
            j = i + 4
        elif wt == 2:
            n, i = _varint(b, i)
            j = i + n
        else:
            raise ValueError(f"wire type {wt}")
        if j > end:
            raise ValueError("field runs past the message")
        yield key >> 3, wt, start, i, j
        i = j


def _stored_field(ref: MessageRef, fd: int, cls: type, number: int
                  ) -> tuple[MessageRef, Any] | None:
    """Where the bytes field ``number`` of the ``cls`` protobuf message at ``ref`` lies
    in the same file (head: its first bytes), with the message parsed without that field.
    ``fd`` reads the fields after it, which must hold no second such field (protobuf would
    take the last); the rest of the message must parse, so a message the decoder rejects
    never passes. None when the message is not laid out like that or its head is too short
    to tell (the caller decodes it instead)."""
    b = ref.head
    try:
        for num, wt, start, a, z in _fields(b, ref.length):
            if num == number:
                if wt != 2:
                    return None
                break
        else:
            return None
        tail = b""
        if z < ref.length:
            tail = b[z:ref.length] if ref.length <= len(b) else \
                os.pread(fd, ref.length - z, ref.offset + z)
            if len(tail) != ref.length - z or any(
                    num == number for num, *_ in _fields(tail, len(tail))):
                return None
        rest = cls.FromString(b[:start] + tail)
    except Exception:  # IndexError, ValueError, protobuf's DecodeError
        return None
    return MessageRef(ref.path, ref.offset + a, z - a, b[a:z]), rest


def stored_image(ref: MessageRef, fd: int) -> MessageRef | None:
    """Where the image bytes (``data``) of the ``foxglove.CompressedImage`` message at
    ``ref`` lie in the same file, the image's first bytes as ``head``; None when the
    message must be decoded instead (see :func:`_stored_field`)."""
    from foxglove_schemas_protobuf.CompressedImage_pb2 import CompressedImage

    got = _stored_field(ref, fd, CompressedImage, 2)
    return None if got is None else got[0]


def stored_points(ref: MessageRef, fd: int, mapped: Any) -> np.ndarray | None:
    """The points of the ``foxglove.PointCloud`` message at ``ref`` as a read-only
    :data:`~agent.schemas.POINT_DTYPE` array over ``mapped`` (the segment file's
    ``mmap``): what the replay decoder gives, without copying the points out of the page
    cache. None when the message must be decoded instead (see :func:`_stored_field`; a
    stride or length the decoder rejects)."""
    from foxglove_schemas_protobuf.PointCloud_pb2 import PointCloud

    from agent.schemas import POINT_DTYPE

    got = _stored_field(ref, fd, PointCloud, 6)
    if got is None:
        return None
    data, rest = got
    if rest.point_stride != POINT_DTYPE.itemsize or data.length % POINT_DTYPE.itemsize:
        return None
    return np.frombuffer(mapped, POINT_DTYPE, count=data.length // POINT_DTYPE.itemsize,
                         offset=data.offset)


# -- label messages → LabelSets ----------------------------------------------------------

def label_set(sample: Sample, info: StreamInfo) -> LabelSet | None:
    """Detections of a replayed label sample (ImageAnnotations, SceneUpdate or
    edgecap.AudioLabels), or None for a label encoding we do not read."""
    from agent.labelers._foxglove import detections_from_scene_update

    p = sample.payload
    params = info.params
    model = {"name": str(params.get("model", "")), "version": str(params.get("model_version", "")),
             "sha256": str(params.get("model_sha256", ""))}
    labeler = str(params.get("labeler", ""))
    name = type(p).__name__
    if name == "ImageAnnotations":
        head = {kv.key: kv.value for kv in p.metadata}
        return LabelSet(info.name, head.get("labeler", labeler), _model_of(head, model),
                        _image_detections(p, head, sample.t_ns), sample.t_ns)
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


def _image_detections(msg: Any, head: dict[str, str], t_ns: int) -> list[dict[str, Any]]:
    """The detections with a box of an ``ImageAnnotations`` message whose metadata is
    ``head``: what ``detections_from_image_annotations`` gives for them, without its
    per-annotation metadata dicts (the exporters' label cost is mostly this loop)."""
    src, kind, t = head.get("source", ""), head.get("labeler", ""), int(t_ns)
    out = []
    for pa in msg.points:
        pts = pa.points
        if not pts:
            continue
        q = pts[0]
        x0 = x1 = q.x
        y0 = y1 = q.y
        for q in pts:  # min() and max() of the coordinates (NaN as they treat it)
            x, y = q.x, q.y
            if x < x0:
                x0 = x
            if x > x1:
                x1 = x
            if y < y0:
                y0 = y
            if y > y1:
                y1 = y
        cls, score = "", 0.0
        for kv in pa.metadata:  # the last of a repeated key wins, as in a dict
            k = kv.key
            if k == "class":
                cls = kv.value
            elif k == "score":
                score = kv.value
        out.append({"stream": src, "t_ns": t, "kind": kind, "cls": cls, "score": float(score),
                    "box": [x0, y0, x1, y1]})
    return out


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
        #: camera and LiDAR streams whose payloads may stay in the segment files
        #: (module doc)
        self.stored_streams = {n for n in self.sensor_streams
                               if (infos[n].kind, infos[n].encoding in IMAGE_EXT) ==
                               (StreamKind.CAMERA, True) or
                               (infos[n].kind, infos[n].encoding) == (StreamKind.LIDAR,
                                                                      "points")}
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
        fds: dict[Path, int] = {}  # segment files read for stored payloads' other fields
        maps: dict[Path, Any] = {}  # and mapped for point clouds (closed when unreferenced)
        try:
            for start, end in self.windows:
                for rec in self.reader.records(start, end, want, refs=self.stored_streams):
                    if progress is not None:
                        progress(1)
                    s = None if rec.ref is None else self._stored_sample(rec, fds, maps)
                    if s is None:
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
        finally:
            for fd in fds.values():
                os.close(fd)
        self.counts["labels_unmatched"] += len(unmatched)

    def _stored_sample(self, rec: Record, fds: dict[Path, int], maps: dict[Path, Any]
                       ) -> Sample | None:
        """The Sample of a record read as a reference: for a camera its payload is the
        image's :class:`MessageRef`, for a LiDAR the points over the mapped file; None
        when that cannot be used (decode the record instead)."""
        import mmap

        ref = rec.ref
        fd = fds.get(ref.path)
        try:
            if fd is None:
                fd = fds[ref.path] = os.open(ref.path, os.O_RDONLY)
            if self.infos[rec.stream].kind == StreamKind.LIDAR:
                mapped = maps.get(ref.path)
                if mapped is None:
                    mapped = maps[ref.path] = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
                payload = stored_points(ref, fd, mapped)
            else:
                payload = stored_image(ref, fd)
        except (OSError, ValueError):
            return None
        return None if payload is None else SessionReader.sample_of(rec, payload)

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


#: jobs for the copy helper written to it at once, and the longest a job waits for its
#: batch to fill (checked when the next job comes; ``close`` writes the rest)
COPY_BATCH = 16
COPY_BATCH_S = 0.005


def _write_all(out: Any, data: bytes | bytearray) -> None:
    """Write all of ``data`` to the unbuffered file ``out`` (a write may take part)."""
    view = memoryview(data)
    while view:
        view = view[out.write(view):]


class FileWriter:
    """Writes export files off the exporting thread. ``write`` takes bytes; a
    :class:`MessageRef` whose bytes are copied from the segment file in the kernel
    (``os.copy_file_range``; plain reads and writes where the kernel or file system
    cannot); or a function that makes the bytes, called on a writer thread (numpy
    releases the GIL while it copies arrays). Called from one thread; it blocks only while
    ``max_pending`` files of bytes or functions (``max_copies`` copies, which hold no
    memory) wait. ``close`` waits for all and raises the first error. ``files``, ``bytes``
    and ``copied`` (files copied from a segment file) count what was asked for. ``link``
    makes hard links to files queued here once they are written.

    Bytes and functions are written by ``threads`` threads of this process. Copies go to
    a helper process (:mod:`._copier`, with as many threads; started at the first copy):
    every file costs a writer thread a few GIL hand-overs (after ``open``, the copy and
    ``close``), and while the exporting thread decodes each waited up to the switch
    interval, which made copying several times slower than the same copies alone. Where
    no process can be started (or with ``copier_process`` False) the threads copy too.
    While a writer is open the switch interval is at most 0.2 ms (as for replay's pacing
    thread); the last ``close`` restores it."""

    #: copies in a helper process (see the class doc)
    copier_process = True
    #: open writers and the switch interval they replaced (process-wide, like the setting)
    _open_writers = 0
    _saved_interval = 0.0
    _interval_lock = threading.Lock()

    def __init__(self, threads: int = 2, max_pending: int = 64, max_copies: int = 1024):
        import queue

        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._mem_slots = threading.BoundedSemaphore(max_pending)
        self._copy_slots = threading.BoundedSemaphore(max_copies)
        self._nthreads = threads
        self._dirs: set[str] = set()
        self._errors: list[BaseException] = []
        self._sources: dict[Path, int] = {}
        self._last: list[str] = []
        self._links: list[tuple[str, str]] = []
        self._queued: set[str] = set()  # files queued for the threads
        self._book = _copier.Links()  # links to them, made once they are written
        self._count_lock = threading.Lock()
        self._copy_state = _copier.CopyState()
        self._proc: Any = None  # the copy helper, once started
        self._use_process = self.copier_process and bool(sys.executable)
        self._copied_by_helper: set[str] = set()
        self._batch = bytearray()  # jobs for the helper not yet written (see _send)
        self._batched = 0
        self._batch_t = 0.0
        self._switching = False
        self._fast_switching(True)
        self.files = 0
        self.bytes = 0
        self.copied = 0
        self._threads = [threading.Thread(target=self._run, name=f"export-write-{k}",
                                          daemon=True) for k in range(threads)]
        for t in self._threads:
            t.start()

    def write(self, path: str | Path, data: bytes | MessageRef | Callable[[], bytes]
              ) -> None:
        """Queue one file (parent folders are made here). ``bytes`` counts a function's
        bytes once it has run."""
        path = self._folder_for(path)
        if self._errors:
            raise self._errors[0]
        if isinstance(data, MessageRef):
            self.copied += 1
            self.files += 1
            with self._count_lock:
                self.bytes += data.length
            if self._helper() is not None:
                self._send(b"c", os.fsencode(data.path), os.fsencode(path),
                           b"%d" % data.offset, b"%d" % data.length)
                self._copied_by_helper.add(path)
                return
            src = self._sources.get(data.path)
            if src is None:
                src = self._sources[data.path] = os.open(data.path, os.O_RDONLY)
            self._copy_slots.acquire()
            self._queued.add(path)
            self._queue.put((path, data, src, self._copy_slots))
            return
        with self._count_lock:
            self.bytes += 0 if callable(data) else len(data)
        self._mem_slots.acquire()
        self.files += 1
        self._queued.add(path)
        self._queue.put((path, data, -1, self._mem_slots))

    def _helper(self) -> Any:
        """The copy helper process, started on first use; None where it cannot run."""
        if self._proc is None and self._use_process:
            import subprocess

            try:
                self._proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", _copier.__file__, str(self._nthreads)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
            except OSError as e:
                log.debug("export: no copy helper process (%s); copying on threads", e)
                self._use_process = False
                return None
            try:  # room for ~1000 queued copies, as max_copies allows the threads
                import fcntl

                fcntl.fcntl(self._proc.stdin.fileno(), 1031, 1 << 18)  # F_SETPIPE_SZ
            except (ImportError, OSError):
                pass
        return self._proc

    def _send(self, *fields: bytes) -> None:
        """Queue one job for the copy helper; jobs go down the pipe in batches of
        :data:`COPY_BATCH` (or after :data:`COPY_BATCH_S`, checked at the next job), so the
        exporting thread pays one write, and the helper one wake-up, per batch."""
        job = b"\0".join(fields)
        if not self._batch:
            self._batch_t = time.monotonic()
        self._batch += len(job).to_bytes(4, "little") + job
        self._batched += 1
        if self._batched >= COPY_BATCH or time.monotonic() - self._batch_t > COPY_BATCH_S:
            self._flush()

    def _flush(self) -> None:
        """Write the batched jobs to the copy helper."""
        batch, self._batch, self._batched = self._batch, bytearray(), 0
        try:
            _write_all(self._proc.stdin, batch)
        except BrokenPipeError:
            self._errors.append(self._helper_failure() or
                                BundleError("the export's copy process ended early"))
            raise self._errors[-1] from None

    def _folder_for(self, path: str | Path) -> str:
        """``path`` as a string, its parent folder made (once)."""
        path = os.fspath(path)
        parent = os.path.dirname(path)
        if parent not in self._dirs:
            os.makedirs(parent, exist_ok=True)
            self._dirs.add(parent)
        return path

    def link(self, existing: str | Path, path: str | Path) -> None:
        """Make ``path`` a hard link to ``existing``, a file queued here before (same bytes
        without writing them again; a copy where the file system has no hard links): by
        whoever writes ``existing``, once it is written (its folder made there too), or,
        for a file not queued here, by ``close``."""
        existing, path = os.fspath(existing), os.fspath(path)
        self.files += 1
        if existing in self._copied_by_helper:
            self._send(b"l", os.fsencode(existing), os.fsencode(path))
        elif existing in self._queued:
            if self._errors:
                raise self._errors[0]
            self._copy_slots.acquire()  # holds no memory, like a copy
            self._queue.put((path, existing, -2, self._copy_slots))
        else:
            self._links.append((existing, self._folder_for(path)))

    def write_last(self, path: str | Path, data: bytes) -> None:
        """Queue a file that must appear only once every file is written (an index such as
        ``annotations.json``): written to ``<path>.tmp``, renamed by a ``close`` that found
        no error."""
        path = os.fspath(path)
        self.write(path + ".tmp", data)
        self._last.append(path)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            path, data, src, slots = item
            try:
                if src == -2:  # a link: data is the file it links to
                    self._book.link(data, path)
                    continue
                if src < 0:
                    if callable(data):
                        data = data()
                        with self._count_lock:
                            self.bytes += len(data)
                    with open(path, "wb") as f:
                        f.write(data)
                else:
                    _copier.copy_range(src, str(data.path), path, data.offset, data.length,
                                       self._copy_state)
                self._book.written(path)
            except _copier.Truncated as e:
                self._errors.append(BundleError(str(e)))
            except BaseException as e:  # reported by the next write or close
                self._errors.append(e)
            finally:
                slots.release()

    def _helper_failure(self) -> BaseException | None:
        """Wait for the copy helper; the first job it reports failed, as an exception."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        try:
            batch, self._batch = self._batch, bytearray()
            _write_all(proc.stdin, batch)  # the jobs still batched
            proc.stdin.close()
        except BrokenPipeError:
            pass
        out = proc.stdout.read().decode(errors="replace")
        proc.stdout.close()
        rc = proc.wait()
        line = out.split("\n", 1)[0]
        if line:
            kind, err, msg, name = (line.split("\0") + ["", "", ""])[:4]
            if kind == "truncated":
                return BundleError(msg)
            return OSError(int(err or 0), msg, name)
        if rc:
            return BundleError(f"the export's copy process exited with status {rc}")
        return None

    def _fast_switching(self, on: bool) -> None:
        cls = FileWriter
        with cls._interval_lock:
            if on and not self._switching:
                if cls._open_writers == 0:
                    cls._saved_interval = sys.getswitchinterval()
                    sys.setswitchinterval(min(cls._saved_interval, SWITCH_INTERVAL_S))
                cls._open_writers += 1
            elif not on and self._switching:
                cls._open_writers -= 1
                if cls._open_writers == 0:
                    sys.setswitchinterval(cls._saved_interval)
            self._switching = on

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()
        failed = self._helper_failure()
        if failed is not None:
            self._errors.append(failed)
        self._fast_switching(False)
        for fd in self._sources.values():
            os.close(fd)
        self._sources.clear()
        if self._errors:
            raise self._errors[0]
        for existing, path in self._links:
            _copier.hard_link(existing, path)
        self._links.clear()
        for path in self._last:
            os.replace(path + ".tmp", path)
        self._last.clear()

    def __enter__(self) -> "FileWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def json_bytes(obj: Any) -> bytes:
    """Deterministic JSON (sorted keys, compact, one trailing newline) as UTF-8."""
    return (json_text(obj) + "\n").encode()


def json_text(obj: Any) -> str:
    """:func:`json_bytes` of ``obj`` as text, without the newline."""
    # compact: the C encoder (an indent would fall back to the pure-Python one, ~5× slower);
    # the exporters' documents hold no cycles, so the encoder need not look for them
    return json.dumps(obj, separators=(",", ":"), sort_keys=True, default=_default,
                      check_circular=False)


def write_json(path: Path, obj: Any) -> None:
    """:func:`json_bytes` of ``obj`` written via a temp file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(json_bytes(obj))
    tmp.replace(path)


def _default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def image_data(frame: Frame) -> tuple[bytes | MessageRef, str, tuple[int, int] | None] | None:
    """``(data, file extension, (width, height))`` of a camera frame, ``data`` for
    :meth:`FileWriter.write`: compressed images as recorded (bytes, or a
    :class:`MessageRef` to them in the segment file), raw images encoded as PNG
    (lossless). The size is None when the bytes do not say it (see :func:`image_size`);
    the whole is None when the payload is not an image."""
    p = frame.sample.payload
    enc = frame.info.encoding
    if enc in IMAGE_EXT:
        if isinstance(p, MessageRef):
            size = image_size(p.head, enc)
            if size is not None or len(p.head) >= p.length:
                return p, IMAGE_EXT[enc], size
            try:
                p = p.read()  # the header lies past the head: ask the whole image
            except (OSError, BundleError):
                return None
        if isinstance(p, (bytes, bytearray, memoryview)):
            data = bytes(p)
            return data, IMAGE_EXT[enc], image_size(data, enc)
    if enc in ("bgr8", "rgb8", "mono8") and isinstance(p, np.ndarray):
        import cv2

        img = cv2.cvtColor(p, cv2.COLOR_RGB2BGR) if enc == "rgb8" else p
        ok, buf = cv2.imencode(".png", img)
        if ok:
            png = buf.tobytes()
            return png, ".png", image_size(png, "png")
    return None
