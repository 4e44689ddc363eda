"""The ingest server (fleet side): a ZeroMQ ROUTER that receives bundles from uploaders,
verifies them and stores them through a storage backend.

Threads::

    caller ── start() binds, returns ──▶ loop thread (owns every socket and all state)
                                            │  decode + validate, rate limits, staging write,
                                            │  ack — the whole per-chunk critical path
                                            ├─▶ hasher thread: sha256 of each written chunk,
                                            │   in arrival order (off the critical path)
                                            ├─▶ worker pool: offers (index/blob lookups,
                                            │   staging re-hash) and commits (wait for the
                                            │   hasher, compare, fsync, put_blob, put_entry)
                                            ◀── results via a queue and a wake-up pipe

Partial uploads live in ``staging_dir/<device>/<sha256>.part``; their length is the offset a
resuming client is told. A chunk is acknowledged (``ack``) once it is written to that file;
its sha256 is computed afterwards, off the per-chunk critical path. A bundle is
acknowledged (``done``/``have``) only after all its bytes hashed to the offered sha256 and
its blob and index entry are durable in the backend. Peer input never raises out of the
loop: it is decoded by :func:`sync.protocol.decode`, rejected with a code, counted in
:class:`sync.metrics.IngestMetrics` and logged (rate limited).

Use::

    srv = IngestServer(load_ingest_config("ingest.toml")).start()   # returns once bound
    print(srv.endpoint)
    ...
    srv.stop()
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import threading
import time
import uuid
import zlib
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

from agent import __version__
from agent.errors import ConfigError

from . import keys, protocol, storage
from .errors import ProtocolError, StorageError
from .ingest_config import IngestConfig
from .metrics import IngestMetrics
from .protocol import CLIENT_TYPES, encode

log = logging.getLogger("sync.ingest")

_ZAP_DOMAIN = "edgecap"
_AUTH_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
#: rejections that a well-behaved client can cause (a stale chunk after a reconnect);
#: they do not count towards the per-peer error budget
_BENIGN = {"unknown_transfer", "bad_offset", "not_hello", "busy", "rate_limited"}
#: received bytes waiting for the hasher thread, over all transfers; beyond it the loop
#: waits for the hasher (and so runs no faster than hashing, as if it hashed inline)
_HASH_BACKLOG = 64 << 20


@dataclass(eq=False)
class _Digest:
    """The running sha256 of one transfer's staging file: ``queued`` bytes were handed to
    the hasher, ``hashed`` of them are in ``sha``. Only the hasher thread updates ``sha``;
    :meth:`_Hasher.hexdigest` reads it once the two counts meet."""

    sha: Any
    queued: int = 0
    hashed: int = 0
    error: str = ""


class _Hasher:
    """One thread that feeds received chunks into their transfer's sha256, in the order
    they were written to staging. hashlib releases the GIL on large buffers, so hashing
    overlaps the loop's next staging write and ZeroMQ's CURVE decryption. A single thread
    is enough: sha256 (≈1.2 GB/s a core) keeps pace with the one ZeroMQ I/O thread that
    decrypts everything this server receives (≈1 GB/s). Thread-safe; :meth:`feed` blocks only while
    ``max_backlog`` bytes are waiting."""

    def __init__(self, max_backlog: int = _HASH_BACKLOG):
        self._cv = threading.Condition()
        self._q: deque[tuple[_Digest, Any]] = deque()
        self._backlog = 0
        self._max = max_backlog
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="ingest-hasher", daemon=True)
        self._thread.start()

    def feed(self, d: _Digest, data: Any) -> None:
        """Queue ``data`` (bytes or a buffer nobody will modify) for ``d``; loop thread."""
        n = len(data)
        with self._cv:
            while self._backlog and self._backlog + n > self._max and not self._closed:
                self._cv.wait()
            self._q.append((d, data))
            self._backlog += n
            d.queued += n
            self._cv.notify_all()

    def hexdigest(self, d: _Digest) -> str:
        """Wait until every byte fed for ``d`` is hashed and return its sha256 (hex).
        Called by a worker at commit; raises RuntimeError if the hasher failed or was
        closed first."""
        with self._cv:
            while d.hashed < d.queued and not d.error and not self._closed:
                self._cv.wait()
            if d.error or d.hashed < d.queued:
                raise RuntimeError(d.error or "hasher closed")
        return d.sha.hexdigest()

    def close(self) -> None:
        """Stop the thread; what is still queued is dropped (staging keeps the bytes and a
        resume re-hashes them)."""
        with self._cv:
            self._closed = True
            self._q.clear()
            self._cv.notify_all()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._q and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                d, data = self._q.popleft()
            try:
                if not d.error:
                    d.sha.update(data)
            except Exception as e:  # a bug; fail that commit rather than hang it
                log.exception("hashing a chunk failed")
                d.error = f"hashing failed: {e}"
            with self._cv:
                d.hashed += len(data)
                self._backlog -= len(data)
                self._cv.notify_all()


@dataclass(eq=False)
class _Transfer:
    device: str
    session: str
    bundle: str
    sha256: str
    size: int
    priority: int
    manifest: bytes
    owner: bytes
    tid: int
    client: str
    path: Path
    state: str = "preparing"  # → receiving → committing; or abandoned
    fd: int | None = None
    digest: _Digest | None = None
    offset: int = 0
    nacked_at: int | None = None


@dataclass(eq=False)
class _Peer:
    rid: bytes
    user: bytes
    key_name: str
    tokens: float
    refill_t: float
    last_seen: float
    device: str | None = None
    transfers: dict[int, _Transfer] = field(default_factory=dict)
    errors: int = 0
    muted_until: float = 0.0
    last_limited_reply: float = 0.0


class IngestServer:
    """One ingest server. ``start()``/``stop()`` run it in a background thread;
    ``serve_forever(stop_event)`` runs it in the calling thread (the CLI). Not reusable
    after ``stop()``; build a new one to restart."""

    def __init__(self, config: IngestConfig, *, backend: storage.Storage | None = None,
                 metrics: IngestMetrics | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.limits = config.limits.protocol_limits()
        self.metrics = metrics or IngestMetrics()
        self._clock = clock
        self._backend = backend
        self._own_backend = backend is None
        self.boot = uuid.uuid4().hex[:16]
        self.endpoint = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._ctx: zmq.Context | None = None
        self._auth: Any = None
        self._allow: dict[bytes, str] = {}
        self._peers: OrderedDict[bytes, _Peer] = OrderedDict()
        self._active: dict[tuple[str, str], _Transfer] = {}
        self._results: queue.Queue[tuple[Callable[..., None], tuple[Any, ...]]] = queue.Queue()
        self._wake_r, self._wake_w = -1, -1
        self._pool: ThreadPoolExecutor | None = None
        self._hasher: _Hasher | None = None
        self._staging = Path(config.staging_dir)
        self._last_auth_log = 0.0
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------
    @property
    def backend(self) -> storage.Storage:
        assert self._backend is not None, "start() first"
        return self._backend

    def start(self) -> "IngestServer":
        """Bind and start the loop thread. Raises ConfigError (keys, address) or
        StorageError (backend unreachable) before any thread starts."""
        self._setup()
        self._thread = threading.Thread(target=self._run, name="ingest-loop", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self, stop: threading.Event | None = None) -> None:
        """Run in the calling thread until ``stop`` is set (or :meth:`stop` is called)."""
        if stop is not None:
            self._stop = stop
        self._setup()
        self._run()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop, let running storage jobs finish, close everything. Partial
        uploads stay in staging so clients resume after a restart."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def __enter__(self) -> "IngestServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def reload_keys(self) -> int:
        """Re-read the client allow-list (after adding or removing ``.key`` files);
        returns how many keys are allowed. Safe from any thread."""
        if self.config.insecure:
            return 0
        allow = keys.load_allow_list(self.config.clients_dir or "")
        self._allow = allow
        if self._auth is not None:
            self._auth.configure_curve(domain=_ZAP_DOMAIN,
                                       location=str(self.config.clients_dir))
        return len(allow)

    def _setup(self) -> None:
        cfg = self.config
        path = cfg.source_path
        if self._backend is None:
            self._backend = storage.create(cfg.storage.backend, cfg.storage.options)
        try:
            self._staging.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(path, [("staging_dir", f"cannot create: {e.strerror}")]) from None
        self._ctx = zmq.Context()
        router = self._ctx.socket(zmq.ROUTER)
        router.linger = 0
        router.router_mandatory = 1
        router.maxmsgsize = self.limits.max_frame + 1024  # + CURVE box overhead on the wire
        router.rcvhwm = cfg.limits.window + 16
        router.sndhwm = 4 * cfg.limits.window + 64
        router.heartbeat_ivl = 5000
        router.heartbeat_timeout = 30000
        if not cfg.insecure:
            from zmq.auth.thread import ThreadAuthenticator

            try:
                pub, sec = keys.load_secret_key(cfg.server_secret_key_file or "")
            except ValueError as e:
                self._teardown_ctx(router)
                raise ConfigError(path, [("server_secret_key_file", str(e))]) from None
            try:
                self._allow = keys.load_allow_list(cfg.clients_dir or "")
            except ValueError as e:
                self._teardown_ctx(router)
                raise ConfigError(path, [("clients_dir", str(e))]) from None
            if not self._allow:
                log.warning("%s has no client .key files: every upload will be refused",
                            cfg.clients_dir)
            self._auth = ThreadAuthenticator(self._ctx, log=logging.getLogger("sync.zap"))
            self._auth.start()
            self._auth.configure_curve(domain=_ZAP_DOMAIN, location=str(cfg.clients_dir))
            router.curve_server = True
            router.curve_publickey = pub
            router.curve_secretkey = sec
            router.zap_domain = _ZAP_DOMAIN.encode()
        try:
            router.bind(cfg.listen)
        except zmq.ZMQError as e:
            self._teardown_ctx(router)
            raise ConfigError(path, [("listen", f"cannot bind {cfg.listen}: {e}")]) from None
        self.endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
        self._router = router
        self._monitor = router.get_monitor_socket(_AUTH_EVENTS)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._pool = ThreadPoolExecutor(cfg.workers, thread_name_prefix="ingest-worker")
        self._hasher = _Hasher()
        self._clean_staging()
        log.info("ingest %s listening on %s (%s), storing to %s", cfg.server_id,
                 self.endpoint, "insecure" if cfg.insecure else
                 f"CURVE, {len(self._allow)} client key(s)", self.backend.describe())

    def _teardown_ctx(self, router: zmq.Socket) -> None:
        router.close(0)
        if self._own_backend and self._backend is not None:
            self._backend.close()
            self._backend = None
        if self._auth is not None:
            self._auth.stop()
            self._auth = None
        assert self._ctx is not None
        self._ctx.term()

    def _shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._pool is not None:
            self._pool.shutdown(wait=True)  # a commit job may wait for the hasher: first
        if self._hasher is not None:
            self._hasher.close()
        for t in list(self._active.values()):
            self._close_fd(t)
        self._active.clear()
        self._peers.clear()
        try:
            self._router.disable_monitor()
        except zmq.ZMQError:
            pass
        self._monitor.close(0)
        self._router.close(0)
        if self._auth is not None:
            self._auth.stop()
        assert self._ctx is not None
        self._ctx.term()
        os.close(self._wake_r)
        os.close(self._wake_w)
        if self._own_backend and self._backend is not None:
            self._backend.close()
        self.metrics.peers.set(0)
        self.metrics.transfers.set(0)

    # -- the loop --------------------------------------------------------------------------
    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        next_house = self._clock() + 1.0
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(200))
                if self._router in events:
                    for _ in range(512):
                        try:
                            frames = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._on_frames(frames)
                if self._monitor in events:
                    self._on_monitor()
                if self._wake_r in events:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                self._drain_results()
                now = self._clock()
                if now >= next_house:
                    self._housekeeping(now)
                    next_house = now + 1.0
        except Exception:  # a bug, not peer input: log it loudly, still shut down cleanly
            log.exception("ingest loop failed")
            raise
        finally:
            self._shutdown()

    def _on_monitor(self) -> None:
        while True:
            try:
                ev = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:
                return
            if ev["event"] & _AUTH_EVENTS:
                self.metrics.auth_failures.inc()
                now = self._clock()
                if now - self._last_auth_log > 10:
                    self._last_auth_log = now
                    log.warning("refused a handshake from %s (unknown client key or bad "
                                "CURVE; event %d, status %s)",
                                ev.get("endpoint", b"?").decode(errors="replace"),
                                ev["event"], ev.get("value"))

    def _send(self, rid: bytes, frames: list[Any]) -> None:
        try:
            self._router.send_multipart([rid, *frames], zmq.NOBLOCK)
        except zmq.ZMQError:  # peer gone (ROUTER_MANDATORY) or its queue is full
            self.metrics.rejected.labels("reply_dropped").inc()

    def _error(self, peer: _Peer, code: str, msg: str = "", **extra: Any) -> None:
        self._send(peer.rid, encode("error", code=code, msg=msg[:500], **extra))

    def _reject(self, peer: _Peer, code: str, detail: str, reply: bool = True,
                **extra: Any) -> None:
        self.metrics.rejected.labels(code).inc()
        if code not in _BENIGN:
            peer.errors += 1
            lvl = logging.WARNING if peer.errors <= 3 else logging.DEBUG
            log.log(lvl, "peer %s (%s): rejected %s: %s", peer.key_name or "-",
                    peer.device or "no hello", code, detail)
            if peer.errors >= self.config.limits.max_errors and self.config.limits.mute_s:
                peer.muted_until = self._clock() + self.config.limits.mute_s
                peer.errors = 0
                log.warning("peer %s (%s): muted for %.0f s after %d errors", peer.key_name
                            or "-", peer.device, self.config.limits.mute_s,
                            self.config.limits.max_errors)
        if reply:
            self._error(peer, code, detail, **extra)

    def _peer(self, rid: bytes, first: Any) -> _Peer | None:
        peer = self._peers.get(rid)
        now = self._clock()
        if peer is not None:
            self._peers.move_to_end(rid)
            peer.last_seen = now
            return peer
        try:
            user = (first.get("User-Id") or "").encode()
        except (zmq.ZMQError, AttributeError):
            user = b""
        if not self.config.insecure and user not in self._allow:
            # ZAP already refused unknown keys; this only happens after a key was removed
            self.metrics.rejected.labels("unknown_key").inc()
            return None
        lim = self.config.limits
        if len(self._peers) >= 4 * lim.max_peers:  # bound state kept for strangers
            old_rid, old = next(iter(self._peers.items()))
            self._drop_peer(old)
        peer = _Peer(rid, user, self._allow.get(user, "insecure"), float(lim.msg_burst),
                     now, now)
        self._peers[rid] = peer
        return peer

    def _on_frames(self, frames: list[Any]) -> None:
        if len(frames) < 2:
            self.metrics.rejected.labels("bad_message").inc()
            return
        rid = frames[0].bytes
        peer = self._peer(rid, frames[1])
        if peer is None:
            return
        now = self._clock()
        if peer.muted_until > now:
            self.metrics.rejected.labels("muted").inc()
            return
        lim = self.config.limits
        peer.tokens = min(float(lim.msg_burst),
                          peer.tokens + (now - peer.refill_t) * lim.msgs_per_s)
        peer.refill_t = now
        if peer.tokens < 1.0:
            reply = now - peer.last_limited_reply > 1.0
            if reply:
                peer.last_limited_reply = now
            self._reject(peer, "rate_limited", "message rate", reply=reply)
            return
        peer.tokens -= 1.0
        try:
            msg = protocol.decode(frames[1:], CLIENT_TYPES, self.limits)
        except ProtocolError as e:
            self._reject(peer, e.code, e.detail)
            return
        self.metrics.messages.labels(msg.type).inc()
        try:
            getattr(self, "_on_" + msg.type)(peer, msg)
        except ProtocolError as e:
            self._reject(peer, e.code, e.detail, **({"tid": msg["tid"]} if "tid" in
                                                    msg.fields else {}))
        except Exception:  # a bug must not take the server down for every other peer
            log.exception("handling %s from %s failed", msg.type, peer.key_name)
            self.metrics.rejected.labels("internal").inc()

    # -- handlers (loop thread) ------------------------------------------------------------
    def _on_ping(self, peer: _Peer, msg: protocol.Message) -> None:
        self._send(peer.rid, encode("pong", boot=self.boot))

    def _on_hello(self, peer: _Peer, msg: protocol.Message) -> None:
        device = msg["device"]
        lim = self.config.limits
        if self.config.device_keys == "name" and peer.key_name != device:
            raise ProtocolError("device_mismatch",
                                f"key {peer.key_name!r} may upload only as that device")
        if peer.device not in (None, device) and peer.transfers:
            raise ProtocolError("device_mismatch", "hello for another device mid-transfer")
        if peer.device is None:  # insecure peers have no key: group them by device
            same_key = [p for p in self._peers.values() if p.device and p is not peer and
                        (p.user == peer.user if peer.user else p.device == device)]
            while len(same_key) >= lim.max_peers_per_key:  # a reconnect supersedes the
                self._drop_peer(same_key.pop(0))             # oldest link of that key
        if peer.device is None and \
                sum(1 for p in self._peers.values() if p.device) >= lim.max_peers:
            raise ProtocolError("busy", "too many peers")
        peer.device = device
        self.metrics.peers.set(sum(1 for p in self._peers.values() if p.device))
        log.info("hello from %s as device %s", peer.key_name, device)
        self._send(peer.rid, encode(
            "welcome", server=self.config.server_id[:128], boot=self.boot,
            max_chunk=self.limits.max_chunk, max_manifest=self.limits.max_manifest,
            max_bundle=self.limits.max_bundle, window=lim.window))

    def _on_offer(self, peer: _Peer, msg: protocol.Message) -> None:
        if peer.device is None:
            raise ProtocolError("not_hello", "send hello first")
        tid, sha = msg["tid"], msg["sha256"]
        lim = self.config.limits
        old = peer.transfers.get(tid)
        if old is not None:
            if old.sha256 == sha and old.bundle == msg["bundle"]:
                if old.state == "receiving":  # a repeated offer: answer it again
                    self._send(peer.rid, encode("resume", tid=tid, offset=old.offset))
                return  # preparing/committing: the answer is on its way
            self._abandon(old)
        if len(peer.transfers) >= lim.max_transfers_per_peer:
            raise ProtocolError("busy", "too many open transfers on this connection")
        key = (peer.device, sha)
        t = self._active.get(key)
        if t is not None and t.state == "receiving":
            # the same content from a new connection (the old link died): take it over
            prev = self._peers.get(t.owner)
            if prev is not None and prev.transfers.get(t.tid) is t:
                del prev.transfers[t.tid]
            t.owner, t.tid, t.client = peer.rid, tid, peer.key_name
            t.session, t.bundle, t.manifest = msg["session"], msg["bundle"], msg["manifest"]
            t.priority, t.nacked_at = msg["priority"], None
            peer.transfers[tid] = t
            self.metrics.resumed.inc()
            self._send(peer.rid, encode("resume", tid=tid, offset=t.offset))
            return
        if t is not None:
            raise ProtocolError("busy", "this bundle is being stored; offer it again soon")
        if sum(1 for x in self._active.values() if x.device == peer.device) \
                >= lim.max_transfers_per_device:
            raise ProtocolError("busy", "too many open transfers for this device")
        t = _Transfer(peer.device, msg["session"], msg["bundle"], sha, msg["size"],
                      msg["priority"], msg["manifest"], peer.rid, tid, peer.key_name,
                      self._staging / peer.device / f"{sha}.part")
        self._active[key] = t
        peer.transfers[tid] = t
        self.metrics.transfers.set(len(self._active))
        self._submit(self._prepare, t)

    def _on_chunk(self, peer: _Peer, msg: protocol.Message) -> None:
        if peer.device is None:
            raise ProtocolError("not_hello", "send hello first")
        tid, off, data = msg["tid"], msg["off"], msg.payload
        t = peer.transfers.get(tid)
        if t is None:
            raise ProtocolError("unknown_transfer", f"tid {tid}")
        if t.state != "receiving":
            self.metrics.rejected.labels("not_receiving").inc()
            return
        code = None
        if off != t.offset or off + len(data) > t.size:
            code = "bad_offset"
        elif "crc" in msg.fields and zlib.crc32(data) != msg["crc"]:
            code = "bad_crc"
        if code is not None:
            self.metrics.rejected.labels(code).inc()
            # one nack per gap, not one per stale chunk in flight behind it; a chunk at
            # the right offset that fails its crc is a fresh attempt and always answered
            if t.nacked_at != t.offset or code == "bad_crc":
                t.nacked_at = t.offset
                self._send(peer.rid, encode("nack", tid=tid, off=t.offset, code=code))
            return
        assert t.fd is not None
        try:
            view = memoryview(data)
            while view:
                n = os.write(t.fd, view)
                view = view[n:]
        except OSError as e:
            log.error("staging write for %s failed: %s", t.bundle, e.strerror)
            self.metrics.storage_errors.inc()
            try:
                os.ftruncate(t.fd, t.offset)
                os.lseek(t.fd, t.offset, os.SEEK_SET)
            except OSError:
                pass
            self._forget(t)
            self._close_fd(t)
            raise ProtocolError("storage", "ingest cannot write staging") from None
        t.offset += len(data)
        t.nacked_at = None
        self.metrics.bytes_received.inc(len(data))
        self._send(peer.rid, encode("ack", tid=tid, off=t.offset))
        assert self._hasher is not None and t.digest is not None
        self._hasher.feed(t.digest, data)  # after the ack: hashing is off the critical path

    def _on_commit(self, peer: _Peer, msg: protocol.Message) -> None:
        t = peer.transfers.get(msg["tid"])
        if t is None:
            raise ProtocolError("unknown_transfer", f"tid {msg['tid']}")
        if t.state != "receiving":
            return  # a repeated commit; the answer is on its way
        if t.offset != t.size:
            self._error(peer, "incomplete", f"hold {t.offset} of {t.size}", tid=t.tid,
                        offset=t.offset)
            return
        t.state = "committing"  # the worker checks the sha256 once the hasher caught up
        self._submit(self._store, t)

    # -- worker jobs (worker threads; touch only the transfer given) -------------------------
    def _submit(self, job: Callable[[_Transfer], tuple[Callable[..., None], tuple[Any, ...]]],
                t: _Transfer) -> None:
        def run() -> None:
            try:
                result = job(t)
            except (StorageError, OSError) as e:
                result = (self._on_failed, (t, "storage", str(e)))
            except Exception as e:  # a bug: never let a worker die silently
                log.exception("worker job failed")
                result = (self._on_failed, (t, "storage", f"internal error: {e}"))
            self._results.put(result)
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass

        assert self._pool is not None
        self._pool.submit(run)

    def _entry(self, t: _Transfer) -> dict[str, Any]:
        return {"device": t.device, "session": t.session, "bundle": t.bundle,
                "sha256": t.sha256, "size": t.size, "priority": t.priority,
                "received_unix_ns": time.time_ns(), "server": self.config.server_id,
                "client_key": t.client, "agent": f"edgecap-ingest {__version__}"}

    def _check_manifest(self, t: _Transfer) -> str | None:
        try:
            man = json.loads(t.manifest)
        except ValueError:
            return "manifest is not JSON"
        if not isinstance(man, dict):
            return "manifest is not a JSON object"
        want = {"sha256": t.sha256, "size": t.size, "session_id": t.session,
                "device_id": t.device, "segment": t.bundle}
        for k, v in want.items():
            if k in man and man[k] != v:
                return f"manifest {k} {str(man[k])[:70]!r} != offered {str(v)[:70]!r}"
        return None

    def _prepare(self, t: _Transfer) -> tuple[Callable[..., None], tuple[Any, ...]]:
        problem = self._check_manifest(t)
        if problem:
            return self._on_failed, (t, "bad_manifest", problem)
        be = self.backend
        entry = be.get_entry(t.device, t.session, t.bundle)
        if entry is not None:
            if entry["sha256"] != t.sha256:
                return self._on_failed, (t, "conflict", "this bundle id is stored with "
                                         "another sha256")
            return self._on_have, (t, "indexed")
        if be.has_blob(t.sha256):
            res = be.put_entry(self._entry(t), t.manifest)
            if res == "conflict":
                return self._on_failed, (t, "conflict", "bundle id indexed elsewhere with "
                                         "another sha256")
            return self._on_have, (t, "duplicate")
        t.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(t.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            held = os.fstat(fd).st_size
            if held > t.size:
                os.ftruncate(fd, 0)
                held = 0
            sha = hashlib.sha256()
            done = 0
            while done < held:
                block = os.pread(fd, min(4 << 20, held - done), done)
                if not block:
                    break
                sha.update(block)
                done += len(block)
            os.lseek(fd, done, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        return self._on_prepared, (t, fd, _Digest(sha, done, done), done)

    def _store(self, t: _Transfer) -> tuple[Callable[..., None], tuple[Any, ...]]:
        fd, t.fd = t.fd, None
        assert fd is not None and t.digest is not None and self._hasher is not None
        try:
            if self._hasher.hexdigest(t.digest) != t.sha256:
                t.path.unlink(missing_ok=True)
                return self._on_bad_hash, (t,)
            os.fsync(fd)
        finally:
            os.close(fd)
        stored = self.backend.put_blob(t.sha256, t.path, t.size)
        res = self.backend.put_entry(self._entry(t), t.manifest)
        t.path.unlink(missing_ok=True)
        if res == "conflict":
            return self._on_failed, (t, "conflict", "bundle id indexed with another sha256")
        return self._on_stored, (t, stored)

    # -- results (loop thread) -----------------------------------------------------------
    def _drain_results(self) -> None:
        while True:
            try:
                fn, args = self._results.get_nowait()
            except queue.Empty:
                return
            fn(*args)

    def _owner(self, t: _Transfer) -> _Peer | None:
        peer = self._peers.get(t.owner)
        return peer if peer is not None and peer.transfers.get(t.tid) is t else None

    def _on_prepared(self, t: _Transfer, fd: int, digest: _Digest, offset: int) -> None:
        if t.state == "abandoned" or self._owner(t) is None:
            os.close(fd)
            self._forget(t)
            return
        t.fd, t.digest, t.offset, t.state = fd, digest, offset, "receiving"
        if offset:
            self.metrics.resumed.inc()
        self._send(t.owner, encode("resume", tid=t.tid, offset=offset))

    def _on_have(self, t: _Transfer, outcome: str) -> None:
        self.metrics.bundles.labels(outcome).inc()
        log.info("bundle %s/%s/%s already stored (%s)", t.device, t.session, t.bundle,
                 outcome)
        owner = self._owner(t)
        self._forget(t)
        if owner is not None:
            self._send(owner.rid, encode("have", tid=t.tid))

    def _on_stored(self, t: _Transfer, stored: bool) -> None:
        self.metrics.bundles.labels("stored" if stored else "duplicate").inc()
        log.info("bundle %s/%s/%s verified and stored (%d bytes%s)", t.device, t.session,
                 t.bundle, t.size, "" if stored else ", blob already present")
        owner = self._owner(t)
        self._forget(t)
        if owner is not None:
            self._send(owner.rid, encode("done", tid=t.tid, stored=stored,
                                         dedup=not stored))

    def _on_bad_hash(self, t: _Transfer) -> None:
        self.metrics.bad_hash.inc()
        self.metrics.rejected.labels("bad_hash").inc()
        log.warning("bundle %s/%s from %s: sha256 does not verify; discarded", t.device,
                    t.bundle, t.client)
        owner = self._owner(t)
        self._forget(t)
        if owner is not None:
            self._error(owner, "bad_hash", "received bytes do not match the offered sha256",
                        tid=t.tid)

    def _on_failed(self, t: _Transfer, code: str, detail: str) -> None:
        if code == "storage":
            self.metrics.storage_errors.inc()
            log.error("bundle %s/%s: storage failed: %s", t.device, t.bundle, detail)
        else:
            self.metrics.rejected.labels(code).inc()
            log.warning("bundle %s/%s from %s: %s: %s", t.device, t.bundle, t.client, code,
                        detail)
        owner = self._owner(t)
        self._close_fd(t)
        self._forget(t)
        if owner is not None:
            self._error(owner, code, detail, tid=t.tid)

    # -- bookkeeping (loop thread) ---------------------------------------------------------
    def _forget(self, t: _Transfer) -> None:
        if self._active.get((t.device, t.sha256)) is t:
            del self._active[(t.device, t.sha256)]
        peer = self._peers.get(t.owner)
        if peer is not None and peer.transfers.get(t.tid) is t:
            del peer.transfers[t.tid]
        self.metrics.transfers.set(len(self._active))

    def _close_fd(self, t: _Transfer) -> None:
        if t.fd is not None and t.state != "committing":
            try:
                os.close(t.fd)
            except OSError:
                pass
            t.fd = None

    def _abandon(self, t: _Transfer) -> None:
        """Drop a transfer whose peer is gone or replaced it. A running worker job finds
        it abandoned and cleans up; the staging file stays for a resume."""
        if t.state == "committing":  # let the store finish; nobody to tell
            peer = self._peers.get(t.owner)
            if peer is not None and peer.transfers.get(t.tid) is t:
                del peer.transfers[t.tid]
            return
        if t.state == "receiving":
            self._close_fd(t)
        t.state = "abandoned"
        self._forget(t)

    def _drop_peer(self, peer: _Peer) -> None:
        for t in list(peer.transfers.values()):
            self._abandon(t)
        self._peers.pop(peer.rid, None)
        self.metrics.peers.set(sum(1 for p in self._peers.values() if p.device))

    def _housekeeping(self, now: float) -> None:
        idle = self.config.limits.peer_idle_s
        for peer in [p for p in self._peers.values() if now - p.last_seen > idle]:
            log.info("peer %s (%s) idle for %.0f s; dropped", peer.key_name, peer.device,
                     now - peer.last_seen)
            self._drop_peer(peer)

    def _clean_staging(self) -> None:
        cutoff = time.time() - self.config.limits.staging_max_age_h * 3600
        for f in self._staging.glob("*/*.part"):
            try:
                if f.stat().st_mtime < cutoff:
                    f.unlink()
                    log.info("removed stale partial upload %s", f)
            except OSError:
                pass

    # -- introspection ---------------------------------------------------------------------
    def stats(self) -> dict[str, float]:
        """Counter values by name, e.g. ``{"bundles.stored": 3, "rejected.bad_crc": 1}``.
        Safe from any thread."""
        out: dict[str, float] = {}
        for fam in self.metrics.registry.collect():
            for s in fam.samples:
                if s.name.endswith("_created"):
                    continue
                name = s.name.removeprefix("edgecap_ingest_").removesuffix("_total")
                label = next(iter(s.labels.values()), None)
                out[f"{name}.{label}" if label else name] = s.value
        return out
