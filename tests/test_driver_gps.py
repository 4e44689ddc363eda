"""The ``gps.nmea`` driver against the GPS emulator on a real pty, its fault counters, its
PPS sources, and property tests of the NMEA byte path."""

from __future__ import annotations

import errno
import math
import os
import struct
import threading
import time
from pathlib import Path

import pytest
import serial
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.errors import DriverError
from drivers import registry
from drivers.base import Counters
from drivers.gps import (NmeaDecoder, NmeaGps, NmeaGpsOptions, decode_bytes,
                         parse_sentence, parse_serial_uri)
from drivers.pps import (NS, PPS_FDATA, PPS_FETCH, EmulatedPps, LinuxPps, SerialDcdPps,
                         open_pps, pack_pps_fdata, unpack_pps_fdata)
from hil.emulators.gps import GpsEmulator
from hil.scenario import Fault, load_scenario
from hil.truth import read_truth
from hil.world import World


def make_emu(tmp_path: Path, duration_s: float, rate_hz: float = 10, baud: int = 115200,
             faults: list[Fault] | None = None, start_in_s: float = 0.3, **options) -> GpsEmulator:
    sc = load_scenario("city-drive", duration_s=duration_s)
    gs = sc.devices.gps.model_copy(update={"rate_hz": rate_hz, "faults": faults or [],
                                           "options": {"baud": baud, **options}})
    return GpsEmulator(World(sc), gs, tmp_path, time.monotonic_ns() + int(start_in_s * NS))


def run_driver(emu: GpsEmulator, drv: NmeaGps, reopen: bool = False) -> list:
    """Iterate the driver in a thread until the emulator has sent everything; with
    ``reopen`` the thread reopens the driver after a lost port, as the pipeline does."""
    out: list = []
    errors: list[Exception] = []

    def loop() -> None:
        while not drv.stopping:
            try:
                out.extend(drv)
                return
            except DriverError as e:
                errors.append(e)
                if not reopen:
                    return
                while not drv.stopping:
                    time.sleep(0.05)
                    try:
                        drv.close()
                        drv.open()
                        drv.counters.inc("reconnects")
                        break
                    except DriverError:
                        continue

    th = threading.Thread(target=loop, daemon=True)
    th.start()
    assert emu.done.wait(emu.world.sc.duration_s + 5)
    time.sleep(0.4)
    drv.close()
    th.join(3.0)
    assert not th.is_alive()
    drv.errors_seen = errors  # type: ignore[attr-defined]
    return out


def truth(emu: GpsEmulator) -> list[dict]:
    return list(read_truth(emu.run_dir / "truth" / "gps.jsonl"))


def check_fixes_match_truth(fixes: list, recs: dict[int, dict]) -> None:
    for s in fixes:
        r = recs[s.device_t_ns]  # device time exact: the UTC of the fix
        p = s.payload
        assert p["utc_ns"] == s.device_t_ns
        assert p["fix_quality"] == r["fix_quality"]
        if r["fix_quality"] == 0:
            assert math.isnan(p["lat"]) and p["covariance"] is None
            continue
        assert abs(p["lat"] - r["lat"]) < 1e-7 and abs(p["lon"] - r["lon"]) < 1e-7
        if "GGA" in s.meta["sentences"]:
            assert abs(p["alt"] - r["alt"]) <= 0.05 + 1e-9
            assert p["satellites"] == r["satellites"]
            assert p["hdop"] == pytest.approx(r["hdop"])
            assert len(p["covariance"]) == 9 and p["covariance"][0] == pytest.approx(
                (r["hdop"] * 4.0) ** 2)
        if not math.isnan(p["speed_mps"]):
            assert abs(p["speed_mps"] - r["speed"]) < 1e-3
        assert s.host_rx_ns >= r["true_ns"]


def test_registry_knows_gps_nmea():
    assert registry.get("gps.nmea") is NmeaGps


