"""``camera.opencv``: cameras through OpenCV — V4L2 devices, video files, HTTP MJPEG, RTSP.

URIs: ``/dev/video0`` (or ``v4l2:/dev/video0``, or a bare index ``0``), ``http(s)://…``
(MJPEG, multipart/x-mixed-replace), ``rtsp://…`` (and other FFmpeg network URLs),
``file:PATH`` or a plain path (any container FFmpeg reads).

JPEG passthrough: where the source delivers JPEG, the bytes are kept as they came —
never decoded and re-encoded in the capture path:

- HTTP MJPEG is read with a plain ``http.client`` reader and parsed here
  (:mod:`drivers.mjpeg`); OpenCV cannot hand out the raw JPEG. The device time and frame
  counter come from the JPEG comment (``t_dev_ns=… seq=…``, as the HIL emulator writes)
  or an ``X-Timestamp`` part header (mjpg-streamer).
- V4L2 asks for ``fourcc`` (MJPG) with ``CAP_PROP_CONVERT_RGB = 0`` and gets the raw
  buffer; the device time is the kernel's buffer timestamp (``CAP_PROP_POS_MSEC``, on
  CLOCK_MONOTONIC for UVC). OpenCV does not expose the V4L2 sequence number, so losses
  are found from timestamp jumps.
- Files and RTSP streams whose codec is MJPEG are read as raw packets
  (``CAP_PROP_FORMAT = -1``); other codecs are decoded and re-encoded at ``quality``
  (or delivered as ``bgr8``). Device time is the stream PTS (plus the RTCP wall-clock
  start for RTSP where the server sends one); a file's frame index is its counter.

Losses: frame-counter jumps are gaps (``frame_counter_jump``); without a counter a jump
in device time of more than 1.5 frame periods is one (``timestamp_jump``). After a
disconnect or a stall longer than ``stall_timeout_s`` the driver reconnects with
exponential backoff (``reconnects``) and records the outage as a gap with cause
``disconnect`` (its size from the counter, else estimated from time). After each
(re)connect the negotiated size, rate and format are read back and a mismatch with the
options is logged and counted (``negotiation_mismatch``).
"""

from __future__ import annotations

import base64
import grp
import http.client
import logging
import os
import pwd
import re
import socket
import statistics
import threading
import time
import urllib.parse
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterator, Literal

import cv2
import numpy as np
from pydantic import Field

from agent.errors import DriverError
from agent.types import Sample, StreamInfo, StreamKind

from . import rxstamp
from .base import Counters, Driver, DriverOptions
from .mjpeg import MultipartParser, boundary_of, jpeg_info, parse_comment, parse_x_timestamp
from .registry import register

log = logging.getLogger(__name__)

_STREAM_SCHEMES = ("rtsp://", "rtsps://", "rtmp://", "udp://", "tcp://", "srt://", "rtp://")


class OpenCvCameraOptions(DriverOptions):
    """``[streams.options]`` of ``camera.opencv``. Requested ``width``/``height`` (and the
    stream's ``rate_hz``) are asked of V4L2 devices and checked against every source."""

    width: int | None = Field(default=None, ge=16, le=7680)
    height: int | None = Field(default=None, ge=16, le=4320)
    fourcc: str = Field(default="MJPG", min_length=4, max_length=4,
                        description="pixel format asked of V4L2 devices")
    encoding: Literal["jpeg", "bgr8"] = "jpeg"
    passthrough: bool = Field(default=True, description="keep JPEG bytes as delivered; "
                              "False decodes and re-encodes every frame")
    quality: int = Field(default=85, ge=10, le=100, description="JPEG quality when encoding")
    stall_timeout_s: float = Field(default=2.0, gt=0, le=600)
    connect_timeout_s: float = Field(default=5.0, gt=0, le=600)
    backoff_initial_s: float = Field(default=0.2, gt=0, le=60)
    backoff_max_s: float = Field(default=5.0, gt=0, le=600)
    fps_tolerance: float = Field(default=0.1, ge=0, le=1,
                                 description="relative rate difference that is a mismatch")
    max_frame_mb: float = Field(default=32.0, gt=0, le=1024)


