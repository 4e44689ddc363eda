"""Live publishing taps: ZeroMQ (msgpack wire format v1) and the Foxglove WebSocket live
view, fed by a replay. Neither may block the tap; every drop is counted."""

from __future__ import annotations

import asyncio
import json
import struct
import threading
import time
from types import SimpleNamespace

import pytest
import zmq

from agent.publish import FoxgloveLive, ZmqPublisher, unpack
from agent.replay import McapReplay, McapReplayOptions, PlaybackClock
from test_replay_fixture import make_session


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory):
    return make_session(tmp_path_factory.mktemp("publish"), duration_s=1.5)


def _samples(session, **kw):
    drv = McapReplay("/replay", str(session.session_dir), McapReplayOptions(max_rate=True, **kw))
    drv.open()
    infos = {i.name: i for i in drv.streams()}
    out = list(drv)
    drv.close()
    return infos, out


def test_zmq_wire_format(session) -> None:
    from foxglove_schemas_protobuf.CompressedImage_pb2 import CompressedImage

    infos, samples = _samples(session)
    pub = ZmqPublisher("tcp://127.0.0.1:0", infos)
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.RCVTIMEO, 3000)
    sub.setsockopt(zmq.SUBSCRIBE, b"/camera/front")
    sub.setsockopt(zmq.SUBSCRIBE, b"/labels/mic")
    sub.connect(pub.endpoint)
    time.sleep(0.3)  # PUB/SUB: let the subscription arrive first
    pub.start()
    for s in samples:
        pub.tap(s)
    want = [s for s in samples if s.stream in ("/camera/front", "/labels/mic/vad")]
    got = [unpack(sub.recv_multipart()) for _ in want]
    pub.stop()
    sub.close(0)
    assert [(m["topic"], m["t_ns"], m["seq"]) for m in got] == \
        [(s.stream, s.t_ns, s.seq) for s in want]
    m = got[0]
    assert m["v"] == 1 and m["encoding"] == "protobuf" and m["schema"] == \
        "foxglove.CompressedImage" and m["device_t_ns"] == want[0].device_t_ns
    assert CompressedImage.FromString(m["data"]).data == want[0].payload
    vad = next(m for m in got if m["topic"] == "/labels/mic/vad")
    assert vad["encoding"] == "json" and vad["schema"] == "edgecap.AudioLabels"
    assert json.loads(vad["data"])["segments"][0]["kind"] == "speech"
    st = pub.stats()
    assert st["sent"] == len(samples) and st["hwm_drops"] == 0 and st["queue_drops"] == {}


def test_tap_never_blocks_and_counts_queue_drops(session) -> None:
    infos, samples = _samples(session, streams=["/mic"])
    pub = ZmqPublisher("tcp://127.0.0.1:0", infos, queue_items=4)
    t0 = time.perf_counter()
    for s in samples:  # no sender thread yet: the queue overflows
        pub.tap(s)
    assert time.perf_counter() - t0 < 0.5
    assert pub.stats()["queue_drops"] == {"/mic": len(samples) - 4}
    pub.start()
    pub.stop()
    assert pub.stats()["sent"] == 4


def test_slow_subscriber_drops_are_counted_not_waited_for(session) -> None:
    infos, samples = _samples(session, streams=["/lidar", "/camera/front"])
    ep = f"inproc://slow-{id(session)}"
    pub = ZmqPublisher(ep, infos, sndhwm=2)
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 2)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(ep)
    time.sleep(0.1)
    pub.start()
    t0 = time.perf_counter()
    for s in samples:
        pub.tap(s)
    pub.stop()
    st = pub.stats()
    sub.close(0)
    assert time.perf_counter() - t0 < 2.0
    assert st["hwm_drops"] > 0 and st["sent"] + st["hwm_drops"] == len(samples)