def test_driver_at_10hz_115200_matches_truth(tmp_path):
    emu = make_emu(tmp_path, duration_s=1.5)
    with emu:
        drv = NmeaGps("/gps", emu.uri, NmeaGpsOptions(), rate_hz=10)
        drv.open()
        out = run_driver(emu, drv)
    t = truth(emu)
    recs = {r["device_ns"]: r for r in t if r["type"] == "sample"}
    fixes = [s for s in out if s.stream == "/gps"]
    refs = [s for s in out if s.stream == "/gps/timeref"]
    overrun = [r for r in t if r["type"] == "fault"]  # only on a starved host
    assert all(r["kind"] == "overrun" for r in overrun) and len(overrun) <= 2
    assert len(recs) + len(overrun) == 15
    assert sorted(s.device_t_ns for s in fixes) == sorted(recs)
    check_fixes_match_truth(fixes, recs)
    c = drv.counters.as_dict()
    assert c["received"] == len(recs) and c["sentences"] == 5 * len(recs)
    assert c["gaps"] == len(overrun)
    assert c["corrupt"] == c.get("garbage_bytes", 0) == c.get("late_sentences", 0) == 0
    # the time reference: one per epoch; arrival of the first byte, soon after the
    # emulator wrote it (scheduling delay only; the burst itself lasts ~25 ms)
    assert [r.payload["utc_ns"] for r in refs] == [s.device_t_ns for s in fixes]
    for s in refs:
        r = recs[s.payload["utc_ns"]]
        assert s.payload["first_msg"] == "RMC" and s.payload["host_rx_ns"] == s.host_rx_ns
        assert 0 <= s.host_rx_ns - r["tx_start_ns"] < 50_000_000
    assert [i.name for i in drv.streams()] == ["/gps", "/gps/timeref"]
    assert drv.streams()[1].params["schema"] == "edgecap.TimeRef"


def test_driver_at_1hz_9600_with_emulated_pps(tmp_path):
    emu = make_emu(tmp_path, duration_s=2.2, rate_hz=1, baud=9600, start_in_s=0.2)
    with emu:
        path, _ = parse_serial_uri(emu.uri, 9600)
        drv = NmeaGps("/gps", path, NmeaGpsOptions(baud=9600, pps=emu.pps_uri))  # plain path
        drv.open()
        out = run_driver(emu, drv)
    t = truth(emu)
    recs = {r["device_ns"]: r for r in t if r["type"] == "sample"}
    fixes = [s for s in out if s.stream == "/gps"]
    assert len(recs) == 3 and sorted(s.device_t_ns for s in fixes) == sorted(recs)
    check_fixes_match_truth(fixes, recs)
    assert drv.counters["gaps"] == 0 and drv.counters["corrupt"] == 0
    # the burst of ~350 bytes takes ~0.36 s at 9600 baud: the fix sample is handed out
    # only after its last sentence, but its host_rx_ns is the first byte's arrival
    for s in fixes:
        r = recs[s.device_t_ns]
        assert r["true_ns"] < s.host_rx_ns
        assert abs(s.host_rx_ns - r["tx_start_ns"]) < 50_000_000  # ≪ the 0.3 s burst
    pps = [s.payload for s in out if s.stream == "/gps/timeref" and s.payload["kind"] == "pps"]
    edges = {r["seq"]: r for r in t if r["type"] == "pps"}
    assert len(pps) >= 2 and [p["pps_seq"] for p in pps] == list(
        range(pps[0]["pps_seq"], pps[0]["pps_seq"] + len(pps)))
    for p in pps:
        e = edges[p["pps_seq"]]
        assert p["host_rx_ns"] == e["assert_mono_ns"]
        if p["utc_ns"] is not None:  # labelled from the NMEA of the previous epoch
            assert p["utc_ns"] == e["utc_ns"]
    assert sum(p["utc_ns"] is not None for p in pps) >= 1
    assert drv.counters["pps_events"] == len(pps) and drv.counters["pps_missed"] == 0


