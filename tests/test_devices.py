"""``edgecap devices``: listing never raises; probing opens a real interface."""

from __future__ import annotations

import time
from pathlib import Path

from click.testing import CliRunner

from agent import devices
from agent.cli import main
from hil.emulators.camera import CameraEmulator
from hil.scenario import DeviceSettings, load_scenario
from hil.world import World


def test_list_all_has_every_kind() -> None:
    found = devices.list_all()
    assert set(found) == {"cameras", "audio_inputs", "serial_ports", "pps", "ptp"}
    res = CliRunner().invoke(main, ["devices", "--json"])
    assert res.exit_code == 0 and '"serial_ports"' in res.output


def test_probe_the_camera_emulator_over_http(tmp_path: Path) -> None:
    world = World(load_scenario("city-drive", duration_s=10))
    s = DeviceSettings(rate_hz=15, options={"width": 320, "height": 240})
    with CameraEmulator(world, s, tmp_path, time.monotonic_ns()) as emu:
        rep = devices.probe("camera.opencv", emu.uri, seconds=4, max_samples=3)
    assert "error" not in rep, rep
    assert rep["streams"][0]["encoding"] == "jpeg"
    assert len(rep["samples"]) == 3 and all(x["device_t_ns"] for x in rep["samples"])
    assert rep["counters"]["received"] >= 3


def test_probe_errors_are_reported_not_raised() -> None:
    rep = devices.probe("camera.opencv", "http://127.0.0.1:9/none.mjpg", seconds=1)
    assert "error" in rep
    rep = devices.probe("camera.nope", "x")
    assert "unknown driver" in rep["error"]
    res = CliRunner().invoke(main, ["devices", "--probe", "weird://x"])
    assert res.exit_code == 2 and "give --driver" in res.output
