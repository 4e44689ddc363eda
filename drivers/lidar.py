"""Ouster LiDAR driver (``lidar.ouster``): UDP packets or a pcap file → one point-cloud
Sample per scan, with every lost packet counted.

    [[streams]]
    name = "/lidar/top"
    driver = "lidar.ouster"
    uri = "udp://0.0.0.0:7502"          # or "pcap:/data/drive.pcap" / "/data/drive.pcap"
    options = { metadata = "/etc/edgecap/os1-64.json" }

Data flow (one reader thread; nothing here blocks on anything but the socket)::

    datagram ─▶ classify (size, sensor identity, CRC-64) ─▶ frame bookkeeping
             (frame_id, packet index from the measurement id) ─▶ ouster-sdk FrameBatcher
             fills a LidarFrame ─▶ scan done (all packets, a newer frame, or silence)
             ─▶ XYZ (XYZLut tables) → POINT_DTYPE array, invalid returns removed ─▶ Sample

ouster-sdk defines the packet format (``PacketFormat`` from the metadata JSON), decodes the
packets (``FrameBatcher``), supplies the beam geometry (``XYZLut`` direction and offset
tables) and reads pcap files (``PcapPacketSource``). This module adds what a capture agent
needs on top: exact loss accounting and never raising on bad input. Per packet, header
fields and the CRC are read by byte offset (anycrc for CRC-64/XZ) once that fast path has
been checked against ouster-sdk's own accessors (see ``ScanAssembler._verify_fast_path``).

Per datagram, in this order (each bad datagram is counted once and skipped):
``garbage`` — too short for a packet header, or not a lidar packet of *this* sensor
(packet type, init_id and serial number from the metadata; a sensor re-initialised with a
new init_id shows up here too and needs fresh metadata); ``truncated`` — a header of this
sensor but the wrong length; ``corrupt`` — the CRC-64 footer does not match (firmware ≥ 3.1
profiles; without a CRC nothing is checked) or the measurement id is impossible.

Per frame: ``missing_packets`` — packets that never made it into their scan (dropped on
the wire, truncated, corrupt, late, or whole frames skipped, seen as a ``frame_id`` jump);
each such loss also goes to :meth:`Driver.record_gap` (count in packets, cause
``missing_packets`` or ``missing_frames``). ``late_packets`` — a packet of a frame that was
already emitted (it is dropped; it was counted missing when its scan went out).
``duplicates`` — a packet received twice. ``incomplete_scans`` — scans emitted with
packets missing; they are still emitted with ``meta["incomplete"] = True``.
``received`` counts scans emitted, ``packets`` the packets that went into them.

A scan is emitted as soon as all its packets arrived, when a packet of a newer frame
arrives, or after ``flush_timeout_ms`` without packets (so a final or stalled scan is not
held back). The first frame seen is dropped whole if the driver started listening after its
first packet (``startup_skipped`` packets; not a loss).

Sample: ``payload`` = :data:`agent.schemas.POINT_DTYPE` array in the sensor frame (metres;
``intensity`` = the SIGNAL field; ``ring`` = beam row, 0 = top; ``t_offset_ns`` = the
column's sensor time minus the first valid column's), ``device_t_ns`` = the first valid
column's timestamp (the sensor's clock, ns), ``host_rx_ns`` = arrival of the packet holding
that column (the kernel's receive stamp on ``time.monotonic_ns``'s clock where the OS
gives one — :mod:`drivers.rxstamp` — else the read's; for pcap files the capture time,
wall clock ns),
``seq`` = frame_id (16 bits, wraps), ``meta`` = ``{"incomplete", "packets",
"missing_packets", "device_span_ns", "span_rx_ns"}``.

Clock pair: a packet can only leave after its last column fired, so each received packet
is one (device time, arrival) observation of the sensor clock. The scan tells the clock
stage the *best* one — the packet with the least ``arrival − last column time`` —
as ``meta["device_span_ns"]`` (that column's time minus ``device_t_ns``) and
``meta["span_rx_ns"]`` (that packet's arrival, host monotonic): the stage learns from
``(device_t_ns + span, span_rx_ns)`` and maps ``device_t_ns``. Best of 64 packets, the
arrival delay it sees is ~1/64 of the mean (see docs/clock.md).
"""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlparse

