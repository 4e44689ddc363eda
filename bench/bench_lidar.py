"""LiDAR: the ``lidar.ouster`` driver's scan assembly against ouster-sdk's own batching
loop on the same packets, and the HIL emulator's CPU cost at OS1-64 1024×10.

Packets: frames rendered by :class:`hil.emulators.lidar.LidarEmulator` from the
``city-drive`` world (64 packets of 12,544 bytes a frame), kept as bytes, as a socket or a
pcap reader hands them over. Figures:

- assembly throughput (packets/s, single thread) of :class:`drivers.lidar.ScanAssembler`
  — classify, CRC-64 check, frame bookkeeping, FrameBatcher, XYZ, POINT_DTYPE with invalid
  returns removed — vs the peer loop ouster-sdk documents: ``FrameBatcher.batch`` into a
  ``LidarFrame`` + ``XYZLutFloat`` per finished scan; vs that loop plus the same output
  packing done with plain numpy; without the CRC check; and as headroom over the sensor's
  packet rate (1,280/s in 2048×10 or 1024×20 modes; 640/s in 1024×10).
- the emulator alone (``python -m hil.emulators.lidar`` in a subprocess, CPU read from
  ``/proc``) as a share of one core, the packet rate it delivered vs the nominal 640/s, and
  the share of packets it sent more than 2 ms late; the driver's CPU while receiving it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from bench import Result

ROOT = Path(__file__).resolve().parent.parent
NOMINAL_PPS = 640.0


def _proc_cpu_s(pid: int, tid: int | None = None) -> float:
    path = f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat"
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _record(frames: int) -> tuple[list[bytes], object]:
    from hil.emulators.lidar import LidarEmulator
    from hil.scenario import load_scenario
    from hil.world import World

    sc = load_scenario("city-drive")
    with tempfile.TemporaryDirectory() as d:
        emu = LidarEmulator(World(sc), sc.devices.lidar, Path(d), 0, dest_port=9)
        try:
            datas = [p for k in range(frames) for p in emu.render_frame(100 + k).datas]
        finally:
            emu.truth.close()
    return datas, emu.info


def _ours(info, datas: list[bytes], check_crc: bool) -> tuple[float, int, int]:
    from drivers.base import Counters
    from drivers.lidar import ScanAssembler

    asm = ScanAssembler(info, Counters(), "/bench", check_crc=check_crc)
    n = pts = 0
    t = time.perf_counter()  # construction (LUT, fast-path check) is not timed
    for d in datas:
        for s in asm.feed(d, 0):
            n += 1
            pts += len(s.payload)
    return time.perf_counter() - t, n, pts


def _theirs(info, datas: list[bytes]) -> tuple[float, int]:
    from ouster.sdk.core import (FrameBatcher, LidarFrame, LidarPacket, PacketFormat,
                                 XYZLutFloat)

    pkt = LidarPacket(PacketFormat(info))
    batcher, frame = FrameBatcher(info), LidarFrame(info)
    lut = XYZLutFloat(info, use_extrinsics=False)
    n = 0
    t = time.perf_counter()
    for d in datas:
        pkt.buf[:] = np.frombuffer(d, np.uint8)
        if batcher.batch(pkt, frame):
            lut(frame)
            n += 1
    return time.perf_counter() - t, n


def _theirs_packed(info, datas: list[bytes]) -> tuple[float, int]:
    """The peer loop plus the output edgecap emits: invalid returns removed, points packed
    as POINT_DTYPE with intensity, ring and per-point time (plain numpy on their frame)."""
    from ouster.sdk.core import (FrameBatcher, LidarFrame, LidarPacket, PacketFormat,
                                 XYZLutFloat)

    from agent.schemas import POINT_DTYPE

    pkt = LidarPacket(PacketFormat(info))
    batcher, frame = FrameBatcher(info), LidarFrame(info)
    lut = XYZLutFloat(info, use_extrinsics=False)
    rows = np.repeat(np.arange(info.h, dtype=np.uint16)[:, None], info.w, 1)
    n = 0
    t = time.perf_counter()
    for d in datas:
        pkt.buf[:] = np.frombuffer(d, np.uint8)
        if batcher.batch(pkt, frame):
            xyz = lut(frame)
            ts = frame.timestamp.astype(np.int64)
            ok = (frame.field("RANGE") > 0) & ((frame.status & 1) > 0)
            pts = np.empty(int(ok.sum()), POINT_DTYPE)
            pts["x"], pts["y"], pts["z"] = xyz[ok].T
            pts["intensity"] = frame.field("SIGNAL")[ok]
            pts["ring"] = rows[ok]
            pts["t_offset_ns"] = np.broadcast_to(ts - ts[0], ok.shape)[ok]
            n += 1
    return time.perf_counter() - t, n


def _best(fn, reps: int):
    return min((fn() for _ in range(reps)), key=lambda r: r[0])


def _emulator_and_driver(seconds: float) -> dict:
    """Run the emulator in a subprocess into the live driver for ``seconds``."""
    import socket

    from drivers.lidar import OusterLidar
    from hil.emulators.lidar import METADATA_PATH

    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    drv = OusterLidar("/bench", f"udp://127.0.0.1:{port}",
                      OusterLidar.Options(metadata=str(METADATA_PATH)))
    drv.open()
    scans: list[int] = []
    cpu: dict[str, float] = {}

    def reader() -> None:
        cpu["tid"] = threading.get_native_id()
        for smp in drv:
            scans.append(len(smp.payload))

    th = threading.Thread(target=reader, daemon=True)
    th.start()
    proc = subprocess.Popen([sys.executable, "-m", "hil.emulators.lidar", "--port", str(port),
                             "--duration", str(seconds + 30)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        uri = proc.stdout.readline().strip()
        if not uri.startswith("udp://"):
            raise RuntimeError(f"emulator did not start: {uri!r}")
        time.sleep(1.0)  # warm-up
        me, tid = os.getpid(), int(cpu["tid"])
        c0, d0 = _proc_cpu_s(proc.pid), _proc_cpu_s(me, tid)
        t0, p0 = time.monotonic(), drv.counters["packets"]
        time.sleep(seconds)
        e_cpu, wall = _proc_cpu_s(proc.pid) - c0, time.monotonic() - t0
        cpu["driver"] = _proc_cpu_s(me, tid) - d0
        pkts = drv.counters["packets"] - p0
    finally:
        proc.terminate()
        try:
            out, _ = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        drv.close()
        th.join(5)
    summary = json.loads(out.strip().splitlines()[-1])
    return {"emu_cpu_s": e_cpu, "wall_s": wall, "packets": pkts, "summary": summary,
            "driver_cpu_s": cpu.get("driver", float("nan")), "scans": len(scans),
            "counters": drv.counters.as_dict()}


def run(quick: bool = False) -> list[Result]:
    frames = 20 if quick else 60
    reps = 2 if quick else 5
    datas, info = _record(frames)
    ours_s, ours_n, ours_pts = _best(lambda: _ours(info, datas, True), reps)
    nocrc_s, _, _ = _best(lambda: _ours(info, datas, False), reps)
    theirs_s, theirs_n = _best(lambda: _theirs(info, datas), reps)
    packed_s, _ = _best(lambda: _theirs_packed(info, datas), reps)
    n = len(datas)
    ours_pps, nocrc_pps, theirs_pps = n / ours_s, n / nocrc_s, n / theirs_s
    packed_pps = n / packed_s
    live = _emulator_and_driver(3.0 if quick else 8.0)
    sm = live["summary"]
    e_share = live["emu_cpu_s"] / live["wall_s"]
    pps = live["packets"] / live["wall_s"]
    late_share = sm.get("late_sends", 0) / max(sm.get("sent", 0), 1)
    load1 = os.getloadavg()[0]
    common = {"load1": round(load1, 2), "packets": n}
    return [
        Result("assembly throughput (CRC checked)", ours_pps, "packets/s",
               reference=f"ouster-sdk FrameBatcher+XYZLut {theirs_pps:,.0f} pkt/s",
               ratio=ours_pps / theirs_pps, goal=0.5, ratio_desc="of ouster-sdk loop",
               extra={**common, "scans": ours_n, "points_per_scan": ours_pts / max(ours_n, 1),
                      "peer_scans": theirs_n, "ms_per_scan": 1e3 * ours_s / max(ours_n, 1),
                      "peer_ms_per_scan": 1e3 * theirs_s / max(theirs_n, 1)}),
        Result("assembly vs peer loop + same output packing", ours_pps, "packets/s",
               reference=f"FrameBatcher+XYZLut+POINT_DTYPE {packed_pps:,.0f} pkt/s",
               ratio=ours_pps / packed_pps, goal=0.7, ratio_desc="of peer+packing",
               extra=common),
        Result("assembly throughput (no CRC check)", nocrc_pps, "packets/s",
               reference=f"ouster-sdk FrameBatcher+XYZLut {theirs_pps:,.0f} pkt/s",
               ratio=nocrc_pps / theirs_pps, goal=0.7, ratio_desc="of ouster-sdk loop",
               extra=common),
        Result("assembly headroom over OS1-64 2048×10", ours_pps, "packets/s",
               reference="sensor 1,280 pkt/s", ratio=ours_pps / 1280.0, goal=5.0,
               ratio_desc="× sensor rate", extra=common),
        Result("emulator CPU at OS1-64 1024×10", 100 * e_share, "% core",
               reference="one core", ratio=e_share, goal=0.5, higher_is_better=False,
               extra={"cpu_s": live["emu_cpu_s"], "wall_s": live["wall_s"], "load1": load1}),
        Result("emulator delivered packet rate", pps, "packets/s",
               reference="nominal 640 pkt/s", ratio=pps / NOMINAL_PPS, goal=0.98,
               extra={"summary": sm, "driver_counters": live["counters"]}),
        Result("emulator packets sent >2 ms late", 100 * late_share, "%",
               reference="all packets sent", ratio=late_share, goal=0.05,
               higher_is_better=False,
               extra={"max_late_ms": sm.get("max_late_ms"), "load1": load1}),
        Result("driver CPU receiving 10 Hz live", 100 * live["driver_cpu_s"] / live["wall_s"],
               "% core", reference="one core", ratio=live["driver_cpu_s"] / live["wall_s"],
               goal=0.15, higher_is_better=False,
               extra={"scans": live["scans"]}),
    ]