def test_injected_faults_show_up_exactly_in_the_counters(tmp_path):
    faults = [Fault(kind="bad_checksum", t_s=0.2, duration_s=0.5, rate=0.5),
              Fault(kind="garbage", t_s=0.8, duration_s=0.4, rate=0.7),
              Fault(kind="outage", t_s=1.3, duration_s=0.3),
              Fault(kind="dropout", t_s=1.7, duration_s=0.4, rate=0.6),
              Fault(kind="truncate", t_s=2.2, duration_s=0.3, rate=0.3),
              Fault(kind="corrupt", t_s=2.5, duration_s=0.3, rate=0.3)]
    emu = make_emu(tmp_path, duration_s=3.0, faults=faults)
    with emu:
        drv = NmeaGps("/gps", emu.uri, NmeaGpsOptions(), rate_hz=10)
        drv.open()
        out = run_driver(emu, drv)
    t = truth(emu)
    recs = {r["device_ns"]: r for r in t if r["type"] == "sample"}
    dropped = [r for r in t if r["type"] == "fault" and r["kind"] == "dropout"]
    # on a starved host the emulator may also skip an epoch it could not send in time
    omitted = [r for r in t if r["type"] == "fault" and r["kind"] in ("dropout", "overrun")]
    assert emu.sent["corrupted"] > 5 and emu.sent["garbage_bytes"] > 50 and dropped
    c = drv.counters.as_dict()
    assert c["corrupt"] == sum(r["corrupted"] for r in recs.values()) == emu.sent["corrupted"]
    assert c["garbage_bytes"] == emu.sent["garbage_bytes"]
    assert c["no_fix"] == emu.sent["no_fix"] == sum(r["fix_quality"] == 0
                                                    for r in recs.values()) > 0
    assert len(dropped) == emu.sent["dropped"]
    assert c["gaps"] == len(omitted), (c, omitted)
    assert all(g["cause"] == "missing_epochs" for g in drv.gap_events)
    fixes = [s for s in out if s.stream == "/gps"]
    check_fixes_match_truth(fixes, recs)
    # an epoch loses its fix only when both GGA and RMC were damaged
    lost = {u for u, r in recs.items()
            if {"GGA", "RMC"} <= {i.split(":")[0] for i in r["corrupted_ids"]}}
    assert {s.device_t_ns for s in fixes} == set(recs) - lost
    assert c["received"] == len(recs) - len(lost)


def test_driver_survives_a_disconnect_and_records_the_gap(tmp_path):
    emu = make_emu(tmp_path, duration_s=2.0,
                   faults=[Fault(kind="disconnect", t_s=0.6, duration_s=0.5)])
    with emu:
        drv = NmeaGps("/gps", emu.uri, NmeaGpsOptions(), rate_hz=10)
        drv.open()
        out = run_driver(emu, drv, reopen=True)
    t = truth(emu)
    recs = {r["device_ns"]: r for r in t if r["type"] == "sample"}
    fixes = sorted(s.device_t_ns for s in out if s.stream == "/gps")
    check_fixes_match_truth([s for s in out if s.stream == "/gps"], recs)
    assert drv.errors_seen and "serial port lost" in str(drv.errors_seen[0])
    assert drv.counters["reconnects"] >= 1
    missing = (fixes[-1] - fixes[0]) // emu.period_ns + 1 - len(fixes)
    lost_in_fault = sum(1 for r in t if r["type"] == "fault" and r["kind"] == "disconnect")
    assert missing >= lost_in_fault == 5
    # a reopen mid-burst can catch the tail of an epoch: timed, but no GGA/RMC, no fix
    c = drv.counters.as_dict()
    assert c["gaps"] + c.get("incomplete_epochs", 0) == missing, c
    causes = [g["cause"] for g in drv.gap_events]
    overrun = sum(1 for r in t if r["type"] == "fault" and r["kind"] == "overrun")
    assert causes.count("disconnect") == 1  # others only from a starved emulator
    assert causes.count("missing_epochs") == len(causes) - 1 <= overrun
    assert fixes[-1] == max(recs)  # capture went on to the end


