"""Edge-side pieces without a network: spool scanning and ordering, markers, the state
file, the token bucket, the credit window (fixed and automatic) and upload windows."""

from __future__ import annotations

import json
import os
from datetime import datetime

import pytest

from sync.schedule import UploadWindows
from sync.spool import (REJECTED_SUFFIX, STATE_FILE, UPLOADED_SUFFIX, Spool, SyncState)
from sync.testing import make_bundle
from sync.throttle import (AutoWindow, PathEstimate, TokenBucket, bdp_window,
                           chunk_for_rate)


def test_scan_finds_closed_segments_with_manifests_only(tmp_path):
    make_bundle(tmp_path, "rig", "rig_s1", 0, 100)
    seg1 = make_bundle(tmp_path, "rig", "rig_s1", 1, 100)
    # a segment still being written, a closed one without its manifest yet, a temp file
    (tmp_path / "rig_s1" / "rig_s1_00002.mcap.active").write_bytes(b"x" * 10)
    (tmp_path / "rig_s1" / "rig_s1_00003.mcap").write_bytes(b"x" * 10)
    (tmp_path / "rig_s1" / ".rig_s1_00004.manifest.json.tmp").write_text("{}")
    (tmp_path / ".hidden").mkdir()
    sp = Spool(tmp_path, "rig")
    keys = [b.key for b in sp.scan()]
    assert keys == ["rig_s1/rig_s1_00000", "rig_s1/rig_s1_00001"]
    sp.mark(sp.scan()[1], UPLOADED_SUFFIX, {"outcome": "stored"})
    assert [b.key for b in sp.scan()] == ["rig_s1/rig_s1_00000"]
    marker = json.loads(seg1.with_name("rig_s1_00001" + UPLOADED_SUFFIX).read_text())
    assert marker["outcome"] == "stored" and marker["size"] == 100


def test_priority_then_triggered_then_oldest(tmp_path):
    make_bundle(tmp_path, "rig", "rig_a", 0, 10, closed_unix_ns=100)
    make_bundle(tmp_path, "rig", "rig_a", 1, 10, closed_unix_ns=200, triggers=[{"n": 1}])
    make_bundle(tmp_path, "rig", "rig_a", 2, 10, closed_unix_ns=300, priority=5)
    make_bundle(tmp_path, "rig", "rig_b", 0, 10, closed_unix_ns=50)
    make_bundle(tmp_path, "rig", "rig_b", 1, 10, closed_unix_ns=400, triggers=[])
    order = [b.key for b in Spool(tmp_path).scan()]
    assert order == ["rig_a/rig_a_00002", "rig_a/rig_a_00001", "rig_b/rig_b_00000",
                     "rig_a/rig_a_00000", "rig_b/rig_b_00001"]


@pytest.mark.parametrize("damage,reason", [
    (lambda m, s: m.write_text("{not json"), "bad_manifest"),
    (lambda m, s: m.write_text("[1]"), "bad_manifest"),
    (lambda m, s: _edit(m, sha256="xyz"), "bad_manifest"),
    (lambda m, s: _edit(m, size="10"), "bad_manifest"),
    (lambda m, s: _edit(m, session_id="other"), "bad_manifest"),
    (lambda m, s: _edit(m, segment="../../etc/passwd"), "bad_manifest"),
    (lambda m, s: _edit(m, device_id="a/b"), "bad_manifest"),
    (lambda m, s: _edit(m, priority="high"), "bad_manifest"),
    (lambda m, s: _edit(m, triggers="yes"), "bad_manifest"),
    (lambda m, s: s.write_bytes(b"short"), "size_mismatch"),
    (lambda m, s: _edit(m, device_id="another-rig"), "other_device"),
])
def test_bad_local_bundles_are_counted_and_skipped(tmp_path, damage, reason):
    seg = make_bundle(tmp_path, "rig", "rig_s1", 0, 100)
    make_bundle(tmp_path, "rig", "rig_s1", 1, 100)
    damage(seg.with_name("rig_s1_00000.manifest.json"), seg)
    sp = Spool(tmp_path, "rig")
    assert [b.key for b in sp.scan()] == ["rig_s1/rig_s1_00001"]
    assert sp.skipped == {reason: 1}
    sp.scan()  # cached: counted once, not on every scan
    assert sp.skipped == {reason: 1}


def _edit(path, **kw):
    m = json.loads(path.read_text())
    m.update(kw)
    path.write_text(json.dumps(m))


def test_rejected_marker_and_delete_only_after_uploaded(tmp_path):
    make_bundle(tmp_path, "rig", "rig_s1", 0, 10)
    make_bundle(tmp_path, "rig", "rig_s1", 1, 10)
    sp = Spool(tmp_path, "rig")
    a, b = sp.scan()
    with pytest.raises(AssertionError):
        sp.delete_segment(a)
    assert a.path.exists()
    sp.mark(a, UPLOADED_SUFFIX, {})
    assert sp.delete_segment(a) and not a.path.exists()
    assert a.manifest_path.exists()
    sp.mark(b, REJECTED_SUFFIX, {"reason": "conflict"})
    assert sp.scan() == []


