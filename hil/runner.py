"""One HIL run: emulators up, the agent recording them in its own process, everything down.

    with HilRun(load_scenario("city-drive", duration_s=12), RunOptions()) as run:
        result = run.run()          # blocks for the scenario's duration (+ start, stop, upload)
    report = score_run(result.run_dir)          # hil/score.py

Sequence (``run``)::

    World(scenario) ─▶ emulators constructed with run_t0_ns = now + start_delay_s
      ─▶ emulators started (ports bound, pty made, sound server up; each begins sending
         at t = 0 or at "now" if it was slow to start); camera and LiDAR each in a
         process of its own (``emulators/isolated.py``), GPS and microphone in this one
      ─▶ examples/hil-rig.toml rendered into run_dir/rig.toml (their URIs, ports, paths)
      ─▶ agent: ``python -m agent.cli record -c rig.toml -o run_dir/recordings -d … -q``
         in its own process (its own GIL: the emulators' timing stays honest on 2 cores),
         its RSS and CPU sampled every ``rss_interval_s``
      ─▶ at t = duration: SIGTERM to the agent, wait for it to close its segments
      ─▶ emulators stopped (truth logs closed) ─▶ optional upload to a loopback ingest
         server with CURVE keys made in run_dir ─▶ run_dir/run.json

Cleanup contract: every process, thread, socket and sound server the run started is
stopped by :meth:`HilRun.close` — called by ``__exit__`` (also on exceptions and
KeyboardInterrupt), by an ``atexit`` hook, and idempotent. The agent runs in its own
session (process group) with ``PR_SET_PDEATHSIG`` so it dies with this process even after
``kill -9``; close() sends SIGTERM to its group, then SIGKILL after ``stop_timeout_s``.

Threads: ``run`` and ``close`` are called from one thread (normally the main thread);
emulators run their own threads. Times: ``*_ns`` are host ``CLOCK_MONOTONIC``, the agent's
timebase (``clock.timebase = "monotonic"``) and the world's true time.
"""

from __future__ import annotations

import atexit
import ctypes
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from agent.errors import EdgecapError

from .emulators.isolated import Isolated, IsolatedError
from .scenario import Scenario
from .world import World

log = logging.getLogger("edgecap.hil.runner")

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "examples" / "hil-rig.toml"
DEVICES = ("camera", "lidar", "gps", "audio")
#: stream name each device gets in the rig template (the scorer looks them up here)
STREAMS = {"camera": "/camera/front", "lidar": "/lidar/top", "gps": "/gps",
           "audio": "/mic/cabin"}
#: labeler tag in the template → (labeler kind, device it needs)
LABELERS = {"label-camera": ("camera.yolo", "camera"), "label-audio": ("audio.vad", "audio"),
            "label-lidar": ("lidar.clusters", "lidar")}
DEVICE_ID = "hil-rig"


class HilError(EdgecapError):
    """A HIL run cannot be set up or the agent failed (the message says which and why)."""