async def _ws_session(port: int, topic: str, feed, n: int) -> tuple[dict, list[bytes]]:
    import websockets

    async with websockets.connect(f"ws://127.0.0.1:{port}",
                                  subprotocols=["foxglove.sdk.v1"]) as ws:
        channels: dict[str, dict] = {}
        while topic not in channels:
            m = json.loads(await asyncio.wait_for(ws.recv(), 5))
            if m["op"] == "advertise":
                channels.update({c["topic"]: c for c in m["channels"]})
        await ws.send(json.dumps({"op": "subscribe", "subscriptions": [
            {"id": 3, "channelId": channels[topic]["id"]}]}))
        await asyncio.sleep(0.3)
        threading.Thread(target=feed, daemon=True).start()
        msgs: list[bytes] = []
        while len(msgs) < n:
            m = await asyncio.wait_for(ws.recv(), 5)
            if isinstance(m, bytes) and m[0] == 1:
                msgs.append(m)
        return channels, msgs


def test_foxglove_live_view_serves_bundle_schemas(session) -> None:
    from foxglove_schemas_protobuf.CompressedImage_pb2 import CompressedImage

    infos, samples = _samples(session)
    live = FoxgloveLive(infos, port=0)
    live.start()
    front = [s for s in samples if s.stream == "/camera/front"]
    try:
        channels, msgs = asyncio.run(_ws_session(
            live.port, "/camera/front", lambda: [live.tap(s) for s in samples], len(front)))
    finally:
        live.stop()
    assert set(channels) == set(infos)
    c = channels["/camera/front"]
    assert (c["encoding"], c["schemaName"], c["schemaEncoding"]) == \
        ("protobuf", "foxglove.CompressedImage", "protobuf")
    assert channels["/labels/lidar/clusters"]["schemaName"] == "foxglove.SceneUpdate"
    for m, s in zip(msgs, front):
        sub_id, log_time = struct.unpack_from("<IQ", m, 1)
        assert sub_id == 3 and log_time == s.t_ns
        assert CompressedImage.FromString(m[13:]).data == s.payload
    assert live.stats()["sent"] == len(samples)


def test_foxglove_playback_bar_drives_the_playback_clock() -> None:
    from foxglove.websocket import PlaybackCommand, PlaybackStatus

    from agent.publish import _PlaybackListener

    clock = PlaybackClock(rate=1.0)
    clock.start(1_000)
    live = SimpleNamespace(clock=clock, control_requests=0)
    lis = _PlaybackListener(live)
    st = lis.on_playback_control_request(SimpleNamespace(
        playback_command=PlaybackCommand.Pause, playback_speed=4.0, seek_time=9_000_000_000,
        request_id="r1"))
    assert clock.paused and clock.rate == 4.0 and clock.seek_target_ns == 9_000_000_000
    assert st.status == PlaybackStatus.Paused and st.did_seek and st.request_id == "r1"
    assert st.current_time == 9_000_000_000
    st = lis.on_playback_control_request(SimpleNamespace(
        playback_command=PlaybackCommand.Play, playback_speed=1.0, seek_time=None,
        request_id="r2"))
    assert not clock.paused and st.status == PlaybackStatus.Playing and not st.did_seek
    assert live.control_requests == 2


def test_replay_cli_publishes_to_zmq(session, tmp_path) -> None:
    from agent.cli.replay_cmd import run_replay

    ep = f"ipc://{tmp_path}/pub.sock"
    got: list[dict] = []
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"/gps")
    sub.setsockopt(zmq.RCVTIMEO, 200)

    def listen() -> None:
        sub.connect(ep)
        while True:
            try:
                got.append(unpack(sub.recv_multipart()))
            except zmq.Again:
                if done.is_set():
                    return

    done = threading.Event()
    th = threading.Thread(target=listen, daemon=True)
    th.start()
    res = run_replay(str(session.session_dir), rate=4.0, publish=ep.replace("ipc", "ipc"),
                     realtime=False)
    done.set()
    th.join(3)
    sub.close(0)
    assert res["publishers"]["zmq"]["sent"] == res["received"] == sum(res["samples"].values())
    n_gps = len(session.samples["/gps"])
    assert 1 <= len(got) <= n_gps and got[-1]["t_ns"] == session.samples["/gps"][-1].t_ns
