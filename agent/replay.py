"""Recorded sessions as a source like any device: the ``replay.mcap`` driver, the session
reader under it and the one playback clock that paces it.

    open_session(uri)          a folder of segments, an ingest store folder, or s3://…
      └─ SessionReader         every segment's messages merged by (t_ns, stream order, seq)
         │                     with a heap; the ``/edgecap/stamps`` rows give back each
         │                     sample's device_t_ns, host_rx_ns and full seq
         └─ McapReplay         Samples with payloads in the pipeline's forms, paced by one
                               PlaybackClock (rate, pause, seek, loop) or as fast as read

Rig file entry (``edgecap replay`` builds the same thing from its options)::

    [[streams]]
    name = "/replay"
    driver = "replay.mcap"
    uri = "replay:/data/recordings/rig-1_20260101T100000Z_ab12"   # or s3://bucket/…
    options = { rate = 1.0, streams = ["/camera/*", "/gps"] }

Samples keep the recording's times: ``t_ns`` (the session timebase; the clock stage leaves
it alone, ``t_ns_final``), ``device_t_ns``, ``host_rx_ns`` and ``seq`` from the stamps
records. Payloads are decoded back to what drivers and labelers produce: JPEG/PNG bytes
as recorded, raw images as ``(h, w, c)`` uint8 arrays, PCM as ``(frames, channels)``
int16, LiDAR as :data:`agent.schemas.POINT_DTYPE` arrays, GPS fixes as dicts
(``lat lon alt`` and ``covariance``; other fix fields are not in LocationFix), label
messages as protobuf messages (encoding ``protobuf``) or dicts (``json``).
Recorder side channels (``/edgecap/*``) are never replayed; clock-quality streams
(``/clock/*``) only with ``include_clock``.

Session URIs: ``replay:/path``, ``file:/path`` or a plain path — a session folder, one
``.mcap`` file, or a session folder of the filesystem ingest store
(``<root>/devices/<device>/<session>``, whose bundles are content-addressed blobs) — and
``s3://bucket/[prefix/]devices/<device>/<session>`` (or ``s3://bucket/[prefix/]<device>/
<session>``) in the ingest server's S3 store, read through :mod:`sync.storage` and kept in
a local cache (sha256 verified while downloading).
"""

from __future__ import annotations

import fnmatch
import hashlib
import heapq
import importlib
import json
import logging
import os
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator

import numpy as np
from pydantic import Field, SecretStr

from drivers.base import Driver, DriverOptions
from drivers.registry import register

from .errors import BundleError, DriverError
from .realtime import realtime_thread
from .manifest import MANIFEST_SUFFIX, manifest_path, read_manifest
from .schemas import POINT_DTYPE
from .segment import ACTIVE_SUFFIX
from .types import Sample, StreamInfo, StreamKind

log = logging.getLogger("edgecap.replay")

STAMPS_TOPIC = "/edgecap/stamps"
SIDE_PREFIX = "/edgecap/"
CLOCK_PREFIX = "/clock/"
NS = 1_000_000_000


class ReplayError(DriverError):
    """A session cannot be found or opened (no such folder, no segments, store error)."""


# =====================================================================================
# The playback clock
# =====================================================================================

class PlaybackClock:
    """Session time ↔ host monotonic time for paced playback. One object holds the rate,
    pause, seek and loop restarts, so every control goes through one place.

    ``rate`` is a speed factor (1.0 = real time, 10.0 = ten times faster) or None for as
    fast as the reader goes. ``start(t_ns)`` anchors session time ``t_ns`` (session
    timebase) to now (``time.monotonic_ns``); ``wait_until(t_ns)`` blocks the pacing
    thread until that session instant is due and returns how late it woke (ns).

    Thread model: one pacing thread calls ``wait_until``; any thread may call ``pause``,
    ``resume``, ``set_rate``, ``seek`` and read ``position_ns`` (a lock guards the state;
    a change wakes the pacing thread at once). A ``seek`` bumps ``generation``: the
    pacing thread's pending ``wait_until`` returns None and its owner restarts reading at
    ``seek_target_ns``.

    Precise sleep: the wait sleeps on a condition until ``spin_ns`` (default 1 ms) before
    the instant, then in short sleeps to 250 µs before it, then spins; so a wake-up is
    late by the scheduler's latency only, not by a sleep's granularity.
    """

    def __init__(self, rate: float | None = 1.0, spin_ns: int = 1_000_000,
                 now_ns: Callable[[], int] = time.monotonic_ns):
        if rate is not None and not rate > 0:
            raise ValueError(f"rate must be > 0 or None (as fast as possible), got {rate}")
        self._cond = threading.Condition()
        self._rate = rate
        self._paused = False
        self._pos_ns = 0          # session time at the anchor
        self._anchor_ns = now_ns()  # monotonic time at the anchor
        self._started = False
        self.spin_ns = int(spin_ns)
        self._now = now_ns
        self.generation = 0
        self.seek_target_ns: int | None = None

    # -- state (any thread) -----------------------------------------------------------
    @property
    def rate(self) -> float | None:
        return self._rate

    @property
    def paused(self) -> bool:
        return self._paused

    def _position_locked(self, now: int) -> int:
        if self._paused or self._rate is None or not self._started:
            return self._pos_ns
        return self._pos_ns + int((now - self._anchor_ns) * self._rate)

    @property
    def position_ns(self) -> int:
        """The session time playback is at now."""
        with self._cond:
            return self._position_locked(self._now())

    def start(self, t_ns: int) -> None:
        """Anchor session time ``t_ns`` to now (playback begins or restarts there)."""
        with self._cond:
            self._pos_ns, self._anchor_ns, self._started = int(t_ns), self._now(), True
            self._cond.notify_all()

    def pause(self) -> None:
        with self._cond:
            if not self._paused:
                self._pos_ns = self._position_locked(self._now())
                self._paused = True
                self._cond.notify_all()

    def resume(self) -> None:
        with self._cond:
            if self._paused:
                self._paused = False
                self._anchor_ns = self._now()
                self._cond.notify_all()

    def set_rate(self, rate: float | None) -> None:
        """Change speed from now on (playback position is kept)."""
        if rate is not None and not rate > 0:
            raise ValueError(f"rate must be > 0 or None, got {rate}")
        with self._cond:
            now = self._now()
            self._pos_ns = self._position_locked(now)
            self._anchor_ns = now
            self._rate = rate
            self._cond.notify_all()

    def seek(self, t_ns: int) -> None:
        """Jump to session time ``t_ns``; the reader restarts there (``generation``)."""
        with self._cond:
            self._pos_ns, self._anchor_ns = int(t_ns), self._now()
            self.seek_target_ns = int(t_ns)
            self.generation += 1
            self._cond.notify_all()

    def due_ns(self, t_ns: int) -> int | None:
        """Monotonic instant session time ``t_ns`` is due (None: paused or max rate)."""
        with self._cond:
            if self._paused or self._rate is None:
                return None
            return self._anchor_ns + int((t_ns - self._pos_ns) / self._rate)

    # -- pacing (one thread) ----------------------------------------------------------
    def wait_until(self, t_ns: int, stop: threading.Event | None = None,
                   generation: int | None = None) -> int | None:
        """Block until session time ``t_ns`` is due. Returns the lateness in ns (≥ 0; 0 at
        max rate), or None when ``stop`` was set or a seek happened (``generation``
        changed) meanwhile. Pausing blocks here until resumed."""
        gen = self.generation if generation is None else generation
        cond = self._cond
        while True:
            with cond:
                if (stop is not None and stop.is_set()) or self.generation != gen:
                    return None
                if self._rate is None:
                    return 0
                if self._paused:
                    cond.wait(0.2)
                    continue
                due = self._anchor_ns + int((t_ns - self._pos_ns) / self._rate)
                remaining = due - self._now()
                if remaining > self.spin_ns:
                    cond.wait((remaining - self.spin_ns) / NS)
                    continue
            if remaining <= 0:
                return -remaining
            if remaining > 250_000:
                time.sleep((remaining - 200_000) / NS)
                continue
            now = self._now
            while now() < due:  # the last ≤ 250 µs: spin
                pass
            return now() - due