# -- rig template ------------------------------------------------------------------------
def toml_value(v: Any) -> str:
    """``v`` as a TOML value: strings, ints, floats, bools, lists and dicts (inline)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        if isinstance(v, float) and v != v:  # NaN has no place in a rig file
            raise ValueError("NaN is not a valid rig value")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_toml_key(k)} = {toml_value(x)}" for k, x in v.items()) \
            + " }"
    raise TypeError(f"cannot write {type(v).__name__} into a rig file")


def _toml_key(k: str) -> str:
    return k if re.fullmatch(r"[A-Za-z0-9_-]+", k) else json.dumps(k)


_WHOLE = re.compile(r'"\{([a-z_][a-z0-9_]*)\}"')
_INNER = re.compile(r"\{([a-z_][a-z0-9_]*)\}")
_BLOCK = re.compile(r"^#(>>|<<) *([A-Za-z0-9_-]+) *$")


def render_rig(template: str, values: dict[str, Any], tags: set[str]) -> str:
    """Render the rig template (rules in ``examples/hil-rig.toml``). Raises HilError for
    an unknown placeholder or unbalanced ``#>>``/``#<<`` markers."""
    out: list[str] = []
    stack: list[tuple[str, bool]] = []
    for n, line in enumerate(template.splitlines(), 1):
        m = _BLOCK.match(line.strip())
        if m:
            if m[1] == ">>":
                stack.append((m[2], m[2] in tags))
            elif not stack or stack.pop()[0] != m[2]:
                raise HilError(f"rig template line {n}: '#<< {m[2]}' without its '#>>'")
            continue
        if all(keep for _, keep in stack):
            out.append(line)
    if stack:
        raise HilError(f"rig template: '#>> {stack[-1][0]}' is never closed")
    text = "\n".join(out) + "\n"

    def whole(m: re.Match[str]) -> str:
        if m[1] not in values:
            raise HilError(f"rig template: unknown placeholder {{{m[1]}}}; known: "
                           f"{', '.join(sorted(values))}")
        return toml_value(values[m[1]])

    def inner(m: re.Match[str]) -> str:
        if m[1] not in values:
            raise HilError(f"rig template: unknown placeholder {{{m[1]}}}")
        return json.dumps(str(values[m[1]]))[1:-1]

    lines = [line if line.lstrip().startswith("#") else _INNER.sub(inner, _WHOLE.sub(whole, line))
             for line in text.splitlines()]
    return "\n".join(lines) + "\n"


def labeler_available(kind: str) -> bool:
    """Whether the labeler ``kind`` can run here (its code imports and its model file is
    installed), so a rig never names a labeler that would fail to start."""
    try:
        from agent import labelers

        labelers.get(kind)
        if kind == "camera.yolo":
            from agent.labelers.camera_yolo import DEFAULT_MODEL
            return DEFAULT_MODEL.is_file()
        if kind == "audio.vad":
            from agent.labelers.audio_vad import silero_model_path
            return silero_model_path().is_file()
        return True
    except Exception:  # noqa: BLE001 - any failure means "not here"
        return False


# -- options and result ------------------------------------------------------------------
@dataclass
class RunOptions:
    """How to run a scenario. ``devices`` None = every device the scenario enables."""

    out_dir: Path | None = None
    devices: set[str] | None = None
    upload: bool = True
    labels: bool = True
    template: Path = TEMPLATE
    start_delay_s: float = 4.0
    stop_timeout_s: float = 20.0
    inspect_timeout_s: float = 300.0
    agent_start_timeout_s: float = 30.0
    rss_interval_s: float = 1.0
    #: the agent's command line; ``{rig}``, ``{out}`` and ``{duration}`` are filled in
    agent_cmd: list[str] | None = None
    upload_give_up_s: float = 30.0
    python: str = sys.executable


@dataclass
class RunResult:
    """What a run did (also written to ``run_dir/run.json``; the scorer reads it)."""

    scenario: str
    scenario_path: str
    run_dir: str
    duration_s: float
    run_t0_ns: int
    devices: list[str]
    streams: dict[str, str]
    labelers: list[str]
    rig: str
    agent_cmd: list[str]
    agent_rc: int | None = None
    agent_log: str = ""
    agent_started_ns: int = 0
    agent_stopped_ns: int = 0
    agent_stop: str = ""           # "sigterm" | "exited" | "killed"
    session_dir: str | None = None
    emulators: dict[str, dict[str, Any]] = field(default_factory=dict)
    rss: list[tuple[float, int]] = field(default_factory=list)   # (t_s, bytes)
    cpu_s: float | None = None
    upload: dict[str, Any] | None = None
    upload_note: str = ""
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    def save(self) -> Path:
        p = Path(self.run_dir) / "run.json"
        p.write_text(json.dumps(asdict(self), indent=1) + "\n")
        return p

    @classmethod
    def load(cls, run_dir: str | Path) -> "RunResult":
        d = json.loads((Path(run_dir) / "run.json").read_text())
        d["rss"] = [tuple(x) for x in d.get("rss", [])]
        return cls(**d)


