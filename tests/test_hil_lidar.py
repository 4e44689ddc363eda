"""LiDAR emulator on its real interface (Ouster packets over UDP on loopback), the ray
caster and the shipped sensor metadata."""

from __future__ import annotations

import json
import math
import socket
import time
from pathlib import Path

import numpy as np
import open3d  # noqa: F401  (the ray caster's heavy import, before anything is timed)
import pytest
from ouster.sdk.core import (ColHeader, FrameBatcher, LidarFrame, LidarPacket, PacketFormat,
                             SensorInfo, XYZLutFloat)

from agent.errors import ConfigError
from hil.emulators.lidar import METADATA_PATH, LidarEmulator, make_metadata
from hil.raycast import GROUND, NOTHING, Raycaster, box_in_sensor_frame
from hil.scenario import Fault, load_scenario
from hil.truth import read_truth
from hil.world import ObjectState, Pose, World

INFO = SensorInfo(METADATA_PATH.read_text())


def make_emu(tmp_path: Path, port: int = 9, faults: list[Fault] | None = None,
             t0_ns: int | None = None, clapper_s: list[float] | None = None,
             **opts: object) -> LidarEmulator:
    sc = load_scenario("city-drive")
    if clapper_s is not None:
        sc = sc.model_copy(update={"clapper_s": clapper_s})
    s = sc.devices.lidar.model_copy(update={"faults": faults or [], "options": dict(opts)})
    return LidarEmulator(World(sc), s, tmp_path, t0_ns or time.monotonic_ns(), dest_port=port)


def udp_socket() -> tuple[socket.socket, int]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.bind(("127.0.0.1", 0))
    s.settimeout(0.5)
    return s, s.getsockname()[1]


def truth_samples(run_dir: Path) -> list[dict]:
    return [r for r in read_truth(run_dir / "truth" / "lidar.jsonl") if r["type"] == "sample"]


# -- metadata -----------------------------------------------------------------------------
def test_shipped_metadata_is_an_os1_64_1024x10_with_crc():
    pf = PacketFormat(INFO)
    assert (INFO.prod_line, INFO.w, INFO.h, INFO.format.fps) == ("OS-1-64", 1024, 64, 10)
    assert str(INFO.format.udp_profile_lidar) == "RNG19_RFL8_SIG16_NIR16"
    assert pf.lidar_packet_size == 12544 and pf.columns_per_packet == 16
    assert pf.packet_footer_size == 32  # CRC-64 footer
    assert INFO.init_id == 5431290 and INFO.sn == 992109000123
    # the file is exactly what make_metadata() produces (no hand edits drift from it)
    assert SensorInfo(make_metadata()).has_fields_equal(INFO)


