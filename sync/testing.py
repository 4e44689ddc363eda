"""Test and benchmark helpers for the sync service: an in-memory storage backend
(registered as ``memory`` when this module is imported, exactly like the real ones), a
fault-injecting TCP proxy for loopback, key and spool fixtures, and an S3 API on loopback
(moto). Not used by the service itself."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from agent.manifest import write_manifest

from . import keys, storage
from .errors import StorageError
from .storage.base import Storage, StorageOptions


class MemoryOptions(StorageOptions):
    name: str = "default"


@storage.register("memory")
class MemoryStorage(Storage):
    """A thread-safe in-memory backend. ``blob_writes`` counts blobs actually written
    (a second write of the same blob would be a bug); ``fail_puts`` makes the next N
    ``put_blob`` calls raise StorageError."""

    Options = MemoryOptions

    def __init__(self, options: MemoryOptions):
        super().__init__(options)
        self._lock = threading.Lock()
        self.blobs: dict[str, bytes] = {}
        self.objects: dict[str, bytes] = {}
        self.blob_writes: dict[str, int] = {}
        self.fail_puts = 0

    def has_blob(self, sha256: str) -> bool:
        with self._lock:
            return sha256 in self.blobs

    def put_blob(self, sha256: str, src: Path, size: int) -> bool:
        data = Path(src).read_bytes()
        with self._lock:
            if self.fail_puts:
                self.fail_puts -= 1
                raise StorageError("injected failure")
            if sha256 in self.blobs:
                return False
            if len(data) != size:
                raise StorageError("size mismatch")
            self.blobs[sha256] = data
            self.blob_writes[sha256] = self.blob_writes.get(sha256, 0) + 1
            return True

    def read_blob(self, sha256: str) -> Iterator[bytes]:
        with self._lock:
            data = self.blobs.get(sha256)
        if data is None:
            raise StorageError(f"no blob {sha256[:12]}")
        yield data

    def list_blobs(self) -> Iterator[str]:
        with self._lock:
            return iter(sorted(self.blobs))

    def get_object(self, key: str) -> bytes | None:
        with self._lock:
            return self.objects.get(key)

    def put_object(self, key: str, data: bytes) -> None:
        with self._lock:
            self.objects[key] = bytes(data)

    def put_object_if_absent(self, key: str, data: bytes) -> bool:
        with self._lock:
            if key in self.objects:
                return False
            self.objects[key] = bytes(data)
            return True

    def list_keys(self, prefix: str) -> Iterator[str]:
        with self._lock:
            return iter(sorted(k for k in self.objects if k.startswith(prefix)))


def verify_store(be: Storage) -> dict[str, Any]:
    """Re-hash every blob and check every index entry points at a blob of the right size
    and hash. Returns counts and the list of problems (empty when all verify)."""
    problems: list[str] = []
    blobs = list(be.list_blobs())
    for sha in blobs:
        h = hashlib.sha256()
        for block in be.read_blob(sha):
            h.update(block)
        if h.hexdigest() != sha:
            problems.append(f"blob {sha[:12]} does not hash to its name")
    entries = list(be.list_entries())
    for e in entries:
        if e["sha256"] not in blobs:
            problems.append(f"entry {e['device']}/{e['session']}/{e['bundle']} has no blob")
        if be.get_object(e["manifest"]) is None:
            problems.append(f"entry {e['bundle']} has no manifest")
    return {"blobs": len(blobs), "entries": len(entries), "problems": problems}


# -- fixtures ----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_keys(root: str | os.PathLike[str], clients: tuple[str, ...] = ("rig",)
              ) -> dict[str, Path]:
    """Server key pair in ``root/server``, one key pair per client in ``root/client``, and
    the allow-list ``root/clients`` holding the clients' public keys."""
    r = Path(root)
    spub, ssec = keys.generate(r / "server", "ingest")
    allow = r / "clients"
    allow.mkdir(parents=True, exist_ok=True)
    out = {"server_public": spub, "server_secret": ssec, "clients_dir": allow}
    for name in clients:
        cpub, csec = keys.generate(r / "client", name)
        shutil.copy(cpub, allow / cpub.name)
        out[f"{name}_public"], out[f"{name}_secret"] = cpub, csec
    return out


