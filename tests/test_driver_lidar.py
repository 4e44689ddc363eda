"""``lidar.ouster``: the packet path (scan assembly and loss accounting), the driver against
the HIL emulator over UDP on loopback with every fault mode, and the pcap round trip."""

from __future__ import annotations

import functools
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open3d  # noqa: F401  (import the emulator's heavy dependency before timing anything)
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ouster.sdk.core import (LidarFrame, LidarMode, PacketFormat, SensorInfo, XYZLutFloat,
                             frame_to_packets)
from pydantic import ValidationError

from agent.errors import DriverError
from agent.schemas import POINT_DTYPE
from agent.types import Sample, StreamKind
from drivers import registry
from drivers.base import Counters
from drivers.lidar import OusterLidar, ScanAssembler
from hil.emulators.lidar import METADATA_PATH, LidarEmulator
from hil.scenario import Fault, load_scenario
from hil.truth import read_truth
from hil.world import World

INFO = SensorInfo(METADATA_PATH.read_text())
PF = PacketFormat(INFO)
T0 = 7_000_000_000_000
PERIOD = 100_000_000
BAD = ("garbage", "truncated", "corrupt")
ACCEPTED = ("packets", "duplicates", "late_packets", "startup_skipped")


def scan_meta(s) -> dict:
    """A scan's meta without the clock pair (``device_span_ns``, ``span_rx_ns``)."""
    return {k: v for k, v in s.meta.items() if k not in ("device_span_ns", "span_rx_ns")}


@functools.lru_cache(maxsize=64)
def frame(fid: int) -> tuple[tuple[bytes, ...], np.ndarray, int]:
    """Packets of a synthetic frame ``fid``, its range image and its first timestamp."""
    fr = LidarFrame(INFO)
    rng = np.random.default_rng(fid)
    r = rng.integers(500, 60_000, (64, 1024)).astype(np.uint32)
    r[rng.random((64, 1024)) < 0.3] = 0
    fr.field("RANGE")[:] = r
    fr.field("SIGNAL")[:] = rng.integers(1, 3000, (64, 1024)).astype(np.uint16)
    t0 = T0 + fid * PERIOD
    fr.timestamp[:] = t0 + np.arange(1024, dtype=np.uint64) * 97_656
    fr.measurement_id[:] = np.arange(1024, dtype=np.uint16)
    fr.status[:] = 1
    fr.frame_id = fid
    pk = tuple(p.buf.tobytes() for p in frame_to_packets(fr, PF, INFO.init_id, INFO.sn))
    return pk, r, t0


def assembler() -> tuple[ScanAssembler, Counters, list[tuple]]:
    c = Counters()
    gaps: list[tuple] = []
    return ScanAssembler(INFO, c, "/lidar", lambda n, cause, **kw: gaps.append((n, cause))), \
        c, gaps


def feed_all(asm: ScanAssembler, datas, host_ns: int = 1) -> list[Sample]:
    out: list[Sample] = []
    for d in datas:
        out += asm.feed(d, host_ns)
    return out


# -- the packet path ----------------------------------------------------------------------
def test_complete_scans_have_every_valid_return_with_column_times():
    asm, c, gaps = assembler()
    pk, r, t0 = frame(5)
    out = feed_all(asm, pk)
    assert len(out) == 1  # emitted as soon as the 64th packet arrived
    s = out[0]
    assert s.seq == 5 and s.device_t_ns == t0 and scan_meta(s) == {
        "incomplete": False, "packets": 64, "missing_packets": 0}
    # the clock pair: the scan's best packet (device time offset, arrival)
    assert 0 <= s.meta["device_span_ns"] < 100_000_000 and "span_rx_ns" in s.meta
    pts = s.payload
    assert pts.dtype == POINT_DTYPE and len(pts) == int((r > 0).sum())
    # same coordinates as ouster-sdk's own projection of the range image
    fr = LidarFrame(INFO)
    fr.field("RANGE")[:] = r
    ref = XYZLutFloat(INFO, use_extrinsics=False)(fr)[r > 0]
    assert np.allclose(np.stack([pts["x"], pts["y"], pts["z"]], 1), ref, atol=1e-5)
    assert pts["ring"].min() == 0 and pts["ring"].max() == 63
    assert pts["t_offset_ns"].min() == 0 and pts["t_offset_ns"].max() == 1023 * 97_656
    assert pts["intensity"].min() >= 1
    assert (c["received"], c["packets"], c["missing_packets"], c["gaps"]) == (1, 64, 0, 0)
    assert gaps == []


