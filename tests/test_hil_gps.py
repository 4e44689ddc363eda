"""The GPS emulator on its real interface: a serial pty read with pyserial, paced at the
baud rate, with truth, faults, disconnects and an emulated PPS."""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path

import pytest
import serial
from pynmeagps import NMEAReader

from agent.errors import ConfigError
from drivers.gps import parse_serial_uri
from drivers.pps import NS, EmulatedPps, EmulatedPpsSpec
from hil.emulators.gps import GpsEmulator
from hil.scenario import Fault, load_scenario
from hil.truth import read_truth
from hil.world import World


def make_emu(tmp_path: Path, duration_s: float, rate_hz: float = 10, baud: int = 115200,
             faults: list[Fault] | None = None, start_in_s: float = 0.2, seed: int | None = None,
             **options) -> GpsEmulator:
    sc = load_scenario("city-drive", duration_s=duration_s)
    if seed is not None:
        sc = sc.model_copy(update={"seed": seed})
    gs = sc.devices.gps.model_copy(update={"rate_hz": rate_hz, "faults": faults or [],
                                           "options": {"baud": baud, **options}})
    return GpsEmulator(World(sc), gs, tmp_path, time.monotonic_ns() + int(start_in_s * NS))


def read_for(ser: serial.Serial, seconds: float) -> list[tuple[int, bytes]]:
    """(monotonic ns after the read, bytes) for every non-empty read."""
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        b = ser.read(ser.in_waiting or 1)
        if b:
            out.append((time.monotonic_ns(), b))
    return out


def truth(emu: GpsEmulator) -> list[dict]:
    return list(read_truth(emu.run_dir / "truth" / "gps.jsonl"))


