"""LiDAR emulator: an Ouster OS1-64 (1024×10) sending lidar packets over UDP.

    emu = LidarEmulator(world, scenario.devices.lidar, run_dir, run_t0_ns, dest_port=7502)
    emu.start()            # opens the UDP socket and starts the sensor's frame schedule
    emu.uri                # udp://127.0.0.1:7502 — where the agent's driver must listen
    emu.metadata_path      # the sensor metadata JSON the driver needs
    emu.stop()             # finishes the frame being sent, then stops

Wire format: ouster-sdk builds the packets (``frame_to_packets`` with the metadata's
:class:`~ouster.sdk.core.PacketFormat`): profile ``RNG19_RFL8_SIG16_NIR16``, 16 columns of
64 pixels a packet, 12,544-byte datagrams, 64 packets a frame, 640 packets/s, each with a
CRC-64 footer (firmware 3.1 layout). Packets carry ``frame_id`` (16 bits, wraps), the
measurement id (column index) and per-column timestamps on the sensor's
:class:`~hil.world.DeviceClock` (``TIME_FROM_INTERNAL_OSC``: nanoseconds).

Timing: frame ``k`` starts at device time ``D0 + k·100 ms`` where ``D0`` is the device
time at scenario t = 0; column ``j`` fires at ``start + j·100 ms/1024``. Packet ``p`` leaves
when its last column has fired (plus the device's arrival jitter), so the 64 packets are
spread over the 100 ms frame, not sent in a burst. The world is ray cast once per frame at
the frame's start (vehicle pose and objects at that instant; no motion distortion inside
a scan) by :class:`hil.raycast.Raycaster`; frames are rendered up to two ahead by a render
thread and sent by a sender thread. A frame whose packets would all be more than two
periods late is withheld whole (``overrun``); one already that late when its turn to be
rendered comes is not ray cast at all (truth ``"rendered": false``), so a stalled host
does not leave the emulator late for good.

Returns: range with 1 cm Gaussian noise, 0 (no return) beyond ``max_range_m`` or when the
signal is too weak (far grazing ground); reflectivity by class (ground 12, car 45,
pedestrian 25, cyclist 30, sign 220 = retro-reflective); signal ∝ reflectivity ·
cos(incidence) / r²; near-IR from the scene brightness.

Faults (``settings.faults``; ``rate`` = share of packets hit while it lasts), each decided
per packet with a per-frame seeded RNG, so the truth says exactly which packets:
``dropout`` (not sent), ``truncate`` (cut to a random length ≥ header + 16 bytes),
``corrupt`` (1–3 bits flipped after the packet header; the CRC no longer matches),
``garbage`` (an extra datagram of 16–1400 random bytes after the packet), ``stall``
(nothing sent; the sensor keeps spinning so ``frame_id`` advances) and ``disconnect``
(socket closed, nothing sent, reopened when it ends).

Options (``[devices.lidar.options]``): ``dest_host`` (127.0.0.1), ``dest_port`` (7502; a
``dest_port`` argument overrides), ``metadata`` (path; default the shipped
``hil/data/os1-64-1024x10.json``), ``mount`` ([0, 0, 1.9] m in the vehicle frame),
``max_range_m`` (120), ``range_noise_m`` (0.01), ``pcap`` (write every datagram sent to this
pcap file, relative to the run directory), ``first_frame_id`` (0).

Truth (``truth/lidar.jsonl``): per frame ``{"type": "sample", "seq": frame_id, "frame": k,
"true_ns": frame start, "device_ns", "packets": 64, "packets_sent" (intact packets that
left), "packets_dropped", "truncated", "corrupted", "withheld", "garbage", the packet
indices of each kind ("dropped_idx", ...), "reason"? (stall | disconnect | overrun),
"points" (returns in the frame), "boxes": [{id, cls, center, size, yaw, points}] in the
sensor frame}``; one ``{"type": "fault"}`` record when each fault begins.
"""

from __future__ import annotations

import json
import logging
import queue
import socket
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.config import _problems
from agent.errors import ConfigError