# =====================================================================================
# Where a session lives
# =====================================================================================

@dataclass
class SegmentRef:
    """One closed segment file of a session, with its manifest when there is one."""

    path: Path
    manifest: dict[str, Any] | None = None

    @property
    def name(self) -> str:
        return self.path.name.removesuffix(".mcap")

    @property
    def t_first_ns(self) -> int | None:
        return (self.manifest or {}).get("t_first_ns")

    @property
    def window(self) -> tuple[int, int] | None:
        m = self.manifest or {}
        if m.get("window_start_ns") is None or m.get("window_end_ns") is None:
            return None
        return int(m["window_start_ns"]), int(m["window_end_ns"])


@dataclass
class Session:
    """A recorded session on local disk: its id, folder and segments sorted by time."""

    session_id: str
    root: Path
    segments: list[SegmentRef]
    source: str = ""
    #: segments left ``.active`` (not closed; run ``edgecap recover``), skipped
    unclosed: list[Path] = field(default_factory=list)

    def triggers_path(self) -> Path:
        return self.root / "triggers.jsonl"


class ReplaySourceOptions(DriverOptions):
    """Where to find a session (shared by the driver and the CLI commands)."""

    cache_dir: str | None = Field(default=None, description="download cache for s3:// "
                                  "sessions (default ~/.cache/edgecap/replay)")
    endpoint_url: str | None = Field(default=None, description="S3 endpoint, e.g. MinIO")
    region: str | None = None
    profile: str | None = None
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None


def _local_path(uri: str) -> Path:
    for pre in ("replay://", "replay:", "file://", "file:"):
        if uri.startswith(pre):
            return Path(uri[len(pre):])
    return Path(uri)


def open_session(uri: str, options: ReplaySourceOptions | None = None) -> Session:
    """Resolve a session URI (module doc) to local segment files. Raises ReplayError."""
    o = options or ReplaySourceOptions()
    if uri.startswith("s3://"):
        return _open_s3(uri, o)
    path = _local_path(uri)
    if not path.exists():
        raise ReplayError(f"{path}: no such session folder or file")
    if path.is_file():
        if not path.name.endswith(".mcap"):
            raise ReplayError(f"{path}: not an .mcap segment")
        return _session_from_files(path.parent, [path], path.name.rsplit("_", 1)[0], uri)
    if any(path.glob("*.entry.json")):
        return _open_fs_store(path, o)
    files = sorted(p for p in path.glob("*.mcap") if p.is_file())
    if not files:
        subs = sorted(p.name for p in path.iterdir() if p.is_dir() and any(p.glob("*.mcap")))
        hint = f"; it holds sessions: {', '.join(subs[:10])}" if subs else ""
        raise ReplayError(f"{path}: no closed segments (*.mcap){hint}")
    sess = _session_from_files(path, files, path.name, uri)
    sess.unclosed = sorted(path.glob(f"*{ACTIVE_SUFFIX}"))
    return sess


def _session_from_files(root: Path, files: list[Path], sid: str, source: str) -> Session:
    segs = []
    for f in files:
        man = None
        mp = manifest_path(f)
        if mp.exists():
            try:
                man = read_manifest(mp)
            except BundleError as e:
                log.warning("replay: %s", e)
        segs.append(SegmentRef(f, man))
        if man and man.get("session_id"):
            sid = man["session_id"]
    segs.sort(key=lambda s: (s.t_first_ns if s.t_first_ns is not None else 0, s.name))
    return Session(sid, root, segs, source)


def _open_fs_store(path: Path, o: ReplaySourceOptions) -> Session:
    """``<root>/devices/<device>/<session>`` of the filesystem ingest store."""
    from sync import storage

    session, device = path.name, path.parent.name
    root = path.parent.parent.parent
    if path.parent.parent.name != "devices":
        raise ReplayError(f"{path}: looks like an ingest store folder but is not under "
                          "<root>/devices/<device>/<session>")
    be = storage.create("fs", {"root": str(root), "fsync": False})
    try:
        return _from_store(be, device, session, _cache_root(o) / "fs" / device / session,
                           str(path))
    finally:
        be.close()


def _cache_root(o: ReplaySourceOptions) -> Path:
    return Path(o.cache_dir) if o.cache_dir else Path.home() / ".cache" / "edgecap" / "replay"


def parse_s3_uri(uri: str) -> tuple[str, str, str, str]:
    """``s3://bucket/[prefix/]devices/<device>/<session>`` (or without ``devices/``) →
    ``(bucket, prefix, device, session)``; the prefix keeps its trailing slash."""
    rest = uri.removeprefix("s3://").strip("/")
    parts = rest.split("/")
    if len(parts) < 3:
        raise ReplayError(f"{uri!r}: expected s3://bucket/[prefix/]devices/<device>/<session>")
    bucket, keys = parts[0], parts[1:]
    if len(keys) >= 3 and keys[-3] == "devices":
        pre = keys[:-3]
    else:
        pre = keys[:-2]
    prefix = "/".join(pre) + "/" if pre else ""
    return bucket, prefix, keys[-2], keys[-1]