def test_missing_packet_gives_an_incomplete_scan_and_a_gap():
    asm, c, gaps = assembler()
    a, _, _ = frame(6)
    b, _, t0b = frame(7)
    out = feed_all(asm, a[:10] + a[11:]) + feed_all(asm, b[1:]) + asm.flush()
    assert [s.seq for s in out] == [6, 7]
    assert scan_meta(out[0]) == {"incomplete": True, "packets": 63, "missing_packets": 1}
    # frame 7 lost its first packet: the scan starts at the first valid column (16)
    assert out[1].device_t_ns == t0b + 16 * 97_656
    assert out[1].payload["t_offset_ns"].min() == 0
    assert (c["missing_packets"], c["incomplete_scans"]) == (2, 2)
    assert gaps == [(1, "missing_packets"), (1, "missing_packets")]


def test_frame_id_jump_counts_whole_missing_frames():
    asm, c, gaps = assembler()
    out = feed_all(asm, frame(8)[0] + frame(11)[0])
    assert [s.seq for s in out] == [8, 11]
    assert c["missing_packets"] == 2 * 64 and gaps == [(128, "missing_frames")]
    assert c["incomplete_scans"] == 0


def test_frame_id_wraps_without_loss():
    asm, c, _ = assembler()
    out = feed_all(asm, frame(65535)[0] + frame(0)[0] + frame(1)[0])
    assert [s.seq for s in out] == [65535, 0, 1] and c["missing_packets"] == 0


def test_late_and_duplicate_packets():
    asm, c, _ = assembler()
    a, b = frame(20)[0], frame(21)[0]
    out = feed_all(asm, a[:5] + a[4:5] + a[5:])  # one duplicate inside the frame
    out += feed_all(asm, b[:3] + a[7:8] + frame(19)[0][:1] + b[3:])  # late: old frames
    assert [s.seq for s in out] == [20, 21]
    assert (c["duplicates"], c["late_packets"], c["missing_packets"]) == (1, 2, 0)


def test_late_packet_after_its_scan_was_flushed():
    asm, c, _ = assembler()
    a = frame(30)[0]
    assert feed_all(asm, a[:63], host_ns=1000) == []
    assert asm.poll(1000 + 10**8, 2 * 10**8) == []  # not yet
    out = asm.poll(1000 + 3 * 10**8, 2 * 10**8)  # silence: emit what we have
    assert len(out) == 1 and out[0].meta["incomplete"]
    assert feed_all(asm, a[63:]) == []  # its last packet arrives after all
    assert (c["late_packets"], c["missing_packets"]) == (1, 1)


def test_partial_first_frame_is_skipped_not_counted_as_loss():
    asm, c, _ = assembler()
    out = feed_all(asm, frame(40)[0][20:] + frame(41)[0])
    assert [s.seq for s in out] == [41]
    assert (c["startup_skipped"], c["missing_packets"], c["gaps"]) == (44, 0, 0)


def test_bad_datagrams_are_classified():
    asm, c, _ = assembler()
    pk = frame(50)[0]
    flipped = bytearray(pk[3])
    flipped[5000] ^= 0x10
    other = bytearray(pk[4])
    other[8:16] = (1234).to_bytes(8, "little")  # not this sensor's serial/init id
    feed_all(asm, [b"", b"x" * 10, pk[1][:9000], bytes(flipped), bytes(other), pk[2] + b"!"])
    assert (c["garbage"], c["truncated"], c["corrupt"]) == (3, 2, 1)
    assert c["packets"] == 0