from ..raycast import GROUND, YIELD_S, Raycaster, box_in_sensor_frame
from ..scenario import DeviceSettings
from ..world import World
from .base import Emulator, punctual_thread, sleep_until

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent.parent / "data"
METADATA_PATH = DATA_DIR / "os1-64-1024x10.json"
PROFILE = "RNG19_RFL8_SIG16_NIR16"

#: calibrated reflectivity (Ouster RFL8 scale: 0-100 diffuse %, >100 retro-reflective)
REFLECTIVITY = {"ground": 12, "car": 45, "pedestrian": 25, "cyclist": 30, "sign": 220}
_SIGNAL_K = 1.3e5  # signal counts of a 100 % diffuse target at 1 m, normal incidence
_MIN_SIGNAL = 4.0


def make_metadata(prod_sn: int = 992109000123, init_id: int = 5431290,
                  udp_port_lidar: int = 7502, mode: str = "1024x10") -> str:
    """Metadata JSON of an OS1-64 with design intrinsics (``SensorInfo.from_default``),
    profile RNG19_RFL8_SIG16_NIR16, firmware 3.1 and the given identity. The shipped
    ``hil/data/os1-64-1024x10.json`` is this function's output with the defaults."""
    from ouster.sdk.core import LidarMode, SensorInfo

    d = json.loads(SensorInfo.from_default(getattr(LidarMode, "_" + mode)).to_json_string())
    d["lidar_data_format"]["udp_profile_lidar"] = PROFILE
    d["config_params"].update(udp_port_lidar=udp_port_lidar, udp_port_imu=udp_port_lidar + 1,
                              udp_profile_lidar=PROFILE,
                              timestamp_mode="TIME_FROM_INTERNAL_OSC")
    d["sensor_info"].update(prod_sn=str(prod_sn), initialization_id=init_id,
                            build_rev="v3.1.0", prod_pn="840-102144-D",
                            image_rev="ousteros-image-prod-aries-v3.1.0+20231214")
    d.pop("ouster-sdk", None)
    return json.dumps(d, indent=1) + "\n"


class PcapWriter:
    """Writes datagrams as a standard pcap (Ethernet/IPv4/UDP, fragmented at a 1500-byte
    MTU like a real capture) with ouster-sdk's recorder. One thread writes."""

    def __init__(self, path: Path, src_port: int, dst_port: int,
                 src_ip: str = "127.0.0.1", dst_ip: str = "127.0.0.1"):
        from ouster.sdk._bindings import pcap as _pcap

        path.parent.mkdir(parents=True, exist_ok=True)
        self._pcap = _pcap
        self._h = _pcap.record_initialize(str(path), 1500)
        self.path = path
        self._addr = (src_ip, dst_ip, src_port, dst_port)
        self.written = 0

    def write(self, data: bytes, wall_s: float) -> None:
        if self._h is None:
            return
        self._pcap.record_packet(self._h, *self._addr, np.frombuffer(data, np.uint8), wall_s)
        self.written += 1

    def close(self) -> None:
        if self._h is not None:
            self._pcap.record_uninitialize(self._h)
            self._h = None


class LidarEmulatorOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dest_host: str = "127.0.0.1"
    dest_port: int = Field(default=7502, ge=1, le=65535)
    metadata: str | None = None
    mount: tuple[float, float, float] = (0.0, 0.0, 1.9)
    max_range_m: float = Field(default=120.0, gt=1, le=500)
    range_noise_m: float = Field(default=0.01, ge=0, le=1)
    pcap: str | None = None
    first_frame_id: int = Field(default=0, ge=0, le=65535)


class _Frame:
    __slots__ = ("k", "fid", "device_ns", "true_ns", "datas", "due_ns", "truth")

    def __init__(self, k: int, fid: int, device_ns: int, true_ns: int, datas: list[bytes],
                 due_ns: list[int], truth: dict[str, Any]):
        self.k, self.fid, self.device_ns, self.true_ns = k, fid, device_ns, true_ns
        self.datas, self.due_ns, self.truth = datas, due_ns, truth