import numpy as np
from pydantic import Field, field_validator

from agent.errors import DriverError
from agent.schemas import POINT_DTYPE
from agent.types import Sample, StreamInfo, StreamKind

from . import rxstamp
from .base import Counters, Driver, DriverOptions
from .registry import register

log = logging.getLogger(__name__)

COUNTERS = ("packets", "missing_packets", "late_packets", "duplicates", "truncated",
            "garbage", "incomplete_scans", "startup_skipped")


class OusterLidarOptions(DriverOptions):
    #: the sensor's metadata JSON (as saved by ouster-sdk / the sensor's HTTP API)
    metadata: str
    #: UDP port to listen on (for pcap files: the lidar port the capture used); default:
    #: the URI's port, else the metadata's udp_port_lidar
    port: int | None = Field(default=None, ge=1, le=65535)
    #: socket receive buffer; a 100 ms scan is ~0.8 MB, the default holds ~10 scans
    rcvbuf_bytes: int = Field(default=8 << 20, ge=1 << 16, le=1 << 30)
    #: check each packet's CRC-64 footer (~50 µs a packet, ~3 % of a core at 640 packets/s)
    check_crc: bool = True
    #: emit a scan still missing packets after this long without any packet (default 5
    #: frame periods)
    flush_timeout_ms: float | None = Field(default=None, gt=0, le=60_000)

    @field_validator("metadata")
    @classmethod
    def _exists(cls, v: str) -> str:
        if not Path(v).is_file():
            raise ValueError(f"metadata file {v!r} does not exist (save it from the sensor: "
                             "http://<sensor>/api/v1/sensor/metadata)")
        return v


def load_sensor_info(path: str | Path) -> Any:
    """Parse an Ouster metadata JSON; raises DriverError naming the file on failure."""
    from ouster.sdk.core import PacketFormat, SensorInfo

    try:
        info = SensorInfo(Path(path).read_text())
    except (OSError, RuntimeError, ValueError) as e:
        raise DriverError(f"{path}: not readable Ouster sensor metadata ({e})") from None
    if PacketFormat(info).lidar_packet_size <= 0 or info.w <= 0 or info.h <= 0:
        raise DriverError(f"{path}: metadata has no lidar data format (lidar port or profile "
                          "off?)")
    return info


