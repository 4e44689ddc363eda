"""Live publishing of a running agent or a replay: a ZeroMQ PUB stream (msgpack) and a
Foxglove live view (foxglove-sdk WebSocket server). Both are pipeline taps.

    reader thread ──tap(sample)──▶ bounded send queue (full: oldest dropped, counted)
    sender thread ──codec_for(info).encode──▶ zmq PUB (SNDHWM, NOBLOCK) | foxglove channel

``tap`` is called from driver reader threads (and label workers): it takes one short lock,
appends and returns; encoding and sending happen on the publisher's own thread, so a slow
or absent subscriber never holds up capture. Messages use the bundle's schemas
(:func:`agent.schemas.codec_for`): Foxglove protobuf schemas for sensor data and labels,
JSON for edgecap's own records.

ZeroMQ wire format (version 1), one two-frame message per sample::

    frame 0: topic, UTF-8 (subscribe with a topic prefix, e.g. b"/camera/")
    frame 1: msgpack map {"v": 1, "topic": str, "t_ns": int, "device_t_ns": int | nil,
             "host_rx_ns": int, "seq": int | nil, "encoding": "protobuf" | "json",
             "schema": str (e.g. "foxglove.CompressedImage"), "data": bin}

``t_ns`` is the session timebase, ``data`` the serialized message exactly as the bundle
stores it. See docs/replay.md for a subscriber in ten lines.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import json
import logging
import threading
from collections import deque
from typing import Any, Callable, Mapping

from .schemas import Codec, codec_for
from .types import Sample, StreamInfo

log = logging.getLogger("edgecap.publish")

WIRE_VERSION = 1


class _SendQueue:
    """Bounded FIFO between taps and one sender thread; drops the oldest when full and
    counts drops per stream. ``put`` never blocks."""

    def __init__(self, max_items: int, max_bytes: int):
        self.max_items, self.max_bytes = max_items, max_bytes
        self._q: deque[Sample] = deque()
        self._bytes = 0
        self._cond = threading.Condition()
        self.dropped: dict[str, int] = {}
        self.closed = False

    def put(self, s: Sample) -> None:
        n = s.nbytes()
        with self._cond:
            if self.closed:
                return
            while self._q and (len(self._q) >= self.max_items or
                               self._bytes + n > self.max_bytes):
                old = self._q.popleft()
                self._bytes -= old.nbytes()
                self.dropped[old.stream] = self.dropped.get(old.stream, 0) + 1
            self._q.append(s)
            self._bytes += n
            self._cond.notify()

    def get(self, timeout_s: float = 0.2) -> Sample | None:
        with self._cond:
            if not self._q and not self.closed:
                self._cond.wait(timeout_s)
            if not self._q:
                return None
            s = self._q.popleft()
            self._bytes -= s.nbytes()
            return s

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        return len(self._q)


class _Publisher(ABC):
    """Shared tap/queue/sender-thread plumbing. Subclasses implement ``_send``."""

    name = "publisher"

    def __init__(self, infos: Mapping[str, StreamInfo] | Callable[[], Mapping[str, StreamInfo]],
                 queue_items: int = 512, queue_mb: float = 128.0):
        self._infos = infos
        self.queue = _SendQueue(queue_items, int(queue_mb * (1 << 20)))
        self._codecs: dict[str, Codec] = {}
        self.sent = 0
        self.encode_errors = 0
        self.unknown_stream = 0
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def infos(self) -> Mapping[str, StreamInfo]:
        return self._infos() if callable(self._infos) else self._infos

    # -- the tap (reader threads) -----------------------------------------------------
    def tap(self, sample: Sample) -> None:
        """Offer a sample for publishing. Never blocks; a full queue drops the oldest."""
        self.queue.put(sample)

    def attach(self, pipeline: Any, pool: Any = None) -> None:
        """Publish every sample of an opened pipeline (and the labels of ``pool``)."""
        pipeline.taps.append(self.tap)
        if pool is not None:
            pool.subscribe(lambda lab, _dets: self.tap(lab))

    # -- sender thread ----------------------------------------------------------------
    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"publish:{self.name}",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() or len(self.queue):
            s = self.queue.get()
            if s is None:
                if self._stop.is_set():
                    break
                continue
            info = self.infos().get(s.stream)
            if info is None:
                self.unknown_stream += 1
                continue
            codec = self._codecs.get(s.stream)
            if codec is None:
                try:
                    codec = self._codecs[s.stream] = codec_for(info)
                except (ValueError, KeyError) as e:
                    self.encode_errors += 1
                    log.warning("%s: cannot publish %s: %s", self.name, s.stream, e)
                    continue
            try:
                data = codec.encode(s, info)
            except Exception as e:  # a payload its codec cannot take: counted
                self.encode_errors += 1
                if self.encode_errors <= 5:
                    log.warning("%s: cannot encode %s: %s", self.name, s.stream, e)
                continue
            try:
                if self._send(s, info, codec, data):
                    self.sent += 1
            except Exception:
                self.encode_errors += 1
                log.exception("%s: send failed", self.name)

    @abstractmethod
    def _send(self, s: Sample, info: StreamInfo, codec: Codec, data: bytes) -> bool:
        """Send one encoded sample on the sender thread; False when it was dropped."""

    def stop(self, drain_s: float = 2.0) -> None:
        """Send what is queued (up to ``drain_s``), then stop the sender thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(drain_s)
        self.queue.close()
        if self._thread is not None:
            self._thread.join(1.0)
        self._close()

    def _close(self) -> None:
        return None

    def stats(self) -> dict[str, Any]:
        return {"sent": self.sent, "queue_drops": dict(self.queue.dropped),
                "queue_depth": len(self.queue), "encode_errors": self.encode_errors,
                "unknown_stream": self.unknown_stream}