def _open_s3(uri: str, o: ReplaySourceOptions) -> Session:
    from sync import storage
    from sync.errors import StorageError

    bucket, prefix, device, session = parse_s3_uri(uri)
    opts: dict[str, Any] = {"bucket": bucket, "prefix": prefix,
                            "endpoint_url": o.endpoint_url, "region": o.region,
                            "profile": o.profile, "access_key_id": o.access_key_id,
                            "secret_access_key": o.secret_access_key}
    try:
        be = storage.create("s3", {k: v for k, v in opts.items() if v is not None})
    except (StorageError, ValueError) as e:
        raise ReplayError(f"{uri}: {e}") from None
    try:
        return _from_store(be, device, session,
                           _cache_root(o) / "s3" / bucket / prefix.strip("/") / device / session,
                           uri)
    finally:
        be.close()


def _from_store(be: Any, device: str, session: str, cache: Path, source: str) -> Session:
    """Fetch every indexed bundle of a session from a storage backend into ``cache``
    (skipping bundles already there with the right sha256) and open it from there."""
    from sync.errors import StorageError

    try:
        entries = list(be.list_entries(device, session))
    except (StorageError, ValueError) as e:
        raise ReplayError(f"{source}: {e}") from None
    if not entries:
        raise ReplayError(f"{source}: no bundles of session {session} (device {device}) in "
                          f"{be.describe()}")
    cache.mkdir(parents=True, exist_ok=True)
    files = []
    for e in entries:
        bundle, sha = e["bundle"], e["sha256"]
        dst = cache / f"{bundle}.mcap"
        mpath = cache / f"{bundle}{MANIFEST_SUFFIX}"
        try:
            if not (mpath.exists() and dst.exists() and _cached_ok(dst, sha)):
                raw = be.get_object(e.get("manifest") or "") if e.get("manifest") else None
                _download_blob(be, sha, dst)
                if raw is not None:
                    mpath.write_bytes(raw)
        except StorageError as err:
            raise ReplayError(f"{source}: bundle {bundle}: {err}") from None
        files.append(dst)
    return _session_from_files(cache, files, session, source)


def _cached_ok(path: Path, sha: str) -> bool:
    marker = path.with_name(path.name + ".sha256")
    return marker.exists() and marker.read_text().strip() == sha and path.exists()


def _download_blob(be: Any, sha: str, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".part")
    h = hashlib.sha256()
    with open(tmp, "wb") as f:
        for block in be.read_blob(sha):
            h.update(block)
            f.write(block)
    if h.hexdigest() != sha:
        tmp.unlink(missing_ok=True)
        raise ReplayError(f"{dst.name}: downloaded bytes do not match sha256 {sha[:12]}…")
    os.replace(tmp, dst)
    dst.with_name(dst.name + ".sha256").write_text(sha + "\n")


# =====================================================================================
# Reading: channels back to StreamInfos, messages back to Samples
# =====================================================================================

@dataclass(frozen=True)
class MessageRef:
    """Where bytes of a recorded message lie in its segment file: ``length`` bytes at
    ``offset`` of ``path`` (a message in an uncompressed chunk), and the first of them
    (``head``, up to what was asked for). Lets a caller copy a large payload file to file
    (``os.copy_file_range``) instead of reading it into memory."""

    path: Path
    offset: int
    length: int
    head: bytes = b""

    def read(self, fd: int | None = None) -> bytes:
        """The bytes (``os.pread`` on ``fd`` when given, else on a fresh descriptor);
        raises BundleError when the file is shorter than the reference."""
        if fd is None:
            with open(self.path, "rb") as f:
                return self.read(f.fileno())
        b = os.pread(fd, self.length, self.offset)
        if len(b) != self.length:
            raise BundleError(f"{self.path.name}: short read at {self.offset} "
                              "(file truncated?)")
        return b


@dataclass
class Record:
    """One recorded message with its times restored (raw bytes, not decoded yet). A record
    read with ``refs`` (see :meth:`SessionReader.records`) has ``ref`` set and empty
    ``data``: its bytes are still in the segment file."""

    stream: str
    t_ns: int
    device_t_ns: int | None
    host_rx_ns: int
    seq: int | None
    data: bytes
    rank: int
    segment: int
    channel: Any = None
    schema: Any = None
    publish_time: int = 0
    sequence: int = 0
    stamped: bool = True
    ref: MessageRef | None = None

    def key(self) -> tuple[int, int, int]:
        return (self.t_ns, self.rank, self.seq if self.seq is not None else -1)


_SCHEMA_KIND = {"foxglove.CompressedImage": ("camera", "jpeg"),
                "foxglove.RawImage": ("camera", "bgr8"),
                "foxglove.RawAudio": ("audio", "pcm-s16"),
                "foxglove.PointCloud": ("lidar", "points"),
                "foxglove.LocationFix": ("gps", "fix")}


def proto_class_for(schema: Any) -> type | None:
    """The protobuf class of an MCAP protobuf schema: the foxglove_schemas_protobuf class
    for ``foxglove.*`` names, else one built from the schema's FileDescriptorSet."""
    if schema is None:
        return None
    name = schema.name
    if name.startswith("foxglove."):
        short = name.split(".", 1)[1]
        try:
            mod = importlib.import_module(f"foxglove_schemas_protobuf.{short}_pb2")
            return getattr(mod, short)
        except (ImportError, AttributeError):
            pass
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fds = descriptor_pb2.FileDescriptorSet.FromString(schema.data)
    pool = descriptor_pool.DescriptorPool()
    for fd in fds.file:
        try:
            pool.Add(fd)
        except TypeError:
            pool.AddSerializedFile(fd.SerializeToString())
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(name))


def _stream_info(topic: str, channel: Any, schema: Any, streams_meta: dict[str, Any],
                 calibration: dict[str, Any]) -> StreamInfo:
    meta = dict(channel.metadata or {})
    sm = streams_meta.get(topic) or {}
    sname = schema.name if schema is not None else ""
    kind_s = meta.get("kind") or sm.get("kind") or _SCHEMA_KIND.get(sname, ("event", ""))[0]
    enc = meta.get("encoding") or sm.get("encoding") or _SCHEMA_KIND.get(sname, ("", ""))[1]
    if not enc:
        enc = "json" if channel.message_encoding == "json" else "protobuf"
    try:
        kind = StreamKind(kind_s)
    except ValueError:
        kind = StreamKind.EVENT
    rate = meta.get("rate_hz") or sm.get("rate_hz")
    params: dict[str, Any] = dict(sm.get("params") or {})
    if enc == "protobuf":
        params["proto_class"] = proto_class_for(schema)
    elif enc == "json":
        params["schema"] = sname or f"edgecap.{kind.value}"
        if schema is not None and schema.data:
            try:
                params["json_schema"] = json.loads(schema.data)
            except ValueError:
                pass
    return StreamInfo(topic, kind, enc, float(rate) if rate else None,
                      frame_id=meta.get("frame_id", ""), calibration=calibration.get(topic),
                      params=params)


