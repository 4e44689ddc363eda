"""An emulator in a child process: the same interface and counts, errors said, no leftover."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from hil.emulators.isolated import Isolated, IsolatedError
from hil.scenario import DeviceSettings, load_scenario

ROOT = Path(__file__).resolve().parent.parent


def _camera(tmp_path: Path, **opts: object) -> Isolated:
    sc = load_scenario("city-drive", duration_s=10)
    s = DeviceSettings(rate_hz=15, options={"width": 160, "height": 120, **opts})
    return Isolated("camera", sc, s, tmp_path, time.monotonic_ns(),
                    attrs=("fps", "opts", "calibration"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_serves_from_its_own_process_and_reports_its_counts(tmp_path):
    emu = _camera(tmp_path)
    emu.start()
    try:
        assert emu.uri.startswith("http://127.0.0.1:") and emu.fps == 15.0
        assert emu.opts.width == 160 and emu.calibration
        pid = emu.pid
        assert pid != os.getpid() and _alive(pid)
        with urllib.request.urlopen(emu.uri, timeout=5) as r:
            data = b""
            while data.count(b"\xff\xd9") < 3:
                data += r.read(4096)
    finally:
        emu.stop()
    emu.stop()  # idempotent
    assert not _alive(pid)
    assert emu.sent["sent"] >= 3 and emu.sent["captured"] >= emu.sent["sent"]
    truth = (tmp_path / "truth" / "camera.jsonl").read_text().splitlines()
    assert '"type":"summary"' in truth[-1].replace(" ", "")  # the child closed its log
    with pytest.raises(AttributeError, match="not one of the attributes"):
        emu.no_such_attribute


def test_a_failing_start_is_a_clear_error_and_leaves_no_process(tmp_path):
    emu = _camera(tmp_path, width=-5)
    with pytest.raises(IsolatedError, match="camera emulator: .*width"):
        emu.start()
    assert emu.pid is None
    emu.stop()
    with pytest.raises(ValueError, match="no isolated emulator"):
        Isolated("radar", load_scenario("city-drive"), DeviceSettings(), tmp_path, 0)


def test_dies_with_its_parent(tmp_path):
    code = (
        "import time, sys\n"
        "from hil.emulators.isolated import Isolated\n"
        "from hil.scenario import DeviceSettings, load_scenario\n"
        "sc = load_scenario('city-drive', duration_s=10)\n"
        "s = DeviceSettings(rate_hz=5, options={'width': 160, 'height': 120})\n"
        f"emu = Isolated('camera', sc, s, {str(tmp_path)!r}, time.monotonic_ns())\n"
        "emu.start()\n"
        "print(emu.pid, flush=True)\n"
        "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        child = int(parent.stdout.readline())
        assert _alive(child)
        parent.send_signal(signal.SIGKILL)
        parent.wait(5)
        end = time.monotonic() + 5
        while time.monotonic() < end and _alive(child):
            time.sleep(0.05)
        assert not _alive(child)
    finally:
        parent.kill()
