"""The camera emulator's render process (hil.emulators.render_worker)."""

from __future__ import annotations

import os
import signal

import cv2
import numpy as np
import pytest

from agent.geometry import PinholeCamera
from hil.emulators.render_worker import NOISE_PATTERNS, RenderError, RenderWorker
from hil.render import default_calibration, render
from hil.scenario import load_scenario
from hil.world import World

W, H = 320, 240


def test_renders_what_the_renderer_renders_in_process() -> None:
    sc = load_scenario("city-drive")
    cal = default_calibration(W, H)
    w = RenderWorker(sc, cal, W, H, quality=85, sensor_noise=0.0)
    w.start()
    try:
        jpeg, boxes, cpu_s = w.render(3.0, 3, 1.0)
    finally:
        w.close()
    img, ref_boxes = render(World(sc), 3.0, PinholeCamera.from_calibration(cal, W, H), 1.0)
    ok, ref = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 85])
    assert jpeg == ref.tobytes()
    assert boxes == [b.as_dict() for b in ref_boxes] and boxes
    assert cpu_s > 0


def test_sensor_noise_cycles_through_its_patterns() -> None:
    w = RenderWorker(load_scenario("city-drive"), default_calibration(W, H), W, H)
    w.start()
    try:
        a, b, c = (w.render(2.0, seq, 1.0)[0] for seq in (0, 1, NOISE_PATTERNS))
    finally:
        w.close()
    assert a != b and a == c          # same scene, same pattern → the same bytes
    img = cv2.imdecode(np.frombuffer(a, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (H, W, 3)


def test_a_dead_worker_is_a_clear_error_and_close_is_idempotent() -> None:
    w = RenderWorker(load_scenario("city-drive"), default_calibration(W, H), W, H)
    w.start()
    assert w.pid is not None
    os.kill(w.pid, signal.SIGKILL)
    with pytest.raises(RenderError, match="render process is gone"):
        w.render(1.0, 0, 1.0)
    w.close()
    w.close()
    with pytest.raises(RenderError, match="not running"):
        w.render(1.0, 0, 1.0)