# -- opening ---------------------------------------------------------------------------
def test_uri_forms():
    assert parse_serial_uri("serial:///dev/ttyUSB0?baud=115200", 9600) == ("/dev/ttyUSB0",
                                                                         115200)
    assert parse_serial_uri("/dev/ttyACM0", 4800) == ("/dev/ttyACM0", 4800)
    for bad in ("udp://1.2.3.4", "serial://?baud=9600", "serial:///dev/x?baud=fast",
                "serial:///dev/x?baud=1234"):
        with pytest.raises(DriverError):
            parse_serial_uri(bad, 9600)
    with pytest.raises(ValueError):
        NmeaGpsOptions(baud=1000)
    with pytest.raises(ValueError, match="dcd:"):
        NmeaGpsOptions(pps="gpsd://localhost")
    assert NmeaGpsOptions(pps="dcd:").pps == "dcd:"


def test_missing_device_has_a_clear_error():
    drv = NmeaGps("/gps", "serial:///dev/ttyUSB_nope?baud=9600")
    with pytest.raises(DriverError, match="no such serial device.*plugged in"):
        drv.open()


def test_permission_denied_names_the_dialout_group(monkeypatch):
    def deny(*a, **k):
        raise serial.SerialException(errno.EACCES, "could not open port: Permission denied")

    monkeypatch.setattr(serial, "Serial", deny)
    with pytest.raises(DriverError, match="not in group dialout"):
        NmeaGps("/gps", "/dev/ttyS0").open()


# -- PPS sources -------------------------------------------------------------------------
def test_pps_fdata_layout_and_ioctl_number():
    if struct.calcsize("P") == 8:
        assert PPS_FDATA.size == 64 and PPS_FETCH == 0xC00870A4
    buf = pack_pps_fdata(1.25)
    assert len(buf) == PPS_FDATA.size
    assert PPS_FDATA.unpack(bytes(buf))[-3:] == (1, 250_000_000, 0)
    assert PPS_FDATA.unpack(bytes(pack_pps_fdata(None)))[-1] == 1  # PPS_TIME_INVALID
    out = PPS_FDATA.pack(42, 7, 1_700_000_000, 123_456_789, 0, 1_700_000_000, 5, 0, 0x11,
                         0, 0, 0)
    assert unpack_pps_fdata(out) == (42, 1_700_000_000_123_456_789, 7, 1_700_000_000_000_000_005)