@dataclass
class _Frame:
    payload: bytes | np.ndarray
    encoding: str                 # "jpeg" or "bgr8"
    host_rx_ns: int
    device_t_ns: int | None
    seq: int | None               # the device's own frame counter, if it has one
    width: int
    height: int
    ts_source: str


class _Disconnected(Exception):
    """The source went away (closed, stalled, read failed); the driver reconnects."""


class _NotMultipart(Exception):
    """An HTTP source that is not MJPEG: hand it to FFmpeg instead."""


def classify(uri: str) -> str:
    """``http``, ``stream``, ``v4l2`` or ``file`` for a URI; DriverError if empty."""
    u = uri.strip()
    if not u:
        raise DriverError("camera.opencv needs a uri (/dev/videoN, http://…, rtsp://…, "
                          "or a file path)")
    low = u.lower()
    if low.startswith(("http://", "https://")):
        return "http"
    if low.startswith(_STREAM_SCHEMES):
        return "stream"
    if low.startswith(("v4l2:", "/dev/video")) or u.isdigit():
        return "v4l2"
    return "file"


def _fourcc_str(v: float) -> str:
    i = int(v)
    return "".join(chr((i >> (8 * k)) & 0xFF) for k in range(4)).strip("\x00") if i else ""


# -- sources ------------------------------------------------------------------------------
class _Source(ABC):
    """One connection to the device. ``open`` returns what was negotiated (``width``,
    ``height``, ``fps``, ``format`` where known); ``read`` blocks for the next frame and
    returns None at the end of a file or raises _Disconnected; ``close`` may be called
    from any thread and makes a blocked ``read`` return soon."""

    def __init__(self, uri: str, opts: OpenCvCameraOptions, counters: Counters,
                 rate_hz: float | None):
        self.uri = uri
        self.opts = opts
        self.counters = counters
        self.rate_hz = rate_hz

    @abstractmethod
    def open(self) -> dict[str, Any]: ...

    @abstractmethod
    def read(self) -> _Frame | None: ...

    @abstractmethod
    def close(self) -> None: ...