def test_pyserial_reads_valid_nmea_from_the_pty(tmp_path):
    emu = make_emu(tmp_path, duration_s=1.0)
    with emu:
        assert emu.uri.startswith("serial://") and emu.uri.endswith("?baud=115200")
        path, baud = parse_serial_uri(emu.uri, 9600)
        assert os.path.realpath(path).startswith("/dev/pts/")
        with serial.Serial(path, baud, timeout=0.05) as ser:
            ser.reset_input_buffer()
            assert emu.done.wait(3.0)
            reads = read_for(ser, 0.2)
    data = b"".join(b for _, b in reads)
    lines = data.splitlines(keepends=True)
    msgs = [NMEAReader.parse(ln) for ln in lines]  # raises on a bad checksum
    assert {m.msgID for m in msgs} == {"GGA", "RMC", "ZDA", "GSA", "VTG"}
    recs = [r for r in truth(emu) if r["type"] == "sample"]
    overrun = [r for r in truth(emu) if r["type"] == "fault" and r["kind"] == "overrun"]
    assert len(recs) + len(overrun) == 10 and len(overrun) <= 2  # overrun: starved host only
    assert emu.sent["sentences"] == len(lines) == 5 * len(recs)
    gga = [m for m in msgs if m.msgID == "GGA"]
    for m, r in zip(gga, recs):
        day = dt.datetime.fromtimestamp(r["device_ns"] // NS, dt.timezone.utc)
        assert (m.time.hour, m.time.minute, m.time.second) == (day.hour, day.minute, day.second)
        assert m.time.microsecond * 1000 == r["device_ns"] % NS
        assert abs(m.lat - r["lat"]) < 1e-7 and abs(m.lon - r["lon"]) < 1e-7
        assert m.numSV == r["satellites"] and m.HDOP == pytest.approx(r["hdop"])
    # UTC epochs sit on whole tenths of a second, and t = 0 is a whole UTC second
    ts = [r for r in truth(emu) if r["type"] == "timescale"][0]
    assert ts["utc_at_t0_ns"] % NS == 0
    assert all(r["device_ns"] % 100_000_000 == 0 for r in recs)


def test_bytes_leave_at_the_baud_rate(tmp_path):
    emu = make_emu(tmp_path, duration_s=0.5, rate_hz=1, baud=9600)
    with emu:
        path, baud = parse_serial_uri(emu.uri, 9600)
        assert baud == 9600
        with serial.Serial(path, baud, timeout=0.05) as ser:
            ser.reset_input_buffer()
            reads = read_for(ser, 0.8)
    n = sum(len(b) for _, b in reads)
    rec = [r for r in truth(emu) if r["type"] == "sample"][0]
    assert n == rec["bytes"] > 250
    span_s = (reads[-1][0] - reads[0][0]) / NS
    wire_s = (n - 1) * 10 / 9600
    assert 0.9 * wire_s < span_s < wire_s + 0.1
    # the burst starts after the fix instant by the receiver latency (25 ms) + jitter
    assert 0.02 < (reads[0][0] - rec["true_ns"]) / NS < 0.1


def test_truth_is_deterministic_for_a_seed(tmp_path):
    faults = [Fault(kind="bad_checksum", t_s=0.0, duration_s=5, rate=0.3),
              Fault(kind="garbage", t_s=0.0, duration_s=5, rate=0.3),
              Fault(kind="truncate", t_s=0.0, duration_s=5, rate=0.2)]

    def burst_series(sub: str, seed: int) -> list[bytes]:
        emu = make_emu(tmp_path / sub, 5.0, faults=faults, seed=seed,
                       utc_start="2024-05-06T10:00:00Z")
        try:
            utc0 = emu.utc_ns(emu.run_t0_ns)
            assert utc0 == 1714989600 * NS
            out = []
            for k in range(40):
                t_s = k * 0.1
                lines = emu.sentences(utc0 + k * emu.period_ns, emu.state(t_s))
                out.append(emu._apply_faults(lines, emu.faults(t_s))[0])
            return out
        finally:
            emu.stop()

    a, b, c = burst_series("a", 7), burst_series("b", 7), burst_series("c", 8)
    assert a == b
    assert a != c


def test_damaged_sentences_fail_their_checksum_and_garbage_has_no_dollar(tmp_path):
    emu = make_emu(tmp_path, 10.0, utc_start="2024-05-06T23:59:59Z")
    lines = emu.sentences(emu.utc_ns(emu.run_t0_ns), emu.state(3.0))
    assert b"060524" in lines[0]  # RMC date before midnight
    for kind in ("bad_checksum", "corrupt", "truncate"):
        fl = {kind: Fault(kind=kind, t_s=0, duration_s=1, rate=1.0)}
        for _ in range(30):
            for k, line in enumerate(lines[:-1]):
                bad, how = emu._damage(line, fl, last=False)
                assert how == kind and bad != line and b"\n" not in bad[:-1]
                if kind == "truncate":
                    assert not bad.endswith(b"\n") and bad.startswith(b"$")
                else:
                    with pytest.raises(Exception):
                        NMEAReader.parse(bad)
    g = {"garbage": Fault(kind="garbage", t_s=0, duration_s=1, rate=1.0)}
    data, info = emu._apply_faults(lines, g)
    assert info["garbage_bytes"] > 0 and len(data) == sum(map(len, lines)) + info["garbage_bytes"]
    assert data.count(b"$") == len(lines)
    emu.stop()


def test_outage_sends_no_fix_sentences(tmp_path):
    emu = make_emu(tmp_path, 2.0)
    st = emu.state(1.0, outage=True)
    msgs = {m.msgID: m for m in map(NMEAReader.parse,
                                    emu.sentences(emu.utc_ns(emu.run_t0_ns), st))}
    assert msgs["GGA"].quality == 0 and msgs["GGA"].lat == ""
    assert msgs["RMC"].status == "V" and msgs["RMC"].lat == ""
    assert msgs["GSA"].navMode == 1 and msgs["VTG"].posMode == "N"
    assert msgs["ZDA"].year >= 2024  # the receiver keeps time without a fix
    emu.stop()


def test_disconnect_closes_the_pty_and_a_new_one_appears(tmp_path):
    emu = make_emu(tmp_path, 1.4, faults=[Fault(kind="disconnect", t_s=0.4, duration_s=0.4)])
    with emu:
        path, baud = parse_serial_uri(emu.uri, 9600)
        first = os.path.realpath(path)
        ser = serial.Serial(path, baud, timeout=0.05)
        got, lost = b"", False
        end = time.monotonic() + 1.0
        while time.monotonic() < end and not lost:
            try:
                got += ser.read(ser.in_waiting or 1)
            except serial.SerialException:
                lost = True
        ser.close()
        assert lost and got.count(b"$GPGGA") >= 3
        while not os.path.exists(path) and time.monotonic() < end + 1.0:
            time.sleep(0.02)
        with serial.Serial(path, baud, timeout=0.05) as ser2:
            data = b"".join(b for _, b in read_for(ser2, 0.35))
        assert os.path.realpath(path) != first or emu.sent["reconnects"] == 1
        assert data.count(b"$GPGGA") >= 2
    t = truth(emu)
    lost_epochs = [r for r in t if r["type"] == "fault" and r["kind"] == "disconnect"]
    assert len(lost_epochs) == emu.sent["disconnected"] == 4
    assert any(r["type"] == "reconnect" for r in t)


def test_a_burst_longer_than_the_epoch_is_dropped_as_overrun(tmp_path):
    emu = make_emu(tmp_path, duration_s=1.0, rate_hz=5, baud=9600, start_in_s=0.0)
    assert emu.burst_ns > emu.period_ns
    with emu:
        path, baud = parse_serial_uri(emu.uri, 9600)
        with serial.Serial(path, baud, timeout=0.05) as ser:
            data = b"".join(b for _, b in read_for(ser, 1.3))
    t = truth(emu)
    assert any(r["type"] == "warning" and r["kind"] == "burst_exceeds_period" for r in t)
    over = [r for r in t if r["type"] == "fault" and r["kind"] == "overrun"]
    assert over and emu.sent["overrun"] == len(over)
    assert emu.sent["epochs"] + len(over) == 5
    assert data.count(b"$GPGGA") == emu.sent["epochs"]


def test_rate_and_options_are_validated(tmp_path):
    with pytest.raises(ConfigError, match="rate_hz"):
        make_emu(tmp_path / "a", 1.0, rate_hz=3)
    with pytest.raises(ConfigError, match="baud"):
        make_emu(tmp_path / "b", 1.0, baud=1234)
    with pytest.raises(ConfigError, match="bogus"):
        make_emu(tmp_path / "c", 1.0, bogus=1)


def test_emulated_pps_edges_follow_whole_utc_seconds(tmp_path):
    emu = make_emu(tmp_path, 60.0, faults=[Fault(kind="outage", t_s=2.5, duration_s=2.0)])
    sp = emu.pps_spec
    assert EmulatedPpsSpec.from_uri(emu.pps_uri) == sp
    s0 = sp.first_s
    assert s0 * NS == emu.utc_ns(emu.run_t0_ns)  # t = 0 is a whole second: first edge
    # the outage covers the edges at t = 3 s and 4 s: no edge, and the sequence goes on
    assert [sp.suppressed(s0 + k) for k in range(6)] == [False] * 3 + [True, True, False]
    assert [sp.seq(s0 + k) for k in (0, 1, 2, 5, 6)] == [1, 2, 3, 4, 5]
    for k in range(5):
        edge = emu.true_of_utc((s0 + k) * NS)
        assert sp.mono_ns((s0 + k) * NS) == edge
        assert 0 <= sp.assert_mono_ns(s0 + k) - edge < 10_000  # ~1 µs jitter
    emu.stop()


def test_emulated_pps_delivers_one_event_a_second(tmp_path):
    emu = make_emu(tmp_path, 60.0, start_in_s=0.0)
    pps = emu.pps()
    evs = [pps.fetch(1.5), pps.fetch(1.5)]
    pps.close()
    emu.stop()
    assert all(evs) and evs[1].seq == evs[0].seq + 1
    sp = emu.pps_spec
    for ev in evs:
        s = sp.first_s + ev.seq - 1
        assert ev.mono_ns == sp.assert_mono_ns(s)
        off = time.time_ns() - time.monotonic_ns()
        assert abs(ev.assert_ns - ev.mono_ns - off) < 2_000_000  # host realtime stamp
    assert abs(evs[1].mono_ns - evs[0].mono_ns - NS) < 20_000
    closed = EmulatedPps(sp)
    closed.close()
    t = time.monotonic()
    assert closed.fetch(1.0) is None and time.monotonic() - t < 0.1
