"""The replay.mcap driver, its session reader and the playback clock: times and payloads
come back as recorded, ordering is stable, pacing holds rate and proportion, sessions are
read from folders, the fs ingest store and S3, bad input is counted."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from agent.replay import (McapReplay, McapReplayOptions, PlaybackClock, ReplayError,
                          SessionReader, open_session, parse_s3_uri)
from agent.types import StreamKind
from test_replay_fixture import CAM_OFFSET, SESSION_ID, T0, all_written, make_session

RT_OK = hasattr(os, "sched_setscheduler") and os.geteuid() == 0


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory):
    return make_session(tmp_path_factory.mktemp("replay"), duration_s=3.0)


def _replay(uri: str, **opts) -> tuple[McapReplay, list]:
    drv = McapReplay("/replay", uri, McapReplayOptions(**opts))
    drv.open()
    out = list(drv)
    drv.close()
    return drv, out


def _payload_equal(a, b) -> bool:
    if isinstance(a, np.ndarray):
        return np.array_equal(np.asarray(a).reshape(np.asarray(b).shape), b)
    if hasattr(a, "SerializeToString"):
        return a.SerializeToString() == b.SerializeToString()
    return a == b


def test_samples_come_back_with_their_times_and_payloads(session) -> None:
    drv, got = _replay(str(session.session_dir), max_rate=True)
    written = all_written(session)
    assert len(got) == len(written)
    key = lambda s: (s.stream, s.t_ns, s.seq if s.seq is not None else -1)  # noqa: E731
    want = {key(s): s for s in written}
    for s in got:
        w = want[key(s)]
        assert (s.device_t_ns, s.host_rx_ns, s.seq) == (w.device_t_ns, w.host_rx_ns, w.seq)
        if w.stream == "/gps":
            assert s.payload == w.payload  # lat lon alt covariance: all LocationFix holds
        else:
            assert _payload_equal(s.payload, w.payload), s.stream
    front = [s for s in got if s.stream == "/camera/front"]
    assert front[0].device_t_ns - front[0].t_ns == CAM_OFFSET
    assert isinstance(front[0].payload, bytes) and front[0].payload[:2] == b"\xff\xd8"
    mic = next(s for s in got if s.stream == "/mic")
    assert mic.payload.dtype == np.dtype("<i2") and mic.payload.shape == (960, 1)
    assert drv.counters["stamps_missing"] == 0 and drv.counters["decode_errors"] == 0


def test_order_is_time_then_stream_order_then_seq(session) -> None:
    _, got = _replay(str(session.session_dir), max_rate=True)
    keys = [s.t_ns for s in got]
    assert keys == sorted(keys)
    reader = SessionReader(open_session(str(session.session_dir)))
    ranks = [(s.t_ns, reader.order[s.stream]) for s in got]
    assert ranks == sorted(ranks)
    # ties: front, rear and the front frame's label share t_ns; they come in stream order
    t = session.samples["/camera/front"][3].t_ns
    at_t = [s.stream for s in got if s.t_ns == t]
    assert at_t == ["/camera/front", "/camera/rear", "/labels/camera/front/yolo"]


def test_streams_are_rebuilt_from_channel_and_session_metadata(session) -> None:
    drv = McapReplay("/replay", str(session.session_dir), McapReplayOptions(max_rate=True))
    drv.open()
    infos = {i.name: i for i in drv.streams()}
    assert set(infos) == set(session.infos)
    for name, want in session.infos.items():
        got = infos[name]
        assert (got.kind, got.encoding, got.rate_hz, got.frame_id) == \
            (want.kind, want.encoding, want.rate_hz, want.frame_id), name
        assert got.calibration == want.calibration
        for k, v in want.params.items():
            if isinstance(v, (int, float, str)):
                assert got.params[k] == v, (name, k)
    assert infos["/labels/camera/front/yolo"].params["proto_class"].DESCRIPTOR.full_name == \
        "foxglove.ImageAnnotations"
    assert infos["/labels/mic/vad"].params["schema"] == "edgecap.AudioLabels"
    assert infos["/mic"].params == {"sample_rate": 48000, "channels": 1, "block": 960}
    drv.close()


def test_window_and_stream_selection(session) -> None:
    drv, got = _replay(str(session.session_dir), max_rate=True, from_s=1.0, to_s=2.0,
                       streams=["/camera/*", "/gps"])
    assert {s.stream for s in got} == {"/camera/front", "/camera/rear", "/gps"}
    first = session.t_first_ns
    assert all(first + 1_000_000_000 <= s.t_ns < first + 2_000_000_000 for s in got)
    n_front = sum(1 for s in session.samples["/camera/front"]
                  if first + 1e9 <= s.t_ns < first + 2e9)
    assert drv.emitted["/camera/front"] == n_front == 20
    with pytest.raises(ReplayError, match="no stream matches"):
        McapReplay("/r", str(session.session_dir), McapReplayOptions(streams=["/nope"])).open()


def test_loop_keeps_time_rising(session) -> None:
    drv = McapReplay("/replay", str(session.session_dir),
                     McapReplayOptions(max_rate=True, loop=True, to_s=0.5, streams=["/gps"]))
    drv.open()
    got = []
    for s in drv:
        got.append(s.t_ns)
        if len(got) == 9:
            break
    drv.close()
    assert got == sorted(got) and len(set(got)) == 9
    assert drv.counters["loops"] >= 2  # 3 fixes per 0.5 s pass


def test_missing_stamps_and_corrupt_segments_are_counted(session, tmp_path: Path) -> None:
    from mcap.reader import make_reader
    from mcap.writer import Writer

    src = session.session_dir
    dst = tmp_path / SESSION_ID
    shutil.copytree(src, dst)
    seg = sorted(dst.glob("*.mcap"))[1]
    # rewrite segment 1 without its stamps records (as if they were lost)
    with open(seg, "rb") as f:
        r = make_reader(f)
        summ = r.get_summary()
        msgs = [(c.topic, m) for _s, c, m in r.iter_messages(log_time_order=True)]
        metas = list(r.iter_metadata())
    out = seg.with_suffix(".tmp")
    with open(out, "wb") as f:
        w = Writer(f)
        w.start()
        sid = {}
        for sch in summ.schemas.values():
            sid[sch.id] = w.register_schema(sch.name, sch.encoding, sch.data)
        cid = {}
        for ch in summ.channels.values():
            cid[ch.topic] = w.register_channel(ch.topic, ch.message_encoding,
                                               sid.get(ch.schema_id, 0), ch.metadata)
        for m in metas:
            w.add_metadata(m.name, m.metadata)
        lost = 0
        for topic, m in msgs:
            if topic == "/edgecap/stamps":
                continue
            lost += topic.startswith("/") and not topic.startswith("/edgecap/")
            w.add_message(cid[topic], m.log_time, m.data, m.publish_time, m.sequence)
        w.finish()
    os.replace(out, seg)
    seg.with_name(seg.name.replace(".mcap", ".manifest.json")).unlink()
    (dst / f"{SESSION_ID}_00009.mcap").write_bytes(b"\x89MCAP0\r\nthis is not an mcap file")
    drv, got = _replay(str(dst), max_rate=True)
    assert drv.counters["bad_segments"] == 1
    assert drv.counters["stamps_missing"] == lost > 0
    missing = [s for s in got if s.meta.get("stamps_missing")]
    assert len(missing) == lost and all(s.device_t_ns is None for s in missing)
    assert len(got) == len(all_written(session))  # every message still replayed


def test_playback_clock_pause_seek_and_rate() -> None:
    clk = PlaybackClock(rate=2.0)
    clk.start(1_000)
    time.sleep(0.05)
    pos = clk.position_ns
    assert 1_000 + 80_000_000 <= pos <= 1_000 + 200_000_000  # 2× for ~50 ms
    clk.pause()
    p1 = clk.position_ns
    time.sleep(0.03)
    assert clk.position_ns == p1
    woke = []
    th = threading.Thread(target=lambda: woke.append(clk.wait_until(p1 + 10_000_000)))
    th.start()
    time.sleep(0.1)
    assert th.is_alive()  # paused: not due
    clk.resume()
    th.join(1.0)
    assert woke and woke[0] is not None and woke[0] < 5_000_000
    gen = clk.generation
    res = []
    th = threading.Thread(target=lambda: res.append(clk.wait_until(clk.position_ns + 10**10,
                                                                   generation=gen)))
    th.start()
    time.sleep(0.05)
    clk.seek(5_000_000_000)
    th.join(1.0)
    assert res == [None] and clk.seek_target_ns == 5_000_000_000
    assert clk.generation == gen + 1
    clk.set_rate(None)
    assert clk.wait_until(10**15) == 0  # max rate: never waits
    with pytest.raises(ValueError):
        PlaybackClock(rate=0)


def test_seek_restarts_reading_at_the_target(session) -> None:
    drv = McapReplay("/replay", str(session.session_dir),
                     McapReplayOptions(rate=1.0, streams=["/gps"]))
    drv.open()
    got = []
    target = session.t_first_ns + 2_000_000_000
    for s in drv:
        got.append(s.t_ns)
        if len(got) == 1:
            drv.clock.seek(target)
    drv.close()
    assert drv.counters["seeks"] == 1
    assert got[0] < target and all(t >= target for t in got[1:]) and len(got) >= 3


def _emit_times(drv: McapReplay) -> dict[str, list[tuple[int, int]]]:
    out: dict[str, list[tuple[int, int]]] = {}
    for s in drv:
        out.setdefault(s.stream, []).append((time.monotonic_ns(), s.t_ns))
    return out


@pytest.mark.skipif(not RT_OK, reason="needs SCHED_FIFO (root) for stable timing")
def test_rates_stay_in_proportion_at_10x(tmp_path: Path) -> None:
    w = make_session(tmp_path, duration_s=10.0, window_s=5.0, labels=False, rear=False,
                     cam_hz=30.0)
    drv = McapReplay("/replay", str(w.session_dir), McapReplayOptions(rate=10.0,
                                                                       realtime=True))
    drv.open()
    times = _emit_times(drv)
    drv.close()
    rates = {}
    for name, tt in times.items():
        assert len(tt) == len(w.samples[name])
        (m0, t0), (m1, t1) = tt[0], tt[-1]
        rates[name] = (len(tt) - 1) / ((m1 - m0) / 1e9)
        recorded = (len(tt) - 1) / ((t1 - t0) / 1e9)
        assert rates[name] / recorded == pytest.approx(10.0, rel=0.01), name
    # in proportion to each other (camera 30 : mic 50 : lidar 10 : gps 5)
    assert rates["/mic"] / rates["/camera/front"] == pytest.approx(50 / 30, rel=0.01)
    assert rates["/lidar"] / rates["/gps"] == pytest.approx(2.0, rel=0.01)


@pytest.mark.hil  # a timing figure: run with make test-hil (and measured by bench export)
@pytest.mark.skipif(not RT_OK, reason="needs SCHED_FIFO (root) for stable timing")
def test_jitter_at_1x_is_below_a_millisecond(session) -> None:
    drv = McapReplay("/replay", str(session.session_dir),
                     McapReplayOptions(rate=1.0, to_s=2.0, realtime=True))
    drv.open()
    n = sum(1 for _ in drv)
    drv.close()
    j = drv.jitter()
    assert j["samples"] == n > 250
    assert j["p99_ms"] <= 1.0, j


def test_a_paced_replay_reads_ahead_before_its_clock_starts(session) -> None:
    """The first samples of every stream come from segments still being opened: the
    read-ahead is given half a second of session time before the clock starts."""
    from agent.replay import PREROLL_NS, _Prefetch

    drv = McapReplay("/replay", str(session.session_dir), McapReplayOptions(rate=1.0))
    drv.open()
    stop = threading.Event()
    ahead = _Prefetch(drv, drv.start_ns)
    try:
        first = ahead.get(stop)
        ahead.preroll(stop, first.t_ns + PREROLL_NS)
        buffered = list(ahead._buf)
    finally:
        ahead.close()
        drv.close()
    assert buffered and buffered[-1] is not None
    assert buffered[-1].t_ns >= first.t_ns + PREROLL_NS
    _, every = _replay(str(session.session_dir), max_rate=True)
    due = [s for s in every if s.t_ns < first.t_ns + PREROLL_NS]
    assert {s.stream for s in due} <= {s.stream for s in buffered}  # all opened and read


def test_replay_and_record_keeps_times_windows_and_counts(session, tmp_path: Path) -> None:
    from agent.cli.replay_cmd import run_replay

    res = run_replay(str(session.session_dir), max_rate=True, record=str(tmp_path / "out"))
    out = Path(res["recorded"]["session_dir"])
    names = sorted(p.name.split("_")[-1] for p in out.glob("*.mcap"))
    assert names == sorted(p.name.split("_")[-1]
                           for p in session.session_dir.glob("*.mcap"))  # same windows
    assert res["recorded"]["queue_drops"] == {}
    _, a = _replay(str(session.session_dir), max_rate=True)
    _, b = _replay(str(out), max_rate=True)
    sig = lambda s: (s.stream, s.t_ns, s.device_t_ns, s.host_rx_ns, s.seq)  # noqa: E731
    assert [sig(s) for s in a] == [sig(s) for s in b]
    assert all(_payload_equal(x.payload, y.payload) for x, y in zip(a, b)
               if x.stream != "/gps")


def _store(backend, session) -> str:
    """Put a session into an ingest store the way the ingest server does."""
    from agent.manifest import manifest_path, read_manifest

    for seg in sorted(session.session_dir.glob("*.mcap")):
        man = read_manifest(manifest_path(seg))
        backend.put_blob(man["sha256"], seg, man["size"])
        backend.put_entry({"device": "testrig", "session": SESSION_ID,
                           "bundle": seg.name.removesuffix(".mcap"), "sha256": man["sha256"],
                           "size": man["size"]}, manifest_path(seg).read_bytes())
    return SESSION_ID


def test_session_from_the_fs_ingest_store(session, tmp_path: Path) -> None:
    from sync import storage

    be = storage.create("fs", {"root": str(tmp_path / "store"), "fsync": False})
    _store(be, session)
    d = tmp_path / "store" / "devices" / "testrig" / SESSION_ID
    drv, got = _replay(str(d), max_rate=True, cache_dir=str(tmp_path / "cache"))
    assert len(got) == len(all_written(session))
    assert drv.session.session_id == SESSION_ID


def test_session_from_s3(session, tmp_path: Path) -> None:
    from sync import storage
    from sync.testing import S3Fixture

    fx = S3Fixture()
    try:
        be = storage.create("s3", fx.options(bucket="fleet", prefix="edgecap/"))
        _store(be, session)
        uri = f"s3://fleet/edgecap/devices/testrig/{SESSION_ID}"
        assert parse_s3_uri(uri) == ("fleet", "edgecap/", "testrig", SESSION_ID)
        opts = dict(max_rate=True, cache_dir=str(tmp_path / "cache"), endpoint_url=fx.endpoint,
                    region="us-east-1", access_key_id="testing", secret_access_key="testing")
        drv, got = _replay(uri, **opts)
        assert len(got) == len(all_written(session))
        cached = sorted((tmp_path / "cache").rglob("*.mcap"))
        assert len(cached) == len(list(session.session_dir.glob("*.mcap")))
        mtimes = [p.stat().st_mtime_ns for p in cached]
        _replay(uri, **opts)  # second open: served from the verified cache
        assert [p.stat().st_mtime_ns for p in cached] == mtimes
        with pytest.raises(ReplayError, match="no bundles"):
            open_session(f"s3://fleet/edgecap/devices/testrig/nosuch_20260101T000000Z_0000",
                         McapReplayOptions(**opts))
    finally:
        fx.stop()


def test_bad_locations_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ReplayError, match="no such session"):
        open_session(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReplayError, match="no closed segments"):
        open_session(str(tmp_path / "empty"))


def test_cli_replay_json_summary(session) -> None:
    from agent.cli import main

    r = CliRunner().invoke(main, ["replay", str(session.session_dir), "--max", "--json",
                                  "-s", "/gps", "-s", "/lidar"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output)
    assert doc["samples"] == {"/gps": len(session.samples["/gps"]),
                              "/lidar": len(session.samples["/lidar"])}
    assert doc["rate"] is None
    r = CliRunner().invoke(main, ["replay", "/nonexistent/session", "--max"])
    assert r.exit_code == 3 and "no such session" in r.output


def test_replay_is_a_registered_driver() -> None:
    from drivers import registry

    cls = registry.get("replay.mcap")
    assert cls is McapReplay and not cls.is_live and cls.t_ns_final
    assert StreamKind.CAMERA.value == "camera"