class _HttpMjpeg(_Source):
    def __init__(self, *a: Any):
        super().__init__(*a)
        self._sock: socket.socket | None = None
        self._conn: http.client.HTTPConnection | None = None
        self._resp: http.client.HTTPResponse | None = None
        self._pending: deque[tuple[Any, int]] = deque()
        self._parser: MultipartParser | None = None
        self._start_rx: int | None = None
        #: plain HTTP with kernel receive stamps: the socket is read directly (see open)
        self.kernel_rx_stamps = False
        self._early: tuple[bytes, int] | None = None
        self._rxbuf = bytearray(1 << 16)

    def open(self) -> dict[str, Any]:
        u = urllib.parse.urlsplit(self.uri)
        cls = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
        host = u.hostname or "127.0.0.1"
        conn = cls(host, u.port, timeout=self.opts.connect_timeout_s)
        headers = {"User-Agent": "edgecap", "Accept": "multipart/x-mixed-replace, */*"}
        if u.username:
            cred = f"{urllib.parse.unquote(u.username)}:{urllib.parse.unquote(u.password or '')}"
            headers["Authorization"] = "Basic " + base64.b64encode(cred.encode()).decode()
        path = (u.path or "/") + (f"?{u.query}" if u.query else "")
        try:
            conn.connect()
            sock = conn.sock       # getresponse() drops conn.sock for Connection: close
            conn.request("GET", path, headers=headers)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise _Disconnected(f"cannot connect: {e}") from None
        if resp.status in (401, 403):
            conn.close()
            raise DriverError(f"{self._safe_uri()}: HTTP {resp.status} {resp.reason} — check "
                              "the user and password in the URI")
        if resp.status != 200:
            conn.close()
            raise _Disconnected(f"HTTP {resp.status} {resp.reason}")
        boundary = boundary_of(resp.getheader("Content-Type"))
        if boundary is None:
            conn.close()
            raise _NotMultipart(resp.getheader("Content-Type") or "no Content-Type")
        self.kernel_rx_stamps = self._raw_reads(u.scheme, sock, resp)
        sock.settimeout(self.opts.stall_timeout_s)
        self._sock, self._conn, self._resp = sock, conn, resp
        self._parser = MultipartParser(boundary, int(self.opts.max_frame_mb * (1 << 20)))
        self._pending.clear()
        self._start_rx = None
        return {"format": "MJPG"}

    def _raw_reads(self, scheme: str, sock: socket.socket,
                   resp: http.client.HTTPResponse) -> bool:
        """Read the body straight from the socket with kernel receive stamps (plain HTTP,
        not chunked, where the OS stamps), taking over what http.client had buffered past
        the headers; False to read through http.client (HTTPS, chunked, other OS)."""
        if scheme != "http" or resp.chunked or resp.fp is None or not rxstamp.enable(sock):
            return False
        sock.settimeout(0.0)  # peek returns only what is buffered
        try:
            early = resp.fp.peek()
            resp.fp.read(len(early))
        except OSError:
            early = b""
        self._early = (early, time.monotonic_ns()) if early else None
        return True

    def _recv(self) -> tuple[bytes, int]:
        """The next bytes of the body and their arrival (monotonic ns)."""
        if self._early is not None:
            early, self._early = self._early, None
            return early
        if self.kernel_rx_stamps:
            assert self._sock is not None
            n, rx = rxstamp.recv_into(self._sock, self._rxbuf)
            return bytes(memoryview(self._rxbuf)[:n]), rx
        assert self._resp is not None
        data = self._resp.read1(1 << 16)
        return data, time.monotonic_ns()

    def _safe_uri(self) -> str:
        return re.sub(r"//[^/@]*@", "//", self.uri)

    def read(self) -> _Frame | None:
        resp, parser = self._resp, self._parser
        if resp is None or parser is None:
            raise _Disconnected("not connected")
        while not self._pending:
            try:
                data, rx = self._recv()
            except TimeoutError:
                raise _Disconnected(f"stalled: no data for {self.opts.stall_timeout_s} s") from None
            except Exception as e:  # OSError, HTTPException, or a close() from another thread
                raise _Disconnected(f"read failed: {e!r}") from None
            if not data:
                self.counters.inc("corrupt", parser.finish())
                raise _Disconnected("connection closed by the camera")
            # a frame's arrival is the read that brought its first JPEG bytes (SOI): the
            # time to transfer the rest grows with its size and is not arrival delay
            if self._start_rx is None and b"\xff\xd8" in data:
                self._start_rx = rx
            before = parser.corrupt
            parts = parser.feed(data)
            for part in parts:
                self._pending.append((part, self._start_rx if self._start_rx is not None
                                      else rx))
                self._start_rx = None
            if parts and b"\xff\xd8" in parser.buf:
                self._start_rx = rx  # the next frame's JPEG began in this read
            if parser.corrupt > before:
                self.counters.inc("corrupt", parser.corrupt - before)
        part, rx = self._pending.popleft()
        info = part.info
        t_dev, seq = parse_comment(info.comment)
        src = "jpeg_com"
        if t_dev is None:
            t_dev = parse_x_timestamp(part.headers.get("x-timestamp"))
            src = "x_timestamp" if t_dev is not None else "host"
        return _Frame(part.body, "jpeg", rx, t_dev, seq, info.width, info.height, src)

    def close(self) -> None:
        sock, conn, resp = self._sock, self._conn, self._resp
        self._sock = self._conn = self._resp = None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        if resp is not None:
            resp.close()
        if conn is not None:
            conn.close()


