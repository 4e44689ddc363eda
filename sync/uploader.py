"""The edge uploader: sends closed segments and their manifests from the spool to an ingest
server, best first, resumably, within a bandwidth cap and upload windows.

One thread (the caller of :meth:`Uploader.run_once` / :meth:`Uploader.run_forever`) does
everything; the only other threads are ZeroMQ's own. Per connection::

    DEALER ── hello ──▶ welcome (limits, window)     (a round-trip sample)
           ── ping ──▶ pong                           (sent only while no chunk is in
                                                       flight: a round-trip sample)
           ── offer(bundle, size, sha256, priority, manifest) ──▶ resume(offset) | have
           ── chunk(off) × window, paced by the token bucket ──▶ ack(off)   (credit)
           ── commit ──▶ done (after the server verified the sha256 and stored durably)

With ``window = "auto"`` the chunks in flight follow the path's bandwidth-delay product
(:class:`sync.throttle.AutoWindow`): the smallest recent round trip of those pings times
the acknowledged rate (or the bandwidth cap, if higher), plus the chunk being served.
While a transfer has nothing in flight the uploader pings (and holds the next chunk up to
``_PROBE_HOLD_S`` for the pong); while more than one chunk is in flight the pipe never
empties by itself, so every ``_DRAIN_EVERY_S`` it lets it drain for one ping. A fixed
``window`` only pings at connect (for the round-trip metric).

A lost link, a killed server or a restart of this process costs at most the chunks that
were in flight: the server answers every offer with the offset it holds. A segment is
marked ``.uploaded`` (and, per ``delete_after_upload``, deleted) only after ``done`` or
``have``. Times are ``time.monotonic`` seconds; upload windows use local wall-clock time.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
import zlib
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

from agent import __version__
from agent.config import RigConfig, SyncConfig
from agent.errors import ConfigError
from agent.manifest import file_sha256

from . import keys
from .errors import ProtocolError
from .metrics import UploaderMetrics
from .protocol import SERVER_TYPES, Limits, Message, decode, encode
from .schedule import UploadWindows
from .spool import REJECTED_SUFFIX, UPLOADED_SUFFIX, Spool, SpoolBundle, SyncState
from .throttle import AutoWindow, CreditWindow, PathEstimate, TokenBucket, chunk_for_rate

log = logging.getLogger("sync.uploader")

_AUTH_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
_SERVER_LIMITS = Limits(max_chunk=1, max_manifest=16 << 10, max_bundle=1 << 62)
_RETRY = {"busy", "storage", "rate_limited", "unknown_transfer", "superseded", "incomplete",
          "bad_offset", "bad_crc", "too_large", "bad_field"}
_PERMANENT = {"conflict", "bad_manifest"}
_MAX_ATTEMPTS = 3  # per bundle and run before it waits for the next run
# Round-trip pings go out only on an idle pipe, and no chunk follows until the pong or
# _PROBE_HOLD_S (a chunk's encryption would delay the pong in ZeroMQ's I/O threads). That
# holds the link for min(round trip, hold), so pings are spaced 100 times that: ≤ 1 %.
_PROBE_HOLD_S = 0.002
_PROBE_MIN_GAP_S = 0.02
_DRAIN_EVERY_S = 10.0  # window > 1: stop sending until all is acked, for one ping (the
                       # round-trip estimate keeps the least sample of the last 30 s)


class _LinkDown(Exception):
    """The connection is unusable (timeout, disconnect, server restarted)."""


class _AuthRejected(Exception):
    """The server refused our key during the CURVE handshake."""


class _Fatal(Exception):
    """Retrying cannot help (this device may not upload with this key)."""


@dataclass
class UploadSummary:
    """What one run did. ``verified`` counts bundles the server acknowledged after checking
    their sha256 (for a duplicate: the stored copy had been checked); ``resent_bytes`` are
    payload bytes sent that had been sent before (after a lost link, a restart, a nack)."""

    uploaded: int = 0
    stored: int = 0
    duplicates: int = 0
    verified: int = 0
    bundle_bytes: int = 0
    bytes_sent: int = 0
    resent_bytes: int = 0
    failed: int = 0
    skipped: int = 0
    deleted: int = 0
    pending: int = 0
    reconnects: int = 0
    auth_rejected: bool = False
    outside_window: bool = False
    error: str = ""
    seconds: float = 0.0
    window: int = 0  # chunks in flight allowed when the run ended (0: never connected)
    rtt_ms: float | None = None  # the round-trip estimate then (smallest recent sample)
    bundles: list[str] = field(default_factory=list)  # acknowledged, in ack order
    offered: list[str] = field(default_factory=list)  # first offers, in priority order

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(eq=False)
class _Up:
    b: SpoolBundle
    tid: int
    fd: int
    state: str = "offered"  # → sending → committing
    pos: int = 0
    acked: int = 0
    ahead: tuple[int, bytes] | None = None  # the next chunk, read while waiting for credit


class _Link:
    """One DEALER connection with its monitor. Owned by the uploader thread."""

    def __init__(self, ctx: zmq.Context, server: str, curve: tuple[bytes, bytes, bytes] | None,
                 timeout_s: float, hwm: int):
        s = self.sock = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.sndtimeo = int(timeout_s * 1000)
        s.sndhwm = hwm
        s.rcvhwm = 4 * hwm + 64
        s.maxmsgsize = _SERVER_LIMITS.max_header
        s.reconnect_ivl = 100
        s.reconnect_ivl_max = 1000
        s.heartbeat_ivl = max(500, int(timeout_s * 1000 / 3))
        s.heartbeat_timeout = int(timeout_s * 1000)
        if curve is not None:
            s.curve_publickey, s.curve_secretkey, s.curve_serverkey = curve
        self.mon = s.get_monitor_socket(zmq.EVENT_DISCONNECTED | _AUTH_EVENTS)
        s.connect(server)
        self.poller = zmq.Poller()
        self.poller.register(s, zmq.POLLIN)
        self.poller.register(self.mon, zmq.POLLIN)
        self.welcome: Message | None = None
        self.pings: deque[float | None] = deque()  # send times; None: not a clean sample

    def send(self, frames: list[Any]) -> None:
        try:
            self.sock.send_multipart(frames, copy=len(frames) == 1)
        except zmq.Again:
            raise _LinkDown("send timed out (server not reading)") from None

    def recv(self, timeout_s: float) -> Message | None:
        """The next valid message, or None when nothing came within ``timeout_s``.
        Raises _AuthRejected / _LinkDown on monitor events."""
        events = dict(self.poller.poll(max(0, int(timeout_s * 1000))))
        if self.mon in events:
            while True:
                try:
                    ev = recv_monitor_message(self.mon, zmq.NOBLOCK)
                except zmq.Again:
                    break
                if ev["event"] & _AUTH_EVENTS:
                    raise _AuthRejected(f"handshake refused (event {ev['event']}, "
                                        f"status {ev.get('value')})")
                if ev["event"] == zmq.EVENT_DISCONNECTED:
                    raise _LinkDown("disconnected")
        if self.sock in events:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return None
            try:
                return decode(frames, SERVER_TYPES, _SERVER_LIMITS)
            except ProtocolError as e:
                log.warning("ignoring a malformed message from the server: %s", e)
        return None

    def close(self) -> None:
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.mon.close(0)
        self.sock.close(0)


class Uploader:
    """The edge uploader. Build with :meth:`from_rig` (or the constructor for a spool
    outside a rig file); call :meth:`run_once` or :meth:`run_forever` from one thread;
    :meth:`stop` from any thread; :meth:`close` when done."""

    def __init__(self, sync: SyncConfig, device_id: str, spool_dir: str | os.PathLike[str],
                 *, source_path: str = "<memory>", metrics: UploaderMetrics | None = None,
                 progress: Callable[[str, int, int], None] | None = None,
                 now: Callable[[], datetime] = datetime.now,
                 clock: Callable[[], float] = time.monotonic):
        self.cfg = sync
        self.device_id = device_id
        self.curve: tuple[bytes, bytes, bytes] | None = None
        if not sync.insecure:
            self.curve = self._load_keys(sync, source_path)
        self.spool = Spool(spool_dir, device_id)
        self.state = SyncState(self.spool.root)
        self.windows = UploadWindows(sync.upload_hours)
        self.metrics = metrics or UploaderMetrics()
        self.progress = progress
        self._now = now
        self._clock = clock
        self._ctx = zmq.Context()
        self._link: _Link | None = None
        self._connections = 0
        self._tid = random.randrange(1 << 30)
        self._hwm: dict[str, int] = {}
        self._cooldown: dict[str, float] = {}
        self._stop = threading.Event()
        self._last_save = 0.0
        self._last_progress = clock()
        self.path = PathEstimate(clock)  # outlives connections: it describes the route
        self._probe_t = -1e9  # when the last clean ping went out
        self._window_shown = 0
        rate = (sync.bandwidth_kbps or 0) * 1000 / 8
        self._cap_rate = rate or None
        self._max_window = sync.window_max if sync.window == "auto" else sync.window
        self._chunk = sync.chunk_kb << 10
        if rate:
            self._chunk = chunk_for_rate(rate, self._chunk)
        self.bucket = (TokenBucket.from_kbps(sync.bandwidth_kbps, self._chunk, clock)
                       if sync.bandwidth_kbps else None)

    @classmethod
    def from_rig(cls, rig: RigConfig, spool_dir: str | os.PathLike[str] | None = None,
                 **kw: Any) -> "Uploader":
        """The uploader of a rig: spool ``sync.spool_dir`` (default ``recorder.out_dir``)."""
        spool = spool_dir or rig.sync.spool_dir or rig.recorder.out_dir
        return cls(rig.sync, rig.device_id, spool, source_path=rig.source_path, **kw)

    @staticmethod
    def _load_keys(sync: SyncConfig, path: str) -> tuple[bytes, bytes, bytes]:
        probs: list[tuple[str, str]] = []
        server = pub = sec = b""
        if not sync.server_public_key:
            probs.append(("sync.server_public_key", "required unless insecure = true (on "
                          "loopback): the server's .key file or its Z85 public key"))
        else:
            try:
                server = keys.load_public_key(sync.server_public_key)
            except ValueError as e:
                probs.append(("sync.server_public_key", str(e)))
        if not sync.client_secret_key_file:
            probs.append(("sync.client_secret_key_file", "required unless insecure = true "
                          "(on loopback); make one with: edgecap keys generate"))
        else:
            try:
                pub, sec = keys.load_secret_key(sync.client_secret_key_file)
            except ValueError as e:
                probs.append(("sync.client_secret_key_file", str(e)))
        if probs:
            raise ConfigError(path, probs)
        return pub, sec, server

    # -- public API --------------------------------------------------------------------------
    def run_once(self, give_up_s: float = 60.0) -> UploadSummary:
        """Upload every bundle that is pending now (not ones that appear meanwhile), retrying
        lost links by itself; return when all are acknowledged, when nothing progressed for
        ``give_up_s``, when the upload window closes, or on :meth:`stop`. Blocks."""
        targets = {b.key for b in self.spool.scan()}
        return self._run(targets, give_up_s)

    def run_forever(self, stop: threading.Event | None = None) -> None:
        """Upload until ``stop`` (or :meth:`stop`): a pass, then wait ``poll_s`` for new
        segments (or until the upload window opens). Blocks."""
        stop = stop or self._stop
        while not stop.is_set() and not self._stop.is_set():
            s = self._run(None, None, stop)
            if s.error:
                log.error("upload stopped: %s", s.error)
            wait = self.cfg.poll_s
            if s.outside_window:
                wait = max(1.0, min(60.0, self.windows.seconds_until_open(self._now())))
            elif s.auth_rejected:
                wait = self.cfg.reconnect_max_s
            stop.wait(wait)

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        """Close the connection and save the state file. Idempotent."""
        self._drop_link()
        self.state.save()
        if not self._ctx.closed:
            self._ctx.term()

    def __enter__(self) -> "Uploader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- passes ------------------------------------------------------------------------------
    def _pending(self, targets: set[str] | None, gave_up: set[str]) -> list[SpoolBundle]:
        found = self.spool.scan()
        out = [b for b in found if (targets is None or b.key in targets)
               and b.key not in gave_up]
        self.metrics.pending.set(len(found))
        self.metrics.pending_bytes.set(sum(b.size for b in found))
        return out

    def _run(self, targets: set[str] | None, give_up_s: float | None,
             stop: threading.Event | None = None) -> UploadSummary:
        stop = stop or self._stop
        s = UploadSummary()
        t0 = self._clock()
        self._last_progress = t0
        gave_up: set[str] = set()
        attempts: dict[str, int] = {}
        skipped0 = sum(self.spool.skipped.values())
        backoff = 0.1
        while not stop.is_set() and not self._stop.is_set():
            if not self.windows.is_open(self._now()):
                s.outside_window = True
                break
            pending = self._pending(targets, gave_up)
            if not pending:
                break
            if give_up_s is not None and self._clock() - self._last_progress > give_up_s:
                s.error = s.error or f"no progress for {give_up_s:.0f} s"
                break
            now = self._clock()
            eligible = [b for b in pending if self._cooldown.get(b.key, 0) <= now]
            if not eligible:
                stop.wait(min(1.0, min(self._cooldown.get(b.key, now) for b in pending) - now))
                continue
            try:
                link = self._connect(s)
                self._session(link, targets, gave_up, attempts, s, stop)
                backoff = 0.1
            except _LinkDown as e:
                log.warning("link to %s lost: %s; reconnecting", self.cfg.server, e)
                self.metrics.failures.labels("link").inc()
                s.failed += 1
                self._drop_link()
                stop.wait(backoff * (0.5 + random.random()))
                backoff = min(backoff * 2, self.cfg.reconnect_max_s)
            except _AuthRejected as e:
                log.error("the server at %s refused this key (%s): is %s's public key in "
                          "its clients_dir?", self.cfg.server, e, self.device_id)
                self.metrics.failures.labels("auth").inc()
                s.auth_rejected = True
                s.error = "server refused the client key"
                self._drop_link()
                break
            except _Fatal as e:
                s.error = str(e)
                log.error("%s", e)
                self._drop_link()
                break
        self.state.save()
        s.pending = len(self._pending(targets, set()))
        s.skipped += sum(self.spool.skipped.values()) - skipped0
        s.reconnects = max(0, self._connections - 1)
        s.seconds = self._clock() - t0
        s.window = self._window_shown
        rtt = self.path.rtt
        s.rtt_ms = None if rtt is None else rtt * 1e3
        return s

    def _drop_link(self) -> None:
        if self._link is not None:
            self._link.close()
            self._link = None
            self.metrics.connected.set(0)

    def _connect(self, s: UploadSummary) -> _Link:
        if self._link is not None:
            return self._link
        link = _Link(self._ctx, self.cfg.server, self.curve, self.cfg.timeout_s,
                     self._max_window + 16)
        self._connections += 1
        if self._connections > 1:
            self.metrics.reconnects.inc()
        try:
            link.send(encode("hello", device=self.device_id,
                             agent=f"edgecap {__version__}"[:64]))
            t_hello = self._clock()  # the sample includes the handshake: an upper bound
            deadline = t_hello + self.cfg.timeout_s
            while True:
                left = deadline - self._clock()
                if left <= 0:
                    raise _LinkDown(f"no welcome within {self.cfg.timeout_s:.0f} s")
                m = link.recv(left)
                if m is None:
                    continue
                if m.type == "welcome":
                    break
                if m.type == "error":
                    if m["code"] == "device_mismatch":
                        raise _Fatal(f"server refused device {self.device_id!r}: "
                                     f"{m.get('msg', '')}")
                    raise _LinkDown(f"hello refused: {m['code']} {m.get('msg', '')}")
        except BaseException:
            link.close()
            raise
        link.welcome = m
        self._on_rtt(self._clock() - t_hello)
        self._link = link
        self._probe(link)  # nothing in flight yet: the bare round trip
        self.metrics.connected.set(1)
        log.info("connected to %s (server %s)", self.cfg.server, m["server"])
        return link

    # -- one connection ----------------------------------------------------------------------
    def _session(self, link: _Link, targets: set[str] | None, gave_up: set[str],
                 attempts: dict[str, int], s: UploadSummary, stop: threading.Event) -> None:
        assert link.welcome is not None
        w = link.welcome
        chunk = min(self._chunk, w["max_chunk"])
        credit: CreditWindow | AutoWindow
        if self.cfg.window == "auto":
            credit = AutoWindow(self.path, chunk, min(self.cfg.window_max, w["window"]),
                                self._cap_rate)
        else:
            credit = CreditWindow(min(self.cfg.window, w["window"]), self._clock)
        timeout = self.cfg.timeout_s
        current: _Up | None = None
        committing: dict[int, _Up] = {}
        last_rx = self._clock()
        last_ping = 0.0

        def requeue(u: _Up, why: str, permanent: bool = False) -> None:
            os.close(u.fd)
            key = u.b.key
            if permanent:
                gave_up.add(key)
                return
            n = attempts[key] = attempts.get(key, 0) + 1
            s.failed += 1
            self.metrics.failures.labels(why).inc()
            if n >= _MAX_ATTEMPTS:
                log.warning("%s: %d failed attempts (%s); leaving it for the next run", key,
                            n, why)
                gave_up.add(key)
            self._cooldown[key] = self._clock() + min(2.0 ** n * 0.5,
                                                      self.cfg.reconnect_max_s)

        try:
            while not stop.is_set() and not self._stop.is_set():
                if current is None and len(committing) < 2:
                    busy = {u.b.key for u in committing.values()}
                    now = self._clock()
                    nxt = next((b for b in self._pending(targets, gave_up)
                                if b.key not in busy and self._cooldown.get(b.key, 0) <= now),
                               None)
                    if nxt is not None:
                        current = self._offer(link, nxt, w, s, gave_up)
                        if current is None:
                            continue
                    elif not committing:
                        return
                wait = timeout / 3
                if current is not None and current.state == "sending":
                    if current.pos == current.b.size and current.acked == current.b.size:
                        link.send(encode("commit", tid=current.tid))
                        current.state = "committing"
                        committing[current.tid] = current
                        current = None
                        continue
                    d = self._pump(link, current, chunk, credit, s)
                    if current.state == "vanished":
                        log.error("%s changed on disk while uploading; skipped this run",
                                  current.b.key)
                        requeue(current, "local_changed", permanent=True)
                        current = None
                        continue
                    if d > 0:
                        wait = min(wait, d)
                expecting = bool(committing) or (current is not None and (
                    current.state == "offered" or current.acked < current.pos))
                m = link.recv(wait)
                while m is not None:
                    last_rx = self._clock()
                    current = self._handle(m, link, current, committing, requeue, s, credit)
                    m = link.recv(0)
                now = self._clock()
                if expecting and now - last_rx > timeout:
                    raise _LinkDown(f"no answer for {timeout:.0f} s")
                if expecting and now - last_rx > timeout / 3 and now - last_ping > timeout / 3:
                    link.send(encode("ping"))
                    link.pings.append(None)  # chunks may be queued ahead of it
                    last_ping = now
        finally:
            for u in ([current] if current else []) + list(committing.values()):
                try:
                    os.close(u.fd)
                except OSError:
                    pass
                self.state.update(u.b.key, u.b.sha256, self._hwm.get(u.b.key, 0), u.acked)
            self.state.save()

    def _offer(self, link: _Link, b: SpoolBundle, w: Message, s: UploadSummary,
               gave_up: set[str]) -> _Up | None:
        try:
            manifest = self.spool.manifest_bytes(b)
            fd = os.open(b.path, os.O_RDONLY)
        except OSError as e:
            log.warning("%s vanished before upload (%s)", b.key, e.strerror)
            gave_up.add(b.key)
            return None
        if len(manifest) > w["max_manifest"]:
            os.close(fd)
            log.error("%s: manifest of %d bytes exceeds the server's %d", b.key,
                      len(manifest), w["max_manifest"])
            self.metrics.skipped.labels("manifest_too_large").inc()
            s.skipped += 1
            gave_up.add(b.key)
            return None
        self._tid = (self._tid + 1) % (1 << 31)
        if b.key not in s.offered:
            s.offered.append(b.key)
        if b.key not in self._hwm:
            self._hwm[b.key] = self.state.get(b.key, b.sha256)["sent"]
        link.send(encode("offer", tid=self._tid, session=b.session, bundle=b.bundle,
                         size=b.size, sha256=b.sha256, priority=b.priority,
                         manifest=manifest))
        return _Up(b, self._tid, fd)

    def _on_rtt(self, seconds: float) -> None:
        self.path.on_rtt(seconds)
        self.metrics.rtt.set(self.path.rtt or seconds)

    def _probe(self, link: _Link) -> None:
        """Send a ping for a round-trip sample unless one is out or went out recently (see
        ``_PROBE_HOLD_S``). Call only while no chunk is in flight (nothing queued
        ahead of it, so the sample is the network's round trip, not a chunk's service)."""
        now = self._clock()
        gap = max(_PROBE_MIN_GAP_S, 100 * min(self.path.rtt or 1.0, _PROBE_HOLD_S))
        if now - self._probe_t < gap or any(t is not None for t in link.pings):
            return
        link.send(encode("ping"))
        link.pings.append(now)
        self._probe_t = now

    def _pump(self, link: _Link, u: _Up, chunk: int, credit: CreditWindow | AutoWindow,
              s: UploadSummary) -> float:
        """Send chunks while credit and tokens allow, then read the next chunk ahead so
        the ack that frees credit is answered by a send at once; returns the seconds the
        bucket (or a round-trip ping) wants us to wait (0 when limited by credit or done).
        With an automatic window, while nothing is in flight it first sends a ping
        (:meth:`_probe`) and waits up to ``_PROBE_HOLD_S`` for its pong; above one chunk
        it sends nothing new once a ping is ``_DRAIN_EVERY_S`` overdue, until all is
        acked."""
        key = u.b.key
        hwm = self._hwm.get(key, 0)
        crc = self.cfg.insecure  # CURVE already authenticates every byte
        win = credit.chunks
        if win != self._window_shown:
            self._window_shown = win
            self.metrics.window.set(win)
        now = self._clock()
        if (isinstance(credit, AutoWindow) and win > 1 and u.pos > u.acked
                and now - self._probe_t > _DRAIN_EVERY_S):
            return 0.0
        if isinstance(credit, AutoWindow) and u.pos == u.acked and u.pos < u.b.size:
            self._probe(link)
            if link.pings and link.pings[-1] is not None:
                hold = self._probe_t + _PROBE_HOLD_S - now
                if hold > 0:
                    return hold
        while u.pos < u.b.size and u.pos - u.acked < win * chunk:
            n = min(chunk, u.b.size - u.pos)
            if self.bucket is not None:
                d = self.bucket.try_take(n)
                if d > 0:
                    return d
            if u.ahead is not None and u.ahead[0] == u.pos and len(u.ahead[1]) == n:
                data = u.ahead[1]
            else:
                data = os.pread(u.fd, n, u.pos)
            u.ahead = None
            if len(data) != n:
                u.state = "vanished"  # truncated or replaced under us
                break
            fields: dict[str, Any] = {"tid": u.tid, "off": u.pos}
            if crc:
                fields["crc"] = zlib.crc32(data)
            link.send(encode("chunk", data, **fields))
            if u.pos < hwm:
                again = min(u.pos + n, hwm) - u.pos
                s.resent_bytes += again
                self.metrics.bytes_resent.inc(again)
            u.pos += n
            credit.on_send(u.pos)
            hwm = max(hwm, u.pos)
            s.bytes_sent += n
            self.metrics.bytes_sent.inc(n)
        self._hwm[key] = hwm
        if link.pings and link.pings[-1] is not None:
            return 0.0  # read ahead after the pong: the read would lengthen the sample
        if u.state == "sending" and u.pos < u.b.size and u.ahead is None:
            u.ahead = (u.pos, os.pread(u.fd, min(chunk, u.b.size - u.pos), u.pos))
        return 0.0

    def _handle(self, m: Message, link: _Link, current: _Up | None,
                committing: dict[int, _Up], requeue: Callable[..., None],
                s: UploadSummary, credit: CreditWindow | AutoWindow) -> _Up | None:
        """Apply one server message; returns the (possibly cleared) current transfer."""
        t = m.type
        tid = m.get("tid")
        cur = current if current is not None and current.tid == tid else None
        if t == "pong":
            if m.get("boot") and m.get("boot") != link.welcome["boot"]:  # type: ignore[index]
                raise _LinkDown("server restarted")
            sent = link.pings.popleft() if link.pings else None  # answered in order
            if sent is not None:
                self._on_rtt(self._clock() - sent)
            return current
        if t == "resume" and cur is not None and cur.state == "offered":
            off = m["offset"]
            if off > cur.b.size:
                requeue(cur, "bad_offset")
                return None
            cur.pos = cur.acked = off
            cur.state = "sending"
            credit.restart(off)
            if off:
                log.info("%s: resuming at %d of %d bytes", cur.b.key, off, cur.b.size)
            return current
        if t == "ack" and cur is not None:
            if m["off"] > cur.acked:
                self._last_progress = self._clock()
            cur.acked = max(cur.acked, min(m["off"], cur.pos))
            credit.on_ack(cur.acked)
            self._saved_progress(cur)
            return current
        if t == "nack" and cur is not None and cur.state == "sending":
            log.info("%s: server holds %d (%s); rewinding from %d", cur.b.key, m["off"],
                     m["code"], cur.pos)
            self.metrics.failures.labels(m["code"][:32]).inc()
            cur.pos = cur.acked = min(m["off"], cur.b.size)
            credit.restart(cur.acked)
            return current
        if t == "have" and cur is not None:
            os.close(cur.fd)
            self._finish(cur, link, stored=False, s=s)
            return None
        if t == "done" and tid in committing:
            u = committing.pop(tid)
            os.close(u.fd)
            self._finish(u, link, stored=m["stored"], s=s)
            return current
        if t == "error":
            code, text = m["code"], m.get("msg", "")
            u = (cur or committing.get(tid)) if tid is not None else None
            if u is None:
                if tid is not None:
                    return current  # about a transfer we no longer have
                if code == "rate_limited":
                    time.sleep(0.5)
                    return current
                if code == "device_mismatch":
                    raise _Fatal(f"server refused device {self.device_id!r}: {text}")
                raise _LinkDown(f"server error {code}: {text}")
            if u is cur:
                current = None
            else:
                committing.pop(u.tid, None)
            if code == "bad_hash":
                self._bad_hash(u, requeue, s)
            elif code in _PERMANENT:
                log.error("%s: server refused it for good (%s: %s); marked %s", u.b.key,
                          code, text, REJECTED_SUFFIX)
                self.spool.mark(u.b, REJECTED_SUFFIX, {"reason": code, "detail": text})
                self.metrics.skipped.labels(code).inc()
                s.skipped += 1
                requeue(u, code, permanent=True)
            else:
                if code not in _RETRY:
                    log.warning("%s: unexpected error %s: %s", u.b.key, code, text)
                else:
                    log.info("%s: %s (%s); will retry", u.b.key, code, text)
                requeue(u, code)
            return current
        return current

    def _bad_hash(self, u: _Up, requeue: Callable[..., None], s: UploadSummary) -> None:
        self._hwm[u.b.key] = max(self._hwm.get(u.b.key, 0), u.pos)
        try:
            sha, size = file_sha256(u.b.path)
        except OSError:
            sha, size = "", -1
        if sha != u.b.sha256 or size != u.b.size:
            log.error("%s: the local file does not match its manifest (damaged on disk); "
                      "not uploading it", u.b.key)
            self.spool.mark(u.b, REJECTED_SUFFIX, {"reason": "local_hash_mismatch"})
            self.metrics.skipped.labels("local_hash_mismatch").inc()
            s.skipped += 1
            requeue(u, "local_hash_mismatch", permanent=True)
        else:
            log.warning("%s: server saw a bad sha256 (corrupted in transit); re-sending",
                        u.b.key)
            requeue(u, "bad_hash")

    def _saved_progress(self, u: _Up) -> None:
        self.state.update(u.b.key, u.b.sha256, self._hwm.get(u.b.key, u.pos), u.acked)
        now = self._clock()
        if now - self._last_save > 1.0:
            self.state.save()
            self._last_save = now
        if self.progress is not None:
            self.progress(u.b.key, u.acked, u.b.size)

    def _finish(self, u: _Up, link: _Link, stored: bool, s: UploadSummary) -> None:
        b = u.b
        server = link.welcome["server"] if link.welcome else ""
        self.spool.mark(b, UPLOADED_SUFFIX, {"outcome": "stored" if stored else "duplicate",
                                             "server": server, "verified": True})
        self.state.remove(b.key)
        self._hwm.pop(b.key, None)
        self._cooldown.pop(b.key, None)
        self._last_progress = self._clock()
        s.uploaded += 1
        s.verified += 1
        s.bundle_bytes += b.size
        s.bundles.append(b.key)
        if stored:
            s.stored += 1
        else:
            s.duplicates += 1
        self.metrics.bundles.labels("stored" if stored else "duplicate").inc()
        if self.cfg.delete_after_upload and self.spool.delete_segment(b):
            s.deleted += 1
            self.metrics.deleted.inc()
        if self.progress is not None:
            self.progress(b.key, b.size, b.size)
        log.info("%s: %s by %s (%d bytes)", b.key, "stored" if stored else
                 "already held", server, b.size)


def spool_status(spool_dir: str | os.PathLike[str], device_id: str | None = None
                 ) -> dict[str, Any]:
    """Counts for ``edgecap sync status``: pending bundles/bytes, uploaded, rejected,
    still being written. Reads the directory only."""
    sp = Spool(spool_dir, device_id)
    pending = sp.scan()
    root = Path(spool_dir)
    uploaded = len(list(root.glob(f"*/*{UPLOADED_SUFFIX}")))
    rejected = len(list(root.glob(f"*/*{REJECTED_SUFFIX}")))
    active = len(list(root.glob("*/*.mcap.active")))
    return {"pending": len(pending), "pending_bytes": sum(b.size for b in pending),
            "uploaded": uploaded, "rejected": rejected, "recording": active,
            "skipped": dict(sp.skipped), "next": [b.key for b in pending[:5]]}