class LidarEmulator(Emulator):
    device = "lidar"

    def __init__(self, world: World, settings: DeviceSettings, run_dir: Path, run_t0_ns: int,
                 dest_port: int | None = None, pcap_path: Path | None = None):
        super().__init__(world, settings, run_dir, run_t0_ns)
        try:
            self.opts = LidarEmulatorOptions.model_validate(settings.options)
        except ValidationError as e:
            self.truth.close()
            raise ConfigError(world.sc.source_path,
                              _problems(e, ("devices", "lidar", "options"))) from None
        from ouster.sdk.core import PacketFormat, SensorInfo, XYZLut

        o = self.opts
        self.dest = (o.dest_host, dest_port or o.dest_port)
        self.metadata_path = Path(o.metadata) if o.metadata else METADATA_PATH
        self.info = SensorInfo(self.metadata_path.read_text())
        self.pf = PacketFormat(self.info)
        self.h, self.w = self.info.h, self.info.w
        fps = int(self.info.format.fps)
        if settings.rate_hz is not None and abs(settings.rate_hz - fps) > 1e-6:
            self.truth.close()
            raise ConfigError(world.sc.source_path, [(
                "devices.lidar.rate_hz",
                f"{settings.rate_hz:g} Hz does not match the sensor mode "
                f"{self.info.config.lidar_mode} ({fps} Hz) in {self.metadata_path}")])
        self.period_ns = 1_000_000_000 // fps
        self.col_off_ns = (np.arange(self.w, dtype=np.int64) * self.period_ns) // self.w
        self.cpp = self.pf.columns_per_packet
        self.ppf = self.w // self.cpp
        self.hdr = self.pf.packet_header_size
        self.size = self.pf.lidar_packet_size
        lut = XYZLut(self.info, use_extrinsics=False)
        self.raycaster = Raycaster(lut.offset, lut.direction, o.mount, o.max_range_m)
        self.pcap_path = pcap_path or (self.run_dir / o.pcap if o.pcap else None)
        self.uri = f"udp://{self.dest[0]}:{self.dest[1]}"
        self.d0_ns = self.clock.device_ns(run_t0_ns)
        self.sent.update({"frames": 0, "packets_dropped": 0, "truncated": 0, "corrupted": 0,
                          "garbage": 0, "withheld": 0, "overrun": 0, "send_errors": 0,
                          "disconnects": 0, "late_sends": 0})
        self._q: queue.Queue[_Frame] = queue.Queue(maxsize=2)
        self._threads: list[threading.Thread] = []
        self._sock: socket.socket | None = None
        self._pcap: PcapWriter | None = None
        self._seen_faults: set[int] = set()
        self._noise_table: np.ndarray | None = None
        #: worst lateness of a packet against its due time (ns); ``sent["late_sends"]``
        #: counts packets that left more than 2 ms late (GIL or CPU contention)
        self.max_late_ns = 0

    # -- lifecycle --------------------------------------------------------------------
    def _start(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 21)
        if self.pcap_path is not None:
            self._pcap = PcapWriter(Path(self.pcap_path), self.dest[1], self.dest[1])
        self.render_frame(0)  # warm up (scene, noise table, ouster-sdk) before the clock runs
        # first frame: the next one that starts at least 30 ms from now (time to render)
        d_now = self.clock.device_ns(time.monotonic_ns() + 30_000_000)
        k0 = max(0, -(-(d_now - self.d0_ns) // self.period_ns))
        for target, name in ((self._render_loop, "lidar-render"),
                             (self._send_loop, "lidar-send")):
            t = threading.Thread(target=target, args=(k0,) if name == "lidar-render" else (),
                                 name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def _stop(self) -> None:
        for t in self._threads:
            t.join(5.0)
        self._threads.clear()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._pcap is not None:
            self._pcap.close()

    # -- rendering (world → packets) ---------------------------------------------------
    def _render_loop(self, k: int) -> None:
        from ouster.sdk.core import LidarFrame

        frame = LidarFrame(self.info)
        while not self.stop_event.is_set():
            try:
                # fallen behind (a stalled host): frames already too late to send are not
                # ray cast, so the emulator catches up instead of staying late for good
                f = self._late_frame(k) or self.render_frame(k, frame)
            except Exception:  # keep the sensor spinning; the frame is never sent
                log.exception("lidar emulator: rendering frame %d failed", k)
                self.count("render_errors")
                k += 1
                continue
            while not self.stop_event.is_set():
                try:
                    self._q.put(f, timeout=0.1)
                    break
                except queue.Full:
                    continue
            k += 1

    def _late_frame(self, k: int) -> _Frame | None:
        """Frame ``k`` unrendered (every packet withheld as ``overrun`` by the sender) when
        its last packet is already more than two periods late; else None."""
        dev_ns = self.d0_ns + k * self.period_ns
        last_ns = self.clock.true_ns(dev_ns + self.period_ns)
        if time.monotonic_ns() <= last_ns + 2 * self.period_ns:
            return None
        fid = (self.opts.first_frame_id + k) & 0xFFFF
        true_ns = self.clock.true_ns(dev_ns)
        truth = {"type": "sample", "seq": fid, "frame": k, "true_ns": true_ns,
                 "device_ns": dev_ns, "packets": self.ppf, "points": 0, "ground_points": 0,
                 "boxes": [], "rendered": False}
        return _Frame(k, fid, dev_ns, true_ns, [b""] * self.ppf, [last_ns] * self.ppf, truth)

    def render_frame(self, k: int, frame: Any = None) -> _Frame:
        """Ray cast frame ``k`` and build its packets (any thread; pure given ``k``)."""
        from ouster.sdk.core import LidarFrame, LidarPacket, frame_to_packets

        frame = frame if frame is not None else LidarFrame(self.info)
        dev_ns = self.d0_ns + k * self.period_ns
        true_ns = self.clock.true_ns(dev_ns)
        t_s = (true_ns - self.run_t0_ns) / 1e9
        pose = self.world.pose(t_s)
        objs = self.world.objects(t_s)
        hits = self.raycaster.cast(pose, objs)
        rng = np.random.default_rng([self.world.sc.seed, 0x11DA, k])
        n = self.h * self.w
        r = hits.range_m
        hit = np.isfinite(r)
        refl = self._class_refl(objs)[hits.hit_object + 2]
        r_hit = np.where(hit, np.maximum(r, 1.0), 1.0)
        signal = (_SIGNAL_K / 100.0) * np.minimum(refl, 100.0) * hits.cos_incidence \
            / (r_hit * r_hit)
        signal *= np.where(refl > 100, refl / 40.0, 1.0).astype(np.float32)  # retro-reflectors
        noise = self._noise(rng, n)
        signal += noise[0] * np.sqrt(signal + 1.0)
        ret = hit & (signal >= _MIN_SIGNAL)
        r = r + noise[1] * np.float32(self.opts.range_noise_m)
        shape = (self.h, self.w)
        frame.field("RANGE")[:] = np.where(ret, np.clip(np.rint(r * 1000.0), 1, (1 << 19) - 1),
                                           0).astype(np.uint32).reshape(shape)
        frame.field("REFLECTIVITY")[:] = np.where(ret, np.minimum(refl, 255), 0) \
            .astype(np.uint8).reshape(shape)
        frame.field("SIGNAL")[:] = np.where(ret, np.minimum(signal, 65535), 0) \
            .astype(np.uint16).reshape(shape)
        ambient = np.float32(300.0 * self.world.brightness(t_s))
        frame.field("NEAR_IR")[:] = np.clip(ambient + 20.0 * noise[2], 0, 65535) \
            .astype(np.uint16).reshape(shape)
        frame.timestamp[:] = (dev_ns + self.col_off_ns).astype(np.uint64)
        frame.measurement_id[:] = np.arange(self.w, dtype=np.uint16)
        fid = (self.opts.first_frame_id + k) & 0xFFFF
        frame.frame_id = fid
        datas = []
        status = frame.status
        step = 8 * self.cpp
        for a in range(0, self.w, step):
            # frame_to_packets holds the GIL for ~4 ms a frame (CRCs): build 8 packets at a
            # time (packets whose columns are all invalid are not built) and yield between
            status[:] = 0
            status[a:a + step] = 1
            datas += [p.buf.tobytes() for p in frame_to_packets(
                frame, self.pf, self.info.init_id, self.info.sn) if isinstance(p, LidarPacket)]
            time.sleep(YIELD_S)
        status[:] = 1
        last_col = np.arange(1, self.ppf + 1) * self.cpp - 1
        due = [self.clock.true_ns(dev_ns + int(self.col_off_ns[c])) for c in last_col]
        counts = np.bincount(hits.hit_object[ret] + 2, minlength=len(objs) + 2)
        boxes = []
        for i, ob in enumerate(objs):
            b = box_in_sensor_frame(ob, pose, self.opts.mount)
            if float(np.hypot(*b["center"][:2])) <= self.opts.max_range_m:
                b["points"] = int(counts[i + 2])
                boxes.append(b)
        truth = {"type": "sample", "seq": fid, "frame": k, "true_ns": true_ns,
                 "device_ns": dev_ns, "packets": len(datas), "points": int(ret.sum()),
                 "ground_points": int(counts[GROUND + 2]), "boxes": boxes}
        clap = self.world.clapper_active(t_s, 0.5)
        if clap is not None:
            truth["clapper"] = clap
        return _Frame(k, fid, dev_ns, true_ns, datas, due, truth)

    def _noise(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Three rows of n standard-normal values: windows of a fixed table at offsets drawn
        from ``rng`` (drawing 200k normals a frame would cost ~3 ms)."""
        if self._noise_table is None:
            self._noise_table = np.random.default_rng(self.world.sc.seed).standard_normal(
                8 * n, dtype=np.float32)
        offs = rng.integers(0, 7 * n, 3)
        return np.stack([self._noise_table[o:o + n] for o in offs])

    @staticmethod
    def _class_refl(objs: list) -> np.ndarray:
        """Reflectivity by ``hit_object + 2`` (NOTHING, GROUND, objects...)."""
        return np.array([0, REFLECTIVITY["ground"]] + [REFLECTIVITY.get(o.cls, 40) for o in objs],
                        np.float32)

    # -- sending ----------------------------------------------------------------------
    def _send_loop(self) -> None:
        punctual_thread()
        while not self.stop_event.is_set():
            try:
                f = self._q.get(timeout=0.1)
            except queue.Empty:
                continue
            # wait for the frame's first packet interruptibly: stop() ends the run between
            # frames (a frame once begun is sent whole), however far ahead t = 0 was set
            lead = (f.due_ns[0] - time.monotonic_ns()) / 1e9 - 0.005
            if lead > 0 and self.stop_event.wait(lead):
                return
            try:
                self._send_frame(f)
            except Exception:
                log.exception("lidar emulator: sending frame %d failed", f.k)
                self.count("send_errors")

    def _fault_records(self, t_s: float) -> dict[str, Any]:
        active = self.faults(t_s)
        for f in active.values():
            key = id(f)
            if key not in self._seen_faults:
                self._seen_faults.add(key)
                self.truth.write({"type": "fault", "kind": f.kind, "t_s": f.t_s,
                                  "duration_s": f.duration_s, "rate": f.rate,
                                  "true_ns": self.true_ns(f.t_s)})
        return active

    def _send_frame(self, f: _Frame) -> None:
        rng = np.random.default_rng([self.world.sc.seed, 0xFA17, f.k])
        tr = f.truth
        idx: dict[str, list[int]] = {"dropped_idx": [], "truncated_idx": [],
                                     "corrupted_idx": [], "withheld_idx": []}
        garbage = 0
        sent = 0
        reason = None
        overrun = time.monotonic_ns() > f.due_ns[-1] + 2 * self.period_ns
        for p, data in enumerate(f.datas):
            due = f.due_ns[p]
            active = self._fault_records(self.t_s(due))
            draw = rng.random(6)  # fixed draws per packet keep decisions reproducible
            if overrun:
                idx["withheld_idx"].append(p)
                reason = "overrun"
                continue
            if "disconnect" in active:
                if self._sock is not None:
                    self._sock.close()
                    self._sock = None
                    self.count("disconnects")
                idx["withheld_idx"].append(p)
                reason = "disconnect"
                continue
            if self._sock is None:
                self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            if "stall" in active:
                idx["withheld_idx"].append(p)
                reason = "stall"
                continue
            at = due + int(self.jitter.delay_s() * 1e9)
            sleep_until(at)
            late_ns = time.monotonic_ns() - at
            self.max_late_ns = max(self.max_late_ns, late_ns)
            if late_ns > 2_000_000:
                self.count("late_sends")
            if "dropout" in active and draw[0] < active["dropout"].rate:
                idx["dropped_idx"].append(p)
            elif "truncate" in active and draw[1] < active["truncate"].rate:
                cut = self.hdr + 16 + int(draw[2] * (self.size - self.hdr - 16))
                self._send(data[:min(cut, self.size - 1)])
                idx["truncated_idx"].append(p)
            elif "corrupt" in active and draw[3] < active["corrupt"].rate:
                buf = bytearray(data)
                for _ in range(1 + int(draw[4] * 3)):
                    bit = int(rng.integers(self.hdr * 8, (self.size - 8) * 8))
                    buf[bit // 8] ^= 1 << (bit % 8)
                self._send(bytes(buf))
                idx["corrupted_idx"].append(p)
            else:
                if self._send(data):
                    sent += 1
            if "garbage" in active and draw[5] < active["garbage"].rate:
                junk = rng.integers(0, 256, int(rng.integers(16, 1401)), np.uint8).tobytes()
                self._send(junk)
                garbage += 1
        tr.update({"packets_sent": sent, "packets_dropped": len(idx["dropped_idx"]),
                   "truncated": len(idx["truncated_idx"]),
                   "corrupted": len(idx["corrupted_idx"]),
                   "withheld": len(idx["withheld_idx"]), "garbage": garbage,
                   **{k: v for k, v in idx.items() if v}})
        if reason:
            tr["reason"] = reason
        self.truth.write(tr)
        self.count("frames")
        self.count("sent", sent)
        for key, n in (("packets_dropped", len(idx["dropped_idx"])),
                       ("truncated", len(idx["truncated_idx"])),
                       ("corrupted", len(idx["corrupted_idx"])),
                       ("withheld", len(idx["withheld_idx"])), ("garbage", garbage)):
            self.count(key, n)
        if overrun:
            self.count("overrun")

    def _send(self, data: bytes) -> bool:
        assert self._sock is not None
        try:
            self._sock.sendto(data, self.dest)
        except OSError:
            self.count("send_errors")
            return False
        if self._pcap is not None:
            self._pcap.write(data, time.time())
        return True


def main(argv: list[str] | None = None) -> int:
    """Run the emulator alone (for ``ouster-cli source udp://...``-style viewers, the
    driver or the benchmark): prints the URI on the first line of stdout, sends until the
    duration ends or SIGTERM, then prints one JSON line with what it sent."""
    import argparse
    import signal
    import tempfile

    from ..scenario import load_scenario

    ap = argparse.ArgumentParser(prog="python -m hil.emulators.lidar")
    ap.add_argument("--scenario", default="city-drive")
    ap.add_argument("--port", type=int, default=7502, help="destination UDP port")
    ap.add_argument("--host", default="127.0.0.1", help="destination host")
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--pcap", help="also write every datagram sent to this pcap file")
    ap.add_argument("--run-dir")
    a = ap.parse_args(argv)
    sc = load_scenario(a.scenario)
    s = sc.devices.lidar
    s = s.model_copy(update={"options": {**s.options, "dest_host": a.host}})
    run_dir = Path(a.run_dir or tempfile.mkdtemp(prefix="edgecap-lidar-"))
    emu = LidarEmulator(World(sc), s, run_dir, time.monotonic_ns(), dest_port=a.port,
                        pcap_path=Path(a.pcap) if a.pcap else None)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with emu:
        print(emu.uri, flush=True)
        try:
            done.wait(a.duration)
        except KeyboardInterrupt:
            pass
    print(json.dumps({**emu.sent, "max_late_ms": round(emu.max_late_ns / 1e6, 3),
                      "metadata": str(emu.metadata_path), "run_dir": str(run_dir)}),
          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
