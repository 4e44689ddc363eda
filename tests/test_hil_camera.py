"""Camera emulator and frame renderer, on the real interface (HTTP MJPEG on loopback)."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np
import pytest

from agent.errors import ConfigError
from agent.geometry import PinholeCamera
from drivers.mjpeg import MultipartParser, boundary_of, jpeg_info, parse_comment
from hil.emulators.camera import CameraEmulator, insert_jpeg_comment
from hil.render import default_calibration, render
from hil.scenario import Fault, load_scenario
from hil.truth import read_truth
from hil.world import World


START_LEAD_NS = 1_500_000_000


def make_emu(tmp_path: Path, width: int = 320, height: int = 240, fps: float = 30.0,
             faults: list[Fault] | None = None, clapper_s: list[float] | None = None,
             **opts: object) -> CameraEmulator:
    sc = load_scenario("city-drive")
    if clapper_s is not None:
        sc = sc.model_copy(update={"clapper_s": clapper_s})
    s = sc.devices.camera.model_copy(update={
        "options": {"width": width, "height": height, **opts}, "rate_hz": fps,
        "faults": faults or []})
    # t = 0 a moment ahead: start() spawns the render process (~0.6 s)
    return CameraEmulator(World(sc), s, tmp_path, time.monotonic_ns() + START_LEAD_NS)


@contextmanager
def running(emu: CameraEmulator) -> Iterator[CameraEmulator]:
    """The emulator started, from its t = 0 on."""
    with emu:
        emu.wait_for_t0()
        yield emu


def samples(run_dir: Path) -> list[dict]:
    return [r for r in read_truth(run_dir / "truth" / "camera.jsonl") if r["type"] == "sample"]


def read_parts(uri: str, seconds: float) -> list:
    """Raw multipart parts from the stream for ``seconds``."""
    resp = urllib.request.urlopen(uri, timeout=5)
    parser = MultipartParser(boundary_of(resp.headers["Content-Type"]) or b"")
    parts = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        data = resp.read1(65536)
        if not data:
            break
        parts += parser.feed(data)
    resp.close()
    assert parser.corrupt == 0
    return parts


# -- renderer -----------------------------------------------------------------------------
CAM = PinholeCamera.from_calibration(default_calibration(640, 360))


def test_render_is_deterministic_and_draws_objects() -> None:
    w = World(load_scenario("city-drive"))
    img1, boxes1 = render(w, 5.0, CAM)
    img2, boxes2 = render(w, 5.0, CAM)
    assert img1.shape == (360, 640, 3) and img1.dtype == np.uint8
    assert np.array_equal(img1, img2) and boxes1 == boxes2
    by_id = {b.id: b for b in boxes1}
    # ahead at t=5 s: the sign at 25 m and the pedestrian at 35 m, both fully in view
    assert by_id["sign-1"].cls == "sign" and by_id["ped-1"].cls == "pedestrian"
    assert by_id["ped-1"].visibility > 0.9
    # an object's box holds pixels that the empty background does not have
    bg, _ = render(World(load_scenario("city-drive").model_copy(update={"objects": []})),
                   5.0, CAM)
    for b in (by_id["sign-1"], by_id["ped-1"]):
        x0, y0, x1, y1 = (int(round(v)) for v in (b.x0, b.y0, b.x1, b.y1))
        diff = np.abs(img1[y0:y1, x0:x1].astype(int) - bg[y0:y1, x0:x1]).sum(2)
        assert (diff > 60).mean() > 0.2, b
    # boxes are sorted nearest first and lie inside the image
    assert [b.depth_m for b in boxes1] == sorted(b.depth_m for b in boxes1)
    assert all(0 <= b.x0 < b.x1 <= 640 and 0 <= b.y0 < b.y1 <= 360 for b in boxes1)


def test_render_classes_have_distinct_colours() -> None:
    w = World(load_scenario("city-drive"))
    img, boxes = render(w, 5.0, CAM)
    means = {}
    for b in boxes:
        if b.visibility > 0.9 and (b.x1 - b.x0) * (b.y1 - b.y0) > 40:
            x0, y0, x1, y1 = (int(round(v)) for v in (b.x0, b.y0, b.x1, b.y1))
            means[b.cls] = img[y0:y1, x0:x1].reshape(-1, 3).mean(0)
    assert {"sign", "pedestrian"} <= set(means)
    assert np.abs(means["sign"] - means["pedestrian"]).max() > 15


def test_render_lighting_flash_and_defects() -> None:
    w = World(load_scenario("city-drive"))
    base, _ = render(w, 5.0, CAM, brightness=1.0)
    dark, _ = render(w, 5.0, CAM, brightness=0.5)
    assert 0.45 < dark.mean() / base.mean() < 0.55
    flash, boxes = render(w, 5.0, CAM, flash=True)
    assert flash.min() == 255 and boxes == []
    over, _ = render(w, 5.0, CAM, brightness=1.0, overexpose=1.0)
    assert (over == 255).mean() > 0.5 > (base == 255).mean()
    blur, _ = render(w, 5.0, CAM, brightness=1.0, blur_px=9)
    sharp = cv2.Laplacian(cv2.cvtColor(base, cv2.COLOR_BGR2GRAY), cv2.CV_64F).var()
    soft = cv2.Laplacian(cv2.cvtColor(blur, cv2.COLOR_BGR2GRAY), cv2.CV_64F).var()
    assert soft < sharp / 3


def test_partly_hidden_object_has_lower_visibility() -> None:
    # a pedestrian standing right behind a car, as seen from the start pose
    sc = load_scenario("city-drive")
    objs = [o.model_copy(update={"position": (20.0, 0.0, 0.0), "path": []})
            for o in sc.objects if o.id == "car-1"]
    objs += [o.model_copy(update={"position": (30.0, 0.0, 0.0), "path": []})
             for o in sc.objects if o.id == "ped-1"]
    _, boxes = render(World(sc.model_copy(update={"objects": objs})), 0.5, CAM)
    by_id = {b.id: b for b in boxes}
    assert by_id["car-1"].visibility > 0.95
    assert by_id.get("ped-1") is None or by_id["ped-1"].visibility < 0.6


# -- emulator on its interface -------------------------------------------------------------
def test_opencv_videocapture_reads_the_stream(tmp_path: Path) -> None:
    emu = make_emu(tmp_path)
    with running(emu):
        cap = cv2.VideoCapture(emu.uri, cv2.CAP_FFMPEG)
        try:
            assert cap.isOpened()
            frames = []
            end = time.monotonic() + 2.0
            while time.monotonic() < end:
                ok, img = cap.read()
                assert ok
                frames.append(img)
        finally:
            cap.release()
    assert len(frames) >= 40
    assert frames[-1].shape == (240, 320, 3)
    assert frames[-1].std() > 10          # a rendered scene, not a flat frame
    assert emu.sent["sent"] >= len(frames)


def test_jpeg_comment_carries_device_time_and_counter(tmp_path: Path) -> None:
    emu = make_emu(tmp_path)
    with running(emu):
        parts = read_parts(emu.uri, 1.0)
    truth = {r["seq"]: r for r in samples(tmp_path)}
    assert len(parts) >= 20
    seqs = []
    for p in parts:
        assert p.body[:4] == b"\xff\xd8\xff\xfe"          # COM right after SOI
        assert int(p.headers["content-length"]) == len(p.body)
        t_dev, seq = parse_comment(jpeg_info(p.body).comment)
        rec = truth[seq]
        assert rec["sent"] and rec["device_ns"] == t_dev
        assert t_dev == emu.clock.device_ns(rec["true_ns"])
        seqs.append(seq)
    # consecutive, except frames the truth says were not sent (overrun on a loaded host)
    missing = set(range(seqs[0], seqs[-1] + 1)) - set(seqs)
    client_drops = {r["seq"] for r in read_truth(tmp_path / "truth" / "camera.jsonl")
                    if r.get("kind") == "client_drop"}
    assert seqs == sorted(seqs)
    assert all(not truth[q]["sent"] or q in client_drops for q in missing)
    # 12.5 s offset and 20 ppm drift of the scenario's camera clock
    rec = truth[seqs[-1]]
    assert rec["device_ns"] - rec["true_ns"] == pytest.approx(12.5e9, abs=1e6)


def test_capture_runs_without_clients_and_truth_says_so(tmp_path: Path) -> None:
    emu = make_emu(tmp_path)
    with running(emu):
        time.sleep(0.5)
    recs = samples(tmp_path)
    assert len(recs) >= 12
    assert all(not r["sent"] and r["reason"] == "no_client" for r in recs)
    times = [r["true_ns"] for r in recs]
    assert all(b - a == emu.period_ns for a, b in zip(times, times[1:]))


def test_clapper_flash_frame_is_white_with_truth(tmp_path: Path) -> None:
    emu = make_emu(tmp_path, clapper_s=[0.6])
    with running(emu):
        parts = read_parts(emu.uri, 1.2)
    truth = {r["seq"]: r for r in samples(tmp_path)}
    flashes = []
    for p in parts:
        _, seq = parse_comment(jpeg_info(p.body).comment)
        img = cv2.imdecode(np.frombuffer(p.body, np.uint8), cv2.IMREAD_GRAYSCALE)
        if img.min() > 240:
            flashes.append(seq)
    assert len(flashes) == 1
    rec = truth[flashes[0]]
    assert rec["clapper"] == 0 and rec["boxes"] == []
    assert 0.6e9 <= rec["true_ns"] - emu.run_t0_ns < 0.6e9 + emu.period_ns


def test_dropout_and_defects_in_truth(tmp_path: Path) -> None:
    faults = [Fault(kind="dropout", t_s=0.3, duration_s=0.5, rate=1.0),
              Fault(kind="blur", t_s=0.9, duration_s=0.3)]
    emu = make_emu(tmp_path, faults=faults)
    with running(emu):
        parts = read_parts(emu.uri, 1.4)
    recs = samples(tmp_path)
    dropped = [r["seq"] for r in recs if r.get("reason") == "dropout"]
    assert len(dropped) == pytest.approx(15, abs=1) and emu.sent["dropout"] == len(dropped)
    got = {parse_comment(jpeg_info(p.body).comment)[1] for p in parts}
    assert not got & set(dropped)
    assert any("blur_px" in r.get("defects", []) for r in recs)
    kinds = [r["kind"] for r in read_truth(tmp_path / "truth" / "camera.jsonl")
             if r["type"] == "fault"]
    assert kinds == ["dropout", "blur"]


def test_disconnect_closes_and_refuses_connections(tmp_path: Path) -> None:
    emu = make_emu(tmp_path, faults=[Fault(kind="disconnect", t_s=0.5, duration_s=0.6)])
    with running(emu):
        resp = urllib.request.urlopen(emu.uri, timeout=5)
        t0 = time.monotonic()
        while resp.read1(65536):
            assert time.monotonic() - t0 < 3
        closed_at = emu.t_s()
        assert 0.45 < closed_at < 0.9
        s = socket.create_connection(("127.0.0.1", emu.port), timeout=2)
        try:                                         # closed on accept while it lasts
            s.sendall(b"GET /stream.mjpg HTTP/1.0\r\n\r\n")
            assert s.recv(100) == b""
        except ConnectionResetError:
            pass
        s.close()
        time.sleep(max(0.0, 1.2 - emu.t_s()))
        parts = read_parts(emu.uri, 0.3)             # and back afterwards
        assert parts
    assert emu.sent["refused"] >= 1 and emu.sent["disconnects"] == 1


def test_calibration_endpoint_and_options(tmp_path: Path) -> None:
    emu = make_emu(tmp_path, width=400, height=300)
    assert emu.calibration["fx"] == pytest.approx(360.0) and emu.calibration["cx"] == 200
    with running(emu):
        base = emu.uri.rsplit("/", 1)[0]
        cal = json.load(urllib.request.urlopen(base + "/calibration.json", timeout=5))
        with pytest.raises(urllib.error.HTTPError):
            urllib.request.urlopen(base + "/nope", timeout=5)
    assert cal == emu.calibration
    with pytest.raises(ConfigError, match="devices.camera.options.widht"):
        make_emu(tmp_path / "x", widht=3)


def test_insert_jpeg_comment_round_trip() -> None:
    ok, enc = cv2.imencode(".jpg", np.zeros((8, 8, 3), np.uint8))
    j = insert_jpeg_comment(enc.tobytes(), b"edgecap-hil t_dev_ns=-5 seq=7")
    assert parse_comment(jpeg_info(j).comment) == (-5, 7)
    assert cv2.imdecode(np.frombuffer(j, np.uint8), cv2.IMREAD_COLOR).shape == (8, 8, 3)
    with pytest.raises(ValueError):
        insert_jpeg_comment(b"nope", b"x")


@pytest.mark.hil
def test_sustains_1280x720_at_30fps(tmp_path: Path) -> None:
    emu = make_emu(tmp_path, width=1280, height=720, fps=30.0)
    with running(emu):
        parts = read_parts(emu.uri, 5.0)
        wall = emu.t_s()
    assert len(parts) >= 0.95 * 30 * 4.9
    assert emu.sent.get("overrun", 0) == 0
    assert emu.capture_cpu_s / wall < 0.8      # render + encode under 80 % of one core