class _Capture(_Source):
    """VideoCapture for V4L2 (``kind="v4l2"``), files and FFmpeg network streams."""

    def __init__(self, uri: str, kind: str, *a: Any):
        super().__init__(uri, *a)
        self.kind = kind
        self._cap: cv2.VideoCapture | None = None
        self._lock = threading.Lock()
        self._closing = False
        self._raw = False
        self._t0_ns = 0

    def _path(self) -> str:
        u = self.uri.strip()
        if self.kind == "v4l2":
            u = u.removeprefix("v4l2:")
            return f"/dev/video{u}" if u.isdigit() else u
        if self.kind == "file" and u.startswith("file:"):
            return urllib.parse.unquote(urllib.parse.urlsplit(u).path or u[5:])
        return u

    def open(self) -> dict[str, Any]:
        self._closing = False
        path = self._path()
        o = self.opts
        if self.kind == "v4l2":
            check_v4l2_device(path)
            cap = cv2.VideoCapture(path, cv2.CAP_V4L2)
            if not cap.isOpened():
                raise DriverError(f"{path}: cannot open as a V4L2 capture device (busy, or "
                                  "not a capture node? `edgecap devices` lists cameras)")
            cap.set(cv2.CAP_PROP_FOURCC, cv2.VideoWriter_fourcc(*o.fourcc))
            if o.width:
                cap.set(cv2.CAP_PROP_FRAME_WIDTH, o.width)
            if o.height:
                cap.set(cv2.CAP_PROP_FRAME_HEIGHT, o.height)
            if self.rate_hz:
                cap.set(cv2.CAP_PROP_FPS, self.rate_hz)
            fmt = _fourcc_str(cap.get(cv2.CAP_PROP_FOURCC))
            self._raw = (o.passthrough and fmt.upper() == "MJPG"
                         and bool(cap.set(cv2.CAP_PROP_CONVERT_RGB, 0)))
        else:
            if self.kind == "file" and not os.path.exists(path):
                raise DriverError(f"{path}: no such file")
            params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, int(o.connect_timeout_s * 1000),
                      cv2.CAP_PROP_READ_TIMEOUT_MSEC, int(o.stall_timeout_s * 1000)]
            cap = cv2.VideoCapture(path, cv2.CAP_FFMPEG, params)
            if not cap.isOpened():
                if self.kind == "file":
                    raise DriverError(f"{path}: FFmpeg cannot read this file")
                raise _Disconnected(f"FFmpeg cannot open {self.uri}")
            fmt = _fourcc_str(cap.get(cv2.CAP_PROP_FOURCC))
            self._raw = (o.passthrough and fmt.upper() in ("MJPG", "AVI1", "JPEG")
                         and bool(cap.set(cv2.CAP_PROP_FORMAT, -1)))
            self._t0_ns = 0
            if self.kind == "stream":
                open_us = cap.get(cv2.CAP_PROP_STREAM_OPEN_TIME_USEC)
                self._t0_ns = int(open_us * 1000) if open_us and open_us > 0 else 0
        neg = {"width": int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
               "height": int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
               "fps": float(cap.get(cv2.CAP_PROP_FPS)) or None, "format": fmt,
               "passthrough": self._raw}
        with self._lock:
            self._cap = cap
        return neg

    def read(self) -> _Frame | None:
        while True:
            with self._lock:
                cap = self._cap
                if cap is None or self._closing:
                    raise _Disconnected("closed")
                ok = cap.grab()
                img = None
                if ok:
                    ok, img = cap.retrieve()
                rx = time.monotonic_ns()
                pos_ms = cap.get(cv2.CAP_PROP_POS_MSEC) if ok else 0.0
                pos_frames = cap.get(cv2.CAP_PROP_POS_FRAMES) if ok else 0.0
                if self._closing:
                    self._release_locked()
            if not ok or img is None:
                if self.kind == "file":
                    return None
                raise _Disconnected("no frame within the read timeout or the stream ended")
            seq = int(pos_frames) - 1 if self.kind == "file" and pos_frames > 0 else None
            if self.kind == "stream":
                if self._t0_ns:
                    t_dev: int | None = self._t0_ns + int(round(pos_ms * 1e6))
                else:
                    t_dev = int(round(pos_ms * 1e6)) if pos_ms > 0 else None
                src = "rtcp" if self._t0_ns else "pts"
            else:
                t_dev, src = int(round(pos_ms * 1e6)), ("v4l2" if self.kind == "v4l2" else "pts")
            if img.ndim == 2 and (img.shape[0] == 1 or img.shape[1] == 1):
                body = img.tobytes()
                info = jpeg_info(body)
                if info is None:
                    self.counters.inc("corrupt")
                    continue
                return _Frame(body, "jpeg", rx, t_dev, seq, info.width, info.height, src)
            if img.ndim == 2:
                img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
            return _Frame(img, "bgr8", rx, t_dev, seq, img.shape[1], img.shape[0], src)

    def _release_locked(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None

    def close(self) -> None:
        self._closing = True
        # never release under a blocked grab (OpenCV is not safe for that): the reader
        # releases when its grab returns (bounded by the read timeout)
        if self._lock.acquire(timeout=0.05):
            try:
                self._release_locked()
            finally:
                self._lock.release()


def check_v4l2_device(path: str) -> None:
    """Raise DriverError naming the fix when ``path`` is missing or not accessible."""
    if not os.path.exists(path):
        have = sorted(p for p in os.listdir("/dev") if p.startswith("video")) \
            if os.path.isdir("/dev") else []
        attached = ", ".join("/dev/" + p for p in have) or "none"
        raise DriverError(f"{path}: no such device (attached cameras: {attached}; is it "
                          "plugged in? `edgecap devices` lists cameras and formats)")
    if not os.access(path, os.R_OK | os.W_OK):
        user = pwd.getpwuid(os.geteuid()).pw_name
        try:
            in_group = user in grp.getgrnam("video").gr_mem or \
                os.getegid() == grp.getgrnam("video").gr_gid or \
                grp.getgrnam("video").gr_gid in os.getgroups()
        except KeyError:
            in_group = False
        hint = (f"user {user} not in group video (sudo usermod -aG video {user}, then log "
                "in again)" if not in_group else "check the device's permissions "
                "(ls -l " + path + ")")
        raise DriverError(f"{path}: permission denied — {hint}")


# -- the driver ---------------------------------------------------------------------------
@register("camera.opencv")
class OpenCvCamera(Driver):
    """A camera as JPEG (or bgr8) Samples. ``open`` blocks until the first frame of a
    network camera has arrived (at most ``connect_timeout_s``), so ``streams()`` knows its
    size; iteration runs in the pipeline's reader thread and reconnects by itself; a
    file's iteration ends at its end (``is_live`` is False for files)."""

    Options = OpenCvCameraOptions

    def __init__(self, name: str, uri: str, options: DriverOptions | None = None,
                 rate_hz: float | None = None, calibration: dict[str, Any] | None = None):
        super().__init__(name, uri, options, rate_hz, calibration)
        self.kind = classify(uri) if uri.strip() else ""
        self.is_live = self.kind != "file"  # type: ignore[misc]
        self.negotiated: dict[str, Any] = {}
        self.mismatches: list[str] = []
        self._src: _Source | None = None
        self._first: _Frame | None = None
        self._last_seq: int | None = None
        self._last_dev_ns: int | None = None
        self._last_rx_ns: int | None = None
        self._outage: dict[str, Any] | None = None
        self._fps_probe: list[int] | None = None
        self._n = 0

    @property
    def opts(self) -> OpenCvCameraOptions:
        assert isinstance(self.options, OpenCvCameraOptions)
        return self.options

    # -- lifecycle --------------------------------------------------------------------
    def streams(self) -> list[StreamInfo]:
        o = self.opts
        neg = self.negotiated
        return [StreamInfo(self.name, StreamKind.CAMERA, o.encoding,
                           self.rate_hz or neg.get("fps"),
                           frame_id=self.name.strip("/").replace("/", "_"),
                           calibration=self.calibration,
                           params={"width": neg.get("width") or o.width,
                                   "height": neg.get("height") or o.height,
                                   "source": self.kind,
                                   "passthrough": bool(neg.get("passthrough"))})]

    def _make_source(self) -> _Source:
        args = (self.opts, self.counters, self.rate_hz)
        if self.kind == "http":
            return _HttpMjpeg(self.uri, *args)
        return _Capture(self.uri, self.kind, *args)

    def _connect(self) -> None:
        """Open the source, read back what was negotiated and check it."""
        src = self._make_source()
        try:
            neg = src.open()
        except _NotMultipart as e:
            log.info("%s: %s is not MJPEG (%s); reading it with FFmpeg", self.name,
                     self.uri, e)
            self.kind = "stream"
            src = self._make_source()
            neg = src.open()
        self._src = src
        neg["passthrough"] = neg.get("passthrough", True) and self.opts.passthrough
        if self.kind == "http":
            # size comes with the first frame; wait for it (bounded by the stall timeout)
            first = src.read()
            assert first is not None
            neg.update(width=first.width, height=first.height)
            self._first = first
            if neg.get("fps") is None and self.negotiated.get("fps"):
                neg["fps"] = self.negotiated["fps"]        # measured on an earlier connect
            elif neg.get("fps") is None:
                self._fps_probe = []
        self.negotiated = neg
        self._check_negotiated(neg)

    def _check_negotiated(self, neg: dict[str, Any]) -> None:
        o = self.opts
        want: list[tuple[str, Any, Any]] = [("width", o.width, neg.get("width")),
                                            ("height", o.height, neg.get("height"))]
        if self.kind == "v4l2":
            want.append(("format", o.fourcc.upper(), (neg.get("format") or "").upper()))
        if self.rate_hz and neg.get("fps"):
            ok = abs(neg["fps"] - self.rate_hz) <= o.fps_tolerance * self.rate_hz
            want.append(("fps", self.rate_hz, self.rate_hz if ok else round(neg["fps"], 2)))
        for key, asked, got in want:
            if asked is not None and got is not None and asked != got:
                msg = f"asked {key}={asked}, the source gives {got}"
                log.warning("%s: %s", self.name, msg)
                self.counters.inc("negotiation_mismatch")
                self.mismatches.append(msg)

    def _open(self) -> None:
        if not self.kind:
            classify(self.uri)  # raises the DriverError for an empty uri
        try:
            self._connect()
        except _Disconnected as e:
            if self._src is not None:
                self._src.close()
            raise DriverError(f"{self.uri}: {e}") from None

    def _close(self) -> None:
        if self._src is not None:
            self._src.close()

    # -- the sample loop --------------------------------------------------------------
    def _samples(self) -> Iterator[Sample]:
        backoff = self.opts.backoff_initial_s
        try:
            while not self.stopping:
                if self._src is None:
                    if self._stop.wait(backoff):
                        return
                    backoff = min(backoff * 2, self.opts.backoff_max_s)
                    try:
                        self._connect()
                    except (_Disconnected, DriverError, OSError) as e:
                        if self._src is not None:
                            self._src.close()
                            self._src = None
                        log.debug("%s: reconnect failed: %s", self.name, e)
                        continue
                    self.counters.inc("reconnects")
                    log.info("%s: reconnected to %s", self.name, self.uri)
                try:
                    if self._first is not None:
                        fr, self._first = self._first, None
                    else:
                        fr = self._src.read()
                except _Disconnected as e:
                    if self.stopping:
                        return
                    self._lost(str(e))
                    continue
                if fr is None:
                    return                       # end of a file
                s = self._to_sample(fr)
                if s is not None:
                    backoff = self.opts.backoff_initial_s
                    yield s
        finally:
            if self._src is not None:
                self._src.close()

    def _lost(self, reason: str) -> None:
        """The connection is gone: remember since when; the next frame sizes the gap."""
        log.warning("%s: %s; reconnecting", self.name, reason)
        self.counters.inc("stalls" if reason.startswith("stalled") else "disconnects")
        if self._outage is None:
            self._outage = {"since_rx_ns": self._last_rx_ns, "reason": reason}
        if self._src is not None:
            self._src.close()
        self._src = None

    def _to_sample(self, fr: _Frame) -> Sample | None:
        self._account(fr)
        payload, enc = fr.payload, fr.encoding
        o = self.opts
        if enc == "jpeg" and (o.encoding == "bgr8" or not o.passthrough):
            img = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
            if img is None:
                self.counters.inc("corrupt")
                return None
            payload, enc = img, "bgr8"
        if enc == "bgr8" and o.encoding == "jpeg":
            ok, buf = cv2.imencode(".jpg", payload, [cv2.IMWRITE_JPEG_QUALITY, o.quality])
            payload, enc = buf.tobytes(), "jpeg"
        self.counters.inc("received")
        self._n += 1
        seq = fr.seq if fr.seq is not None else self._n - 1
        meta: dict[str, Any] = {"width": fr.width, "height": fr.height, "ts": fr.ts_source}
        if fr.seq is None:
            meta["seq_local"] = True
        return Sample(self.name, payload, fr.host_rx_ns, device_t_ns=fr.device_t_ns,
                      seq=seq, meta=meta)

    def _period_ns(self) -> int | None:
        fps = self.negotiated.get("fps") or self.rate_hz
        return int(1e9 / fps) if fps else None

    def _account(self, fr: _Frame) -> None:
        """Gaps (counter or timestamp jumps, outages) and the deferred rate check."""
        outage, self._outage = self._outage, None
        missing: int | None = None
        cause = "disconnect" if outage else "frame_counter_jump"
        extra: dict[str, Any] = {}
        if fr.seq is not None and self._last_seq is not None:
            d = fr.seq - self._last_seq
            if d <= 0:
                self.counters.inc("counter_resets")
            else:
                missing = d - 1
        elif fr.device_t_ns is not None and self._last_dev_ns is not None:
            per = self._period_ns()
            if per:
                k = round((fr.device_t_ns - self._last_dev_ns) / per)
                if fr.device_t_ns - self._last_dev_ns > 1.5 * per:
                    missing = k - 1
                    cause = "disconnect" if outage else "timestamp_jump"
                else:
                    missing = 0
        if outage is not None:
            if missing is None:
                per = self._period_ns()
                since = outage.get("since_rx_ns")
                if per and since:
                    missing = max(0, round((fr.host_rx_ns - since) / per) - 1)
                    extra["estimated"] = True
                else:
                    missing = 0
            extra["reason"] = outage["reason"]
            if outage.get("since_rx_ns"):
                extra["duration_ns"] = fr.host_rx_ns - outage["since_rx_ns"]
            self.record_gap(missing, "disconnect", **extra)
        elif missing:
            self.record_gap(missing, cause, seq=fr.seq)
        if fr.seq is not None:
            self._last_seq = fr.seq
        if fr.device_t_ns is not None:
            self._last_dev_ns = fr.device_t_ns
        self._last_rx_ns = fr.host_rx_ns
        probe = self._fps_probe
        if probe is not None:
            probe.append(fr.device_t_ns if fr.device_t_ns is not None else fr.host_rx_ns)
            if len(probe) >= 30:
                self._fps_probe = None
                d = [b - a for a, b in zip(probe, probe[1:]) if b > a]
                if d:
                    self.negotiated["fps"] = round(1e9 / statistics.median(d), 3)
                    self._check_negotiated({"fps": self.negotiated["fps"]})


# -- for labelers -------------------------------------------------------------------------
_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
            8: cv2.IMREAD_REDUCED_COLOR_8}