def make_bundle(spool: str | os.PathLike[str], device: str, session: str, index: int,
                size: int, *, priority: int | None = None, triggers: list[Any] | None = None,
                closed_unix_ns: int | None = None, data: bytes | None = None) -> Path:
    """Write a closed segment of ``size`` pseudo-random bytes (or ``data``) and its
    manifest, as the recorder does. Returns the segment path."""
    d = Path(spool) / session
    d.mkdir(parents=True, exist_ok=True)
    name = f"{session}_{index:05d}"
    seg = d / f"{name}.mcap"
    if data is None:
        data = hashlib.shake_256(f"{device}/{name}".encode()).digest(size)
    seg.write_bytes(data)
    man: dict[str, Any] = {
        "sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "session_id": session,
        "device_id": device, "segment": name, "file": seg.name, "index": index,
        "window_start_ns": index * 10**10, "window_end_ns": (index + 1) * 10**10,
        "closed_unix_ns": closed_unix_ns if closed_unix_ns is not None
        else time.time_ns(), "streams": {}}
    if triggers is not None:
        man["triggers"] = triggers
    if priority is not None:
        man["priority"] = priority
    write_manifest(seg, man)
    return seg


class S3Fixture:
    """moto's S3 API on 127.0.0.1 (a real HTTP server in a thread)."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._srv = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._srv.start()
        host, port = self._srv.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"

    def options(self, bucket: str = "edgecap-ingest", **kw: Any) -> dict[str, Any]:
        return {"bucket": bucket, "endpoint_url": self.endpoint, "region": "us-east-1",
                "access_key_id": "testing", "secret_access_key": "testing",
                "create_bucket": True, "part_mb": 5, **kw}

    def stop(self) -> None:
        self._srv.stop()


class FaultProxy:
    """A TCP proxy on 127.0.0.1 that forwards to ``target_port`` and injects faults into
    the client→server byte stream: ``cut_at(n)`` drops every connection abruptly once
    ``n`` more bytes went up (mid-frame), ``corrupt_at(n)`` flips one byte ``n`` bytes
    ahead, ``cut()`` drops every connection now. ``bytes_up`` counts what was forwarded
    upstream. One accept thread and two pump threads per connection."""

    def __init__(self, target_port: int, port: int = 0):
        self.target_port = target_port
        self._lsock = socket.socket()
        self._lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._lsock.bind(("127.0.0.1", port))
        self._lsock.listen(16)
        self.port = self._lsock.getsockname()[1]
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._conns: list[tuple[socket.socket, socket.socket]] = []
        self.bytes_up = 0
        self.bytes_down = 0
        self.cuts = 0
        self.corruptions = 0
        self._cut_at: int | None = None
        self._corrupt_at: int | None = None
        self._closed = False
        threading.Thread(target=self._accept, name="fault-proxy", daemon=True).start()

    def cut_at(self, more_bytes: int) -> None:
        with self._lock:
            self._cut_at = self.bytes_up + more_bytes

    def corrupt_at(self, more_bytes: int) -> None:
        with self._lock:
            self._corrupt_at = self.bytes_up + more_bytes

    def cut(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
            self.cuts += 1
        for a, b in conns:
            for s in (a, b):
                try:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
                    s.close()
                except OSError:
                    pass

    def close(self) -> None:
        self._closed = True
        try:
            self._lsock.close()
        except OSError:
            pass
        self.cut()

    def _accept(self) -> None:
        while not self._closed:
            try:
                c, _ = self._lsock.accept()
            except OSError:
                return
            try:
                u = socket.create_connection(("127.0.0.1", self.target_port), timeout=2)
                u.settimeout(None)
            except OSError:
                c.close()
                continue
            with self._lock:
                self._conns.append((c, u))
            threading.Thread(target=self._pump, args=(c, u, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, up: bool) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                cut_now = False
                if up:
                    with self._lock:
                        start = self.bytes_up
                        if self._corrupt_at is not None and \
                                start <= self._corrupt_at < start + len(data):
                            i = self._corrupt_at - start
                            data = data[:i] + bytes([data[i] ^ 0x5A]) + data[i + 1:]
                            self._corrupt_at = None
                            self.corruptions += 1
                        if self._cut_at is not None and start + len(data) >= self._cut_at:
                            data = data[:self._cut_at - start]
                            self._cut_at = None
                            cut_now = True
                        self.bytes_up += len(data)
                else:
                    with self._lock:
                        self.bytes_down += len(data)
                if data:
                    dst.sendall(data)
                if cut_now:
                    self.cut()
                    return
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


def ingest_config(root: str | os.PathLike[str], keyset: dict[str, Path] | None = None, *,
                  backend: str = "fs", options: dict[str, Any] | None = None,
                  listen: str = "tcp://127.0.0.1:0", **over: Any) -> Any:
    """An IngestConfig for tests: CURVE with ``keyset`` (from :func:`make_keys`), else
    insecure on loopback; staging and fs store under ``root``."""
    from .ingest_config import parse_ingest_config

    r = Path(root)
    data: dict[str, Any] = {"listen": listen, "staging_dir": str(r / "staging"),
                            "server_id": "test-ingest"}
    if keyset is None:
        data["insecure"] = True
    else:
        data["server_secret_key_file"] = str(keyset["server_secret"])
        data["clients_dir"] = str(keyset["clients_dir"])
    if options is None:
        options = {"root": str(r / "store")} if backend == "fs" else {}
    data["storage"] = {"backend": backend, "options": options}
    limits = over.pop("limits", None)
    if limits:
        data["limits"] = limits
    data.update(over)
    return parse_ingest_config(data, "<test>")


def sync_config(endpoint: str, keyset: dict[str, Path] | None = None, client: str = "rig",
                **over: Any) -> Any:
    """A rig's SyncConfig for tests: CURVE with ``keyset`` or insecure on loopback; short
    timeouts so faults are noticed quickly."""
    from agent.config import SyncConfig

    data: dict[str, Any] = {"server": endpoint, "timeout_s": 3.0, "reconnect_max_s": 0.5,
                            "poll_s": 0.2}
    if keyset is None:
        data["insecure"] = True
    else:
        data["server_public_key"] = str(keyset["server_public"])
        data["client_secret_key_file"] = str(keyset[f"{client}_secret"])
    data.update(over)
    return SyncConfig(**data)


_SERVER_MAIN = """
import sys, threading
from sync.ingest import IngestServer
from sync.ingest_config import load_ingest_config
IngestServer(load_ingest_config(sys.argv[1])).start()
print("ready", flush=True)
threading.Event().wait()
"""


class IngestProcess:
    """An ingest server (fs backend, CURVE) in its own process, to be killed with SIGKILL
    and restarted on the same port, staging and store."""

    def __init__(self, root: str | os.PathLike[str], keyset: dict[str, Path]):
        r = Path(root)
        r.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.store = r / "store"
        self.toml = r / "ingest.toml"
        self.toml.write_text(f'''
listen = "tcp://127.0.0.1:{self.port}"
server_secret_key_file = "{keyset['server_secret']}"
clients_dir = "{keyset['clients_dir']}"
staging_dir = "{r / 'staging'}"
[storage.options]
root = "{self.store}"
''')
        self.proc: subprocess.Popen[str] | None = None

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start and wait until it listens."""
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER_MAIN, str(self.toml)],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("ingest process did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
