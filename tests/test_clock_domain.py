"""ClockStage clock domains (a GPS receiver's fixes mapped by its PPS edges, with an
NMEA-arrival fallback) and the span arrival (``meta["span_rx_ns"]``, LiDAR's best packet)."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.clock import ClockStage, Timebase
from agent.types import Sample, StreamInfo, StreamKind

NS = 1_000_000_000
MONO0 = 10**13          # host monotonic at the simulation's start
UTC0 = 1_763_000_000 * NS  # the receiver's UTC at its start (a whole second)
FIX = "/gps"
REF = "/gps/timeref"


def gps_stage(**options) -> ClockStage:
    stage = ClockStage(Timebase(), options)
    stage.configure_stream(StreamInfo(FIX, StreamKind.GPS, "fix", 10.0))
    stage.configure_stream(StreamInfo(REF, StreamKind.TIMEREF, "json", 10.0))
    return stage


def simulate_gps(stage: ClockStage, dur_s: float, *, ppm: float = 60.0,
                 offset_ns: int = 0, latency_ms: float = 25.0, rate_hz: float = 10.0,
                 pps: bool = True, pps_off: tuple[float, float] | None = None,
                 mislabel: frozenset[int] = frozenset(), seed: int = 0
                 ) -> list[tuple[Sample, int, float]]:
    """A receiver whose UTC runs ``ppm`` fast from ``UTC0 + offset_ns``: fixes every
    1/rate of UTC, their NMEA arriving ``latency_ms`` + exponential(2 ms) (1 % spikes of
    50 ms) after the fix instant; PPS edges at whole UTC seconds stamped |N(0, 1 µs)| late
    (the k-th edge labelled a second late when k is in ``mislabel``).
    Feeds the stage in arrival order; returns (fix sample, true instant, scenario s)."""
    rng = np.random.default_rng(seed)
    k = 1 + ppm * 1e-6
    u0 = UTC0 + offset_ns

    def true_of(utc: int) -> int:  # host-monotonic instant the receiver's UTC reads utc
        return MONO0 + int(round((utc - u0) / k))

    events: list[tuple[int, Sample, int | None, float]] = []
    period = int(NS / rate_hz)
    first = -(-u0 // period) * period
    utc = first
    while true_of(utc) < MONO0 + dur_s * NS:
        true = true_of(utc)
        t_s = (true - MONO0) / NS
        delay = latency_ms * 1e6 + rng.exponential(2e6) + (rng.random() < 0.01) * 50e6
        rx = true + int(delay)
        events.append((rx, Sample(REF, {"kind": "nmea"}, rx, device_t_ns=utc), None, t_s))
        events.append((rx, Sample(FIX, {"lat": 0.0}, rx, device_t_ns=utc), true, t_s))
        if pps and utc % NS == 0 and not (pps_off and pps_off[0] <= t_s < pps_off[1]):
            rx_p = true + int(abs(rng.normal(0.0, 1000.0)))
            label = utc + (NS if (utc - first) // NS in mislabel else 0)
            events.append((rx_p, Sample(REF, {"kind": "pps"}, rx_p, device_t_ns=label,
                                        meta={"clock_ref": "pps"}), None, t_s))
        utc += period
    events.sort(key=lambda e: e[0])
    out = []
    for _rx, s, true, t_s in events:
        stage.stamp(s, False)
        if true is not None:
            out.append((s, true, t_s))
    return out


def errs(pairs, after_s: float = 0.0, before_s: float = 1e9) -> np.ndarray:
    return np.array([s.t_ns - true for s, true, t in pairs if after_s <= t < before_s])


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ppm=st.floats(-200.0, 200.0), offset_s=st.integers(-3 * 3600, 3 * 3600),
       latency_ms=st.floats(5.0, 400.0), seed=st.integers(0, 2**31))
def test_fixes_are_mapped_by_the_pps_disciplined_estimator(ppm, offset_s, latency_ms, seed):
    stage = gps_stage()
    pairs = simulate_gps(stage, 30.0, ppm=ppm, offset_ns=offset_s * NS,
                         latency_ms=latency_ms, seed=seed)
    # PPS is ±1 µs; after a few edges the skew is known to ~1 ppm, so a fix up to 1 s after
    # the last edge is off by ~1 µs -- whatever the NMEA latency is
    assert np.percentile(np.abs(errs(pairs, 5.0)), 99) <= 10_000
    q = stage.quality(FIX)
    assert q["source"] == "pps" and q["domain"] == FIX and q["state"] == "locked"
    assert q["ref_samples"] >= 28
    # the NMEA arrivals told the fallback the receiver's latency; nothing fed the PPS line
    assert abs(q["fallback_minus_ref_ns"] - latency_ms * 1e6) <= 3_000_000
    assert stage.quality(REF)["source"] == "pps"


def test_without_pps_fixes_fall_back_to_nmea_arrival_and_say_so():
    stage = gps_stage(latency_ms={FIX: 25.0})
    pairs = simulate_gps(stage, 30.0, pps=False, seed=3)
    q = stage.quality(FIX)
    assert q["source"] == "nmea-arrival" and q["ref_samples"] == 0
    # domain-wide: the fixes and the timeref's NMEA records
    assert q["mapped_by_ref"] == 0 and q["mapped_by_fallback"] == 2 * len(pairs)
    # the envelope finds the fastest NMEA path (25 ms + ~0), and the configured latency
    # takes the 25 ms off: within the envelope's error of the truth
    e = errs(pairs, 10.0)
    assert np.percentile(np.abs(e), 99) <= 1_000_000
    # without the latency setting the fixes sit the receiver's latency late
    stage2 = gps_stage()
    e2 = errs(simulate_gps(stage2, 30.0, pps=False, seed=3), 10.0)
    assert 24_000_000 <= np.median(e2) <= 27_000_000


def test_pps_outage_beyond_holdover_falls_back_and_returns():
    stage = gps_stage(ref_holdover_s=3.0)
    pairs = simulate_gps(stage, 40.0, pps_off=(15.0, 25.0), seed=5)
    src = {}
    for s, _true, t in pairs:
        src[round(t, 1)] = s.t_ns
    # during the outage (after the 3 s holdover) fixes are mapped by their NMEA arrival:
    # the receiver's 25 ms latency shows; before and after, PPS precision
    e_before = errs(pairs, 8.0, 15.0)
    e_hold = errs(pairs, 15.0, 17.9)
    e_out = errs(pairs, 18.2, 25.0)
    e_after = errs(pairs, 26.5, 40.0)
    assert np.max(np.abs(e_before)) <= 10_000
    assert np.max(np.abs(e_hold)) <= 50_000   # extrapolated by the known skew
    assert np.median(e_out) >= 20_000_000
    assert np.max(np.abs(e_after)) <= 10_000
    q = stage.quality(FIX)
    assert q["source"] == "pps" and q["mapped_by_fallback"] > 0 and q["mapped_by_ref"] > 0


def test_mislabelled_references_are_rejected_and_do_not_derail_the_mapping():
    # edges 1, 2 and every 7th after are labelled a second late (their label came from a
    # stale NMEA epoch after a reader stall); edge 0 comes before any NMEA (a driver has no
    # label for it then) and is good
    stage = gps_stage()
    bad = frozenset({1, 2} | set(range(7, 40, 7)))
    pairs = simulate_gps(stage, 40.0, mislabel=bad, seed=13)
    assert np.percentile(np.abs(errs(pairs, 8.0)), 99) <= 10_000
    q = stage.quality(FIX)
    assert q["source"] == "pps" and q["jumps"] == 0
    assert q["ref_rejected"] == len(bad)
    assert abs(q["skew_ppm"] + 60.0 / (1 + 60e-6)) < 1.0


def test_reference_samples_do_not_feed_the_fallback():
    # PPS edges on time and NMEA 100 ms late: if PPS fed the arrival fit, the fallback's
    # envelope would sit on the PPS line; it must stay 100 ms above it
    stage = gps_stage()
    simulate_gps(stage, 20.0, latency_ms=100.0, seed=7)
    q = stage.quality(FIX)
    assert 99_000_000 <= q["fallback_minus_ref_ns"] <= 103_000_000


def test_explicit_domain_param_and_a_reference_without_device_time():
    stage = ClockStage(Timebase())
    stage.configure_stream(StreamInfo("/rx/fix", StreamKind.GPS, "fix",
                                      params={"clock_domain": "receiver"}))
    stage.configure_stream(StreamInfo("/rx/pps", StreamKind.TIMEREF, "json",
                                      params={"clock_domain": "receiver"}))
    # an edge before any NMEA has no label: arrival time, counted, never learned from
    s = Sample("/rx/pps", {}, MONO0, device_t_ns=None, meta={"clock_ref": True})
    stage.stamp(s, False)
    assert s.t_ns == MONO0 and stage.quality("/rx/pps")["no_device_time"] == 1
    for i in range(1, 6):
        s = Sample("/rx/pps", {}, MONO0 + i * NS + 500, device_t_ns=UTC0 + i * NS,
                   meta={"clock_ref": True})
        stage.stamp(s, False)
    f = Sample("/rx/fix", {}, MONO0 + int(5.53e9), device_t_ns=UTC0 + int(5.5e9))
    stage.stamp(f, False)
    assert abs(f.t_ns - (MONO0 + int(5.5e9) + 500)) <= 2_000
    q = stage.quality("/rx/fix")
    assert q["source"] == "reference" and q["domain"] == "receiver"


def test_references_on_an_undeclared_stream_make_it_its_own_domain():
    stage = ClockStage(Timebase())
    for i in range(5):
        stage.stamp(Sample("/clk", {}, MONO0 + i * NS + 200, device_t_ns=7 * NS + i * NS,
                           meta={"clock_ref": "pps"}), False)
    s = Sample("/clk", {}, MONO0 + int(4.6e9), device_t_ns=7 * NS + int(4.5e9))
    stage.stamp(s, False)
    assert abs(s.t_ns - (MONO0 + int(4.5e9) + 200)) <= 1_000
    assert stage.quality("/clk")["source"] == "pps"
    # other streams are untouched by domains
    o = Sample("/other", b"", MONO0 + 5, device_t_ns=3)
    stage.stamp(o, False)
    assert stage.quality("/other")["source"] == "estimator"


def test_members_may_be_stamped_from_several_threads():
    stage = ClockStage(Timebase())
    for name in ("/a", "/b"):
        stage.configure_stream(StreamInfo(name, StreamKind.CAMERA, "jpeg",
                                          params={"clock_domain": "shared"}))
    errors: list[BaseException] = []

    def run(name: str, ref: bool, phase: int) -> None:
        try:
            for i in range(2000):
                dev = 5 * NS + i * 10_000_000 + phase
                meta = {"clock_ref": True} if ref and i % 100 == 0 else {}
                s = Sample(name, b"", MONO0 + dev - 5 * NS + 1000, device_t_ns=dev,
                           meta=meta)
                stage.stamp(s, False)
                assert s.t_ns != 0
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    ts = [threading.Thread(target=run, args=("/a", True, 0)),
          threading.Thread(target=run, args=("/b", False, 5_000_000))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    qa, qb = stage.quality("/a"), stage.quality("/b")
    assert qa["ref_samples"] == qb["ref_samples"] == 20
    assert qa["mapped_by_ref"] + qa["mapped_by_fallback"] == 4000 - 20


def test_discontinuity_resets_both_estimators_of_a_domain():
    stage = gps_stage()
    simulate_gps(stage, 10.0, seed=9)
    stage.reset_stream(FIX)
    q = stage.summary()[FIX]
    assert q["resets"] == 1


@pytest.mark.parametrize("rate_hz", [10.0])
def test_span_arrival_is_learned_from(rate_hz):
    """A LiDAR-like scan: ``host_rx_ns`` is the first packet's arrival (its last column +
    a variable delay), ``meta`` names the best packet of the scan: its last column
    (``device_span_ns``) and its arrival (``span_rx_ns``). The stage learns from the best
    packet, so the scan's first column maps within µs, not within the first packet's
    delay."""
    rng = np.random.default_rng(1)
    stage = ClockStage(Timebase())
    off = 2_750_000_000
    col_ns = 100_000_000 // 1024
    errs_ = []
    for k in range(int(30 * rate_hz)):
        true0 = MONO0 + k * 100_000_000
        dev0 = true0 + off + int((true0 - MONO0) * -100e-6)
        ends = np.arange(1, 65) * 16 * col_ns - col_ns       # last column of each packet
        delays = rng.exponential(2e6, 64) + 1_000             # each packet's own delay
        rx = true0 + ends + delays.astype(np.int64)
        p = int(np.argmin(rx - ends))
        s = Sample("/lidar", b"", int(rx[0]), device_t_ns=dev0,
                   meta={"device_span_ns": int(ends[p]), "span_rx_ns": int(rx[p])})
        stage.stamp(s, False)
        if k >= 100:
            errs_.append(s.t_ns - true0)
    assert np.percentile(np.abs(errs_), 99) <= 20_000
    # without the span the first packet's delay (its 1.5 ms of columns + jitter) shows
    stage2 = ClockStage(Timebase())
    s = None
    rng = np.random.default_rng(1)
    e2 = []
    for k in range(int(30 * rate_hz)):
        true0 = MONO0 + k * 100_000_000
        dev0 = true0 + off
        rx0 = true0 + 15 * col_ns + int(rng.exponential(2e6))
        s = Sample("/lidar", b"", rx0, device_t_ns=dev0)
        stage2.stamp(s, False)
        if k >= 100:
            e2.append(s.t_ns - true0)
    assert np.median(e2) >= 1_400_000


def _pps_until(stage: ClockStage, end_mono: int, seconds: int, ppm: float) -> None:
    """``seconds`` + 1 PPS edges (and a fix each, its NMEA 30 ms late) whose last edge is
    at host-monotonic ``end_mono``; the receiver's UTC is true and the host clock runs
    ``ppm`` fast against it."""
    rng = np.random.default_rng(1)
    k = 1 + ppm * 1e-6
    for i in range(seconds + 1):
        utc = UTC0 + i * NS
        true = end_mono - int(round((seconds - i) * NS * k))
        stage.stamp(Sample(REF, {"kind": "pps"}, true + int(abs(rng.normal(0, 1000))),
                           device_t_ns=utc, meta={"clock_ref": "pps"}), False)
        stage.stamp(Sample(FIX, {"lat": 0.0}, true + 30_000_000, device_t_ns=utc), False)


def test_utc_is_taken_from_gps_pps_while_it_is_locked():
    import time

    stage = gps_stage()
    assert stage.utc_mapping()["source"] != "gps-pps"  # no edges yet: the system clock
    ppm, end = 40.0, time.monotonic_ns()
    _pps_until(stage, end, 30, ppm)
    m = stage.utc_mapping()
    assert m["source"] == "gps-pps" and m["sync"] == "pps"
    tb = m["timebase_ns"]
    true_utc = UTC0 + 30 * NS + (tb - end) / (1 + ppm * 1e-6)
    err = tb + m["utc_minus_timebase_ns"] - true_utc
    assert abs(err) <= m["uncertainty_ns"] < 100_000, (err, m)
    d = m["details"]
    assert d["domain"] == FIX and d["pps_edges"] == 31 and d["edge_age_ms"] >= 0
    # the system clock's view rides along, and how far it is off GPS
    assert d["system_minus_pps_ns"] == (d["system"]["utc_minus_timebase_ns"]
                                        - m["utc_minus_timebase_ns"])


def test_utc_falls_back_to_the_system_clock_when_the_pps_is_stale():
    import time

    stage = gps_stage(ref_holdover_s=2.0)
    _pps_until(stage, time.monotonic_ns() - 5 * NS, 30, 0.0)  # last edge 5 s ago
    m = stage.utc_mapping()
    assert m["source"] != "gps-pps" and "system" not in (m.get("details") or {})