# -- ray casting --------------------------------------------------------------------------
def test_raycast_ground_and_box_ranges_are_exact():
    dirs = np.array([[1, 0, -0.19], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float32)
    rc = Raycaster(np.zeros((4, 3)), dirs, mount_xyz=(0, 0, 1.9), max_range_m=100)
    box = ObjectState("car", "car", (20.0, 0.0, 0.75), (4.0, 2.0, 1.5), 0.0)
    hits = rc.cast(Pose(0, 0, 0, 0, 0), [box])
    # ray 0 hits the ground 10 m ahead (1.9 / 0.19), ray 1 passes over the 1.5 m box
    assert hits.hit_object.tolist() == [GROUND, NOTHING, NOTHING, NOTHING]
    assert hits.range_m[0] == pytest.approx(math.hypot(10, 1.9), abs=1e-3)
    assert np.isinf(hits.range_m[1:]).all()
    # a tall box: the horizontal ray hits its near face at x = 18
    tall = ObjectState("wall", "sign", (20.0, 0.0, 2.0), (4.0, 2.0, 4.0), 0.0)
    hits = rc.cast(Pose(0, 0, 0, 0, 0), [tall])
    assert hits.hit_object[1] == 0 and hits.range_m[1] == pytest.approx(18.0, abs=1e-3)
    assert hits.cos_incidence[1] == pytest.approx(1.0, abs=1e-4)
    # the vehicle turned left by 90°: now the +y ray of the sensor points to -x in the world
    hits = rc.cast(Pose(30.0, 0.0, 0, math.pi / 2, 0), [tall])
    assert hits.hit_object[2] == 0 and hits.range_m[2] == pytest.approx(8.0, abs=1e-3)


def test_scene_is_rebuilt_only_when_objects_move():
    rc = Raycaster(np.zeros((1, 3)), np.array([[1, 0, 0]], np.float32))
    a = ObjectState("a", "car", (10.0, 0.0, 0.75), (4.0, 2.0, 1.5), 0.0)
    rc.cast(Pose(0, 0, 0, 0, 0), [a])
    rc.cast(Pose(1, 0, 0, 0.1, 3), [a])  # vehicle moved, object did not
    assert rc.rebuilds == 1
    rc.cast(Pose(1, 0, 0, 0.1, 3), [ObjectState("a", "car", (11.0, 0.0, 0.75), a.size, 0.0)])
    assert rc.rebuilds == 2


def test_box_in_sensor_frame():
    ob = ObjectState("p", "pedestrian", (10.0, 5.0, 0.9), (0.5, 0.6, 1.8), math.pi / 2)
    b = box_in_sensor_frame(ob, Pose(10.0, 0.0, 0.0, math.pi / 2, 0.0), (0.0, 0.0, 1.9))
    assert b["center"] == pytest.approx([5.0, 0.0, -1.0], abs=1e-6)
    assert b["yaw"] == pytest.approx(0.0, abs=1e-9)


# -- rendering ----------------------------------------------------------------------------
def _assemble(info: SensorInfo, datas: list[bytes]) -> LidarFrame:
    pf = PacketFormat(info)
    fb, fr, pkt = FrameBatcher(info), LidarFrame(info), LidarPacket(pf)
    for d in datas:
        pkt.buf[:] = np.frombuffer(d, np.uint8)
        fb.batch(pkt, fr)
    return fr


def test_rendered_frame_round_trips_through_ouster_sdk(tmp_path):
    emu = make_emu(tmp_path, t0_ns=10**12)
    try:
        f = emu.render_frame(20)
    finally:
        emu.truth.close()
    assert len(f.datas) == 64 and {len(d) for d in f.datas} == {12544}
    pf = PacketFormat(INFO)
    first = np.frombuffer(f.datas[0], np.uint8)
    assert pf.frame_id(first) == f.fid == 20
    assert pf.crc(first) == pf.calculate_crc(first)
    fr = _assemble(INFO, f.datas)
    assert fr.frame_id == 20 and fr.measurement_id.tolist() == list(range(1024))
    ts = fr.timestamp.astype(np.int64)
    assert ts[0] == f.device_ns
    # columns evenly spread over the 100 ms frame on the device clock
    assert np.all(np.diff(ts) // 1000 == 97)
    rng = fr.field("RANGE")
    assert int((rng > 0).sum()) == f.truth["points"] > 10_000
    # intensity plausible: signal present wherever there is a return, none elsewhere
    sig = fr.field("SIGNAL")
    assert (sig[rng > 0] > 0).mean() > 0.99 and not sig[rng == 0].any()
    # packets are due when their last column fired: spread over ~100 ms, in order
    due = np.array(f.due_ns) - f.true_ns
    assert np.all(np.diff(due) > 0) and 95e6 < due[-1] < 101e6


def test_rendering_is_deterministic_for_a_seed(tmp_path):
    t0 = 5 * 10**12
    a, b = make_emu(tmp_path / "a", t0_ns=t0), make_emu(tmp_path / "b", t0_ns=t0)
    try:
        fa, fb = a.render_frame(33), b.render_frame(33)
        assert fa.datas == fb.datas and fa.truth == fb.truth
    finally:
        a.truth.close()
        b.truth.close()


def test_clapper_board_shows_in_the_points_inside_its_truth_box(tmp_path):
    emu = make_emu(tmp_path, t0_ns=10**12, clapper_s=[1.0])
    try:
        f = emu.render_frame(12)  # t = 1.2 s: the board stands 6 m ahead
    finally:
        emu.truth.close()
    box = next(b for b in f.truth["boxes"] if b["id"] == "clapper-0")
    assert f.truth.get("clapper") == 0 and box["points"] > 50
    assert box["center"][0] == pytest.approx(6.0, abs=0.01)
    fr = _assemble(INFO, f.datas)
    xyz = XYZLutFloat(INFO, use_extrinsics=False)(fr)[fr.field("RANGE") > 0]
    c, s = math.cos(box["yaw"]), math.sin(box["yaw"])
    d = xyz - np.array(box["center"], np.float32)
    local = np.stack([c * d[:, 0] + s * d[:, 1], -s * d[:, 0] + c * d[:, 1], d[:, 2]], 1)
    inside = np.all(np.abs(local) <= np.array(box["size"]) / 2 + 0.05, axis=1)
    # the decoded points land inside the truth box (range noise 1 cm, 5 cm margin)
    assert abs(int(inside.sum()) - box["points"]) <= 0.05 * box["points"]


def test_bad_options_and_rate_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="options.dest_prot"):
        make_emu(tmp_path, dest_prot=1)
    sc = load_scenario("city-drive")
    s = sc.devices.lidar.model_copy(update={"rate_hz": 20.0})
    with pytest.raises(ConfigError, match="does not match the sensor mode 1024x10"):
        LidarEmulator(World(sc), s, tmp_path, time.monotonic_ns())


# -- the real interface -------------------------------------------------------------------
def test_udp_packets_parse_into_scans_with_realistic_spacing(tmp_path):
    rx, port = udp_socket()
    emu = make_emu(tmp_path, port=port, t0_ns=time.monotonic_ns() + 200_000_000)
    arrivals: list[tuple[int, int, int]] = []  # (frame_id, packet index, host ns)
    pf = PacketFormat(INFO)
    fb, fr, pkt = FrameBatcher(INFO), LidarFrame(INFO), LidarPacket(pf)
    scans = []
    emu.start()
    try:
        end = time.monotonic() + 10.0
        while time.monotonic() < end and len(scans) < 12:
            try:
                data = rx.recv(65536)
            except TimeoutError:
                continue
            now = time.monotonic_ns()
            pkt.buf[:] = np.frombuffer(data, np.uint8)
            mid = int(pf.packet_header(ColHeader.MEASUREMENT_ID, pkt.buf)[0])
            arrivals.append((pkt.frame_id(), mid // 16, now))
            if fb.batch(pkt, fr):  # ouster-sdk's own batcher: a scan finished
                scans.append((fr.frame_id, int((fr.field("RANGE") > 0).sum()),
                              int((fr.status & 1).sum())))
    finally:
        emu.stop()
        rx.close()
    truth = {t["seq"]: t for t in truth_samples(tmp_path)}
    assert len(scans) >= 10
    for fid, returns, cols in scans:
        assert cols == 1024 and returns == truth[fid]["points"]
    # not a burst: within a frame, packets arrive in order and spread over the frame
    # (generous bounds: CI machines are shared; the sensor's spacing is 1.56 ms)
    by_frame: dict[int, list[tuple[int, int]]] = {}
    for fid, p, t in arrivals:
        by_frame.setdefault(fid, []).append((p, t))
    spans = [(v[-1][1] - v[0][1]) / 1e6 for v in by_frame.values() if len(v) == 64]
    assert spans and np.median(spans) > 60
    assert all([p for p, _ in v] == sorted(p for p, _ in v) for v in by_frame.values())
    assert emu.sent["sent"] == sum(t["packets_sent"] for t in truth.values())


def test_faults_are_recorded_in_truth_and_reproducible(tmp_path):
    faults = [Fault(kind="dropout", t_s=0.0, duration_s=5.0, rate=0.3),
              Fault(kind="garbage", t_s=0.0, duration_s=5.0, rate=0.2)]
    runs = []
    for name in ("a", "b"):
        rx, port = udp_socket()
        emu = make_emu(tmp_path / name, port=port, faults=faults,
                       t0_ns=time.monotonic_ns() + 150_000_000)
        emu.start()
        got = 0
        end = time.monotonic() + 0.6
        while time.monotonic() < end:
            try:
                rx.recv(65536)
                got += 1
            except TimeoutError:
                pass
        emu.stop()
        time.sleep(0.05)
        rx.settimeout(0.05)
        try:
            while True:
                rx.recv(65536)
                got += 1
        except TimeoutError:
            pass
        rx.close()
        ts = truth_samples(tmp_path / name)
        assert got == sum(t["packets_sent"] + t["garbage"] for t in ts)
        runs.append({t["frame"]: (t.get("dropped_idx"), t["garbage"]) for t in ts})
        recs = list(read_truth(tmp_path / name / "truth" / "lidar.jsonl"))
        assert {r["kind"] for r in recs if r["type"] == "fault"} == {"dropout", "garbage"}
    common = set(runs[0]) & set(runs[1])
    assert common and all(runs[0][k] == runs[1][k] for k in common)
    assert any(runs[0][k][0] for k in common)  # some packets really were dropped


def test_stop_is_prompt_and_idempotent(tmp_path):
    emu = make_emu(tmp_path, t0_ns=time.monotonic_ns())
    emu.start()
    time.sleep(0.3)
    t = time.monotonic()
    emu.stop()
    emu.stop()
    assert time.monotonic() - t < 1.0
    # a run whose t = 0 lies far ahead stops at once too (nothing was sent)
    later = make_emu(tmp_path / "later", t0_ns=time.monotonic_ns() + 60 * 10**9)
    later.start()
    time.sleep(0.2)
    t = time.monotonic()
    later.stop()
    assert time.monotonic() - t < 1.0 and later.sent["frames"] == 0
    recs = list(read_truth(tmp_path / "truth" / "lidar.jsonl"))
    assert recs[-1]["type"] == "summary" and recs[-1]["frames"] >= 1
    assert json.loads(json.dumps(recs))  # plain JSON


def test_a_frame_already_too_late_is_not_ray_cast(tmp_path):
    """A stalled host: frames whose packets are all past sending are skipped unrendered
    (the sender withholds them as overrun), so the emulator catches up."""
    now = time.monotonic_ns()
    emu = make_emu(tmp_path, t0_ns=now - 10 * 10**9)  # t = 0 was 10 s ago
    f = emu._late_frame(0)
    assert f is not None and f.truth["rendered"] is False and len(f.datas) == emu.ppf
    assert emu._late_frame(200) is None  # 20 s in: still in the future
    emu_now = make_emu(tmp_path / "b", t0_ns=now + 10**9)
    assert emu_now._late_frame(0) is None