def test_state_file_round_trip_and_corruption(tmp_path):
    st = SyncState(tmp_path)
    st.update("s/b", "a" * 64, sent=300, acked=200)
    st.save()
    assert not list(tmp_path.glob(".*.tmp"))  # written via rename
    again = SyncState(tmp_path)
    assert again.get("s/b", "a" * 64) == {"sha256": "a" * 64, "sent": 300, "acked": 200}
    assert again.get("s/b", "b" * 64)["sent"] == 0  # another content: start clean
    (tmp_path / STATE_FILE).write_text("{garbage")
    assert SyncState(tmp_path).inflight == {}


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_token_bucket_holds_its_rate():
    clk = FakeClock()
    tb = TokenBucket(1000.0, 100.0, clk)
    sent = 0
    while clk.t < 10.0:
        d = tb.try_take(50)
        if d == 0:
            sent += 50
        else:
            assert d > 0
            clk.t += d
    # 10 s at 1000 B/s, plus at most the one send the bucket lends
    assert 10_000 <= sent <= 10_050 + 50


def test_token_bucket_burst_is_capped_after_idle():
    clk = FakeClock()
    tb = TokenBucket(1000.0, 200.0, clk)
    clk.t = 3600.0  # an hour idle must not bank an hour of bandwidth
    taken = 0
    while tb.try_take(100) == 0:
        taken += 100
    assert taken <= 300


def test_chunk_for_rate():
    assert chunk_for_rate(1e9, 1 << 20) == 1 << 20
    assert chunk_for_rate(125_000, 1 << 20) == 16 << 10  # floor
    assert chunk_for_rate(1_250_000, 1 << 20) == 125_000
    assert TokenBucket.from_kbps(8000, 1000).rate == 1_000_000


@pytest.mark.parametrize("specs,when,open_", [
    ([], "12:00", True),
    (["22:00-06:00"], "23:30", True),
    (["22:00-06:00"], "05:59", True),
    (["22:00-06:00"], "06:00", False),
    (["22:00-06:00"], "12:00", False),
    (["09:00-10:00", "13:00-24:00"], "23:59", True),
    (["09:00-10:00", "13:00-24:00"], "11:00", False),
    (["00:00-24:00"], "00:00", True),
])
def test_upload_windows(specs, when, open_):
    h, m = map(int, when.split(":"))
    assert UploadWindows(specs).is_open(datetime(2026, 1, 1, h, m)) is open_


def test_seconds_until_open():
    w = UploadWindows(["22:00-06:00"])
    assert w.seconds_until_open(datetime(2026, 1, 1, 21, 30)) == 1800
    assert w.seconds_until_open(datetime(2026, 1, 1, 23, 0)) == 0
    assert w.seconds_until_open(datetime(2026, 1, 1, 21, 59, 30)) == 30


def test_spool_ignores_unreadable_root(tmp_path):
    assert Spool(tmp_path / "missing").scan() == []
    os.makedirs(tmp_path / "bad name")  # not a valid id: its manifests are refused
    make_bundle(tmp_path, "rig", "bad name", 0, 10)
    sp = Spool(tmp_path)
    assert sp.scan() == [] and sp.skipped == {"bad_id": 1}


def test_credit_window_grows_on_fast_acks_and_shrinks_on_a_queue():
    from sync.throttle import CreditWindow

    clk = FakeClock()
    cw = CreditWindow(8, clk)
    assert cw.chunks == 2
    off = 0
    for _ in range(10):  # acks as fast as ever: no queue, open up to the maximum
        off += 100
        cw.on_send(off)
        clk.t += 0.001
        cw.on_ack(off)
    assert cw.chunks == 8
    for i in range(10):  # acks now take 20x longer: a queue builds, close down to 2
        off += 100
        cw.on_send(off)
        clk.t += 0.02
        cw.on_ack(off)
    assert cw.chunks == 2
    cw.on_ack(off + 1000)  # an ack for nothing in flight changes nothing
    assert cw.chunks == 2
    assert CreditWindow(1, clk).chunks == 1  # never above the configured window


MIB = 1 << 20


def _acks(clk: FakeClock, aw: AutoWindow, rate: float, seconds: float, chunk: int = MIB,
          off: int = 0) -> int:
    """Acknowledge ``chunk``-sized pieces at ``rate`` bytes/s for ``seconds``."""
    end = clk.t + seconds
    while clk.t < end:
        clk.t += chunk / rate
        off += chunk
        aw.on_ack(off)
    return off