def test_linux_pps_fetch_with_a_fake_device(tmp_path):
    fake = tmp_path / "pps0"
    fake.write_bytes(b"")
    replies = [(errno.ETIMEDOUT, None), (0, 5), (0, 5), (0, 6)]
    calls = []

    def ioctl(fd, req, buf, mutate):
        assert req == PPS_FETCH and mutate and isinstance(buf, bytearray)
        calls.append(PPS_FDATA.unpack(bytes(buf))[-3:])
        err, seq = replies.pop(0) if replies else (errno.ETIMEDOUT, None)
        if err:
            raise OSError(err, os.strerror(err))
        rt = time.time_ns()
        buf[:] = PPS_FDATA.pack(seq, 0, rt // NS, rt % NS, 0, 0, 0, 0, 1, 0, 0, 0)
        return 0

    src = LinuxPps(str(fake), ioctl=ioctl)
    a = src.fetch(1.0)
    b = src.fetch(0.05)  # a timeout-0-style repeat of seq 5 is not a new edge... then 6
    assert a is not None and a.seq == 5 and abs(a.mono_ns - time.monotonic_ns()) < 50_000_000
    assert b is not None and b.seq == 6
    assert src.fetch(0.05) is None  # only timeouts left
    assert calls[0][2] == 0 and 0 < calls[0][0] * NS + calls[0][1] <= NS
    src.close()
    src.close()


def test_linux_pps_missing_device_hint():
    with pytest.raises(DriverError, match="no such PPS device.*ldattach"):
        open_pps("/dev/pps_nope")


@pytest.mark.skipif(not os.path.exists("/dev/pps0"), reason="no /dev/pps0 on this host "
                    "(needs a PPS device: pps-gpio or a serial line with ldattach 18)")
def test_linux_pps_live():
    with open_pps("/dev/pps0") as src:
        ev = src.fetch(2.0)
    assert ev is not None and ev.seq > 0


def test_serial_dcd_on_a_pty_says_there_is_no_dcd():
    m, s = os.openpty()
    try:
        with pytest.raises(DriverError, match="no modem-status lines.*pty"):
            open_pps("dcd:", os.ttyname(s))
        with pytest.raises(DriverError, match="no modem-status lines"):
            SerialDcdPps(os.ttyname(s), mode="poll")
    finally:
        os.close(m)
        os.close(s)
    with pytest.raises(DriverError, match="no serial port"):
        open_pps("dcd:")


def test_open_pps_picks_the_implementation(tmp_path):
    emu = make_emu(tmp_path, 5.0)
    src = open_pps(emu.pps_uri)
    assert isinstance(src, EmulatedPps) and src.spec == emu.pps_spec
    src.close()
    emu.stop()
    for bad in ("gpsd://localhost", "pps:emulated?epoch_ns=x"):
        with pytest.raises(DriverError):
            open_pps(bad)


# -- the NMEA byte path, property tests ----------------------------------------------------
_SAMPLE = (b"$GPRMC,123519.00,A,4807.03800,N,01131.00000,E,0.022,84.40,230394,,,A*50\r\n"
           b"$GPGGA,123519.00,4807.03800,N,01131.00000,E,1,08,0.90,545.4,M,46.9,M,,*69\r\n"
           b"$GPZDA,123519.00,23,03,1994,00,00*6B\r\n")


def _fixed(line: bytes) -> bytes:
    """Recompute the checksum of a ``$...*XX\\r\\n`` line."""
    body = line[1:line.index(b"*")]
    cs = 0
    for c in body:
        cs ^= c
    return b"$" + body + b"*%02X\r\n" % cs


VALID = [_fixed(ln + b"\r\n") for ln in _SAMPLE.split(b"\r\n") if ln]


def test_sample_sentences_decode():
    eps, c = decode_bytes(b"".join(VALID))
    assert c["sentences"] == 3 and c["corrupt"] == 0 and len(eps) == 1
    assert eps[0].utc_ns == 764426119 * NS  # 1994-03-23 12:35:19 UTC


def test_arrival_is_back_dated_within_a_read_by_the_byte_time():
    c = Counters()
    dec = NmeaDecoder(c, char_ns=1_000_000)  # 10 kbaud
    data = b"junk" + b"".join(VALID)
    t_read = 10_000_000_000
    eps = dec.feed(data, t_read) + dec.flush()
    # the '$' is byte 4 of the read: it arrived (len - 1 - 4) byte times before the read
    assert eps[0].rx_ns == t_read - (len(data) - 5) * 1_000_000
    # never before the previous read returned
    dec2 = NmeaDecoder(Counters(), char_ns=1_000_000)
    dec2.feed(b"xx", t_read - 3_000_000)
    eps = dec2.feed(data, t_read) + dec2.flush()
    assert eps[0].rx_ns == t_read - 3_000_000


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(1, 64))
def test_random_bytes_never_raise_and_chunking_does_not_matter(data, chunk):
    eps1, c1 = decode_bytes(data, chunk=chunk)
    eps2, c2 = decode_bytes(data, chunk=len(data) or 1)
    assert c1.as_dict() == c2.as_dict()
    assert [e.utc_ns for e in eps1] == [e.utc_ns for e in eps2]
    assert c1["garbage_bytes"] <= len(data)
    assert c1["garbage_bytes"] + c1["corrupt"] <= len(data)