def _decode_fix(msg: Any) -> dict[str, Any]:
    fix: dict[str, Any] = {"lat": msg.latitude, "lon": msg.longitude, "alt": msg.altitude}
    if msg.position_covariance_type and len(msg.position_covariance) == 9:
        fix["covariance"] = list(msg.position_covariance)
    return fix


def payload_decoder(info: StreamInfo) -> Callable[[bytes], Any]:
    """``bytes → payload`` for a stream's messages, in the forms drivers produce."""
    enc = info.encoding
    if enc in ("jpeg", "png"):
        from foxglove_schemas_protobuf.CompressedImage_pb2 import CompressedImage

        return lambda b: CompressedImage.FromString(b).data
    if enc in ("bgr8", "rgb8", "mono8"):
        from foxglove_schemas_protobuf.RawImage_pb2 import RawImage

        def raw(b: bytes) -> np.ndarray:
            m = RawImage.FromString(b)
            c = 1 if enc == "mono8" else 3
            a = np.frombuffer(m.data, np.uint8).reshape(m.height, m.step)[:, :m.width * c]
            return a.reshape(m.height, m.width, c) if c > 1 else a.reshape(m.height, m.width)
        return raw
    if enc == "pcm-s16":
        from foxglove_schemas_protobuf.RawAudio_pb2 import RawAudio

        def pcm(b: bytes) -> np.ndarray:
            m = RawAudio.FromString(b)
            ch = max(1, m.number_of_channels)
            return np.frombuffer(m.data, "<i2").reshape(-1, ch)
        return pcm
    if enc == "points":
        from foxglove_schemas_protobuf.PointCloud_pb2 import PointCloud

        def points(b: bytes) -> np.ndarray:
            m = PointCloud.FromString(b)
            if m.point_stride != POINT_DTYPE.itemsize:
                raise ValueError(f"point stride {m.point_stride}, expected "
                                 f"{POINT_DTYPE.itemsize}")
            return np.frombuffer(m.data, POINT_DTYPE)  # read-only, like the message
        return points
    if enc == "fix":
        from foxglove_schemas_protobuf.LocationFix_pb2 import LocationFix

        return lambda b: _decode_fix(LocationFix.FromString(b))
    if enc == "protobuf":
        cls = info.params.get("proto_class")
        if cls is None:
            raise ValueError(f"{info.name}: no protobuf schema")
        return cls.FromString
    if enc == "json":
        return json.loads
    return bytes