class ScanAssembler:
    """The packet path: datagrams in, finished scans out. Pure (no sockets, no clocks of its
    own), single-threaded: the driver's reader thread calls :meth:`feed` and :meth:`poll`.
    Never raises on bad input; counts it in ``counters``.

    ``on_gap(count, cause, **extra)`` is told about every loss (the driver's
    ``record_gap``). ``feed`` and ``poll`` return finished :class:`Sample` objects whose
    ``stream`` is ``stream``.
    """

    def __init__(self, info: Any, counters: Counters, stream: str = "",
                 on_gap: Callable[..., None] | None = None, check_crc: bool = True):
        from ouster.sdk.core import (ColHeader, FrameBatcher, LidarFrame, LidarPacket,
                                     PacketFormat, XYZLut)

        self.info = info
        self.pf = pf = PacketFormat(info)
        self.counters = counters
        for name in COUNTERS:
            counters.inc(name, 0)
        self.stream = stream
        self.on_gap = on_gap or (lambda count, cause, **kw: None)
        self.check_crc = check_crc
        self.size = pf.lidar_packet_size
        self.hdr = pf.packet_header_size
        self.cpp = pf.columns_per_packet
        self.h, self.w = info.h, info.w
        c0, c1 = info.format.column_window
        self.col0 = int(c0)
        # packets per frame over the azimuth window (the whole circle unless windowed)
        ncols = (int(c1) - int(c0)) % self.w + 1
        self.ppf = -(-ncols // self.cpp)
        self.init_id, self.sn = int(info.init_id), int(info.sn)
        self.legacy = self.hdr == 0  # LEGACY profile: no packet header, no CRC
        self._mid_hdr = ColHeader.MEASUREMENT_ID
        self._pkt = LidarPacket(pf)
        self._batcher = FrameBatcher(info)
        self._frame = LidarFrame(info)
        lut = XYZLut(info, use_extrinsics=False)  # xyz = range_mm * direction + offset
        self._dirofs = np.concatenate([np.asarray(lut.direction, np.float32).reshape(-1, 3),
                                       np.asarray(lut.offset, np.float32).reshape(-1, 3)], 1)
        self._got = np.zeros(self.ppf, bool)
        self._rx_ns = np.zeros(self.ppf, np.int64)
        self._cur: int | None = None  # frame_id being assembled
        self._last: int | None = None  # frame_id of the last scan emitted (or skipped)
        self._skip: int | None = None  # frame_id of a partial first frame being skipped
        self._last_rx_ns = 0
        self._id_bytes: bytes | None = None
        self._crc: Any = None
        self._fast = self._verify_fast_path()

    def _verify_fast_path(self) -> bool:
        """The hot path reads the header fields and the CRC-64 by plain byte offsets (the
        documented layout of the non-LEGACY profiles) and checks the CRC with ``anycrc``;
        ouster-sdk's accessors cost 1-10 µs each and its CRC ~50 µs a packet. Both are
        verified here against ouster-sdk on a packet it built; on any mismatch (other
        layout, anycrc missing) the slow path through ouster-sdk is used instead."""
        if self.legacy or not self.init_id or not self.sn:
            return False
        from ouster.sdk.core import LidarFrame, LidarPacket, frame_to_packets

        fr = LidarFrame(self.info)
        fr.measurement_id[:] = np.arange(self.w, dtype=np.uint16)
        fr.status[:] = 1
        fr.field("RANGE")[:] = 1000
        fr.frame_id = 0x1234
        refs = [p.buf.tobytes() for p in frame_to_packets(fr, self.pf, self.init_id, self.sn)
                if isinstance(p, LidarPacket)]
        if len(refs) < 2:
            return False
        ref = refs[1]
        a = np.frombuffer(ref, np.uint8)
        pf = self.pf
        ok = (len(ref) == self.size and ref[0:2] == b"\x01\x00" and pf.packet_type(a) == 1
              and int.from_bytes(ref[2:4], "little") == pf.frame_id(a) == 0x1234
              and int.from_bytes(ref[4:7], "little") == pf.init_id(a) == self.init_id
              and int.from_bytes(ref[7:12], "little") == pf.prod_sn(a) == self.sn
              and int.from_bytes(ref[self.hdr + 8:self.hdr + 10], "little")
              == int(pf.packet_header(self._mid_hdr, a)[0]) == self.cpp)
        if not ok:
            return False
        self._id_bytes = ref[4:12]
        try:
            import anycrc

            model = anycrc.Model("CRC64-XZ")
            stored = pf.crc(a)
            if (stored is not None and model.calc(ref[:-8]) == stored
                    == int.from_bytes(ref[-8:], "little")):
                self._crc = model
        except Exception:  # anycrc absent or different: ouster-sdk computes the CRC
            self._crc = None
        return True

    # -- per datagram -----------------------------------------------------------------
    def classify(self, buf: memoryview) -> tuple[str, int, int]:
        """``("ok", frame_id, packet_index)`` or ``(counter_name, -1, -1)`` for a bad
        datagram. ``buf`` is a byte memoryview of the datagram."""
        n = len(buf)
        if self._fast:
            if n < self.hdr or buf[0:2] != b"\x01\x00" or buf[4:12] != self._id_bytes:
                return "garbage", -1, -1
            if n != self.size:
                return "truncated", -1, -1
            if self.check_crc:
                if self._crc is not None:
                    if self._crc.calc(buf[:n - 8]) != int.from_bytes(buf[n - 8:], "little"):
                        return "corrupt", -1, -1
                else:
                    a = np.frombuffer(buf, np.uint8)
                    if self.pf.crc(a) != self.pf.calculate_crc(a):
                        return "corrupt", -1, -1
            fid = buf[2] | buf[3] << 8
            mid = buf[self.hdr + 8] | buf[self.hdr + 9] << 8
        else:
            a = np.frombuffer(buf, np.uint8)
            pf = self.pf
            if self.legacy:
                if n != self.size:
                    return ("truncated" if n < self.size else "garbage"), -1, -1
            else:
                if n < self.hdr:
                    return "garbage", -1, -1
                if (pf.packet_type(a) != 1 or (self.sn and pf.prod_sn(a) != self.sn)
                        or (self.init_id and pf.init_id(a) != self.init_id)):
                    return "garbage", -1, -1
                if n != self.size:
                    return "truncated", -1, -1
                if self.check_crc:
                    crc = pf.crc(a)
                    if crc is not None and crc != pf.calculate_crc(a):
                        return "corrupt", -1, -1
            fid = int(pf.frame_id(a))
            mid = int(pf.packet_header(self._mid_hdr, a)[0])
        off = (mid - self.col0) % self.w
        if mid >= self.w or off % self.cpp or off // self.cpp >= self.ppf:
            return "corrupt", -1, -1
        return "ok", fid, off // self.cpp

    def feed(self, data: bytes | bytearray | memoryview | np.ndarray,
             host_ns: int) -> list[Sample]:
        """One datagram (``host_ns``: its arrival time). Returns the scans it finished."""
        buf = memoryview(data).cast("B") if not isinstance(data, memoryview) else data
        try:
            kind, fid, pidx = self.classify(buf)
        except Exception:  # a parser surprise must not stop capture
            log.exception("lidar: packet classification failed")
            kind, fid, pidx = "corrupt", -1, -1
        if kind != "ok":
            self.counters.inc(kind)
            return []
        self._last_rx_ns = host_ns
        out: list[Sample] = []
        if self._cur is not None:
            d = (fid - self._cur) & 0xFFFF
            if d == 0:
                self._add(buf, pidx, host_ns)
            elif d < 0x8000:
                out.append(self._finish())
                self._start(fid, buf, pidx, host_ns)
            else:
                self._late()
        elif self._skip is not None and fid == self._skip:
            self.counters.inc("startup_skipped")
        elif self._last is None and self._skip is None and pidx != 0:
            self._skip = fid  # started listening in the middle of this frame
            self._last = fid
            self.counters.inc("startup_skipped")
        else:
            d = 1 if self._last is None else (fid - self._last) & 0xFFFF
            if d == 0 or d >= 0x8000:
                self._late()
            else:
                self._start(fid, buf, pidx, host_ns)
        if self._cur is not None and self._got.all():
            out.append(self._finish())
        return out

    def poll(self, now_ns: int, timeout_ns: int) -> list[Sample]:
        """Emit the scan in progress if no packet came for ``timeout_ns``."""
        if self._cur is not None and now_ns - self._last_rx_ns >= timeout_ns:
            return [self._finish()]
        return []

    def flush(self) -> list[Sample]:
        """Emit the scan in progress now (end of a pcap file)."""
        return [self._finish()] if self._cur is not None else []

    # -- frame bookkeeping ------------------------------------------------------------
    def _late(self) -> None:
        self.counters.inc("late_packets")

    def _start(self, fid: int, buf: memoryview, pidx: int, host_ns: int) -> None:
        if self._last is not None:
            skipped = ((fid - self._last) & 0xFFFF) - 1
            if skipped > 0:
                n = skipped * self.ppf
                self.counters.inc("missing_packets", n)
                self.on_gap(n, "missing_frames", frames=skipped, after_frame_id=self._last)
        self._skip = None
        self._cur = fid
        self._got[:] = False
        self._batcher.reset()
        # columns of packets that never come keep stale data; their status says invalid
        self._frame.status[:] = 0
        self._add(buf, pidx, host_ns)

    def _add(self, buf: memoryview, pidx: int, host_ns: int) -> None:
        if self._got[pidx]:
            self.counters.inc("duplicates")
            return
        self._got[pidx] = True
        self._rx_ns[pidx] = host_ns
        self._pkt.buf[:] = np.frombuffer(buf, np.uint8)
        self._batcher.batch(self._pkt, self._frame)
        self.counters.inc("packets")

    def _finish(self) -> Sample:
        fid = self._cur
        assert fid is not None
        self._cur, self._last = None, fid
        got = int(self._got.sum())
        missing = self.ppf - got
        if missing:
            self.counters.inc("missing_packets", missing)
            self.counters.inc("incomplete_scans")
            self.on_gap(missing, "missing_packets", frame_id=fid)
        self.counters.inc("received")
        return self._to_sample(fid, got, missing)

    def _to_sample(self, fid: int, got: int, missing: int) -> Sample:
        fr = self._frame
        ts = fr.timestamp.astype(np.int64)
        colok = (fr.status & 1).astype(bool)
        rng = fr.field("RANGE").reshape(-1)
        idx = np.flatnonzero((rng.reshape(self.h, self.w) > 0) & colok)
        n = len(idx)
        # one (n, 6) block of 32-bit words viewed as POINT_DTYPE (x y z intensity t ring)
        out = np.empty((n, 6), np.float32)
        g = self._dirofs[idx]  # one row gather: direction (per mm) and offset (m)
        np.multiply(g[:, :3], rng[idx].astype(np.float32)[:, None], out=out[:, :3])
        out[:, :3] += g[:, 3:]
        names = fr.fields
        inten = "SIGNAL" if "SIGNAL" in names else "REFLECTIVITY" if "REFLECTIVITY" in names \
            else None
        out[:, 3] = fr.field(inten).reshape(-1)[idx] if inten else 0.0
        words = out.view(np.uint32)
        ring, cols = np.divmod(idx, self.w)
        words[:, 5] = ring  # ring in the low 16 bits, zero padding above
        first = int(np.argmax(colok)) if colok.any() else -1
        device_t_ns = int(ts[first]) if first >= 0 else None
        if device_t_ns is not None:
            words[:, 4] = np.clip(ts - device_t_ns, 0, 0xFFFFFFFF)[cols]
            host = int(self._rx_ns[((first - self.col0) % self.w) // self.cpp])
        else:
            words[:, 4] = 0
            host = int(self._rx_ns[self._got].min()) if self._got.any() else self._last_rx_ns
        pts = out.view(POINT_DTYPE).reshape(n)
        meta: dict[str, Any] = {"incomplete": bool(missing), "packets": got,
                                "missing_packets": missing}
        if device_t_ns is not None:
            meta.update(self._clock_pair(ts, colok, device_t_ns, host))
        return Sample(self.stream, pts, host_rx_ns=host, device_t_ns=device_t_ns, seq=fid,
                      meta=meta)

    def _clock_pair(self, ts: np.ndarray, colok: np.ndarray, first_ns: int,
                    host: int) -> dict[str, int]:
        """The received packet with the least (arrival − its last valid column's time):
        ``{"device_span_ns": that column − first_ns, "span_rx_ns": its arrival}``."""
        cols = (self.col0 + np.arange(self.ppf * self.cpp)) % self.w
        end = np.where(colok[cols], ts[cols], -1).reshape(self.ppf, self.cpp).max(axis=1)
        ok = self._got & (end >= first_ns)
        if not ok.any():
            return {"device_span_ns": 0, "span_rx_ns": host}
        delay = np.where(ok, self._rx_ns - end, np.iinfo(np.int64).max)
        p = int(np.argmin(delay))
        return {"device_span_ns": int(end[p]) - first_ns, "span_rx_ns": int(self._rx_ns[p])}


def _parse_uri(uri: str) -> tuple[str, str, int | None]:
    """``("udp", host, port)`` or ``("pcap", path, None)``."""
    if uri.startswith("pcap:"):
        return "pcap", uri[5:].removeprefix("//"), None
    if uri.startswith("file:"):
        return "pcap", uri[5:].removeprefix("//"), None
    if uri.endswith((".pcap", ".pcapng")) and "://" not in uri:
        return "pcap", uri, None
    u = urlparse(uri)
    if u.scheme != "udp":
        raise DriverError(f"{uri!r}: expected udp://HOST:PORT, pcap:/path/file.pcap or a "
                          ".pcap path")
    try:
        port = u.port
    except ValueError:
        raise DriverError(f"{uri!r}: bad port") from None
    return "udp", u.hostname or "0.0.0.0", port


@register("lidar.ouster")
class OusterLidar(Driver):
    """Ouster sensors over UDP (live) or from pcap files (recorded; not live)."""

    Options = OusterLidarOptions
    options: OusterLidarOptions

    def __init__(self, name: str, uri: str, options: DriverOptions | None = None,
                 rate_hz: float | None = None, calibration: dict[str, Any] | None = None):
        super().__init__(name, uri, options, rate_hz, calibration)
        self.mode, self.host, uri_port = _parse_uri(uri)
        self._uri_port = uri_port
        if self.mode == "pcap":
            self.is_live = False  # type: ignore[misc]
        self.info: Any = None
        self.assembler: ScanAssembler | None = None
        self._sock: socket.socket | None = None
        self.rcvbuf_bytes = 0
        #: arrivals are the kernel's receive stamps (see drivers.rxstamp)
        self.kernel_rx_stamps = False
        self.port: int | None = None
        for c in COUNTERS + ("corrupt",):
            self.counters.inc(c, 0)

    def streams(self) -> list[StreamInfo]:
        info = self.info
        params: dict[str, Any] = {}
        rate = self.rate_hz
        if info is not None:
            rate = rate or float(info.format.fps)
            params = {"model": info.prod_line, "serial": str(info.sn), "firmware": info.fw_rev,
                      "mode": str(info.config.lidar_mode),
                      "profile": str(info.format.udp_profile_lidar), "rings": info.h,
                      "columns": info.w,
                      "packets_per_frame": self.assembler.ppf if self.assembler else None,
                      "source": self.mode}
            if self.mode == "udp":
                params.update(port=self.port, rcvbuf_bytes=self.rcvbuf_bytes)
        return [StreamInfo(self.name, StreamKind.LIDAR, "points", rate,
                           frame_id=self.name.strip("/").replace("/", "_"),
                           calibration=self.calibration, params=params)]

    def _open(self) -> None:
        self.info = load_sensor_info(self.options.metadata)
        self.assembler = ScanAssembler(self.info, self.counters, self.name, self.record_gap,
                                       self.options.check_crc)
        if self.mode == "pcap":
            if not Path(self.host).is_file():
                raise DriverError(f"{self.host}: no such pcap file")
            return
        self.port = (self.options.port or self._uri_port
                     or int(self.info.config.udp_port_lidar or 0) or 7502)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self.rcvbuf_bytes = _set_rcvbuf(s, self.options.rcvbuf_bytes)
            s.bind((self.host, self.port))
        except OSError as e:
            s.close()
            hint = ("another process is bound to it (a running agent or ouster-cli?)"
                    if e.errno == 98 else "ports below 1024 need root or CAP_NET_BIND_SERVICE"
                    if e.errno == 13 else e.strerror)
            raise DriverError(f"{self.uri}: cannot listen on {self.host}:{self.port}: "
                              f"{hint}") from None
        if self.rcvbuf_bytes < self.options.rcvbuf_bytes:
            log.warning("%s: socket receive buffer is %d bytes, asked %d (raise "
                        "net.core.rmem_max)", self.name, self.rcvbuf_bytes,
                        self.options.rcvbuf_bytes)
        self.kernel_rx_stamps = rxstamp.enable(s)
        s.settimeout(0.05)
        self._sock = s

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    @property
    def flush_timeout_ns(self) -> int:
        if self.options.flush_timeout_ms is not None:
            return int(self.options.flush_timeout_ms * 1e6)
        fps = float(self.info.format.fps) if self.info is not None else 10.0
        return int(5e9 / fps)

    def _samples(self) -> Iterator[Sample]:
        if self.mode == "pcap":
            yield from self._pcap_samples()
        else:
            yield from self._udp_samples()

    def _udp_samples(self) -> Iterator[Sample]:
        asm, sock = self.assembler, self._sock
        assert asm is not None and sock is not None
        rx = np.empty(65536, np.uint8)
        timeout = self.flush_timeout_ns
        while not self.stopping:
            try:
                n, rx_ns = rxstamp.recv_into(sock, rx)
            except TimeoutError:
                yield from asm.poll(time.monotonic_ns(), timeout)
                continue
            except OSError:
                if self.stopping:
                    return
                self.counters.inc("errors")
                time.sleep(0.01)
                continue
            yield from asm.feed(rx[:n], rx_ns)
            yield from asm.poll(time.monotonic_ns(), timeout)

    def _pcap_samples(self) -> Iterator[Sample]:
        from ouster.sdk.core import LidarPacket
        from ouster.sdk.pcap import PcapPacketSource

        asm = self.assembler
        assert asm is not None
        info = self.info
        if self.options.port:
            # ouster-sdk's reader picks packets by the metadata's lidar port; a capture made
            # on another port (HIL rigs, port-forwarded sensors) names it in the options
            from ouster.sdk.core import SensorInfo

            info = SensorInfo(self.info.to_json_string())
            cfg = info.config
            cfg.udp_port_lidar = self.options.port
            info.config = cfg
        src = PcapPacketSource(self.host, sensor_info=[info])
        size_err = id_err = 0
        try:
            for _, pkt in src:
                if self.stopping:
                    return
                # ouster-sdk's reader drops datagrams of the wrong size or sensor id before
                # we see them; carry its counts over (sizes → truncated, ids → garbage)
                if src.size_error_count != size_err:
                    self.counters.inc("truncated", src.size_error_count - size_err)
                    size_err = src.size_error_count
                if src.id_error_count != id_err:
                    self.counters.inc("garbage", src.id_error_count - id_err)
                    id_err = src.id_error_count
                if not isinstance(pkt, LidarPacket):
                    continue
                yield from asm.feed(pkt.buf, int(pkt.host_timestamp))
            self.counters.inc("truncated", src.size_error_count - size_err)
            self.counters.inc("garbage", src.id_error_count - id_err)
            yield from asm.flush()
        finally:
            src.close()


def _set_rcvbuf(s: socket.socket, want: int) -> int:
    """Set SO_RCVBUF to ``want`` (SO_RCVBUFFORCE first, which root may use past rmem_max);
    return what the kernel granted (it reports double the payload space; we halve it)."""
    force = getattr(socket, "SO_RCVBUFFORCE", 33)
    try:
        s.setsockopt(socket.SOL_SOCKET, force, want)
    except OSError:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, want)
    return s.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) // 2
