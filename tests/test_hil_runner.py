"""`edgecap hil run`: the rig template, the run's cleanup contract, the scorer, and a short
city-drive end to end (emulators on real interfaces, the agent in its own process, upload
over CURVE, scored report). Longer scenarios are marked ``hil``."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest

from agent.config import load_config
from hil.runner import (TEMPLATE, HilError, HilRun, RunOptions, free_udp_port, render_rig,
                        toml_value)
from hil.scenario import load_scenario
from hil.score import check_assertions, err_stats, locate, rss_summary

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


# -- helpers -------------------------------------------------------------------------------
def children() -> list[int]:
    """PIDs of live (non-zombie) descendants of this process, from /proc."""
    parent: dict[int, int] = {}
    state: dict[int, str] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        parent[int(d.name)], state[int(d.name)] = int(fields[1]), fields[0]
    out, todo = [], [os.getpid()]
    while todo:
        p = todo.pop()
        for c, pp in parent.items():
            if pp == p:
                todo.append(c)
                if state[c] != "Z":
                    out.append(c)
    return out


def wait_no_children(timeout_s: float = 5.0) -> list[int]:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        left = children()
        if not left:
            return []
        time.sleep(0.1)
    return children()


def tcp_listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def udp_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def sleeper(ignore_term: bool = False) -> list[str]:
    """An 'agent' that records nothing and (optionally) ignores SIGTERM."""
    code = "import signal, time\n"
    if ignore_term:
        code += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    code += "time.sleep(120)\n"
    return [PY, "-c", code]


# -- the rig template ----------------------------------------------------------------------
VALUES = {
    "device_id": "hil-rig", "out_dir": "/tmp/x/recordings",
    "camera_uri": "http://127.0.0.1:8080/stream.mjpg", "camera_rate_hz": 30.0,
    "camera_width": 1280, "camera_height": 720,
    "camera_calibration": {"fx": 1152.0, "fy": 1152.0, "cx": 640.0, "cy": 360.0,
                           "extrinsics": {"x": 1.5, "y": 0.0, "z": 1.4}},
    "lidar_uri": "udp://127.0.0.1:7502",
    "lidar_metadata": str(ROOT / "hil" / "data" / "os1-64-1024x10.json"),
    "gps_uri": "serial:///tmp/x/gps.tty?baud=115200", "gps_rate_hz": 10.0,
    "gps_pps": "pps:emulated?epoch_ns=1&offset_ns=2&drift_ppm=0.0&jitter_ns=1000&seed=7",
    "audio_uri": "pulse:edgecap_hil_mic", "audio_pulse_server": "unix:/tmp/p/native",
    "audio_rate": 48000, "audio_channels": 1,
}


def test_template_is_valid_toml_and_renders_a_valid_rig(tmp_path):
    tomllib.loads(TEMPLATE.read_text())  # the template itself parses
    text = render_rig(TEMPLATE.read_text(), VALUES, {"camera", "lidar", "gps", "audio"})
    p = tmp_path / "rig.toml"
    p.write_text(text)
    cfg = load_config(p)  # what `edgecap config check` runs, driver options included
    names = {s.name: s for s in cfg.streams}
    assert set(names) == {"/camera/front", "/lidar/top", "/gps", "/mic/cabin"}
    cam = names["/camera/front"]
    assert cam.uri == VALUES["camera_uri"] and cam.rate_hz == 30.0
    assert cam.calibration["extrinsics"]["z"] == 1.4 and cam.options["width"] == 1280
    assert names["/gps"].options["pps"] == VALUES["gps_pps"]
    assert names["/mic/cabin"].options["pulse_server"] == "unix:/tmp/p/native"
    assert cfg.operations.metrics_port == 0 and not cfg.labelers
    r = subprocess.run([PY, "-m", "agent.cli", "config", "check", str(p)],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_disabled_devices_and_labelers_are_left_out():
    text = render_rig(TEMPLATE.read_text(), VALUES, {"camera", "label-camera"})
    doc = tomllib.loads(text)
    assert [s["driver"] for s in doc["streams"]] == ["camera.opencv"]
    assert [lab["kind"] for lab in doc["labelers"]] == ["camera.yolo"]
    code = "\n".join(x for x in text.splitlines() if not x.lstrip().startswith("#"))
    assert "lidar" not in code and "gps" not in code and "pulse" not in code


def test_render_errors_name_the_problem():
    with pytest.raises(HilError, match="unknown placeholder {nope}"):
        render_rig('uri = "{nope}"\n', {}, set())
    with pytest.raises(HilError, match="never closed"):
        render_rig("#>> camera\nx = 1\n", {}, {"camera"})
    with pytest.raises(HilError, match="without its"):
        render_rig("#<< camera\n", {}, set())
    # text placeholders inside a longer string are escaped as TOML
    out = render_rig('a = "x-{v}-y"\n', {"v": 'q"z'}, set())
    assert tomllib.loads(out)["a"] == 'x-q"z-y'


def test_toml_values_round_trip():
    v = {"s": 'a "b" \\ c', "i": 3, "f": 0.1, "b": True, "l": [1, 2.5, "x"],
         "d": {"nested key": {"k": -1}}}
    assert tomllib.loads(f"v = {toml_value(v)}\n")["v"] == v
    with pytest.raises(ValueError):
        toml_value(float("nan"))


# -- scoring pieces ------------------------------------------------------------------------
def test_err_stats_signed_median_and_magnitudes():
    e = np.array([1, 2, 3, -40, 2, 2, 2, 2, 2, 2]) * 1_000_000
    s = err_stats(e)
    assert s["n"] == 10 and s["p50_ms"] == 2.0 and s["max_ms"] == 40.0
    assert 30 < s["p99_ms"] <= 40 and s["spread_p99_ms"] > 30
    assert err_stats([])["p99_ms"] is None


def test_locate_finds_recorded_audio_in_the_emitted_signal():
    rng = np.random.default_rng(3)
    ref = (rng.normal(0, 100, 200_000)).astype(np.int16)
    piece = ref[123_457:123_457 + 24_000]
    pos, corr = locate(piece, ref, guess=120_000, search=48_000)
    assert pos == 123_457 and corr > 0.999
    pos, corr = locate(np.zeros(1000, np.int16), ref, 0, 1000)
    assert pos == -1


def test_rss_summary_growth_and_slope():
    rss = [(float(t), int((100 + 0.05 * t) * 2**20)) for t in range(0, 600)]
    s = rss_summary(rss)
    assert s["growth_mb"] == pytest.approx(29.7, abs=0.5)
    assert s["slope_mb_per_min"] == pytest.approx(3.0, abs=0.05)
    assert rss_summary([])["samples"] == 0


def _report(**over):
    rep = {"streams": {"camera": {"ts": {"p99_ms": 2.0}, "loss_share": 0.0},
                       "gps": {"ts": {"p99_ms": 30.0}, "loss_share": 0.1}},
           "labels": {"camera": {"note": "no labels"}},
           "segments": {"verified_share": 1.0},
           "agent": {"rss": {"growth_mb": 3.0, "slope_mb_per_min": 0.1}}}
    rep.update(over)
    return rep


def test_assertions_pass_fail_skip_and_unknown_keys():
    res = check_assertions(_report(), {
        "camera_ts_p99_ms": 5.0, "gps_ts_p99_ms": 10.0, "max_loss_share": 0.05,
        "min_segments_verified_share": 1.0, "camera_recall_min": 0.5,
        "lidar_ts_p99_ms": 1.0, "camera_ts_p99_msec": 1.0})
    by = {r["key"]: r for r in res["results"]}
    assert by["camera_ts_p99_ms"]["ok"] and by["min_segments_verified_share"]["ok"]
    assert not by["gps_ts_p99_ms"]["ok"] and not by["max_loss_share"]["ok"]
    # labels absent and a device that did not run: skipped, listed, not failed
    assert {r["key"] for r in res["skipped"]} == {"camera_recall_min", "lidar_ts_p99_ms"}
    assert by["camera_ts_p99_msec"]["note"] == "unknown assertion key"
    assert {r["key"] for r in res["failed"]} == {"gps_ts_p99_ms", "max_loss_share",
                                                 "camera_ts_p99_msec"}
    assert not res["ok"]
    # a stream that ran but measured nothing fails
    rep = _report()
    rep["streams"]["camera"]["ts"]["p99_ms"] = None
    assert not check_assertions(rep, {"camera_ts_p99_ms": 5.0})["ok"]


def test_every_shipped_scenario_loads_with_known_assertions():
    for name in ("city-drive", "clock-stress", "faults", "soak"):
        sc = load_scenario(name)
        res = check_assertions(_report(), sc.assertions)
        assert not [r for r in res["results"] if r.get("note") == "unknown assertion key"], name


# -- cleanup contract ----------------------------------------------------------------------
def _emulator_ports(run: HilRun) -> tuple[int, int | None]:
    cam = int(run.emulators["camera"].uri.rsplit(":", 1)[1].split("/")[0])
    li = run.emulators.get("lidar")
    return cam, (li.dest[1] if li is not None else None)


def test_agent_that_fails_to_start_leaves_no_process_or_port(tmp_path):
    sc = load_scenario("city-drive", duration_s=5)
    opts = RunOptions(out_dir=tmp_path, devices={"camera", "gps", "audio"}, upload=False,
                      start_delay_s=0.5,
                      agent_cmd=[PY, "-c", "import sys; print('boom'); sys.exit(3)"])
    with pytest.raises(HilError, match="exited with status 3") as ei:
        with HilRun(sc, opts) as run:
            run.run()
    assert "boom" in str(ei.value)  # the agent's log tail is in the message
    cam_port, _ = _emulator_ports(run)
    assert wait_no_children() == []
    assert not tcp_listening(cam_port)
    assert not (run.run_dir / "gps.tty").exists()
    assert run.pulse is not None and not run.pulse.active


def test_exception_inside_the_run_stops_everything(tmp_path):
    sc = load_scenario("city-drive", duration_s=30)
    opts = RunOptions(out_dir=tmp_path, devices={"camera", "lidar", "gps"}, upload=False,
                      start_delay_s=0.3, agent_cmd=sleeper(ignore_term=True),
                      stop_timeout_s=1.0)
    with pytest.raises(RuntimeError, match="test failure"):
        with HilRun(sc, opts) as run:
            run.start_emulators()
            run.start_agent(run.render(), 30)
            assert run.agent is not None and run.agent.poll() is None
            assert run.agent.pid in children()
            raise RuntimeError("test failure")
    cam_port, lidar_port = _emulator_ports(run)
    # the agent ignored SIGTERM: it was killed after stop_timeout_s
    assert run.agent.returncode is not None and run.agent.returncode < 0
    assert wait_no_children() == []
    assert not tcp_listening(cam_port)
    assert lidar_port is not None and udp_free(lidar_port)
    run.close()  # idempotent


def test_keyboard_interrupt_stops_everything(tmp_path):
    sc = load_scenario("city-drive", duration_s=30)
    opts = RunOptions(out_dir=tmp_path, devices={"gps"}, upload=False, start_delay_s=0.2,
                      agent_cmd=sleeper())
    with pytest.raises(KeyboardInterrupt):
        with HilRun(sc, opts) as run:
            run.start_emulators()
            run.start_agent(run.render(), 30)
            raise KeyboardInterrupt
    assert run.agent.returncode is not None
    assert wait_no_children() == []


def descendants(pid: int) -> list[int]:
    """Live descendants of ``pid`` (from /proc)."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                f = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if f[0] != "Z":
                parent[int(d.name)] = int(f[1])
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c, pp in parent.items():
            if pp == p:
                out.append(c)
                todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        st = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return st != "Z"