class _IndexedSegment:
    """Reads chosen channels of one closed MCAP segment through its summary: chunk indexes
    and message indexes say where every message of a channel is, so only those messages
    are read (``os.pread``; no other channel's bytes, no per-record Python parsing of the
    rest). Compressed chunks are read whole and decompressed. Used when the segment has a
    summary with message indexes (every closed edgecap segment); otherwise the mcap
    reader's linear path is used."""

    _MSG = struct.Struct("<HIQQ")  # channel_id, sequence, log_time, publish_time
    _SMALL = 4096  # messages up to this size come with their header in one read

    def __init__(self, f: Any, summary: Any):
        self.fd = f.fileno()
        self.path = Path(f.name)
        self.summary = summary
        self._chunk_cache: tuple[int, bytes] | None = None

    def usable(self) -> bool:
        s = self.summary
        return bool(s is not None and s.chunk_indexes and
                    all(ci.message_index_offsets for ci in s.chunk_indexes))

    def _pread(self, n: int, off: int) -> bytes:
        b = os.pread(self.fd, n, off)
        if len(b) != n:
            raise BundleError(f"short read at {off} (file truncated?)")
        return b

    def entries(self, cids: set[int], start_ns: int | None, end_ns: int | None
                ) -> list[tuple[int, int, int, int]]:
        """``(log_time, channel_id, chunk_no, offset)`` of every message of ``cids`` in
        ``[start, end)``, from the message indexes."""
        out = []
        for k, ci in enumerate(self.summary.chunk_indexes):
            if (end_ns is not None and ci.message_start_time >= end_ns) or \
                    (start_ns is not None and ci.message_end_time < start_ns):
                continue
            offs = {c: o for c, o in ci.message_index_offsets.items() if c in cids}
            if not offs:
                continue
            base = min(ci.message_index_offsets.values())
            blob = self._pread(ci.message_index_length, base)
            for c, o in offs.items():
                pos = o - base
                if blob[pos] != 0x07:
                    raise BundleError(f"no message index at {o}")
                (n,) = struct.unpack_from("<I", blob, pos + 11)
                arr = np.frombuffer(blob, "<u8", count=n // 8, offset=pos + 15).reshape(-1, 2)
                for t, off in arr.tolist():
                    if (start_ns is None or t >= start_ns) and (end_ns is None or t < end_ns):
                        out.append((t, c, k, off))
        return out

    def message(self, chunk_no: int, off: int) -> tuple[int, int, int, int, bytes]:
        """``(channel_id, sequence, log_time, publish_time, data)`` of the message at
        ``off`` in chunk ``chunk_no``'s records."""
        ci = self.summary.chunk_indexes[chunk_no]
        rec_start = ci.chunk_start_offset + 49 + len(ci.compression)
        if not ci.compression:
            # one read for the header and a small message (labels, fixes); two for large
            head = os.pread(self.fd, 31 + self._SMALL, rec_start + off)
            if len(head) < 31 or head[0] != 0x05:
                raise BundleError(f"no message record at chunk {chunk_no} offset {off}")
            (ln,) = struct.unpack_from("<Q", head, 1)
            cid, seq, t, pub = self._MSG.unpack_from(head, 9)
            n = ln - 22
            if n <= self._SMALL:
                if len(head) < 31 + n:
                    raise BundleError(f"short read at {rec_start + off} (file truncated?)")
                return cid, seq, t, pub, head[31:31 + n]
            return cid, seq, t, pub, self._pread(n, rec_start + off + 31)
        if self._chunk_cache is None or self._chunk_cache[0] != chunk_no:
            raw = self._pread(ci.compressed_size, rec_start)
            self._chunk_cache = (chunk_no, _decompress(ci.compression, raw,
                                                       ci.uncompressed_size))
        buf = self._chunk_cache[1]
        if buf[off] != 0x05:
            raise BundleError(f"no message record at chunk {chunk_no} offset {off}")
        (ln,) = struct.unpack_from("<Q", buf, off + 1)
        cid, seq, t, pub = self._MSG.unpack_from(buf, off + 9)
        return cid, seq, t, pub, buf[off + 31:off + 9 + ln]

    def message_ref(self, chunk_no: int, off: int, head: int
                    ) -> tuple[int, int, int, int, MessageRef] | None:
        """Like :meth:`message` but the data left in the file: a :class:`MessageRef` with
        the first ``head`` bytes read; None when the chunk is compressed."""
        ci = self.summary.chunk_indexes[chunk_no]
        if ci.compression:
            return None
        pos = ci.chunk_start_offset + 49 + off
        buf = os.pread(self.fd, 31 + head, pos)
        if len(buf) < 31 or buf[0] != 0x05:
            raise BundleError(f"no message record at chunk {chunk_no} offset {off}")
        (ln,) = struct.unpack_from("<Q", buf, 1)
        cid, seq, t, pub = self._MSG.unpack_from(buf, 9)
        n = ln - 22
        if len(buf) < 31 + min(head, n):
            raise BundleError(f"short read at {pos} (file truncated?)")
        return cid, seq, t, pub, MessageRef(self.path, pos + 31, n, buf[31:31 + min(head, n)])


class _Msg:
    """The fields of an MCAP message record that ``_record`` reads."""

    __slots__ = ("log_time", "publish_time", "sequence", "data")

    def __init__(self, log_time: int, publish_time: int, sequence: int, data: bytes):
        self.log_time, self.publish_time = log_time, publish_time
        self.sequence, self.data = sequence, data


def _decompress(kind: str, data: bytes, size: int) -> bytes:
    if kind == "zstd":
        import zstandard

        return zstandard.ZstdDecompressor().decompress(data, max_output_size=size)
    if kind == "lz4":
        import lz4.frame

        return lz4.frame.decompress(data)
    raise BundleError(f"unknown chunk compression {kind!r}")


class SessionReader:
    """Reads a :class:`Session`: stream descriptions and records in playback order.

    ``infos`` maps every replayable stream (recorder side channels excluded; clock
    streams only with ``include_clock``) to its StreamInfo, rebuilt from the channel
    metadata and the ``edgecap.streams``/``edgecap.calibration`` records; ``order`` is the
    stream order used to break ties. ``records(start_ns, end_ns, streams)`` yields
    :class:`Record` objects sorted by ``(t_ns, stream order, seq)`` across segments
    (segments are opened lazily as the merge reaches them). Blocking file I/O; one thread
    per iterator. Unreadable segments are counted in ``bad_segments`` and skipped.
    """

    def __init__(self, session: Session, include_clock: bool = False):
        from mcap.reader import make_reader

        self.session = session
        self.include_clock = include_clock
        self.infos: dict[str, StreamInfo] = {}
        self.metadata: dict[str, dict[str, str]] = {}
        self.order: dict[str, int] = {}
        self.bad_segments: list[str] = []
        self.stamps_missing = 0
        self.decode_errors = 0
        self._seg_first: list[int | None] = []
        self._summaries: dict[int, Any] = {}  # segment index → its summary, read once
        self._make_reader = make_reader
        streams_meta: dict[str, Any] = {}
        calibration: dict[str, Any] = {}
        channels: list[tuple[str, Any, Any]] = []
        for seg in session.segments:
            try:
                with open(seg.path, "rb") as f:
                    r = make_reader(f)
                    summary = r.get_summary()
                    for m in r.iter_metadata():
                        self.metadata.setdefault(m.name, {}).update(m.metadata)
                        if m.name == "edgecap.streams":
                            for k, v in m.metadata.items():
                                streams_meta.setdefault(k, _loads(v))
                        elif m.name == "edgecap.calibration":
                            for k, v in m.metadata.items():
                                calibration.setdefault(k, _loads(v))
            except Exception as e:  # a truncated or corrupt file: counted and skipped
                self.bad_segments.append(f"{seg.path.name}: {type(e).__name__}: {e}")
                self._seg_first.append(None)
                continue
            if summary is None:
                self.bad_segments.append(f"{seg.path.name}: no summary (unclosed?)")
                self._seg_first.append(None)
                continue
            st = summary.statistics
            first = seg.t_first_ns
            if first is None and st is not None and st.message_count:
                first = st.message_start_time
            self._seg_first.append(first)
            self._summaries[len(self._seg_first) - 1] = summary
            for cid in sorted(summary.channels):
                ch = summary.channels[cid]
                channels.append((ch.topic, ch, summary.schemas.get(ch.schema_id)))
        seen: set[str] = set()
        order_hint = list(streams_meta)
        for topic, ch, schema in channels:
            if topic in seen or not self._replayable(topic):
                continue
            seen.add(topic)
            try:
                self.infos[topic] = _stream_info(topic, ch, schema, streams_meta, calibration)
            except Exception as e:  # an unknown schema we cannot build a class for
                log.warning("replay: stream %s skipped: %s", topic, e)
        rank = {n: i for i, n in enumerate(order_hint)}
        names = sorted(self.infos, key=lambda n: (rank.get(n, len(rank)), n))
        self.infos = {n: self.infos[n] for n in names}
        self.order = {n: i for i, n in enumerate(names)}
        self._decoders: dict[str, Callable[[bytes], Any]] = {}
        if not self.infos and not self.bad_segments:
            raise ReplayError(f"{session.source or session.root}: no replayable streams")

    def _replayable(self, topic: str) -> bool:
        if topic.startswith(SIDE_PREFIX):
            return False
        return self.include_clock or not topic.startswith(CLOCK_PREFIX)

    # -- span -----------------------------------------------------------------------
    def span_ns(self) -> tuple[int, int]:
        """``(first, last)`` sample time of the session (from manifests or summaries)."""
        firsts, lasts = [], []
        for seg in self.session.segments:
            m = seg.manifest or {}
            if m.get("t_first_ns") is not None:
                firsts.append(m["t_first_ns"])
                lasts.append(m["t_last_ns"])
        if not firsts:
            for seg in self.session.segments:
                try:
                    with open(seg.path, "rb") as f:
                        s = self._make_reader(f).get_summary()
                except Exception:
                    continue
                if s is not None and s.statistics and s.statistics.message_count:
                    firsts.append(s.statistics.message_start_time)
                    lasts.append(s.statistics.message_end_time)
        if not firsts:
            return (0, 0)
        return min(firsts), max(lasts)

    # -- records --------------------------------------------------------------------
    def records(self, start_ns: int | None = None, end_ns: int | None = None,
                streams: set[str] | None = None, refs: set[str] | None = None,
                ref_head: int = 4096) -> Iterator[Record]:
        """Records with ``start_ns <= t_ns < end_ns`` of ``streams`` (default: all
        replayable), in ``(t_ns, stream order, seq)`` order across every segment.

        Records of the streams in ``refs`` that lie in uncompressed chunks of an indexed
        segment are not read: they carry a :class:`MessageRef` (``ref``, with the first
        ``ref_head`` bytes) and empty ``data``; every other record carries its bytes."""
        want = set(self.infos) if streams is None else set(streams) & set(self.infos)
        lazy = (refs or set()) & want
        segs = sorted((first, i) for i, first in enumerate(self._seg_first)
                      if first is not None)
        heap: list[tuple[tuple[int, int, int], int, int, Record, Iterator[Record]]] = []
        k = 0
        tie = 0
        while k < len(segs) or heap:
            # open the next segment once the merge has reached its first sample
            while k < len(segs) and (not heap or segs[k][0] <= heap[0][0][0]):
                _, i = segs[k]
                k += 1
                if end_ns is not None and segs[k - 1][0] >= end_ns:
                    continue
                last = (self.session.segments[i].manifest or {}).get("t_last_ns")
                if start_ns is not None and last is not None and last < start_ns:
                    continue
                it = self._segment_records(i, start_ns, end_ns, want, lazy, ref_head)
                first = next(it, None)
                if first is not None:
                    tie += 1
                    heapq.heappush(heap, (first.key(), i, tie, first, it))
            if not heap:
                continue
            _, i, _, rec, it = heapq.heappop(heap)
            yield rec
            nxt = next(it, None)
            if nxt is not None:
                tie += 1
                heapq.heappush(heap, (nxt.key(), i, tie, nxt, it))

    def _stamps(self, reader: Any, want: set[str]) -> dict[tuple[str, int], deque[list[Any]]]:
        out: dict[tuple[str, int], deque[list[Any]]] = {}
        for _s, _c, msg in reader.iter_messages(topics=[STAMPS_TOPIC], log_time_order=False):
            self._add_stamps(out, msg.data, want)
        return out

    def _add_stamps(self, out: dict[tuple[str, int], deque[list[Any]]], data: bytes,
                    want: set[str]) -> None:
        try:
            doc = json.loads(data)
            name = doc["stream"]
            if name not in want:
                return
            cols = doc.get("columns") or ["t_ns", "device_t_ns", "host_rx_ns", "seq"]
            it, idev, irx, iseq = (cols.index(c) for c in
                                   ("t_ns", "device_t_ns", "host_rx_ns", "seq"))
            for row in doc["rows"]:
                out.setdefault((name, int(row[it])), deque()).append(
                    [row[idev], row[irx], row[iseq]])
        except (ValueError, KeyError, TypeError, IndexError):
            self.decode_errors += 1

    def _segment_records(self, i: int, start_ns: int | None, end_ns: int | None,
                         want: set[str], lazy: set[str] = frozenset(),
                         ref_head: int = 0) -> Iterator[Record]:
        seg = self.session.segments[i]
        try:
            f = open(seg.path, "rb")
        except OSError as e:
            self.bad_segments.append(f"{seg.path.name}: {e.strerror}")
            return
        with f:
            try:
                reader = self._make_reader(f)
                summary = self._summaries.get(i)
                idx = _IndexedSegment(f, summary if summary is not None else
                                      reader.get_summary())
                if idx.usable():
                    yield from self._indexed_records(i, idx, start_ns, end_ns, want, lazy,
                                                     ref_head)
                    return
                stamps = self._stamps(reader, want)
                msgs = reader.iter_messages(topics=sorted(want), starting_at=start_ns,
                                            ending_before=end_ns, log_time_order=True)
                run: list[Record] = []
                for schema, ch, msg in msgs:
                    rec = self._record(i, schema, ch, msg, stamps)
                    if run and rec.t_ns != run[0].t_ns:
                        if len(run) > 1:
                            run.sort(key=Record.key)
                        yield from run
                        run = []
                    run.append(rec)
                if len(run) > 1:
                    run.sort(key=Record.key)
                yield from run
            except Exception as e:  # corrupt chunk mid-file: keep what was read
                self.bad_segments.append(f"{seg.path.name}: {type(e).__name__}: {e}")
                log.warning("replay: %s: %s", seg.path.name, e)

    def _indexed_records(self, i: int, idx: _IndexedSegment, start_ns: int | None,
                         end_ns: int | None, want: set[str], lazy: set[str] = frozenset(),
                         ref_head: int = 0) -> Iterator[Record]:
        summ = idx.summary
        chans = {cid: ch for cid, ch in summ.channels.items() if ch.topic in want}
        stamp_ids = {cid for cid, ch in summ.channels.items() if ch.topic == STAMPS_TOPIC}
        stamps: dict[tuple[str, int], deque[list[Any]]] = {}
        for _t, _c, k, off in sorted(idx.entries(stamp_ids, None, None)):
            self._add_stamps(stamps, idx.message(k, off)[4], want)
        order = self.order
        entries = idx.entries(set(chans), start_ns, end_ns)
        entries.sort(key=lambda e: (e[0], order[chans[e[1]].topic], e[2], e[3]))
        run: list[Record] = []
        lazy_ids = {cid for cid, ch in chans.items() if ch.topic in lazy}
        for t, cid, k, off in entries:
            ch = chans[cid]
            got = idx.message_ref(k, off, ref_head) if cid in lazy_ids else None
            if got is None:
                _cid, seq, log_time, pub, data = idx.message(k, off)
                ref = None
            else:
                _cid, seq, log_time, pub, ref = got
                data = b""
            msg = _Msg(log_time, pub, seq, data)
            rec = self._record(i, summ.schemas.get(ch.schema_id), ch, msg, stamps)
            rec.ref = ref
            if run and rec.t_ns != run[0].t_ns:
                if len(run) > 1:
                    run.sort(key=Record.key)
                yield from run
                run = []
            run.append(rec)
        if len(run) > 1:
            run.sort(key=Record.key)
        yield from run

    def _record(self, i: int, schema: Any, ch: Any, msg: Any,
                stamps: dict[tuple[str, int], deque[list[Any]]]) -> Record:
        topic = ch.topic
        rows = stamps.get((topic, msg.log_time))
        row = None
        if rows:
            if len(rows) > 1:  # equal t_ns in one stream: match the 32-bit sequence
                for j, r in enumerate(rows):
                    if r[2] is not None and (r[2] & 0xFFFFFFFF) == msg.sequence:
                        row = r
                        del rows[j]
                        break
            if row is None:
                row = rows.popleft()
        if row is not None:
            dev, rx, seq = row
            stamped = True
        else:
            self.stamps_missing += 1
            dev, rx, seq, stamped = None, msg.publish_time, msg.sequence, False
        return Record(topic, msg.log_time, dev, rx, seq, msg.data, self.order[topic], i,
                      ch, schema, msg.publish_time, msg.sequence, stamped)

    # -- decoding -------------------------------------------------------------------
    def decoder(self, stream: str) -> Callable[[bytes], Any]:
        d = self._decoders.get(stream)
        if d is None:
            d = self._decoders[stream] = payload_decoder(self.infos[stream])
        return d

    def sample(self, rec: Record) -> Sample | None:
        """The Sample of a record (payload decoded; a ``ref`` record's bytes are read
        first), or None when it does not decode (counted in ``decode_errors``)."""
        try:
            data = rec.data if rec.ref is None else rec.ref.read()
            payload = self.decoder(rec.stream)(data)
        except Exception:
            self.decode_errors += 1
            return None
        return self.sample_of(rec, payload)

    @staticmethod
    def sample_of(rec: Record, payload: Any) -> Sample:
        """The Sample of a record with a payload the caller decoded."""
        meta: dict[str, Any] = {} if rec.stamped else {"stamps_missing": True}
        return Sample(rec.stream, payload, rec.host_rx_ns, device_t_ns=rec.device_t_ns,
                      seq=rec.seq, t_ns=rec.t_ns, meta=meta)


def _loads(v: str) -> Any:
    try:
        return json.loads(v)
    except ValueError:
        return v


def select_streams(names: list[str] | tuple[str, ...], patterns: list[str] | None
                   ) -> set[str]:
    """Stream names matching any of ``patterns`` (exact names or fnmatch globs such as
    ``/camera/*``); all names when ``patterns`` is empty. A label stream is kept when its
    source matches too unless patterns name label streams explicitly."""
    if not patterns:
        return set(names)
    out = set()
    for n in names:
        if any(n == p or fnmatch.fnmatchcase(n, p) for p in patterns):
            out.add(n)
    return out


# =====================================================================================
# The driver
# =====================================================================================

class McapReplayOptions(ReplaySourceOptions):
    """``[streams.options]`` of a ``replay.mcap`` stream."""

    rate: float = Field(default=1.0, gt=0, le=10_000, description="speed factor")
    max_rate: bool = Field(default=False, description="as fast as the reader goes")
    from_s: float | None = Field(default=None, ge=0,
                                 description="start this many seconds after the first sample")
    to_s: float | None = Field(default=None, gt=0,
                               description="end this many seconds after the first sample")
    streams: list[str] = Field(default_factory=list,
                               description="stream names or globs (default: all)")
    loop: bool = False
    include_clock: bool = Field(default=False, description="also replay /clock/* streams")
    realtime: bool = Field(default=False, description="SCHED_FIFO for the pacing thread "
                           "(root or CAP_SYS_NICE); falls back with a warning")
    spin_us: int = Field(default=1000, ge=0, le=20_000,
                         description="sleep to this long before a sample, then short "
                         "sleeps and a spin")


@register("replay.mcap")
class McapReplay(Driver):
    """A recorded session as a source (module doc). Not live: ``t_ns`` comes from the
    recording (``t_ns_final``); pacing is the :attr:`clock`'s (a :class:`PlaybackClock`,
    shared with whoever controls playback).

    Counters: ``received`` (samples emitted), ``decode_errors``, ``stamps_missing``
    (samples whose stamps row was lost: ``device_t_ns`` None, ``host_rx_ns`` = publish
    time), ``bad_segments``, ``loops``, ``seeks``. ``lateness_ns`` keeps how late each
    paced sample left (for jitter figures).
    """

    Options = McapReplayOptions
    options: McapReplayOptions
    is_live: ClassVar[bool] = False
    t_ns_final: ClassVar[bool] = True
    #: no clock estimation for replayed streams (their times were estimated when recorded)
    device_clock_is_timebase: ClassVar[bool] = True

    def __init__(self, name: str, uri: str, options: DriverOptions | None = None,
                 rate_hz: float | None = None, calibration: dict[str, Any] | None = None,
                 clock: PlaybackClock | None = None):
        super().__init__(name, uri, options, rate_hz, calibration)
        o = self.options
        self.clock = clock or PlaybackClock(None if o.max_rate else o.rate,
                                            spin_ns=o.spin_us * 1000)
        self.session: Session | None = None
        self.reader: SessionReader | None = None
        self.selected: set[str] = set()
        self.t_first_ns = self.t_last_ns = 0
        self.start_ns = self.end_ns = 0
        self.lateness_ns: deque[int] = deque(maxlen=200_000)
        self.emitted: dict[str, int] = {}
        self.done = threading.Event()
        #: optional ``() -> bool``: at max rate, hold the next sample while it says True
        #: (``edgecap replay --max --record`` waits for the recorder's queues this way)
        self.backpressure: Callable[[], bool] | None = None
        for c in ("decode_errors", "stamps_missing", "bad_segments", "loops", "seeks"):
            self.counters.inc(c, 0)

    # -- lifecycle --------------------------------------------------------------------
    def _open(self) -> None:
        o = self.options
        self.session = open_session(self.uri, o)
        self.reader = SessionReader(self.session, include_clock=o.include_clock)
        for bad in self.reader.bad_segments:
            log.warning("replay: unreadable segment %s", bad)
        self.counters.inc("bad_segments", len(self.reader.bad_segments))
        self.selected = select_streams(list(self.reader.infos), o.streams)
        if not self.selected:
            raise ReplayError(f"{self.uri}: no stream matches {o.streams}; streams: "
                              f"{', '.join(self.reader.infos)}")
        self.t_first_ns, self.t_last_ns = self.reader.span_ns()
        self.start_ns = self.t_first_ns + int((o.from_s or 0.0) * NS)
        self.end_ns = (self.t_first_ns + int(o.to_s * NS) if o.to_s is not None
                       else self.t_last_ns + 1)
        if self.end_ns <= self.start_ns:
            raise ReplayError(f"empty replay window: from {o.from_s} s to {o.to_s} s of a "
                              f"{(self.t_last_ns - self.t_first_ns) / NS:.1f} s session")
        self.done.clear()

    def _close(self) -> None:
        with self.clock._cond:  # wake a pacing wait so iteration ends at once
            self.clock._cond.notify_all()

    def streams(self) -> list[StreamInfo]:
        if self.reader is None:
            return []
        return [i for n, i in self.reader.infos.items() if n in self.selected]

    @property
    def duration_ns(self) -> int:
        return self.end_ns - self.start_ns

    # -- samples ----------------------------------------------------------------------
    def _samples(self) -> Iterator[Sample]:
        assert self.reader is not None
        if self.options.realtime:
            _try_realtime()
        clock, stop = self.clock, self._stop
        loop_shift = 0
        period = self.duration_ns + _min_period_ns(self.reader, self.selected)
        pos = self.start_ns
        try:
            while not stop.is_set():
                gen = clock.generation
                ahead = _Prefetch(self, pos)
                seeked = False
                try:
                    s = ahead.get(stop)  # the first sample is read before the clock starts
                    if clock.rate is not None:
                        # and, when paced, a little more: the first samples of every
                        # stream come from segments still being opened
                        ahead.preroll(stop, s.t_ns + PREROLL_NS)
                    clock.start(pos)
                    while s is not None:
                        late = clock.wait_until(s.t_ns, stop, gen)
                        if late is None:
                            if stop.is_set():
                                return
                            seeked = True
                            break
                        if clock.rate is not None:
                            self.lateness_ns.append(late)
                        if loop_shift:
                            s.t_ns += loop_shift
                        bp = self.backpressure
                        if bp is not None and clock.rate is None:
                            while bp() and not stop.wait(0.002):
                                pass
                        self.counters.inc("received")
                        self.emitted[s.stream] = self.emitted.get(s.stream, 0) + 1
                        yield s
                        if stop.is_set():
                            return
                        s = ahead.get(stop)
                finally:
                    ahead.close()
                if seeked:
                    self.counters.inc("seeks")
                    target = clock.seek_target_ns
                    pos = min(max(target if target is not None else self.start_ns,
                                  self.start_ns), self.end_ns - 1)
                    continue
                if not self.options.loop or stop.is_set():
                    return
                # end of the window: wait until its last instant is due, then loop
                if clock.wait_until(self.end_ns, stop, gen) is None and stop.is_set():
                    return
                self.counters.inc("loops")
                loop_shift += period
                pos = self.start_ns
        finally:
            self.done.set()

    def jitter(self) -> dict[str, float | int | None]:
        """Lateness of paced samples: count, p50/p99/max in ms (None when not paced)."""
        lat = np.asarray(self.lateness_ns, dtype=np.float64)
        if not lat.size:
            return {"samples": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
        return {"samples": int(lat.size), "p50_ms": round(float(np.percentile(lat, 50)) / 1e6, 4),
                "p99_ms": round(float(np.percentile(lat, 99)) / 1e6, 4),
                "max_ms": round(float(lat.max()) / 1e6, 4)}


class _Prefetch:
    """Reads and decodes ahead of the pacing thread (one helper thread, a bounded buffer
    of ``max_items`` samples / ``max_bytes``), so opening a segment or decoding a large
    scan never delays a sample that is due. ``get`` blocks until a sample is ready and
    returns None at the end of the window (or when stopped). With ``realtime`` it runs
    SCHED_FIFO one level below the pacing thread (it sleeps whenever the buffer is full)."""

    def __init__(self, drv: "McapReplay", start_ns: int, max_items: int = 256,
                 max_bytes: int = 256 << 20):
        self._drv = drv
        self._start = start_ns
        self._buf: deque[Sample | None] = deque()
        self._bytes = 0
        self._cond = threading.Condition()
        self._closed = False
        self.max_items, self.max_bytes = max_items, max_bytes
        self._thread = threading.Thread(target=self._run, name="replay-read", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        drv = self._drv
        reader = drv.reader
        assert reader is not None
        if drv.options.realtime:
            # below the pacing thread, but not preempted by other processes while it holds
            # the GIL the pacing thread is waiting for (priority inversion)
            _try_realtime(priority=5)
        try:
            for rec in reader.records(self._start, drv.end_ns, drv.selected):
                s = reader.sample(rec)
                if s is None:
                    drv.counters.inc("decode_errors")
                    continue
                if not rec.stamped:
                    drv.counters.inc("stamps_missing")
                n = s.nbytes()
                with self._cond:
                    while not self._closed and self._buf and (
                            len(self._buf) >= self.max_items or
                            self._bytes + n > self.max_bytes):
                        self._cond.wait(0.2)
                    if self._closed:
                        return
                    self._buf.append(s)
                    self._bytes += n
                    self._cond.notify_all()
        except Exception:  # never let a bad file kill the source silently
            log.exception("replay: reading %s failed", drv.uri)
            drv.counters.inc("errors")
        finally:
            with self._cond:
                self._buf.append(None)
                self._cond.notify_all()

    def preroll(self, stop: threading.Event, until_ns: int, timeout_s: float = 2.0) -> None:
        """Wait until the buffer reaches session time ``until_ns``, is full, or holds the
        end (at most ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not stop.is_set() and time.monotonic() < deadline:
                buf = self._buf
                if buf and (buf[-1] is None or buf[-1].t_ns >= until_ns
                            or len(buf) >= self.max_items or self._bytes >= self.max_bytes // 2):
                    return
                self._cond.wait(0.05)

    def get(self, stop: threading.Event) -> Sample | None:
        with self._cond:
            while not self._buf:
                if stop.is_set():
                    return None
                self._cond.wait(0.2)
            s = self._buf.popleft()
            if s is not None:
                self._bytes -= s.nbytes()
            self._cond.notify_all()
            return s

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._buf.clear()
            self._cond.notify_all()
        self._thread.join(5.0)


#: session time read ahead before a paced replay starts its clock
PREROLL_NS = 500_000_000


def _min_period_ns(reader: SessionReader, streams: set[str]) -> int:
    """One nominal period of the fastest stream (the gap kept between loop passes)."""
    rates = [reader.infos[n].rate_hz for n in streams if reader.infos[n].rate_hz]
    return int(NS / max(rates)) if rates else 1_000_000


def _try_realtime(priority: int = 10) -> bool:
    """:func:`agent.realtime.realtime_thread` for the calling thread, with a warning when
    SCHED_FIFO is refused (pacing then uses the normal scheduler)."""
    if realtime_thread(priority):
        return True
    log.warning("replay: realtime scheduling not available (needs root or CAP_SYS_NICE); "
                "pacing with the normal scheduler")
    return False