def test_bdp_window_rule():
    assert bdp_window(MIB, 300e6, 0.0001, 8) == 1  # loopback: 30 kB on the way
    assert bdp_window(MIB, 6e6, 0.1, 8) == 2  # LTE: 0.6 MB on the way + the chunk
    assert bdp_window(MIB, 6e6, 0.1, 1) == 1  # the limit (window_max, server) wins
    assert bdp_window(MIB, 100e6, 1.0, 8) == 8
    assert bdp_window(MIB, 0.0, 5.0, 8) == 1
    assert bdp_window(MIB, 1e6, 1.1 * MIB / 1e6, 8) == 2  # 2.1 chunks needed: within slack
    assert bdp_window(MIB, 1e6, 1.5 * MIB / 1e6, 8) == 3


def test_auto_window_loopback_stays_at_one_and_lte_gets_two():
    clk = FakeClock()
    path = PathEstimate(clk)
    aw = AutoWindow(path, MIB, 8)
    assert aw.chunks == 1  # nothing measured yet
    path.on_rtt(0.0001)
    _acks(clk, aw, 300e6, 2.0)
    assert aw.chunks == 1 and path.rate == pytest.approx(300e6)

    clk = FakeClock()
    path = PathEstimate(clk)
    aw = AutoWindow(path, MIB, 8)
    path.on_rtt(0.25)  # hello -> welcome: includes the handshake
    path.on_rtt(0.1)  # a ping on the idle connection
    _acks(clk, aw, 6e6, 0.4)
    assert path.rate is None and aw.chunks == 1  # the acks span too little time yet
    _acks(clk, aw, 6e6, 1.0, off=4 * MIB)
    assert path.rtt == 0.1 and aw.chunks == 2
    assert AutoWindow(path, MIB, 1).chunks == 1  # never above window_max / the server's


def test_auto_window_converges_to_full_link_use_from_one_chunk():
    """A link of 6.25 MB/s and 100 ms: W chunks in flight deliver W chunks per (chunk time
    + round trip), at most the link rate. From window 1 (0.6 of the link) the measured
    rate alone already asks for 2, which fills it."""
    link, rtt, chunk = 6.25e6, 0.1, MIB
    clk = FakeClock()
    path = PathEstimate(clk)
    aw = AutoWindow(path, chunk, 8)
    path.on_rtt(rtt)
    off, seen = 0, []
    for _ in range(5):
        w = aw.chunks
        seen.append(w)
        rate = min(link, w * chunk / (chunk / link + rtt))
        off = _acks(clk, aw, rate, 1.0, off=off)
    assert seen[0] == 1 and seen[-1] == 2
    assert path.rate == pytest.approx(link)


def test_auto_window_uses_the_cap_when_higher_than_measured():
    clk = FakeClock()
    path = PathEstimate(clk)
    path.on_rtt(0.1)
    aw = AutoWindow(path, MIB, 8)
    _acks(clk, aw, 1e6, 2.0, chunk=MIB // 4)  # starved: 1 MB/s measured
    assert aw.chunks == 1
    capped = AutoWindow(path, MIB, 8, cap_rate=20e6)  # bandwidth_kbps = 160 000
    assert capped.chunks == 3  # 1 + 20 MB/s x 0.1 s / 1 MiB = 2.9
    clk.t += 30  # idle: the rate is kept, not read as a slow link
    assert path.rate == pytest.approx(1e6) and capped.chunks == 3


def test_min_rtt_expires_after_its_window():
    clk = FakeClock()
    path = PathEstimate(clk, rtt_window_s=30.0)
    assert path.rtt is None
    path.on_rtt(0.05)
    clk.t = 10.0
    path.on_rtt(0.2)  # the route got longer
    clk.t = 20.0
    path.on_rtt(0.3)
    assert path.rtt == 0.05
    clk.t = 30.5  # the 0.05 sample is older than 30 s
    assert path.rtt == 0.2
    clk.t = 45.0
    path.on_rtt(0.25)
    clk.t = 41.0 + 30
    assert path.rtt == 0.25
    clk.t = 500.0  # all old: the newest sample stands
    assert path.rtt == 0.25
    path.on_rtt(0.01)  # a smaller one replaces it at once
    assert path.rtt == 0.01


def test_auto_window_counts_acked_bytes_across_rewinds():
    clk = FakeClock()
    path = PathEstimate(clk)
    aw = AutoWindow(path, MIB, 8)
    aw.restart(5 * MIB)  # resumed at 5 MiB: those bytes were acked earlier
    clk.t = 0.6
    aw.on_ack(6 * MIB)
    aw.on_ack(6 * MIB)  # a repeated ack adds nothing
    aw.restart(0)  # the next transfer
    clk.t = 1.2
    aw.on_ack(MIB)
    assert path.rate == pytest.approx(MIB / 0.6)