# -- process helpers ---------------------------------------------------------------------
def _pdeathsig() -> None:  # in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def free_udp_port() -> int:
    """A UDP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_rss_cpu(pid: int) -> tuple[int | None, float | None]:
    """(resident bytes, CPU seconds user+system) of ``pid``; psutil when installed, else
    ``/proc``. (None, None) when the process is gone."""
    try:
        import psutil

        p = psutil.Process(pid)
        with p.oneshot():
            t = p.cpu_times()
            return int(p.memory_info().rss), float(t.user + t.system)
    except ImportError:
        pass
    except Exception:  # noqa: BLE001 - NoSuchProcess, AccessDenied, zombie
        return None, None
    try:
        rss = None
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return rss, cpu
    except (OSError, ValueError, IndexError):
        return None, None


# -- the run -----------------------------------------------------------------------------
class HilRun:
    """Context manager owning every process and thread of one run (see module doc).

    ``run()`` does the whole sequence; the steps (``start_emulators``, ``start_agent``,
    ``wait_agent``, ``stop_agent``, ``stop_emulators``, ``upload``) are public for tests
    and for ``edgecap hil emulate``. ``close()`` is safe at any point and more than once.
    """

    def __init__(self, scenario: Scenario, options: RunOptions | None = None):
        self.sc = scenario
        self.opts = options or RunOptions()
        enabled = {d for d in DEVICES if getattr(scenario.devices, d).enabled}
        want = self.opts.devices if self.opts.devices is not None else set(DEVICES)
        unknown = set(want) - set(DEVICES)
        if unknown:
            raise HilError(f"unknown device(s) {sorted(unknown)}; known: {', '.join(DEVICES)}")
        self.devices = [d for d in DEVICES if d in enabled and d in want]
        #: what was left out and why (reported with the run)
        self.notes: list[str] = []
        if "audio" in self.devices and self.opts.devices is None:
            from .pulse import pulse_unavailable

            why = pulse_unavailable()
            if why:  # not asked for by name: run without it rather than fail
                self.devices.remove("audio")
                self.notes.append(f"audio left out: {why}")
        if not self.devices:
            raise HilError("no device left to run (all disabled in the scenario or excluded)")
        base = (Path(self.opts.out_dir) if self.opts.out_dir else Path(tempfile.gettempdir())).resolve()
        base.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S")
        self.run_dir = Path(tempfile.mkdtemp(prefix=f"{scenario.name}-{stamp}-", dir=base))
        self.world = World(scenario)
        self.emulators: dict[str, Any] = {}
        self.pulse: Any = None
        self.agent: subprocess.Popen[bytes] | None = None
        self._agent_log_f: Any = None
        self.ingest: Any = None
        self.run_t0_ns = 0
        self.result: RunResult | None = None
        self._closed = False
        self._sampler: threading.Thread | None = None
        self._sampler_stop = threading.Event()
        self._lock = threading.RLock()
        atexit.register(self.close)

    # -- context ------------------------------------------------------------------------
    def __enter__(self) -> "HilRun":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- steps --------------------------------------------------------------------------
    def start_emulators(self) -> None:
        """Construct and start the emulators of ``self.devices``; t = 0 is
        ``start_delay_s`` after the (slow) sound-server start. Blocks ~0.5–3 s."""
        if "audio" in self.devices:
            from .pulse import PulseError, PulseServer

            a = self.sc.devices.audio
            ch = int(a.options.get("channels", 1)) if isinstance(a.options, dict) else 1
            self.pulse = PulseServer(rate=int(a.rate_hz or 48_000), channels=ch)
            try:
                self.pulse.start()
            except PulseError as e:
                if self.opts.devices is not None or len(self.devices) == 1:
                    raise HilError(f"the microphone emulator needs a sound server: {e}") \
                        from None
                self.devices.remove("audio")
                self.notes.append(f"audio left out: {e}")
                self.pulse = None
        self._prewarm()
        self._import_emulators()
        self.run_t0_ns = time.monotonic_ns() + int(self.opts.start_delay_s * 1e9)
        d = self.sc.devices
        for dev in self.devices:
            # camera and LiDAR render in processes of their own (hil/emulators/isolated.py)
            if dev == "camera":
                emu = Isolated("camera", self.sc, d.camera, self.run_dir, self.run_t0_ns,
                               attrs=("fps", "opts", "calibration"))
            elif dev == "lidar":
                emu = Isolated("lidar", self.sc, d.lidar, self.run_dir, self.run_t0_ns,
                               attrs=("metadata_path", "dest"), dest_port=free_udp_port())
            elif dev == "gps":
                from .emulators.gps import GpsEmulator
                emu = GpsEmulator(self.world, d.gps, self.run_dir, self.run_t0_ns)
            else:
                from .emulators.audio import AudioEmulator
                emu = AudioEmulator(self.world, d.audio, self.run_dir, self.run_t0_ns,
                                    pulse=self.pulse)
            self.emulators[dev] = emu
            t = time.monotonic()
            try:
                emu.start()
            except IsolatedError as e:
                raise HilError(str(e)) from None
            log.debug("%s emulator started in %.2f s", dev, time.monotonic() - t)
        late = (time.monotonic_ns() - self.run_t0_ns) / 1e9
        if late > 0:
            log.info("emulators were up %.2f s after t = 0 (they start at 'now')", late)

    def _import_emulators(self) -> None:
        """Import the emulator modules (cv2, ouster-sdk, open3d: ~1 s) before t = 0 is
        set. A device whose libraries are missing is left out with a note, unless it was
        asked for by name (then HilError)."""
        import importlib

        for dev in list(self.devices):
            try:
                importlib.import_module(f"hil.emulators.{dev}")
            except ImportError as e:
                if self.opts.devices is not None or len(self.devices) == 1:
                    raise HilError(f"the {dev} emulator cannot load: {e}") from None
                self.devices.remove(dev)
                self.notes.append(f"{dev} left out: {e}")

    def _prewarm(self) -> None:
        """Synthesise the scenario's speech into the audio emulator's cache before t = 0
        (espeak-ng takes ~0.2 s a sentence)."""
        if "audio" not in self.devices or not self.sc.speech:
            return
        from . import sounds

        o = self.sc.devices.audio.options
        rate = int(self.sc.devices.audio.rate_hz or 48_000)
        for sp in self.sc.speech:
            try:
                sounds.speech(sp.text, rate, self.run_dir / "audio", o.get("voice", "en"),
                              int(o.get("wpm", 165)))
            except Exception as e:  # noqa: BLE001 - the emulator reports it properly
                log.warning("speech pre-synthesis failed: %s", e)
                return

    def rig_values(self) -> dict[str, Any]:
        """Placeholder values for the rig template from the running emulators."""
        v: dict[str, Any] = {"device_id": DEVICE_ID,
                             "out_dir": str(self.run_dir / "recordings")}
        e = self.emulators
        if "camera" in e:
            c = e["camera"]
            v.update(camera_uri=c.uri, camera_rate_hz=float(c.fps),
                     camera_width=c.opts.width, camera_height=c.opts.height,
                     camera_calibration=c.calibration)
        if "lidar" in e:
            li = e["lidar"]
            v.update(lidar_uri=li.uri, lidar_metadata=str(li.metadata_path))
        if "gps" in e:
            g = e["gps"]
            v.update(gps_uri=g.uri, gps_rate_hz=float(1e9 / g.period_ns), gps_pps=g.pps_uri)
        if "audio" in e:
            a = e["audio"]
            v.update(audio_uri=a.uri, audio_pulse_server=self.pulse.server or "",
                     audio_rate=a.rate, audio_channels=a.channels)
        return v

    def tags(self) -> set[str]:
        tags = set(self.devices)
        if self.opts.labels:
            for tag, (kind, dev) in LABELERS.items():
                if dev in self.devices and labeler_available(kind):
                    tags.add(tag)
        return tags

    def render(self, path: Path | None = None) -> Path:
        """Render the rig template for the running emulators into ``path``
        (default ``run_dir/rig.toml``)."""
        path = path or self.run_dir / "rig.toml"
        text = render_rig(Path(self.opts.template).read_text(), self.rig_values(), self.tags())
        path.write_text(f"# Rendered from {self.opts.template} for the HIL run in "
                        f"{self.run_dir} ({self.sc.name}).\n" + text)
        return path

    def start_agent(self, rig: Path, duration_s: float) -> None:
        """Start the agent process recording ``rig``; returns at once. The agent's own
        ``-d`` is a backstop; the run stops it with SIGTERM at the end of the scenario."""
        out = self.run_dir / "recordings"
        cmd = self.opts.agent_cmd or [self.opts.python, "-m", "agent.cli", "record",
                                      "-c", "{rig}", "-o", "{out}", "-d", "{duration}", "-q"]
        backstop = duration_s + self.opts.start_delay_s + 60.0
        cmd = [c.format(rig=rig, out=out, duration=f"{backstop:.1f}") for c in cmd]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in
                                             env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._agent_log_f = open(self.run_dir / "agent.log", "wb")
        pre: Callable[[], None] | None = (
            _pdeathsig if threading.current_thread() is threading.main_thread() else None)
        self.agent = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._agent_log_f,
                                      stderr=subprocess.STDOUT, cwd=self.run_dir, env=env,
                                      start_new_session=True, preexec_fn=pre)
        self._agent_cmd = cmd
        self._agent_started_ns = time.monotonic_ns()
        self._sampler_stop.clear()
        self._rss: list[tuple[float, int]] = []
        self._cpu: float | None = None
        self._sampler = threading.Thread(target=self._sample_loop, args=(self.agent.pid,),
                                         name="hil-rss", daemon=True)
        self._sampler.start()

    def _sample_loop(self, pid: int) -> None:
        t0 = time.monotonic()
        while not self._sampler_stop.is_set():
            rss, cpu = proc_rss_cpu(pid)
            if rss is None:
                return
            if rss > 0:  # 0: a zombie, the process has exited
                self._rss.append((round(time.monotonic() - t0, 2), rss))
                self._cpu = cpu
            self._sampler_stop.wait(self.opts.rss_interval_s)

    def agent_log_tail(self, lines: int = 30) -> str:
        try:
            text = (self.run_dir / "agent.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def wait_agent(self, until_ns: int) -> str:
        """Wait until monotonic ``until_ns`` or the agent's exit. Raises HilError when the
        agent exits before recording anything (its log tail is in the message); returns
        ``"running"`` or ``"exited"``."""
        assert self.agent is not None
        rec = self.run_dir / "recordings"
        deadline_start = time.monotonic() + self.opts.agent_start_timeout_s
        started = False
        while time.monotonic_ns() < until_ns:
            rc = self.agent.poll()
            if rc is not None:
                if not started and not any(rec.glob("*/*.mcap*")):
                    raise HilError(f"the agent exited with status {rc} before recording "
                                   f"anything; its log ({self.run_dir / 'agent.log'}):\n"
                                   + self.agent_log_tail())
                return "exited"
            if not started:
                started = any(rec.glob("*/*.mcap*"))
                if not started and time.monotonic() > deadline_start:
                    raise HilError(f"the agent wrote nothing within "
                                   f"{self.opts.agent_start_timeout_s:.0f} s; log tail:\n"
                                   + self.agent_log_tail())
            time.sleep(min(0.1, max(0.0, (until_ns - time.monotonic_ns()) / 1e9)))
        return "running"

    def stop_agent(self) -> tuple[int | None, str]:
        """SIGTERM to the agent's process group; SIGKILL if it has not closed its session
        within ``stop_timeout_s``. ``edgecap record`` then verifies the whole session
        (``inspect``; ~10 s per GB): that part gets ``inspect_timeout_s`` before it is cut
        short with SIGTERM (its handler is gone by then). Returns (exit status, how it
        stopped: "exited", "sigterm", "sigterm-inspect-cut" or "killed"). Idempotent."""
        p = self.agent
        if p is None:
            return None, ""
        how = "exited" if p.poll() is not None else "sigterm"
        self._sampler_stop.set()  # RSS while recording, not while closing and verifying
        if p.poll() is None:
            _signal_group(p, signal.SIGTERM)
            deadline = time.monotonic() + self.opts.stop_timeout_s
            closed = False
            while p.poll() is None:
                if not closed and self._session_closed():
                    closed = True
                    deadline = time.monotonic() + self.opts.inspect_timeout_s
                if time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            if p.poll() is None and closed:
                log.warning("the agent's post-run inspect took over %.0f s: stopping it",
                            self.opts.inspect_timeout_s)
                how = "sigterm-inspect-cut"
                _signal_group(p, signal.SIGTERM)
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    pass
            if p.poll() is None:
                log.warning("agent ignored SIGTERM for %.0f s: killing it",
                            self.opts.stop_timeout_s)
                how = "killed"
                _signal_group(p, signal.SIGKILL)
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    pass
        if self._sampler is not None:
            self._sampler.join(2)
        if self._agent_log_f is not None:
            self._agent_log_f.close()
            self._agent_log_f = None
        return p.returncode, how

    def _session_closed(self) -> bool:
        """Whether ``edgecap record`` printed its "session … →" line (it has stopped the
        pipeline: every segment is closed and has its manifest)."""
        try:
            with open(self.run_dir / "agent.log", "rb") as f:
                return any(line.startswith(b"session ") and "→".encode() in line
                           for line in f)
        except OSError:
            return False

    def stop_emulators(self) -> dict[str, dict[str, Any]]:
        """Stop every emulator (reverse order) and the sound server; their counts."""
        sent: dict[str, dict[str, Any]] = {}
        for dev, emu in reversed(list(self.emulators.items())):
            try:
                emu.stop()
            except Exception as e:  # noqa: BLE001 - keep stopping the others
                log.error("stopping the %s emulator: %s", dev, e)
            sent[dev] = dict(emu.sent)
        if self.pulse is not None:
            self.pulse.stop()
        return dict(reversed(list(sent.items())))

    def upload(self) -> tuple[dict[str, Any] | None, str]:
        """Upload the recorded session to an ingest server run here on loopback with CURVE
        keys generated into ``run_dir/keys``, then re-verify what it stored. Returns
        (summary, note); (None, why) when the sync package cannot be used."""
        try:
            from agent.config import SyncConfig
            from sync import keys
            from sync.ingest import IngestServer
            from sync.ingest_config import parse_ingest_config
            from sync.uploader import Uploader
        except ImportError as e:
            return None, f"upload skipped: sync unavailable ({e})"
        kd = self.run_dir / "keys"
        spub, ssec = keys.generate(kd / "server", "ingest")
        cpub, csec = keys.generate(kd / "client", DEVICE_ID)
        allow = kd / "clients"
        allow.mkdir(parents=True, exist_ok=True)
        (allow / cpub.name).write_bytes(cpub.read_bytes())
        icfg = parse_ingest_config({
            "listen": "tcp://127.0.0.1:0", "server_id": "hil-ingest",
            "server_secret_key_file": str(ssec), "clients_dir": str(allow),
            "staging_dir": str(self.run_dir / "ingest" / "staging"),
            "storage": {"backend": "fs", "options": {"root": str(self.run_dir / "ingest"
                                                                  / "store")}}}, "<hil>")
        self.ingest = IngestServer(icfg).start()
        t0 = time.monotonic()
        try:
            scfg = SyncConfig(server=self.ingest.endpoint, server_public_key=str(spub),
                              client_secret_key_file=str(csec), timeout_s=5.0,
                              reconnect_max_s=1.0, poll_s=0.2)
            with Uploader(scfg, DEVICE_ID, self.run_dir / "recordings") as up:
                s = up.run_once(give_up_s=self.opts.upload_give_up_s)
            summary = s.as_dict()
            summary.pop("bundles", None)
            summary["store"] = _verify_store(self.ingest.backend)
            summary["seconds"] = round(time.monotonic() - t0, 2)
        finally:
            self.ingest.stop()
            self.ingest = None
        return summary, ""

    # -- the whole run ------------------------------------------------------------------
    def run(self, on_status: Callable[[str], None] | None = None) -> RunResult:
        """Run the scenario end to end (see module doc) and return the result; the
        emulators and agent are stopped before it returns. Blocks for about
        ``duration + start_delay_s`` plus stop and upload time."""
        say = on_status or (lambda _m: None)
        wall0 = time.monotonic()
        say(f"run dir {self.run_dir}")
        self.start_emulators()
        rig = self.render()
        say(f"emulators up ({', '.join(self.devices)}); agent starting")
        self.start_agent(rig, self.sc.duration_s)
        end_ns = self.run_t0_ns + int(self.sc.duration_s * 1e9)
        state = self.wait_agent(end_ns)
        say("stopping the agent" if state == "running" else "the agent exited early")
        rc, how = self.stop_agent()
        stopped_ns = time.monotonic_ns()
        sent = self.stop_emulators()
        sessions = sorted(p for p in (self.run_dir / "recordings").glob("*") if p.is_dir())
        res = RunResult(
            scenario=self.sc.name, scenario_path=self.sc.source_path, run_dir=str(self.run_dir),
            duration_s=self.sc.duration_s, run_t0_ns=self.run_t0_ns, devices=self.devices,
            streams={d: STREAMS[d] for d in self.devices},
            labelers=[LABELERS[t][0] for t in sorted(self.tags()) if t in LABELERS],
            rig=str(rig), agent_cmd=self._agent_cmd, agent_rc=rc,
            agent_log=str(self.run_dir / "agent.log"),
            agent_started_ns=self._agent_started_ns, agent_stopped_ns=stopped_ns,
            agent_stop=how, session_dir=str(sessions[-1]) if sessions else None,
            emulators=sent, rss=list(self._rss), cpu_s=self._cpu, notes=list(self.notes))
        if how == "exited" and rc not in (0, None):
            res.upload_note = "agent failed"
        if self.opts.upload and sessions:
            say("uploading to a loopback ingest server (CURVE)")
            try:
                res.upload, res.upload_note = self.upload()
            except Exception as e:  # noqa: BLE001 - reported, the run itself stands
                res.upload, res.upload_note = None, f"upload failed: {e}"
        elif not self.opts.upload:
            res.upload_note = "upload skipped (--no-upload)"
        res.wall_s = round(time.monotonic() - wall0, 2)
        res.save()
        self.result = res
        return res

    # -- cleanup ------------------------------------------------------------------------
    def close(self) -> None:
        """Stop everything this run started, in order: agent, emulators, sound server,
        ingest server. Idempotent; never raises; safe from atexit."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self.stop_agent()
        except Exception as e:  # noqa: BLE001
            log.error("stopping the agent: %s", e)
        for dev, emu in reversed(list(self.emulators.items())):
            try:
                emu.stop()
            except Exception as e:  # noqa: BLE001
                log.error("stopping the %s emulator: %s", dev, e)
        if self.pulse is not None:
            try:
                self.pulse.stop()
            except Exception as e:  # noqa: BLE001
                log.error("stopping the sound server: %s", e)
        if self.ingest is not None:
            try:
                self.ingest.stop()
            except Exception as e:  # noqa: BLE001
                log.error("stopping the ingest server: %s", e)
        try:
            atexit.unregister(self.close)
        except Exception:  # noqa: BLE001
            pass


def _signal_group(p: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _verify_store(backend: Any) -> dict[str, Any]:
    """Re-hash what the ingest server stored (sync.testing.verify_store)."""
    try:
        from sync.testing import verify_store
    except ImportError as e:
        return {"problems": [f"cannot verify: {e}"]}
    return verify_store(backend)