class ZmqPublisher(_Publisher):
    """A ZeroMQ publisher bound to ``endpoint`` (``tcp://127.0.0.1:7460``, ``ipc://…``);
    subscribers connect SUB sockets. It is an XPUB socket with ``XPUB_NODROP`` so that a
    message a slow subscriber cannot take (``sndhwm`` messages queued for it) makes the
    non-blocking send fail instead of vanishing: it is dropped and counted in
    ``hwm_drops``. Subscription frames are read and discarded by the sender thread."""

    name = "zmq"

    def __init__(self, endpoint: str, infos: Any, sndhwm: int = 1000, **kw: Any):
        super().__init__(infos, **kw)
        import msgpack
        import zmq

        self._zmq = zmq
        self._pack = msgpack.Packer(use_bin_type=True).pack
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.XPUB)
        self.sock.setsockopt(zmq.SNDHWM, sndhwm)
        self.sock.setsockopt(zmq.XPUB_NODROP, 1)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.hwm_drops = 0
        self.subscriptions = 0

    def _send(self, s: Sample, info: StreamInfo, codec: Codec, data: bytes) -> bool:
        msg = {"v": WIRE_VERSION, "topic": s.stream, "t_ns": int(s.t_ns),
               "device_t_ns": None if s.device_t_ns is None else int(s.device_t_ns),
               "host_rx_ns": int(s.host_rx_ns), "seq": None if s.seq is None else int(s.seq),
               "encoding": codec.message_encoding, "schema": codec.schema_name, "data": data}
        self._drain_subscriptions()
        try:
            self.sock.send_multipart([s.stream.encode(), self._pack(msg)],
                                     flags=self._zmq.NOBLOCK, copy=False)
            return True
        except self._zmq.Again:
            self.hwm_drops += 1
            return False

    def _drain_subscriptions(self) -> None:
        try:
            while True:
                frame = self.sock.recv(self._zmq.NOBLOCK)
                if frame[:1] == b"\x01":
                    self.subscriptions += 1
        except self._zmq.Again:
            pass

    def _close(self) -> None:
        self.sock.close(0)

    def stats(self) -> dict[str, Any]:
        return {**super().stats(), "hwm_drops": self.hwm_drops, "endpoint": self.endpoint}


def unpack(frames: list[bytes]) -> dict[str, Any]:
    """Decode one ZeroMQ message of this publisher (for subscribers and tests)."""
    import msgpack

    msg = msgpack.unpackb(frames[-1], raw=False)
    if msg.get("v") != WIRE_VERSION:
        raise ValueError(f"unknown wire version {msg.get('v')!r}")
    return msg