def test_fast_header_path_is_verified_and_agrees_with_ouster_sdk_accessors():
    fast, cf, _ = assembler()
    slow, cs, _ = assembler()
    assert fast._fast and fast._crc is not None  # verified against ouster-sdk at startup
    slow._fast = False
    pk = frame(70)[0]
    bad = [pk[1][:5000], b"\x01\x00" + bytes(40), bytes(bytearray(pk[2])[:-1]) + b"\x00"]
    datas = list(pk[:30]) + bad + list(pk[31:]) + list(frame(72)[0])
    a, b = feed_all(fast, datas) + fast.flush(), feed_all(slow, datas) + slow.flush()
    assert cf.as_dict() == cs.as_dict() and cf["corrupt"] == 1 and cf["truncated"] == 1
    assert [s.seq for s in a] == [s.seq for s in b] == [70, 72]
    assert all(np.array_equal(x.payload, y.payload) for x, y in zip(a, b))


POOL = [p for f in (60, 61, 62, 65, 0, 65535) for p in frame(f)[0][::7]]


@st.composite
def datagrams(draw) -> bytes:
    kind = draw(st.sampled_from(["random", "cut", "flip", "real"]))
    if kind == "random":
        return draw(st.binary(max_size=13_000))
    p = draw(st.sampled_from(POOL))
    if kind == "cut":
        return p[:draw(st.integers(0, len(p)))]
    if kind == "flip":
        b = bytearray(p)
        for pos in draw(st.lists(st.integers(0, len(p) * 8 - 1), min_size=1, max_size=4)):
            b[pos // 8] ^= 1 << (pos % 8)
        return bytes(b)
    return p


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(datagrams(), max_size=40), st.integers(0, 2**62))
def test_property_any_bytes_never_raise_and_every_datagram_is_counted(data, t):
    asm, c, _ = assembler()
    out = feed_all(asm, data, host_ns=t) + asm.poll(t + 10**10, 1) + asm.flush()
    assert sum(c[k] for k in BAD + ACCEPTED) == len(data)
    assert c["received"] == len(out)
    for s in out:
        assert s.payload.dtype == POINT_DTYPE and 0 <= s.meta["missing_packets"] < 64
        assert s.meta["packets"] + s.meta["missing_packets"] == 64


# -- the driver against the emulator ------------------------------------------------------
def free_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def make_driver(uri: str, **opts) -> OusterLidar:
    cls = registry.get("lidar.ouster")
    return cls("/lidar/top", uri, cls.Options(metadata=str(METADATA_PATH), **opts))


@dataclass
class Run:
    samples: list[Sample]
    counters: dict[str, int]
    truth: list[dict]
    emu: LidarEmulator
    port: int


def run_live(tmp_path: Path, faults: list[Fault] | None = None, seconds: float = 1.3,
             pcap: bool = False) -> Run:
    port = free_port()
    drv = make_driver(f"udp://127.0.0.1:{port}", flush_timeout_ms=200)
    drv.open()
    out: list[Sample] = []
    reader = threading.Thread(target=lambda: out.extend(drv), daemon=True)
    reader.start()
    sc = load_scenario("city-drive")
    s = sc.devices.lidar.model_copy(update={"faults": faults or []})
    t0 = time.monotonic_ns() + 300_000_000  # scenario t = 0; faults are timed from here
    emu = LidarEmulator(World(sc), s, tmp_path, t0, dest_port=port,
                        pcap_path=tmp_path / "lidar.pcap" if pcap else None)
    try:
        emu.start()
        time.sleep(max(0.0, (t0 - time.monotonic_ns()) / 1e9) + seconds)
    finally:
        emu.stop()
        time.sleep(0.35)  # > flush timeout (200 ms): the last scan is out
        drv.close()
        reader.join(5)
    truth = [r for r in read_truth(tmp_path / "truth" / "lidar.jsonl") if r["type"] == "sample"]
    return Run(out, drv.counters.as_dict(), truth, emu, port)