def test_sigterm_to_hil_run_stops_the_agent_and_emulators(tmp_path):
    """`edgecap hil run` killed with SIGTERM (a CI timeout, systemd) leaves nothing behind:
    neither the agent nor the sound server nor its player survive it."""
    import signal

    p = subprocess.Popen([PY, "-m", "agent.cli", "hil", "run", "city-drive", "-d", "60",
                          "--out", str(tmp_path), "--no-upload"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen: set[int] = set()
        end = time.monotonic() + 40
        while time.monotonic() < end and p.poll() is None:
            seen |= set(descendants(p.pid))
            if list(tmp_path.glob("*/recordings/*/*.mcap*")):
                seen |= set(descendants(p.pid))
                break
            time.sleep(0.2)
        assert list(tmp_path.glob("*/recordings/*/*.mcap*")), p.stderr.read() \
            if p.poll() is not None else "the agent never recorded"
        assert len(seen) >= 3  # the agent, pulseaudio, pacat, ...
        p.send_signal(signal.SIGTERM)
        _out, err = p.communicate(timeout=40)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 130, err
    assert "stopped" in err
    end = time.monotonic() + 5
    while time.monotonic() < end and any(alive(x) for x in seen):
        time.sleep(0.1)
    assert not [x for x in seen if alive(x)]


def test_options_are_checked(tmp_path):
    sc = load_scenario("city-drive", duration_s=5)
    with pytest.raises(HilError, match="unknown device"):
        HilRun(sc, RunOptions(out_dir=tmp_path, devices={"radar"}))
    off = sc.model_copy(deep=True)
    off.devices.gps.enabled = False
    with pytest.raises(HilError, match="no device left"):
        HilRun(off, RunOptions(out_dir=tmp_path, devices={"gps"}))
    assert free_udp_port() > 0


# -- end to end ----------------------------------------------------------------------------
def _hil(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "agent.cli", "hil", *args], capture_output=True,
                          text=True, cwd=ROOT, timeout=timeout)


@pytest.fixture(scope="module")
def city_drive(tmp_path_factory):
    """One short city-drive run shared by the end-to-end tests (~19 s wall)."""
    for attempt in range(2):
        out = tmp_path_factory.mktemp("hil")
        t = time.monotonic()
        r = _hil("run", "city-drive", "--duration", "12", "--out", str(out), "--report",
                 str(out / "report.json"))
        wall = time.monotonic() - t
        stalled = _host_stalled(out / "report.json")
        if r.returncode == 0 or not stalled or attempt:
            break
        # the emulators could not keep time: the host stalled, the run says nothing of the
        # agent; one more run (a stall twice in a row fails as it is)
        print(f"city-drive run {attempt + 1}: the host stalled ({stalled}); running again")
        shutil.rmtree(out, ignore_errors=True)
    yield r, out, wall
    shutil.rmtree(out, ignore_errors=True)


def _host_stalled(report: Path) -> str:
    """Why the run's emulators fell behind (a shortfall of the host, recorded in their
    truth as withheld frames/scans), or '' when they kept time."""
    try:
        streams = json.loads(report.read_text())["streams"]
    except (OSError, ValueError, KeyError):
        return ""
    late = {d: f"{row['withheld']}/{row['truth']} withheld" for d, row in streams.items()
            if row.get("truth") and row.get("withheld", 0) > 0.1 * row["truth"]}
    return ", ".join(f"{d} {v}" for d, v in late.items())


def test_city_drive_runs_and_passes(city_drive):
    r, out, wall = city_drive
    print(r.stdout[-3000:])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert wall < 40
    rep = json.loads((out / "report.json").read_text())
    assert rep["assertions"]["ok"] and not rep["assertions"]["failed"]
    for dev in ("camera", "lidar", "gps", "audio"):
        row = rep["streams"][dev]
        assert row["received"] > 0 and row["ts"]["n"] > 0, (dev, row)
        assert row["loss_share"] <= 0.05, (dev, row)  # start-up drain, see city-drive.toml
        # the agent's timestamps beat naive arrival stamping at the median
        assert abs(row["ts"]["p50_ms"]) <= abs(row["naive"]["p50_ms"]) + 1.0, (dev, row)
    # 12 s at the nominal rates are due (360 frames, 120 scans and fixes, 576 k samples). On
    # a saturated or stalled 2-core host the camera and LiDAR emulators withhold what they
    # cannot render in time (counted in their truth, not the agent's loss, which loss_share
    # bounds above): the truth's books must balance, and enough must have been sent for the
    # run to mean something
    least = {"camera": 30, "lidar": 20, "gps": 60, "audio": 6 * 48_000}
    for dev, n in least.items():
        row = rep["streams"][dev]
        assert row["received"] + row["lost"] == row["truth"], (dev, row)
        assert row["received"] >= n, (dev, row, rep["emulators"].get(dev))
    seg = rep["segments"]
    assert seg["total"] >= 2 and seg["verified"] == seg["total"]
    up = rep["upload"]
    assert up["uploaded"] + up["duplicates"] == seg["total"] and up["verified"] == seg["total"]
    assert up["store"]["problems"] == [] and up["store"]["entries"] == seg["total"]
    assert rep["agent"]["exit_status"] == 0 and rep["agent"]["stopped_by"] == "sigterm"
    assert rep["agent"]["rss"]["samples"] >= 5
    run_dir = Path(rep["run_dir"])
    assert (run_dir / "report.json").exists() and (run_dir / "rig.toml").exists()
    assert "t_ns err ms" in r.stdout and "assertions passed" in r.stdout
    assert wait_no_children() == []


def test_failed_assertion_makes_the_exit_status_non_zero(city_drive, tmp_path):
    _r, out, _wall = city_drive
    run_dir = next(p for p in out.iterdir() if p.is_dir())
    strict = tmp_path / "strict.toml"
    text = (ROOT / "hil" / "scenarios" / "city-drive.toml").read_text()
    strict.write_text(text.split("[assertions]")[0] + "\n[assertions]\n"
                      "camera_ts_p99_ms = 0.000001\nmax_loss_share = 0.5\n")
    meta = json.loads((run_dir / "run.json").read_text())
    meta["scenario_path"] = str(strict)
    (run_dir / "run.json").write_text(json.dumps(meta))
    r = _hil("score", str(run_dir), "--report", str(tmp_path / "r.json"))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "FAIL camera_ts_p99_ms" in r.stdout and "pass max_loss_share" in r.stdout
    rep = json.loads((tmp_path / "r.json").read_text())
    assert [f["key"] for f in rep["assertions"]["failed"]] == ["camera_ts_p99_ms"]


def test_label_scoring_reads_label_channels(city_drive):
    """Labels made from the truth itself, in the labelers' own message formats, score
    perfectly: the glue (frame keys, decoding, windows) is right."""
    from agent.labelers import ModelInfo
    from agent.labelers._foxglove import image_annotations, scene_update
    from hil.runner import RunResult
    from hil.score import Bundle, _truth, score_audio, score_labels

    _r, out, _wall = city_drive
    run_dir = next(p for p in out.iterdir() if p.is_dir())
    res = RunResult.load(run_dir)
    b = Bundle(Path(res.session_dir), ["/mic/cabin"])
    model = ModelInfo("truth", "1")
    cam = {r["seq"]: r for r in _truth(run_dir, "camera") if r["type"] == "sample"}
    msgs = []
    frames = b.stamps["/camera/front"].tolist()
    for t, _d, _rx, seq in frames[::max(1, len(frames) // 12)]:
        dets = [{"cls": x["cls"], "score": 0.9, "box": [x["x0"], x["y0"], x["x1"], x["y1"]]}
                for x in cam[seq].get("boxes", [])]
        msgs.append((t, image_annotations(t, dets, model, "camera.yolo",
                                          "/camera/front").SerializeToString(), ""))
    b.labels["/labels/camera/front/yolo"] = msgs
    lid = {r["device_ns"]: r for r in _truth(run_dir, "lidar") if r["type"] == "sample"}
    msgs = []
    scans = b.stamps["/lidar/top"].tolist()
    for t, d, _rx, _seq in scans[::max(1, len(scans) // 16)]:
        fr = lid[max(k for k in lid if k <= d)]
        dets = [{"cls": x["cls"], "score": 1.0, "bbox3d": {k: x[k] for k in
                                                           ("center", "size", "yaw")}}
                for x in fr["boxes"]]
        msgs.append((t, scene_update(t, "/lidar/top", dets, model, "lidar.clusters",
                                     "/lidar/top").SerializeToString(), ""))
    b.labels["/labels/lidar/top/clusters"] = msgs
    speech = [{"start_ns": r["true_start_ns"], "end_ns": r["true_end_ns"]}
              for r in _truth(run_dir, "audio") if r.get("kind") == "speech"]
    b.labels["/labels/mic/cabin/vad"] = [(s["end_ns"], json.dumps(
        {"segments": [s]}).encode(), "edgecap.AudioLabels") for s in speech]
    audio = score_audio(run_dir, b, "/mic/cabin", res.run_t0_ns)
    lab = score_labels(run_dir, b, res, {"audio": audio})
    assert lab["camera"]["recall"] == 1.0 and lab["camera"]["precision"] == 1.0, lab["camera"]
    assert lab["camera"]["map50"] == 1.0 and lab["camera"]["frames_labelled"] >= 10
    assert lab["lidar"]["recall"] == 1.0 and lab["lidar"]["scans_labelled"] >= 15, lab["lidar"]
    assert lab["vad"]["f1"] == 1.0 and lab["vad"]["truth_segments"] == 1, lab["vad"]


def test_bad_scenario_and_device_are_clear_errors():
    r = _hil("run", "no-such-scenario", timeout=60)
    assert r.returncode == 2 and "no such scenario" in r.stderr and "city-drive" in r.stderr
    r = _hil("run", "city-drive", "--devices", "camera,radar", timeout=60)
    assert r.returncode == 2 and "radar" in r.stderr


# -- long scenarios (make test-hil) --------------------------------------------------------
def _scenario_run(name: str, tmp_path: Path, *extra: str, timeout: float) -> dict:
    r = _hil("run", name, "--out", str(tmp_path), "--report", str(tmp_path / "r.json"),
             *extra, timeout=timeout)
    print(r.stdout[-4000:])
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert wait_no_children() == []
    return json.loads((tmp_path / "r.json").read_text())


@pytest.mark.hil
def test_faults_scenario(tmp_path):
    rep = _scenario_run("faults", tmp_path, timeout=300)
    s = rep["streams"]
    # every emulator's deliberate faults show up as withheld units, and the run still
    # loses almost nothing it was not told to lose
    assert s["camera"]["withheld"] > 0 and s["gps"]["withheld"] > 0
    assert s["lidar"]["packets"]["truth"]["packets_dropped"] > 0
    assert s["lidar"]["agent"]["corrupt"] > 0 and s["lidar"]["agent"]["truncated"] > 0
    assert s["gps"]["agent"]["corrupt"] > 0
    assert s["audio"]["runs"] >= 2  # the unplugged mic came back
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.hil
@pytest.mark.realtime  # its assertions are issue 5's 0.1 ms goals: a host stall breaks them
def test_clock_stress_scenario(tmp_path):
    rep = _scenario_run("clock-stress", tmp_path, timeout=400)
    for dev in ("camera", "lidar", "gps"):
        row = rep["streams"][dev]
        # the estimator beats arrival stamping by a wide margin under heavy jitter
        assert row["ts"]["p99_ms"] < row["naive"]["p99_ms"], (dev, row)
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.hil
def test_soak_scenario(tmp_path):
    rep = _scenario_run("soak", tmp_path, "--no-upload", timeout=1800)
    rss = rep["agent"]["rss"]
    assert rss["samples"] > 1000
    print(f"agent RSS {rss}")
    shutil.rmtree(tmp_path, ignore_errors=True)