class FoxgloveLive(_Publisher):
    """A Foxglove WebSocket server (foxglove-sdk, ``pip install 'edgecap[live]'``) on
    ``host:port`` with one channel per stream, advertised with the bundle's schemas.
    Messages are encoded only while a client subscribes to their channel. With a
    :class:`agent.replay.PlaybackClock`, Foxglove's playback bar controls the replay
    (play/pause, speed, seek) and the server broadcasts the replay time."""

    name = "foxglove"

    def __init__(self, infos: Any, port: int = 8765, host: str = "127.0.0.1",
                 clock: Any = None, time_range: tuple[int, int] | None = None, **kw: Any):
        super().__init__(infos, **kw)
        try:
            import foxglove
        except ImportError as e:
            raise RuntimeError("the Foxglove live view needs foxglove-sdk: "
                               "pip install 'edgecap[live]'") from e
        self._fg = foxglove
        self.clock = clock
        self.context = foxglove.Context()
        caps = [foxglove.Capability.Time]
        listener = None
        if clock is not None:
            caps.append(foxglove.Capability.PlaybackControl)
            listener = _PlaybackListener(self)
        self.server = foxglove.start_server(
            name="edgecap", host=host, port=port, capabilities=caps,
            server_listener=listener, context=self.context,
            playback_time_range=time_range if clock is not None else None)
        self.port = self.server.port
        self._channels: dict[str, Any] = {}
        self._last_time_ns = 0
        self.control_requests = 0

    def channel(self, info: StreamInfo, codec: Codec) -> Any:
        ch = self._channels.get(info.name)
        if ch is not None:
            return ch
        fg = self._fg
        if codec.proto_class is not None:
            from mcap_protobuf.schema import build_file_descriptor_set

            schema = fg.Schema(name=codec.schema_name, encoding="protobuf",
                               data=build_file_descriptor_set(codec.proto_class)
                               .SerializeToString())
        else:
            schema = fg.Schema(name=codec.schema_name, encoding="jsonschema",
                               data=json.dumps(codec.json_schema or {"type": "object"}).encode())
        ch = fg.Channel(info.name, schema=schema, message_encoding=codec.message_encoding,
                        context=self.context,
                        metadata={"kind": info.kind.value, "encoding": info.encoding})
        self._channels[info.name] = ch
        return ch

    def declare(self) -> None:
        """Advertise every known stream now (before the first sample)."""
        for info in self.infos().values():
            try:
                self.channel(info, codec_for(info))
            except (ValueError, KeyError):
                continue

    def _run(self) -> None:
        self.declare()
        super()._run()

    def _send(self, s: Sample, info: StreamInfo, codec: Codec, data: bytes) -> bool:
        self.channel(info, codec).log(data, log_time=int(s.t_ns))
        if s.t_ns - self._last_time_ns >= 50_000_000 or s.t_ns < self._last_time_ns:
            self._last_time_ns = s.t_ns
            self.server.broadcast_time(int(s.t_ns))
        return True

    def _close(self) -> None:
        for ch in self._channels.values():
            ch.close()
        self.server.stop()


def _PlaybackListener(live: FoxgloveLive) -> Any:
    """A foxglove ServerListener that turns playback-bar requests into PlaybackClock
    calls (the listener's other hooks keep their no-op defaults)."""
    from foxglove.websocket import (PlaybackCommand, PlaybackState, PlaybackStatus,
                                    ServerListener)

    class Listener(ServerListener):
        def on_playback_control_request(self, req: Any) -> Any:
            clock = live.clock
            live.control_requests += 1
            did_seek = req.seek_time is not None
            if req.playback_command == PlaybackCommand.Pause:
                clock.pause()  # first, so that a seek lands exactly where asked
            if did_seek:
                clock.seek(int(req.seek_time))
            if req.playback_speed and req.playback_speed > 0:
                clock.set_rate(float(req.playback_speed))
            if req.playback_command == PlaybackCommand.Play:
                clock.resume()
            status = PlaybackStatus.Paused if clock.paused else PlaybackStatus.Playing
            return PlaybackState(status=status, current_time=clock.position_ns,
                                 playback_speed=float(clock.rate or 1.0), did_seek=did_seek,
                                 request_id=req.request_id)

    return Listener()
