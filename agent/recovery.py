"""Recovery of segments left ``.mcap.active`` by a crash or power cut.

The recorder flushes its open chunk and fsyncs at a bounded interval, so an ``.active``
file holds a valid MCAP prefix: header, metadata, schemas, channels and whole chunks up to
the last sync, then possibly a torn record. ``recover_segment`` copies every record up to
the last intact (CRC-checked) chunk into a new, finished MCAP, renames it to ``.mcap``,
writes a manifest with ``recovered: true`` and the interval that may have been lost, and
only then removes the ``.active`` file. It never raises for a damaged file: an unreadable
one is moved aside as ``.mcap.corrupt`` and reported.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from mcap.records import Channel, Message, Metadata, Schema
from mcap.stream_reader import StreamReader
from mcap.writer import CompressionType, Writer

from . import __version__
from .manifest import write_manifest
from .segment import ACTIVE_SUFFIX, HashingFile, fsync_dir

log = logging.getLogger("edgecap.recovery")

SEGMENT_META = "edgecap.segment"


def _read_prefix(path: Path) -> tuple[list[Any], int, str | None]:
    """Records of ``path`` up to the first damage; returns (records, bytes consumed by
    intact records, error text or None when the file was complete)."""
    records: list[Any] = []
    good = 0
    err = None
    with open(path, "rb") as f:
        reader = StreamReader(f, validate_crcs=True, record_size_limit=1 << 30)
        try:
            for rec in reader.records:
                records.append(rec)
                good = f.tell()
        except Exception as e:  # truncated or torn: everything before is intact
            err = f"{type(e).__name__}: {e}"
    return records, good, err


def recover_segment(active: Path, fsync_interval_s: float = 1.0) -> dict[str, Any]:
    """Recover one ``.mcap.active`` file; returns a report dict (``ok``, ``file``,
    ``messages``, ``lost_interval_ns`` …)."""
    name = active.name.removesuffix(ACTIVE_SUFFIX)
    final = active.with_name(name + ".mcap")
    report: dict[str, Any] = {"active": str(active), "file": str(final), "ok": False}
    try:
        size_before = active.stat().st_size
        records, good, err = _read_prefix(active)
    except OSError as e:
        report["error"] = f"unreadable: {e.strerror}"
        return report
    schemas = [r for r in records if isinstance(r, Schema)]
    channels = [r for r in records if isinstance(r, Channel)]
    messages = [r for r in records if isinstance(r, Message)]
    metadata = [r for r in records if isinstance(r, Metadata)]
    seg_meta = next((m.metadata for m in metadata if m.name == SEGMENT_META), {})
    if size_before == 0:
        # created but never written (crash before its first flush): nothing was in it
        active.unlink()
        report.update(ok=True, messages=0, lost_interval_ns=[None, None], torn_bytes=0,
                      size=0, file=None, empty=True)
        return report
    if not metadata and not messages:
        corrupt = active.with_name(name + ".mcap.corrupt")
        os.rename(active, corrupt)
        report.update(error=f"nothing recoverable ({err or 'empty'}); kept as {corrupt.name}",
                      file=str(corrupt))
        return report
    tmp = active.with_name(name + ".mcap.recovering")
    tmp.unlink(missing_ok=True)
    hf = HashingFile(tmp)
    w = Writer(hf, compression=CompressionType.NONE)
    w.start(profile="", library=f"edgecap/{__version__} recovered")
    for m in metadata:
        w.add_metadata(m.name, m.metadata)
    schema_ids: dict[int, int] = {}
    for s in schemas:
        schema_ids[s.id] = w.register_schema(s.name, s.encoding, s.data)
    chan_ids: dict[int, int] = {}
    topics: dict[int, str] = {}
    for c in channels:
        chan_ids[c.id] = w.register_channel(c.topic, c.message_encoding,
                                            schema_ids.get(c.schema_id, 0), c.metadata)
        topics[c.id] = c.topic
    kept = [m for m in messages if m.channel_id in chan_ids]
    for m in kept:
        w.add_message(chan_ids[m.channel_id], m.log_time, m.data, m.publish_time, m.sequence)
    streams, t_first, t_last = _stream_stats(kept, topics)
    w.finish()
    hf.fsync()
    hf.close()
    os.rename(tmp, final)
    fsync_dir(final.parent)
    session = next((m.metadata for m in metadata if m.name == "edgecap.session"), {})
    ws = int(seg_meta["window_start_ns"]) if "window_start_ns" in seg_meta else t_first
    we = int(seg_meta["window_end_ns"]) if "window_end_ns" in seg_meta else t_last
    lost_from = t_last if t_last is not None else ws
    manifest = {
        "session_id": session.get("session_id", name.rsplit("_", 1)[0]),
        "device_id": session.get("device_id", ""),
        "config_digest": session.get("config_digest", ""),
        "timebase": session.get("timebase", ""),
        "segment": name, "index": int(seg_meta.get("index", -1)), "file": final.name,
        "sha256": hf.hexdigest(), "size": hf.size,
        "window_start_ns": ws, "window_end_ns": we,
        "t_first_ns": t_first, "t_last_ns": t_last, "late_samples": 0,
        "recovered": True,
        "recovery": {"source_bytes": size_before, "intact_bytes": good,
                     "torn_bytes": size_before - good, "reader_stopped_at": err,
                     "recovered_unix_ns": time.time_ns(),
                     "fsync_interval_s": fsync_interval_s},
        # Everything after the last intact message up to the end of the window may be
        # lost; the recorder's fsync interval bounds it to about one interval before
        # the crash.
        "lost_interval_ns": [lost_from, we],
        "streams": streams, "agent_version": __version__, "alerts": [],
        "triggers": json.loads(seg_meta.get("triggers", "[]")),
    }
    write_manifest(final, manifest)
    active.unlink()
    fsync_dir(final.parent)
    report.update(ok=True, messages=len(messages), lost_interval_ns=[lost_from, we],
                  torn_bytes=size_before - good, size=hf.size)
    log.warning("recovered %s: %d messages, %d torn bytes dropped", final.name,
                len(messages), size_before - good)
    return report


def _stream_stats(messages: list[Message], topics: dict[int, str]
                  ) -> tuple[dict[str, dict[str, Any]], int | None, int | None]:
    streams: dict[str, dict[str, Any]] = {}
    t_first = t_last = None
    for m in messages:
        st = streams.setdefault(topics[m.channel_id], {"messages": 0, "bytes": 0,
                                                       "t_first_ns": m.log_time,
                                                       "t_last_ns": m.log_time})
        st["messages"] += 1
        st["bytes"] += len(m.data)
        st["t_first_ns"] = min(st["t_first_ns"], m.log_time)
        st["t_last_ns"] = max(st["t_last_ns"], m.log_time)
        t_first = m.log_time if t_first is None else min(t_first, m.log_time)
        t_last = m.log_time if t_last is None else max(t_last, m.log_time)
    return streams, t_first, t_last


def rebuild_manifest(segment: Path) -> dict[str, Any]:
    """A closed ``.mcap`` whose manifest was never written (a crash between the rename
    and the manifest): read it whole, and if it is complete write its manifest with
    ``recovered: true`` and ``manifest_rebuilt: true``. Nothing is rewritten."""
    from .manifest import file_sha256

    report: dict[str, Any] = {"active": str(segment), "file": str(segment), "ok": False}
    records, good, err = _read_prefix(segment)
    if err is not None:
        # not complete after all: recover it like an unclosed segment
        active = segment.with_name(segment.name + ".active")
        os.rename(segment, active)
        return recover_segment(active)
    topics = {r.id: r.topic for r in records if isinstance(r, Channel)}
    messages = [r for r in records if isinstance(r, Message) and r.channel_id in topics]
    metadata = {r.name: r.metadata for r in records if isinstance(r, Metadata)}
    streams, t_first, t_last = _stream_stats(messages, topics)
    seg_meta = metadata.get(SEGMENT_META, {})
    session = metadata.get("edgecap.session", {})
    sha, size = file_sha256(segment)
    name = segment.name.removesuffix(".mcap")
    manifest = {
        "session_id": session.get("session_id", name.rsplit("_", 1)[0]),
        "device_id": session.get("device_id", ""),
        "config_digest": session.get("config_digest", ""),
        "timebase": session.get("timebase", ""),
        "segment": name, "index": int(seg_meta.get("index", -1)), "file": segment.name,
        "sha256": sha, "size": size,
        "window_start_ns": int(seg_meta.get("window_start_ns", t_first or 0)),
        "window_end_ns": int(seg_meta.get("window_end_ns", t_last or 0)),
        "t_first_ns": t_first, "t_last_ns": t_last, "late_samples": 0,
        "recovered": True, "manifest_rebuilt": True, "lost_interval_ns": None,
        "streams": streams, "agent_version": __version__, "alerts": [], "triggers": [],
        "retention": "keep", "priority": 0,
    }
    write_manifest(segment, manifest)
    report.update(ok=True, messages=len(messages), lost_interval_ns=[None, None],
                  torn_bytes=0, size=size, manifest_rebuilt=True)
    log.warning("rebuilt the missing manifest of %s", segment.name)
    return report


def recover_all(root: Path, fsync_interval_s: float = 1.0) -> list[dict[str, Any]]:
    """Recover every ``.mcap.active`` under ``root`` (recursively). Never raises."""
    reports = []
    if not root.exists():
        return reports
    for active in sorted(root.rglob(f"*{ACTIVE_SUFFIX}")):
        try:
            reports.append(recover_segment(active, fsync_interval_s))
        except Exception as e:  # one bad file must not stop the agent starting
            log.exception("recovery of %s failed", active)
            reports.append({"active": str(active), "ok": False, "error": str(e)})
    from .manifest import manifest_path

    for seg in sorted(root.rglob("*.mcap")):
        if seg.is_file() and not manifest_path(seg).exists():
            try:
                reports.append(rebuild_manifest(seg))
            except Exception as e:
                log.exception("manifest rebuild of %s failed", seg)
                reports.append({"active": str(seg), "ok": False, "error": str(e)})
    for tmp in root.rglob("*.mcap.recovering"):
        tmp.unlink(missing_ok=True)
    return reports
