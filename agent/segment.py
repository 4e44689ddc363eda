"""One MCAP segment on disk: written as ``NAME.mcap.active``, fsynced at a bounded interval,
closed by finishing the MCAP summary, fsyncing, renaming to ``NAME.mcap`` and writing the
manifest ``NAME.manifest.json`` beside it (see :mod:`agent.manifest`).

Called only from the recorder's writer thread; every method may block on disk I/O.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO

from mcap.writer import CompressionType, Writer
from mcap_protobuf.schema import register_schema

from . import __version__
from .errors import RecorderError
from .schemas import Codec
from .types import StreamInfo

ACTIVE_SUFFIX = ".mcap.active"

_COMPRESSION = {"none": CompressionType.NONE, "zstd": CompressionType.ZSTD,
                "lz4": CompressionType.LZ4}


class HashingFile:
    """A write-only binary file that keeps a running sha256 and byte count of what was
    written, so closing a segment needs no second read of it.

    Hashing and the periodic fsync run on helper threads (hashlib and fsync release the
    GIL), so on a multi-core machine they overlap with the writer instead of stalling it.
    ``write`` may only be given immutable ``bytes`` (what the mcap writer passes). An error
    of a background fsync is raised by the next ``write``/``fsync_async``/``fsync``.
    """

    def __init__(self, path: Path):
        self._f: BinaryIO = open(path, "xb", buffering=1 << 20)
        self._sha = hashlib.sha256()
        self._q: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._hasher = threading.Thread(target=self._hash_loop, name="edgecap-sha256",
                                        daemon=True)
        self._hasher.start()
        self._sync_req = threading.Event()
        self._sync_stop = False
        self._sync_error: OSError | None = None
        self._syncer = threading.Thread(target=self._sync_loop, name="edgecap-fsync",
                                        daemon=True)
        self._syncer.start()
        self._digest: str | None = None
        self.size = 0

    def _hash_loop(self) -> None:
        while (data := self._q.get()) is not None:
            self._sha.update(data)

    def _sync_loop(self) -> None:
        fd = self._f.fileno()
        while True:
            self._sync_req.wait()
            self._sync_req.clear()
            if self._sync_stop:
                return
            try:
                os.fsync(fd)
            except OSError as e:
                self._sync_error = e

    def _raise_sync_error(self) -> None:
        if self._sync_error is not None:
            err, self._sync_error = self._sync_error, None
            raise err

    def fsync_async(self) -> None:
        """Hand what was written to the OS and let the fsync thread make it durable."""
        self._raise_sync_error()
        self._f.flush()
        self._sync_req.set()

    def write(self, data: bytes) -> int:
        self._raise_sync_error()
        n = self._f.write(data)
        self._q.put(data if isinstance(data, bytes) else bytes(data))
        self.size += n
        return n

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self._f.flush()

    def fsync(self) -> None:
        """Synchronous flush + fsync (used when closing)."""
        self._raise_sync_error()
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        """Stop the helper threads and close the file (a failing final flush still
        releases the descriptor and raises)."""
        self._sync_stop = True
        self._sync_req.set()
        self._syncer.join()
        try:
            self._f.close()
        finally:
            self._finish_hash()

    def _finish_hash(self) -> None:
        if self._digest is None:
            self._q.put(None)
            self._hasher.join()
            self._digest = self._sha.hexdigest()

    def hexdigest(self) -> str:
        self._finish_hash()
        assert self._digest is not None
        return self._digest


def fsync_dir(path: Path) -> None:
    """Make a rename or create inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SegmentWriter:
    """Writes one segment. ``window`` is the half-open ``[start_ns, end_ns)`` of the shared
    timebase it covers; samples outside it (late arrivals) are still written and counted.
    """

    def __init__(self, directory: Path, name: str, index: int, window: tuple[int, int],
                 metadata: dict[str, dict[str, str]], compression: str = "none",
                 chunk_size: int = 4 << 20, fsync_interval_s: float = 1.0):
        self.directory = directory
        self.name = name
        self.index = index
        self.window = window
        self.final_path = directory / f"{name}.mcap"
        self.active_path = directory / f"{name}{ACTIVE_SUFFIX}"
        self.compression = compression
        self.fsync_interval_ns = int(fsync_interval_s * 1e9)
        try:
            self._file = HashingFile(self.active_path)
        except OSError as e:
            raise RecorderError(f"cannot create {self.active_path}: {e.strerror}") from e
        try:
            self._writer = Writer(self._file, chunk_size=chunk_size,
                                  compression=_COMPRESSION[compression], enable_crcs=True)
            self._writer.start(profile="", library=f"edgecap/{__version__}")
            for mname, data in metadata.items():
                self._writer.add_metadata(mname, data)
            self._writer.add_metadata("edgecap.segment", {
                "name": name, "index": str(index), "window_start_ns": str(window[0]),
                "window_end_ns": str(window[1])})
            # make the header and metadata durable at once: a crash at any later moment
            # leaves a file that recovery can read
            self._writer.flush()
            self._file.fsync()
        except OSError as e:
            try:
                self._file.close()
            except OSError:
                pass
            raise RecorderError(f"cannot start {self.active_path.name}: {e.strerror}") from e
        self._channels: dict[str, int] = {}
        self._schemas: dict[str, int] = {}
        self.stats: dict[str, dict[str, Any]] = {}
        self.t_first_ns: int | None = None
        self.t_last_ns: int | None = None
        self.late = 0
        #: per stream: [t_ns, device_t_ns, host_rx_ns, seq] rows not yet written
        self.pending_stamps: dict[str, list[list[int | None]]] = {}
        self._last_sync = time.monotonic_ns()
        self.closed = False

    # -- writing ----------------------------------------------------------------------
    def _channel(self, info: StreamInfo, codec: Codec) -> int:
        cid = self._channels.get(info.name)
        if cid is not None:
            return cid
        sid = self._schemas.get(codec.schema_name)
        if sid is None:
            if codec.proto_class is not None:
                sid = register_schema(self._writer, codec.proto_class)
            else:
                sid = self._writer.register_schema(
                    name=codec.schema_name, encoding="jsonschema",
                    data=json.dumps(codec.json_schema or {"type": "object"}).encode())
            self._schemas[codec.schema_name] = sid
        meta = {"kind": info.kind.value, "encoding": info.encoding}
        if info.rate_hz:
            meta["rate_hz"] = repr(float(info.rate_hz))
        if info.frame_id:
            meta["frame_id"] = info.frame_id
        cid = self._writer.register_channel(topic=info.name,
                                            message_encoding=codec.message_encoding,
                                            schema_id=sid, metadata=meta)
        self._channels[info.name] = cid
        self.stats[info.name] = {"messages": 0, "bytes": 0, "t_first_ns": None,
                                 "t_last_ns": None}
        return cid

    def write(self, info: StreamInfo, codec: Codec, data: bytes, t_ns: int,
              publish_ns: int, seq: int) -> None:
        """Append one encoded message. Raises RecorderError on an I/O failure."""
        cid = self._channel(info, codec)
        try:
            self._writer.add_message(channel_id=cid, log_time=t_ns, data=data,
                                     publish_time=publish_ns, sequence=seq & 0xFFFFFFFF)
        except OSError as e:
            raise RecorderError(f"write to {self.active_path} failed: {e.strerror}") from e
        st = self.stats[info.name]
        st["messages"] += 1
        st["bytes"] += len(data)
        if st["t_first_ns"] is None or t_ns < st["t_first_ns"]:
            st["t_first_ns"] = t_ns
        if st["t_last_ns"] is None or t_ns > st["t_last_ns"]:
            st["t_last_ns"] = t_ns
        if self.t_first_ns is None or t_ns < self.t_first_ns:
            self.t_first_ns = t_ns
        if self.t_last_ns is None or t_ns > self.t_last_ns:
            self.t_last_ns = t_ns
        if not (self.window[0] <= t_ns < self.window[1]):
            self.late += 1

    def add_metadata(self, name: str, data: dict[str, str]) -> None:
        self._writer.add_metadata(name, data)

    def sync_due(self) -> bool:
        """True when the fsync interval has passed since the last ``sync``."""
        return time.monotonic_ns() - self._last_sync >= self.fsync_interval_ns

    def sync(self) -> None:
        """Flush the open chunk to the file and start its fsync on the fsync thread (the
        writer does not wait; a failure surfaces on the next write)."""
        try:
            self._writer.flush()
            self._file.fsync_async()
        except OSError as e:
            raise RecorderError(f"fsync of {self.active_path} failed: {e.strerror}") from e
        self._last_sync = time.monotonic_ns()

    @property
    def size(self) -> int:
        return self._file.size

    # -- closing ----------------------------------------------------------------------
    def close(self) -> tuple[Path, str, int]:
        """Finish the MCAP, fsync, rename ``.active`` → ``.mcap`` and fsync the directory.
        Returns ``(final_path, sha256, size)``. The manifest is the caller's to write."""
        try:
            self._writer.finish()
            self._file.fsync()
            self._file.close()
            os.rename(self.active_path, self.final_path)
            fsync_dir(self.directory)
        except OSError as e:
            raise RecorderError(f"closing {self.active_path} failed: {e.strerror}") from e
        self.closed = True
        return self.final_path, self._file.hexdigest(), self._file.size

    def abandon(self) -> None:
        """Close the file handle after a failed write, leaving ``.active`` for recovery."""
        try:
            self._file.close()
        except OSError:
            pass
        self.closed = True
