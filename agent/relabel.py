"""Relabel a recorded session with another model: new, versioned label channels beside
the old ones, in a new session folder.

    source session ──segment by segment──▶ every message copied as recorded (bytes, no
        re-encode) ──▶ new segment: same name index, same window
                   └──▶ labeler.label(sample) for its input streams ──▶ label messages on
                        ``<label stream>@<tag>`` (tag: model sha256[:8] or ``--tag``)
    closed segment ──▶ manifest regenerated (sha256, size, per-stream counts) ──▶ verified

The new session is ``<out>/<session_id>-relabel-<tag>`` by default. Metadata records are
copied with ``edgecap.session`` naming the new session and ``relabel_of`` the old one; an
``edgecap.relabel`` record and the new streams' ``edgecap.streams`` entries are added.
Labelers come from :mod:`agent.labelers` (``create(LabelerConfig)``); stateful labelers
see every sample of their streams in time order across segments, and what they hold back
at the end (``flush``) goes into the last segment.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import LabelerConfig
from .manifest import verify_segment, write_manifest
from .replay import (ReplaySourceOptions, SessionReader, _stream_info, open_session,
                     select_streams)
from .schemas import codec_for
from .segment import SegmentWriter
from .types import Sample, StreamInfo, StreamKind

log = logging.getLogger("edgecap.relabel")


class RelabelError(Exception):
    """Relabeling cannot run (no stream the labeler accepts, output exists, …)."""


@dataclass
class RelabelResult:
    session_dir: Path
    session_id: str
    tag: str
    streams: dict[str, int] = field(default_factory=dict)  # new label stream → labels
    segments: list[Path] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    labeled: int = 0
    bad_input: int = 0
    errors: int = 0


class _Context:
    """What a labeler may ask (the pool's LabelContext): stream infos and the nearest
    label produced so far in this run."""

    def __init__(self, infos: dict[str, StreamInfo]):
        self.infos = infos
        self._hist: dict[str, list[tuple[Sample, list[dict[str, Any]]]]] = {}

    def remember(self, lab: Sample) -> None:
        h = self._hist.setdefault(lab.stream, [])
        h.append((lab, lab.meta.get("detections", [])))
        if len(h) > 64:
            del h[0]

    def nearest(self, label_stream: str, t_ns: int, max_dt_ns: int
                ) -> tuple[Sample, list[dict[str, Any]]] | None:
        h = self._hist.get(label_stream, [])
        best = min(h, key=lambda e: abs(e[0].t_ns - t_ns), default=None)
        if best is None or abs(best[0].t_ns - t_ns) > max_dt_ns:
            return None
        return best


def model_tag(model: str | None, labeler: Any) -> str:
    """``sha256[:8]`` of the model file, else of the labeler's model record."""
    sha = getattr(getattr(labeler, "model", None), "sha256", "") or ""
    if sha:
        return sha[:8]
    if model and Path(model).is_file():
        from .labelers import file_sha256

        return file_sha256(model)[:8]
    rec = json.dumps(labeler.model.as_dict(), sort_keys=True).encode()
    return hashlib.sha256(rec).hexdigest()[:8]


def relabel(uri: str, kind: str, model: str | None = None, out: str | Path | None = None,
            streams: list[str] | None = None, options: dict[str, Any] | None = None,
            tag: str | None = None, source: ReplaySourceOptions | None = None,
            progress: bool = False) -> RelabelResult:
    """Run labeler ``kind`` (with ``model``/``options``) over a session and write the new
    session (module doc). Raises RelabelError, or LabelerError when the labeler cannot be
    built."""
    from .labelers import create

    session = open_session(uri, source)
    reader = SessionReader(session, include_clock=True)
    sensors = [n for n, i in reader.infos.items()]
    wanted = select_streams(sensors, streams or [])
    cfg = LabelerConfig(kind=kind, streams=sorted(wanted) or ["/"], model=model,
                        options=options or {})
    lab = create(cfg)
    try:
        ctx = _Context(dict(reader.infos))
        lab.context = ctx
        inputs = {n: reader.infos[n] for n in sorted(wanted, key=reader.order.get)
                  if lab.accepts(reader.infos[n])}
        if not inputs:
            raise RelabelError(f"{kind} accepts none of the streams "
                               f"{', '.join(sorted(wanted)) or '(none)'}")
        tag = tag or model_tag(model, lab)
        rename: dict[str, str] = {}
        new_infos: dict[str, StreamInfo] = {}
        for info in inputs.values():
            for o in lab.outputs(info):
                name = f"{o.name}@{tag}"
                if name in reader.infos:
                    raise RelabelError(f"{name} already exists in {session.session_id}; "
                                       "pick another --tag")
                rename[o.name] = name
                new_infos[name] = StreamInfo(name, o.kind, o.encoding, o.rate_hz, o.frame_id,
                                             o.calibration, {**o.params, "version_tag": tag,
                                                             "relabel_of": o.name})
                ctx.infos[o.name] = o
        new_id = f"{session.session_id}-relabel-{tag}"
        base = Path(out) if out is not None else session.root.parent
        new_dir = base / new_id
        if new_dir.exists() and any(new_dir.iterdir()):
            raise RelabelError(f"{new_dir} exists and is not empty")
        new_dir.mkdir(parents=True, exist_ok=True)
        job = _Job(reader, lab, inputs, rename, new_infos, new_dir, new_id, tag, model)
        res = job.run(progress)
        trig = session.triggers_path()
        if trig.exists():
            shutil.copy2(trig, new_dir / "triggers.jsonl")
        return res
    finally:
        lab.close()


class _Job:
    def __init__(self, reader: SessionReader, lab: Any, inputs: dict[str, StreamInfo],
                 rename: dict[str, str], new_infos: dict[str, StreamInfo], new_dir: Path,
                 new_id: str, tag: str, model: str | None):
        self.reader, self.lab, self.inputs = reader, lab, inputs
        self.rename, self.new_infos = rename, new_infos
        self.new_dir, self.new_id, self.tag, self.model = new_dir, new_id, tag, model
        self.res = RelabelResult(new_dir, new_id, tag, {n: 0 for n in new_infos})
        self._codecs: dict[str, Any] = {}
        self._chinfo: dict[str, StreamInfo] = {}

    # -- metadata -------------------------------------------------------------------
    def _metadata(self, seg_meta: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
        meta = {k: dict(v) for k, v in seg_meta.items() if k != "edgecap.segment"}
        sess = meta.setdefault("edgecap.session", {})
        sess["relabel_of"] = sess.get("session_id", self.reader.session.session_id)
        sess["session_id"] = self.new_id
        streams = meta.setdefault("edgecap.streams", {})
        for name, info in self.new_infos.items():
            streams[name] = json.dumps({"kind": info.kind.value, "encoding": info.encoding,
                                        "rate_hz": info.rate_hz,
                                        "params": {k: v for k, v in info.params.items()
                                                   if isinstance(v, (int, float, str))}})
        meta["edgecap.relabel"] = {
            "source_session": sess["relabel_of"], "labeler": self.lab.kind,
            "tag": self.tag, "model": json.dumps(self.lab.model.as_dict(), sort_keys=True),
            "model_path": self.model or "", "inputs": json.dumps(sorted(self.inputs)),
            "streams": json.dumps(sorted(self.new_infos)),
            "created_unix_ns": str(time.time_ns())}
        return meta

    def _segment_meta(self, mcap_reader: Any) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        for m in mcap_reader.iter_metadata():
            out.setdefault(m.name, {}).update(m.metadata)
        return out

    # -- copying --------------------------------------------------------------------
    def _info_for(self, ch: Any, schema: Any) -> StreamInfo:
        info = self._chinfo.get(ch.topic)
        if info is None:
            info = self.reader.infos.get(ch.topic) or _stream_info(ch.topic, ch, schema, {}, {})
            self._chinfo[ch.topic] = info
        return info

    def _codec(self, info: StreamInfo) -> Any:
        c = self._codecs.get(info.name)
        if c is None:
            c = self._codecs[info.name] = codec_for(info)
        return c

    def run(self, progress: bool) -> RelabelResult:
        from mcap.reader import make_reader

        segs = self.reader.session.segments
        stamps_info = StreamInfo("/edgecap/stamps", StreamKind.CLOCK, "json",
                                 params={"schema": "edgecap.Stamps"})
        for i, seg in enumerate(segs):
            with open(seg.path, "rb") as f:
                r = make_reader(f)
                meta = self._segment_meta(r)
                win = seg.window or _window_of(meta)
                name = self.new_id + seg.name[len(self.reader.session.session_id):] \
                    if seg.name.startswith(self.reader.session.session_id) else \
                    f"{self.new_id}_{i:05d}"
                idx = int((seg.manifest or {}).get("index", i))
                w = SegmentWriter(self.new_dir, name, idx, win, self._metadata(meta),
                                  (seg.manifest or {}).get("compression", "none"))
                stamps = self.reader._stamps(r, set(self.inputs))
                rows: dict[str, list[list[Any]]] = {}
                for schema, ch, msg in r.iter_messages(log_time_order=True):
                    info = self._info_for(ch, schema)
                    w.write(info, self._codec(info), msg.data, msg.log_time, msg.publish_time,
                            msg.sequence)
                    if ch.topic in self.inputs:
                        rec = self.reader._record(i, schema, ch, msg, stamps)
                        s = self.reader.sample(rec)
                        if s is None:
                            self.res.bad_input += 1
                            continue
                        self._write_labels(w, self._label(s), rows)
                if i == len(segs) - 1:
                    self._write_labels(w, self._flush(), rows)
                self._write_stamps(w, stamps_info, rows)
                path, sha, size = w.close()
            man = self._manifest(seg.manifest or {}, w, name, idx, sha, size)
            write_manifest(path, man)
            self.res.segments.append(path)
            self.res.problems += verify_segment(path, deep=True)
            if progress:
                log.info("relabel: %s (%d/%d)", path.name, i + 1, len(segs))
        self.res.bad_input += int(getattr(self.lab, "bad_input", 0))
        return self.res

    def _label(self, s: Sample) -> list[Sample]:
        try:
            out = self.lab.label(s)
        except Exception as e:  # a labeler bug must not stop the job: counted
            self.res.errors += 1
            if self.res.errors <= 5:
                log.warning("relabel: %s failed on %s: %s", self.lab.kind, s.stream, e)
            return []
        self.res.labeled += 1
        now = time.monotonic_ns()
        for lab in out:
            lab.host_rx_ns = now
            if not lab.t_ns:
                lab.t_ns = s.t_ns
            assert isinstance(self.lab.context, _Context)
            self.lab.context.remember(lab)
        return out

    def _flush(self) -> list[Sample]:
        try:
            out = self.lab.flush()
        except Exception as e:
            self.res.errors += 1
            log.warning("relabel: flush failed: %s", e)
            return []
        for lab in out:
            lab.host_rx_ns = lab.host_rx_ns or time.monotonic_ns()
        return out

    def _write_labels(self, w: SegmentWriter, labels: list[Sample],
                      rows: dict[str, list[list[Any]]]) -> None:
        for lab in labels:
            name = self.rename.get(lab.stream)
            if name is None:  # a stream outputs() did not announce: counted
                self.res.errors += 1
                continue
            info = self.new_infos[name]
            try:
                data = self._codec(info).encode(lab, info)
            except Exception as e:
                self.res.errors += 1
                log.warning("relabel: cannot encode %s: %s", name, e)
                continue
            w.write(info, self._codec(info), data, lab.t_ns, lab.host_rx_ns, lab.seq or 0)
            rows.setdefault(name, []).append([lab.t_ns, None, lab.host_rx_ns, lab.seq])
            self.res.streams[name] += 1

    def _write_stamps(self, w: SegmentWriter, info: StreamInfo,
                      rows: dict[str, list[list[Any]]]) -> None:
        codec = self._codec(info)
        t = max(w.t_last_ns or w.window[0], w.window[0])
        for name, rr in rows.items():
            doc = {"stream": name, "columns": ["t_ns", "device_t_ns", "host_rx_ns", "seq"],
                   "rows": rr}
            data = codec.encode(Sample("", doc, 0), info)
            w.write(info, codec, data, t, t, 0)

    def _manifest(self, src: dict[str, Any], w: SegmentWriter, name: str, idx: int,
                  sha: str, size: int) -> dict[str, Any]:
        streams: dict[str, Any] = {}
        old = src.get("streams") or {}
        for topic, st in w.stats.items():
            base = dict(old.get(topic) or {})
            info = self._chinfo.get(topic) or self.new_infos.get(topic)
            if not base and info is not None:
                base = {"kind": info.kind.value if not topic.startswith("/edgecap/")
                        else "meta", "encoding": info.encoding, "rate_hz": info.rate_hz}
            base.update(st)
            streams[topic] = base
        man = {k: v for k, v in src.items() if k != "manifest_version"}
        man.update({
            "session_id": self.new_id, "segment": name, "index": idx,
            "file": f"{name}.mcap", "sha256": sha, "size": size,
            "window_start_ns": w.window[0], "window_end_ns": w.window[1],
            "t_first_ns": w.t_first_ns, "t_last_ns": w.t_last_ns, "streams": streams,
            "closed_unix_ns": time.time_ns(), "recovered": bool(src.get("recovered", False)),
            "relabel": {"source_session": src.get("session_id"), "source_segment":
                        src.get("segment"), "source_sha256": src.get("sha256"),
                        "labeler": self.lab.kind, "tag": self.tag,
                        "model": self.lab.model.as_dict(),
                        "streams": sorted(self.new_infos)},
        })
        return man


def _window_of(meta: dict[str, dict[str, str]]) -> tuple[int, int]:
    seg = meta.get("edgecap.segment") or {}
    try:
        return int(seg["window_start_ns"]), int(seg["window_end_ns"])
    except (KeyError, ValueError):
        raise RelabelError("segment without a window (no manifest, no edgecap.segment "
                           "record)") from None