def decode_for_labeler(sample: Sample, max_side: int) -> np.ndarray | None:
    """A BGR image of ``sample`` whose longer side is at most ``max_side`` (never
    enlarged), decoded as cheaply as possible: a JPEG is decoded at 1/2, 1/4 or 1/8 scale
    by libjpeg (``IMREAD_REDUCED_COLOR_*``) when that still covers ``max_side``, then
    area-resized. Raw ``bgr8``/``mono8`` arrays are resized. Returns None for a payload
    that does not decode (the caller counts it). Any thread; CPU only."""
    p = sample.payload
    if isinstance(p, np.ndarray):
        img = cv2.cvtColor(p, cv2.COLOR_GRAY2BGR) if p.ndim == 2 else p
    elif isinstance(p, (bytes, bytearray, memoryview)):
        info = jpeg_info(p)
        buf = np.frombuffer(p, np.uint8)
        flag = cv2.IMREAD_COLOR
        if info is not None:
            long_side = max(info.width, info.height)
            for r in (8, 4, 2):
                if long_side // r >= max_side:
                    flag = _REDUCED[r]
                    break
        img = cv2.imdecode(buf, flag)
        if img is None:
            return None
    else:
        return None
    h, w = img.shape[:2]
    if max(h, w) > max_side:
        k = max_side / max(h, w)
        img = cv2.resize(img, (max(1, round(w * k)), max(1, round(h * k))),
                         interpolation=cv2.INTER_AREA)
    return img