def expected_counts(truth: list[dict]) -> dict[str, int]:
    """What the driver must count, from what the emulator says it did. Frames before the
    first or after the last frame that reached the driver are invisible to any receiver."""
    seen = [t["frame"] for t in truth if t["packets_sent"] > 0]
    span = [t for t in truth if seen[0] <= t["frame"] <= seen[-1]]
    return {"received": len(seen),
            "packets": sum(t["packets_sent"] for t in truth),
            "missing_packets": sum(t["packets"] - t["packets_sent"] for t in span),
            "incomplete_scans": sum(0 < t["packets_sent"] < t["packets"] for t in span),
            "truncated": sum(t["truncated"] for t in truth),
            "corrupt": sum(t["corrupted"] for t in truth),
            "garbage": sum(t["garbage"] for t in truth)}


def test_driver_scans_match_the_emulators_truth(tmp_path):
    run = run_live(tmp_path)
    exp = expected_counts(run.truth)
    got = {k: run.counters[k] for k in exp}
    assert got == exp
    assert run.counters["late_packets"] == run.counters["duplicates"] == 0
    assert run.counters["startup_skipped"] == 0 and len(run.samples) >= 10
    by_seq = {t["seq"]: t for t in run.truth}
    for s in run.samples:
        t = by_seq[s.seq]
        assert s.device_t_ns == t["device_ns"]  # first column, on the sensor clock
        if t["packets_sent"] == 64:
            assert len(s.payload) == t["points"] and not s.meta["incomplete"]
    # host arrival is after the first packet was due (its 16 columns fired) on the
    # emulator's true time (= this host's monotonic clock)
    assert all(s.host_rx_ns >= by_seq[s.seq]["true_ns"] for s in run.samples)


FAULTS = {
    "dropout": Fault(kind="dropout", t_s=0.2, duration_s=0.35, rate=0.2),
    "truncate": Fault(kind="truncate", t_s=0.2, duration_s=0.35, rate=0.15),
    "corrupt": Fault(kind="corrupt", t_s=0.2, duration_s=0.35, rate=0.15),
    "garbage": Fault(kind="garbage", t_s=0.2, duration_s=0.35, rate=0.3),
    "stall": Fault(kind="stall", t_s=0.25, duration_s=0.25),
    "disconnect": Fault(kind="disconnect", t_s=0.25, duration_s=0.25),
}


@pytest.mark.parametrize("kind", sorted(FAULTS))
def test_every_injected_fault_is_counted_exactly(tmp_path, kind):
    run = run_live(tmp_path, [FAULTS[kind]], seconds=0.75)
    exp = expected_counts(run.truth)
    assert {k: run.counters[k] for k in exp} == exp
    injected = {"dropout": "packets_dropped", "truncate": "truncated",
                "corrupt": "corrupted", "garbage": "garbage", "stall": "withheld",
                "disconnect": "withheld"}[kind]
    assert sum(t[injected] for t in run.truth) > 0  # the fault really happened
    assert run.counters["gaps"] == run.counters["missing_packets"]
    assert run.counters["late_packets"] == 0 and run.counters["errors"] == 0
    by_seq = {s.seq: s for s in run.samples}
    for t in run.truth:  # every incomplete scan is flagged with its own missing count
        if t["seq"] in by_seq:
            assert by_seq[t["seq"]].meta["missing_packets"] == t["packets"] - t["packets_sent"]
    if kind == "disconnect":
        assert run.emu.sent["disconnects"] == 1


