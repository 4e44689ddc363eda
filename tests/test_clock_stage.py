"""ClockStage (per-stream choice of mapping, quality, quality samples) and Timebase (kinds,
PTP device errors, UTC mapping from chrony / the kernel)."""

from __future__ import annotations

import json
import os
import stat
import threading
import time

import numpy as np
import pytest
from pydantic import ValidationError

from agent.clock import (QUALITY_SCHEMA, UTC_SCHEMA, UTC_TOPIC, ClockOptions, ClockStage,
                         Timebase, TimebaseError, kernel_clock_sync, parse_chrony_tracking,
                         ptp_clock_id, quality_topic, system_clock_sync)
from agent.errors import DriverError
from agent.schemas import codec_for
from agent.types import Sample, StreamInfo, StreamKind

MONO0 = 5 * 10**12


def feed(stage: ClockStage, name: str, n: int, rate: float, *, ppm: float = 0.0,
         offset_ns: int = 0, seed: int = 0, device: bool = True, payload=None,
         flag: bool = False) -> list[tuple[Sample, int]]:
    """Stamp ``n`` samples of a simulated device; returns (sample, true time) pairs."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        true = MONO0 + int(i * 1e9 / rate)
        dev = offset_ns + true + int((true - MONO0) * ppm * 1e-6) if device else None
        rx = true + int(rng.exponential(2e6))
        s = Sample(name, b"" if payload is None else payload, rx, dev, i)
        stage.stamp(s, flag)
        out.append((s, true))
    return out


def test_device_clock_is_timebase_passes_through():
    stage = ClockStage(Timebase())
    s = Sample("/cam", b"", host_rx_ns=123, device_t_ns=456)
    stage.stamp(s, True)
    assert s.t_ns == 456
    q = stage.quality("/cam")
    assert q["source"] == "device=timebase" and q["state"] == "device=timebase"
    assert q["samples"] == 1


def test_device_time_goes_through_the_estimator():
    stage = ClockStage(Timebase())
    pairs = feed(stage, "/lidar", 900, 10.0, ppm=80.0, offset_ns=7200 * 10**9, seed=1)
    errs = [s.t_ns - t for s, t in pairs[600:]]
    assert np.percentile(np.abs(errs), 99) <= 100_000
    q = stage.summary()["/lidar"]
    assert q["source"] == "estimator" and q["state"] == "locked"
    last, true_last = pairs[-1]
    assert abs(q["offset_ns"] - (true_last - last.device_t_ns)) < 100_000
    assert abs(q["skew_ppm"] + 80.0) < 2.0 and q["samples"] == 900


def test_no_device_time_is_arrival_minus_configured_latency():
    stage = ClockStage(Timebase(), {"latency_ms": {"/gps": 12.5}})
    pairs = feed(stage, "/gps", 50, 10.0, device=False)
    for s, _ in pairs:
        assert s.t_ns == s.host_rx_ns - 12_500_000
    q = stage.quality("/gps")
    assert q["source"] == "arrival" and q["state"] == "arrival" and q["uncertainty_ns"] is None


def test_realtime_timebase_maps_arrival_onto_it():
    stage = ClockStage(Timebase("realtime"))
    now_mono = time.monotonic_ns()
    s = Sample("/x", b"", host_rx_ns=now_mono)
    stage.stamp(s, False)
    assert abs(s.t_ns - time.time_ns()) < 50_000_000


def test_bad_device_times_are_counted_not_raised():
    stage = ClockStage(Timebase())
    feed(stage, "/cam", 20, 30.0, seed=2)
    for bad in (1.5e9, "12", True):
        s = Sample("/cam", b"", host_rx_ns=MONO0 + 10**9, device_t_ns=bad)  # type: ignore
        stage.stamp(s, False)
        assert s.t_ns == s.host_rx_ns  # arrival time, this sample only
    q = stage.quality("/cam")
    assert q["bad_device_time"] == 3 and q["no_device_time"] == 3
    assert q["source"] == "estimator"


def test_audio_stream_learns_from_block_end_and_reports_drift():
    rate, block, ppm = 48_000, 960, -55.0
    stage = ClockStage(Timebase())
    stage.configure_stream(StreamInfo("/mic", StreamKind.AUDIO, "pcm-s16", rate_hz=50.0,
                                      params={"sample_rate": rate}))
    real = rate * (1 + ppm * 1e-6)
    rng = np.random.default_rng(3)
    pcm = np.zeros((block, 1), dtype=np.int16)
    errs = []
    for k in range(50 * 80):
        idx = k * block
        first_true = MONO0 + int(idx / real * 1e9)
        end_true = MONO0 + int((idx + block) / real * 1e9)
        s = Sample("/mic", pcm, end_true + int(rng.exponential(2e6)),
                   device_t_ns=idx * 10**9 // rate, seq=k)
        stage.stamp(s, False)
        if k >= 50 * 60:
            errs.append(s.t_ns - first_true)
    assert np.percentile(np.abs(errs), 99) <= 100_000
    q = stage.quality("/mic")
    assert q["source"] == "sample-count" and abs(q["drift_ppm"] - ppm) < 1.0
    assert q["nominal_rate_hz"] == rate


def test_quality_stream_infos_and_samples():
    stage = ClockStage(Timebase())
    for name in ("/camera/front", "/lidar/top"):
        stage.configure_stream(StreamInfo(name, StreamKind.CAMERA, "jpeg", rate_hz=30.0))
    infos = {i.name: i for i in stage.quality_stream_infos()}
    assert set(infos) == {"/clock/camera/front", "/clock/lidar/top", UTC_TOPIC}
    assert infos["/clock/camera/front"].kind == StreamKind.CLOCK
    assert infos["/clock/camera/front"].params["schema"] == QUALITY_SCHEMA
    assert infos[UTC_TOPIC].params["schema"] == UTC_SCHEMA
    assert quality_topic("gps") == "/clock/gps"

    feed(stage, "/camera/front", 100, 30.0, ppm=10.0, seed=4)
    now = 10**13
    first = stage.poll_quality(now)
    assert [s.stream for s in first] == ["/clock/camera/front", UTC_TOPIC]
    assert stage.poll_quality(now + 500_000_000) == []  # at most 1 Hz per stream
    again = stage.poll_quality(now + 1_000_000_000, include_utc=False)
    assert [s.stream for s in again] == ["/clock/camera/front"]
    q = first[0]
    assert q.t_ns == now and q.payload["stream"] == "/camera/front"
    assert q.payload["state"] in ("acquiring", "locked")
    for s in first:  # the recorder's JSON codec takes them as they are
        info = infos[s.stream]
        doc = json.loads(codec_for(info).encode(s, info))
        assert doc == json.loads(json.dumps(s.payload))
    utc = first[1].payload
    assert utc["timebase"] == "monotonic"
    assert abs(utc["timebase_ns"] + utc["utc_minus_timebase_ns"] - time.time_ns()) < 10**9


def test_options_are_validated():
    with pytest.raises(ValidationError):
        ClockStage(Timebase(), {"window": 30})
    with pytest.raises(ValidationError):
        ClockOptions(quality_period_s=0.1)
    p = ClockOptions(window_s=30, latency_ms={"/mic": 21.3}).params("/mic")
    assert p.window_s == 30 and p.latency_ns == 21_300_000


def test_reset_stream_restarts_its_estimator():
    stage = ClockStage(Timebase())
    feed(stage, "/lidar", 100, 10.0, seed=5)
    stage.reset_stream("/lidar")
    stage.reset_stream("/unknown")  # harmless
    assert stage.quality("/lidar")["resets"] == 1


def test_driver_discontinuity_resets_and_relocks_at_once():
    # an audio device reopened: its sample count (device clock) starts again from 0
    stage = ClockStage(Timebase())
    feed(stage, "/mic", 600, 50.0, ppm=30.0, offset_ns=-MONO0, seed=6)
    t_reopen = MONO0 + 20 * 10**9
    s = Sample("/mic", b"", t_reopen + 1_000_000, device_t_ns=0,
               meta={"discontinuity": True, "epoch": 1})
    stage.stamp(s, False)
    assert abs(s.t_ns - t_reopen) <= 1_000_000
    q = stage.quality("/mic")
    assert q["resets"] == 1 and q["jumps"] == 0


def test_concurrent_streams_and_readers():
    stage = ClockStage(Timebase())
    errors: list[BaseException] = []

    def writer(name: str) -> None:
        try:
            feed(stage, name, 3000, 1000.0, ppm=20.0, seed=hash(name) & 0xFFFF)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(f"/s{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        stage.summary()
        stage.poll_quality(time.monotonic_ns(), include_utc=False)
    for t in threads:
        t.join()
    assert not errors
    assert {k: v["samples"] for k, v in stage.summary().items()} == {
        "/s0": 3000, "/s1": 3000, "/s2": 3000}


# -- timebase ------------------------------------------------------------------------------
def test_timebase_kinds():
    mono = Timebase()
    assert mono.from_monotonic(42) == 42
    rt = Timebase("realtime")
    m = time.monotonic_ns()
    assert abs(rt.from_monotonic(m) - time.time_ns()) < 10_000_000
    tai = Timebase("tai")
    d = tai.describe()
    assert d["timebase"] == "tai" and isinstance(d["tai_minus_utc_s"], int)
    with pytest.raises(TimebaseError):
        Timebase("gps")


def test_ptp_device_errors_are_clear():
    assert ptp_clock_id(3) == -29  # ((~3) << 3) | 3
    with pytest.raises(TimebaseError, match="does not exist"):
        Timebase("ptp", "/dev/ptp-nonexistent")
    with pytest.raises(DriverError, match="not a readable PTP clock"):
        Timebase("ptp", "/dev/null")


def test_parse_chrony_tracking():
    line = ("C0A80001,192.168.0.1,2,1700000000.123456789,-0.000012345,0.000001234,"
            "0.000023456,-12.345,0.001,0.012,0.004000000,0.000500000,64.2,Normal")
    rep = parse_chrony_tracking(line)
    assert rep is not None and rep["source"] == "chrony" and rep["sync"] == "synchronized"
    assert rep["error_bound_ns"] == int((0.000012345 + 0.0005 + 0.002) * 1e9)
    unsynced = line.replace("Normal", "Not synchronised").replace(",2,", ",0,", 1)
    assert parse_chrony_tracking(unsynced)["error_bound_ns"] is None
    assert parse_chrony_tracking("506 Cannot talk to daemon") is None


def test_utc_mapping_prefers_chrony(tmp_path, monkeypatch):
    fake = tmp_path / "chronyc"
    fake.write_text("#!/bin/sh\necho 'C0A80001,ntp.example,3,1700000000.0,0.000100000,"
                    "0.0,0.0,1.0,0.0,0.0,0.010000000,0.001000000,64.0,Normal'\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    m = Timebase("realtime").utc_mapping()
    assert m["source"] == "chrony" and m["utc_minus_timebase_ns"] == 0
    assert 6_100_000 <= m["uncertainty_ns"] < 6_200_000  # 0.1 + 1 + 10/2 ms + read gap


def test_utc_mapping_without_chrony_is_honest(tmp_path, monkeypatch):
    broken = tmp_path / "chronyc"
    broken.write_text("#!/bin/sh\necho '506 Cannot talk to daemon' >&2\nexit 1\n")
    broken.chmod(broken.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    rep = system_clock_sync()
    assert rep["source"] in ("adjtimex", "system")
    kern = kernel_clock_sync()
    if kern is not None:  # no bound is claimed for a clock the kernel says is unsynced
        assert (kern["error_bound_ns"] is None) == (kern["sync"] != "synchronized")
    m = Timebase().utc_mapping()
    assert (m["uncertainty_ns"] is None) == (rep["error_bound_ns"] is None)


PMC_OUT = """sending: GET TIME_STATUS_NP
\tec4670.fffe.0c5a74-1 seq 0 RESPONSE MANAGEMENT TIME_STATUS_NP
\t\tmaster_offset              -23
\t\tingress_time               1577836800123456789
\t\tcumulativeScaledRateOffset +0.000000000
\t\tscaledLastGmPhaseChange    0
\t\tgmTimeBaseIndicator        0
\t\tlastGmPhaseChange          0x0000'0000000000000000.0000
\t\tgmPresent                  true
\t\tgmIdentity                 001122.fffe.334455
sending: GET TIME_PROPERTIES_DATA_SET
\tec4670.fffe.0c5a74-1 seq 1 RESPONSE MANAGEMENT TIME_PROPERTIES_DATA_SET
\t\tcurrentUtcOffset      37
\t\tleap61                0
\t\tleap59                0
\t\tcurrentUtcOffsetValid 1
\t\tptpTimescale          1
\t\ttimeTraceable         1
\t\tfrequencyTraceable    1
\t\ttimeSource            0x20
"""


def test_ptp4l_state_is_read_through_pmc(tmp_path, monkeypatch):
    from agent.clock import ptp4l_state, ptp_utc_offset

    fake = tmp_path / "pmc"
    (tmp_path / "out.txt").write_text(PMC_OUT)
    fake.write_text(f"#!/bin/sh\n[ \"$1 $2 $3\" = '-u -b 0' ] || exit 2\ncat {tmp_path}/out.txt\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    st = ptp4l_state()
    assert st == {"gm_present": True, "gm_identity": "001122.fffe.334455",
                  "master_offset_ns": -23, "utc_offset_s": 37, "ptp_timescale": True}
    # a PHC on the PTP timescale is TAI: UTC = PHC - 37 s, within |master offset|
    assert ptp_utc_offset(st) == (-37_000_000_000, 23)
    assert ptp_utc_offset({**st, "gm_present": False}) is None  # free-running: no claim
    assert ptp_utc_offset({**st, "ptp_timescale": False}) is None  # ARB timescale
    # ptp4l not running: pmc answers nothing
    fake.write_text("#!/bin/sh\necho 'sending: GET TIME_STATUS_NP'\n")
    assert ptp4l_state() is None