_garbage = st.binary(max_size=30).map(lambda b: b.replace(b"$", b"#"))


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(_garbage, st.sampled_from(VALID)), max_size=12), _garbage,
       st.integers(1, 50))
def test_garbage_between_sentences_is_counted_exactly(parts, tail, chunk):
    data = b"".join(g + s for g, s in parts) + tail
    eps, c = decode_bytes(data, chunk=chunk)
    assert c["sentences"] == len(parts)
    assert c["garbage_bytes"] == sum(len(g) for g, _ in parts) + len(tail)
    assert c["corrupt"] == 0


def test_a_splice_that_passes_the_checksum_is_not_a_fix():
    # "$GPZDA,12" + "3519.00,23,03,1994,00,00*6C" read as "$GPRMC,3519.00,…*6C": the XOR
    # checksum of "GPZDA,12" equals that of "GPRMC," — a lost run of bytes made a sentence
    # that passes its checksum; its fields (6 for an RMC, time "3519.00") give it away
    assert parse_sentence(b"$GPRMC,3519.00,23,03,1994,00,00*6C\r\n") is None
    stream = b"".join(VALID) * 3
    eps, c = decode_bytes(stream[:193] + stream[343:], chunk=1)
    assert all(e.utc_ns == 764426119 * NS for e in eps) and c["corrupt"] >= 1


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_truncated_and_spliced_streams_never_raise(data):
    stream = b"".join(VALID) * 3
    cut = data.draw(st.integers(0, len(stream)))
    cut2 = data.draw(st.integers(0, len(stream)))
    spliced = stream[:cut] + stream[cut2:]
    eps, c = decode_bytes(spliced, chunk=data.draw(st.integers(1, 40)))
    assert c["sentences"] <= 9 + 9
    # every well-formed sentence of the splice is decoded, the cut one is counted
    whole = spliced.count(b"\r\n")
    assert c["sentences"] + c["corrupt"] >= whole - 1
    assert all(e.utc_ns in (None, 764426119 * NS) for e in eps)


def test_counters_class_is_shared():
    c = Counters()
    decode_bytes(b"xx" + VALID[0], counters=c)
    assert c["garbage_bytes"] == 2 and c["sentences"] == 1


def _pty_driver() -> tuple[int, int, NmeaGps]:
    m, s = os.openpty()
    drv = NmeaGps("/gps", f"serial://{os.ttyname(s)}?baud=115200", NmeaGpsOptions(),
                  rate_hz=1)
    drv.open()
    return m, s, drv


def _drain(drv: NmeaGps, m: int, data: bytes) -> dict:
    """Write ``data`` to the pty's other end and read until the driver has taken it."""
    out: list = []
    th = threading.Thread(target=lambda: out.extend(drv), daemon=True)
    th.start()
    os.write(m, data)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and drv.counters["sentences"] < 3:
        time.sleep(0.02)
    drv.close()
    th.join(3)
    return drv.counters.as_dict()


def test_opening_the_port_mid_sentence_is_not_garbage():
    """The receiver was talking before we listened: the tail of its sentence before the
    first ``$`` is skipped and counted as such, not as line noise."""
    m, s, drv = _pty_driver()
    try:
        tail = VALID[0][20:]
        c = _drain(drv, m, tail + b"".join(VALID))
    finally:
        os.close(m)
        os.close(s)
    assert c["startup_skipped_bytes"] == len(tail) and c["sentences"] == 3
    assert c.get("garbage_bytes", 0) == 0 and c["corrupt"] == 0


def test_a_line_that_never_sends_a_sentence_start_is_garbage_after_a_frame():
    m, s, drv = _pty_driver()
    try:
        noise = b"\x00\x11" * 400
        c = _drain(drv, m, noise + b"".join(VALID))
    finally:
        os.close(m)
        os.close(s)
    assert c["startup_skipped_bytes"] == 256
    assert c["garbage_bytes"] == len(noise) - 256 and c["sentences"] == 3