def test_pcap_round_trip_gives_the_same_scans_as_the_live_path(tmp_path):
    faults = [Fault(kind="dropout", t_s=0.2, duration_s=0.3, rate=0.1),
              Fault(kind="corrupt", t_s=0.5, duration_s=0.3, rate=0.1),
              Fault(kind="garbage", t_s=0.2, duration_s=0.6, rate=0.1)]
    run = run_live(tmp_path, faults, seconds=1.0, pcap=True)
    drv = make_driver(f"pcap:{tmp_path / 'lidar.pcap'}", port=run.port)
    drv.open()
    assert drv.is_live is False and OusterLidar.is_live is True
    replayed = list(drv)
    drv.close()
    assert [s.seq for s in replayed] == [s.seq for s in run.samples] and replayed
    for a, b in zip(run.samples, replayed):
        # the clock pair names the scan's best-arriving packet: it differs between the
        # live and the pcap path by design
        assert a.device_t_ns == b.device_t_ns and scan_meta(a) == scan_meta(b)
        assert np.array_equal(a.payload, b.payload)
    pc = drv.counters.as_dict()
    for k in ("received", "packets", "missing_packets", "incomplete_scans", "corrupt"):
        assert pc[k] == run.counters[k], k
    # ouster-sdk's pcap reader drops wrong-size datagrams itself; we carry its count over
    assert pc["truncated"] + pc["garbage"] == run.counters["truncated"] + run.counters["garbage"]
    assert run.counters["garbage"] > 0


# -- configuration and errors -------------------------------------------------------------
def test_stream_info_and_options():
    drv = make_driver("udp://127.0.0.1:0", port=free_port())
    drv.open()
    try:
        (info,) = drv.streams()
    finally:
        drv.close()
    assert info.kind is StreamKind.LIDAR and info.encoding == "points" and info.rate_hz == 10
    assert info.params["rings"] == 64 and info.params["packets_per_frame"] == 64
    assert info.params["rcvbuf_bytes"] >= 1 << 20
    with pytest.raises(ValidationError, match="does not exist"):
        OusterLidar.Options(metadata="/nonexistent.json")
    with pytest.raises(ValidationError):
        OusterLidar.Options(metadata=str(METADATA_PATH), porrt=1)


def test_clear_errors_for_bad_uri_busy_port_and_bad_metadata(tmp_path):
    with pytest.raises(DriverError, match="expected udp://"):
        make_driver("tcp://127.0.0.1:7502")
    busy = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    busy.bind(("127.0.0.1", 0))
    try:
        drv = make_driver(f"udp://127.0.0.1:{busy.getsockname()[1]}")
        with pytest.raises(DriverError, match="cannot listen"):
            drv.open()
    finally:
        busy.close()
    bad = tmp_path / "meta.json"
    bad.write_text("{not json")
    drv = OusterLidar("/l", "udp://127.0.0.1:0", OusterLidar.Options(metadata=str(bad)))
    with pytest.raises(DriverError, match="meta.json"):
        drv.open()
    with pytest.raises(DriverError, match="no such pcap"):
        make_driver(f"pcap:{tmp_path / 'none.pcap'}").open()


def test_legacy_profile_through_ouster_sdk_accessors():
    legacy = SensorInfo.from_default(LidarMode._1024x10)
    pf = PacketFormat(legacy)
    assert pf.packet_header_size == 0 and pf.lidar_packet_size == 12608
    fr = LidarFrame(legacy)
    fr.field("RANGE")[:] = 5000
    fr.timestamp[:] = T0 + np.arange(1024, dtype=np.uint64) * 97_656
    fr.measurement_id[:] = np.arange(1024, dtype=np.uint16)
    fr.status[:] = 0xFFFFFFFF
    fr.frame_id = 9
    pk = [p.buf.tobytes() for p in frame_to_packets(fr, pf, 0, 0)]
    c = Counters()
    asm = ScanAssembler(legacy, c, "/l")
    assert not asm._fast  # no header to read by offset: ouster-sdk's accessors are used
    out = feed_all(asm, pk[:3] + [pk[3][:100]] + pk[4:]) + asm.flush()
    assert [s.seq for s in out] == [9] and out[0].meta["missing_packets"] == 1
    assert len(out[0].payload) == 63 * 16 * 64 and out[0].device_t_ns == T0
    assert (c["truncated"], c["packets"], c["missing_packets"]) == (1, 63, 1)
