"""A PulseAudio server for the HIL microphone: a null sink that the audio emulator plays
into, and a microphone source fed by that sink's monitor that the agent records from.

    with PulseServer() as pa:              # private server unless told to reuse one
        pa.sink                            # "edgecap_hil"      (the emulator plays here)
        pa.monitor                         # "edgecap_hil.monitor"
        pa.source                          # "edgecap_hil_mic"  (what the agent records)
        pa.server                          # "unix:/tmp/edgecap-pulse-…/native" (PULSE_SERVER)
        pa.env                             # environment for clients (pactl, pacat, the agent)

``source`` is ``module-remap-source`` over the monitor: the same samples at ``rate`` (format
and channels unchanged), but it can be unplugged (``unplug_mic``: the module is unloaded,
every stream recording it dies as when a USB microphone is pulled, and opening it fails)
and plugged back (``plug_mic``, ~40 ms to first data) while the sink and the emulator keep
running with undisturbed timing. Recording ``monitor`` directly works too. The monitor is
kept the default source, so streams that follow the default never move onto the mic.

``PulseServer(private=True)`` (the default; what tests use) starts its own ``pulseaudio`` in
user mode as a child process with a private runtime directory, config and socket, so it
never meets a desktop's server or another test's; its ``rescue-streams`` is off, so
recorders of a vanished source end instead of being moved. ``private=None`` reuses a server
that already answers in the current environment (only the modules are loaded into it and
unloaded again; its own rescue setting applies) and starts a private one when none runs.
Running as root works in user mode (the daemon warns).

The sink's clock. The null sink runs at ``clock_rate`` (50 kHz), not at the clients' ``rate``
(48 kHz): it advances its clock by ``pa_bytes_to_usec(chunk)`` per rendered chunk, which
truncates to whole microseconds, and on a loaded host (late wake-ups, chunks of odd sizes)
a 48 kHz sink, whose frame is 20.83 µs, ran up to ~50 ppm fast against the host clock —
measured in the HIL as the monitor's samples arriving 3.7 ms early after 80 s, seen alike by
the agent and by the keeper. A 50 kHz frame is 20 µs, so the sink keeps the host's time
exactly and the emitted sample ``i`` is heard at its scheduled time. The server resamples
the player's 48 kHz into the sink and the sink's monitor back to 48 kHz for the mic with
its default resampler (speex: a fixed delay of a few samples, part of the sound path's
fixed latency; digital zeros stay zeros; a clipped flat top comes back as a ripple just
under full scale, as behind any resampling sound server). A private server's
``daemon.conf`` pins its default and alternate rates to ``clock_rate``, so that no client
switches the sink back to its own rate; a reused server keeps its own settings. (Running
the server with real-time scheduling was tried and left off: it put a 4 s sawtooth of
±3 ms into the mic's arrivals.)

The null sink is loaded with ``norewinds=1``: a new player then starts after what the sink
has already rendered instead of rewinding it, which a monitor cannot follow (it lost the
first ~2 ms of every new stream). While no client is connected the sink renders in 2 s
blocks, and the first client could wait that long; so a *keeper* — a ``parec`` on the
monitor asking for ``keeper_latency_ms`` (20 ms), its output discarded — stays connected
while the sink exists, and ``load_sink`` returns once data flows (~0.1 s). Later clients
start within tens of milliseconds.

Cleanup is robust: ``stop()`` is idempotent, unloads what it loaded, terminates (then kills)
the server and keeper it started and removes its directory; it is registered with
``atexit``, and processes started from the main thread get ``PR_SET_PDEATHSIG`` so they die
with their parent even after ``kill -9``.

Thread contract: every method blocks (at most a few seconds) and takes an internal lock, so
an emulator thread may unplug the mic while the test thread inspects the server;
``env``/``server``/``source`` are plain reads.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

DEFAULT_SINK = "edgecap_hil"
#: the null sink's own rate: a whole number of microseconds per frame (see the module doc)
CLOCK_RATE = 50_000


class PulseError(RuntimeError):
    """The sound server cannot be started or reached, or a module cannot be loaded."""


def pulse_unavailable() -> str | None:
    """Why a PulseAudio server cannot be run here (missing binaries), or None."""
    for tool in ("pulseaudio", "pactl", "parec", "pacat"):
        if shutil.which(tool) is None:
            return f"{tool} not installed (apt-get install pulseaudio pulseaudio-utils)"
    return None


def _pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _preexec():  # type: ignore[no-untyped-def]
    return _pdeathsig if threading.current_thread() is threading.main_thread() else None


def _terminate(p: subprocess.Popen[bytes] | None, wait_s: float = 3.0) -> None:
    if p is None:
        return
    if p.poll() is None:
        p.terminate()
        try:
            p.wait(wait_s)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(wait_s)


class PulseServer:
    """A PulseAudio server with the null sink ``sink`` (``channels``, s16le, running at
    ``clock_rate`` Hz) and the microphone source ``f"{sink}_mic"`` (``rate`` Hz) over its
    monitor. ``clock_rate=None`` runs the sink at ``rate`` (see the module doc for why not)."""

    def __init__(self, sink: str = DEFAULT_SINK, rate: int = 48_000, channels: int = 1,
                 private: bool | None = True, start_timeout_s: float = 10.0,
                 keeper_latency_ms: int | None = 20, clock_rate: int | None = CLOCK_RATE):
        self.sink = sink
        self.rate = rate
        self.clock_rate = clock_rate or rate
        self.channels = channels
        self.private = private
        self.start_timeout_s = start_timeout_s
        self.keeper_latency_ms = keeper_latency_ms
        self.owned = False  # True when this object started the server process
        #: PULSE_SERVER for clients ("unix:/…/native"); None when reusing the environment's
        self.server: str | None = None
        self.active = False
        self.env: dict[str, str] = {}
        self.sink_module: int | None = None
        self.mic_module: int | None = None
        self.log_path: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._keeper: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None
        self._lock = threading.RLock()
        self._atexit = False

    # -- names --------------------------------------------------------------------------
    @property
    def monitor(self) -> str:
        return f"{self.sink}.monitor"

    @property
    def source(self) -> str:
        """The microphone source the agent records (a remap of the monitor)."""
        return f"{self.sink}_mic"

    @property
    def running(self) -> bool:
        return self.active and self._answers({**os.environ, **self.env})

    # -- lifecycle --------------------------------------------------------------------
    def start(self) -> "PulseServer":
        """Start (or attach to) the server, load the sink and the mic. Raises PulseError."""
        with self._lock:
            if self.active:
                return self
            why = pulse_unavailable()
            if why:
                raise PulseError(why)
            if not self._atexit:
                atexit.register(self.stop)
                self._atexit = True
            try:
                if self.private is not True and self._answers(dict(os.environ)):
                    self.env = {k: v for k, v in os.environ.items()
                                if k.startswith(("PULSE_", "XDG_RUNTIME_DIR", "HOME"))}
                    self.server = os.environ.get("PULSE_SERVER") or None
                elif self.private is False:
                    raise PulseError("no PulseAudio server answers in this environment "
                                     "(private=False forbids starting one)")
                else:
                    self._spawn()
                self.active = True
                self.load_sink()
            except BaseException:
                self.stop()
                raise
            return self

    def stop(self) -> None:
        """Unload what was loaded, stop what was started, remove its files. Idempotent;
        never raises."""
        with self._lock:
            if not self.owned and self.active:
                self.unload_sink()
            self._kill()
            self.owned = False
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None
            self.active = False
            self.server = None
            self.env = {}
            if self._atexit:
                atexit.unregister(self.stop)
                self._atexit = False

    def restart(self) -> None:
        """Kill the private server and start it again on the same socket with the same
        modules (a sound-server crash as clients see it). Blocks until data flows again."""
        with self._lock:
            self.kill_server()
            self._spawn()
            self.load_sink()

    def kill_server(self) -> None:
        """Stop the private server (clients see the connection drop); ``restart`` or
        ``respawn`` brings it back."""
        with self._lock:
            if not self.owned:
                raise PulseError("only a server this object started can be killed")
            self._kill()

    def respawn(self) -> None:
        with self._lock:
            if self.owned and self._proc is None:
                self._spawn()
                self.load_sink()

    def __enter__(self) -> "PulseServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- modules ----------------------------------------------------------------------
    def load_sink(self) -> None:
        """Load the null sink, start the keeper and plug the mic (each only if missing)."""
        with self._lock:
            if self.sink_module is None or not self.has_sink():
                args = (f"sink_name={self.sink} rate={self.clock_rate} channels={self.channels} "
                        f"format=s16le norewinds=1 sink_properties=device.description=edgecap-HIL")
                self.sink_module = self._load("module-null-sink", args)
                self._start_keeper()
            self.plug_mic()

    def unload_sink(self) -> None:
        """Remove mic, keeper and sink (what this object loaded). Never raises."""
        with self._lock:
            self.unplug_mic()
            self._stop_keeper()
            if self.sink_module is not None:
                self.pactl("unload-module", str(self.sink_module))
                self.sink_module = None

    def plug_mic(self) -> None:
        """Load the mic source over the monitor (no-op when present)."""
        with self._lock:
            if self.mic_module is not None and self.has_source(self.source):
                return
            args = (f"master={self.monitor} source_name={self.source} "
                    f"rate={self.rate} channels={self.channels} remix=no "
                    f"source_properties=device.description=edgecap-HIL-mic")
            self.mic_module = self._load("module-remap-source", args)
            if self.owned:
                # keep the monitor the default source: streams following the default are
                # then never moved to or from the mic when it comes and goes
                self.pactl("set-default-source", self.monitor)

    def unplug_mic(self) -> int:
        """Unload the mic source; streams recording it end. Returns how many ended. (On a
        reused server whose ``rescue-streams`` is on, the server may move them to another
        source instead; they are then not counted.) Never raises."""
        with self._lock:
            if self.mic_module is None:
                return 0
            victims = self._source_outputs(self.source)
            self.pactl("unload-module", str(self.mic_module))
            self.mic_module = None
            left = {ln.split("\t")[0] for ln in
                    self.pactl("list", "short", "source-outputs").stdout.splitlines()}
            return len(victims - left)

    def has_sink(self) -> bool:
        r = self.pactl("list", "short", "sinks")
        return r.returncode == 0 and any(
            ln.split("\t")[1:2] == [self.sink] for ln in r.stdout.splitlines())

    def has_source(self, name: str | None = None) -> bool:
        r = self.pactl("list", "short", "sources")
        return r.returncode == 0 and any(
            ln.split("\t")[1:2] == [name or self.source] for ln in r.stdout.splitlines())

    def pactl(self, *args: str, timeout_s: float = 5.0) -> subprocess.CompletedProcess[str]:
        """Run ``pactl`` against this server; never raises (failures are in returncode)."""
        try:
            return subprocess.run(["pactl", *args], env={**os.environ, **self.env},
                                  capture_output=True, text=True, timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired) as e:
            return subprocess.CompletedProcess(["pactl", *args], 1, "", str(e))

    def _load(self, module: str, args: str) -> int:
        r = self.pactl("load-module", module, *args.split())
        if r.returncode != 0 or not r.stdout.strip().isdigit():
            raise PulseError(f"cannot load {module} ({args}); a sink or source with that "
                             f"name may exist already: {r.stderr.strip() or r.stdout.strip()}")
        return int(r.stdout.strip())

    def _source_outputs(self, source: str) -> set[str]:
        idx = [ln.split("\t")[0] for ln in
               self.pactl("list", "short", "sources").stdout.splitlines()
               if ln.split("\t")[1:2] == [source]]
        if not idx:
            return set()
        return {ln.split("\t")[0] for ln in
                self.pactl("list", "short", "source-outputs").stdout.splitlines()
                if ln.split("\t")[1:2] == idx[:1]}

    # -- internals --------------------------------------------------------------------
    @staticmethod
    def _answers(env: dict[str, str]) -> bool:
        try:
            r = subprocess.run(["pactl", "info"], env=env, capture_output=True, timeout=3)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return r.returncode == 0

    def _spawn(self) -> None:
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="edgecap-pulse-"))
        d = self._dir
        for sub in ("run", "home", "state"):
            (d / sub).mkdir(mode=0o700, exist_ok=True)
        sock = d / "native"
        self.log_path = d / "pulse.log"
        env = {**os.environ, "HOME": str(d / "home"), "XDG_RUNTIME_DIR": str(d / "run"),
               "PULSE_RUNTIME_PATH": str(d / "run"), "PULSE_STATE_PATH": str(d / "state"),
               "XDG_CONFIG_HOME": str(d / "home"), "PULSE_SERVER": f"unix:{sock}",
               "PULSE_CONFIG": str(d / "daemon.conf")}
        (d / "daemon.conf").write_text(
            "rescue-streams = no\n"
            f"default-sample-rate = {self.clock_rate}\nalternate-sample-rate = {self.clock_rate}\n")
        env.pop("DISPLAY", None)
        env.pop("DBUS_SESSION_BUS_ADDRESS", None)
        cmd = ["pulseaudio", "-n", "--daemonize=no", "--use-pid-file=no", "--system=no",
               "--exit-idle-time=-1", "--disallow-exit=yes", "--disallow-module-loading=no",
               "--high-priority=no", "--realtime=no", "--no-cpu-limit=yes",
               f"--log-target=file:{self.log_path}",
               f"--load=module-native-protocol-unix auth-anonymous=1 socket={sock}"]
        try:
            self._proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          preexec_fn=_preexec())
        except OSError as e:
            raise PulseError(f"cannot start pulseaudio: {e}") from None
        self.owned = True
        self.server = f"unix:{sock}"
        self.env = {"PULSE_SERVER": self.server, "HOME": env["HOME"],
                    "XDG_RUNTIME_DIR": env["XDG_RUNTIME_DIR"],
                    "PULSE_RUNTIME_PATH": env["PULSE_RUNTIME_PATH"]}
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                break
            if sock.exists() and self._connects(sock):
                return
            time.sleep(0.02)
        log = self.log_path.read_text(errors="replace")[-800:] if self.log_path.exists() else ""
        self._kill()
        raise PulseError(f"pulseaudio did not come up within {self.start_timeout_s:g} s; "
                         f"log tail:\n{log}")

    @staticmethod
    def _connects(sock: Path) -> bool:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.settimeout(0.5)
            s.connect(str(sock))
            return True
        except OSError:
            return False
        finally:
            s.close()

    def _start_keeper(self) -> None:
        """Start the keeper and wait (at most ``start_timeout_s``) until data flows."""
        self._stop_keeper()
        if not self.keeper_latency_ms or shutil.which("parec") is None:
            return
        try:
            k = subprocess.Popen(
                ["parec", "--raw", "--format=s16le", f"--rate={self.rate}",
                 f"--channels={self.channels}", f"--latency-msec={self.keeper_latency_ms}",
                 f"--device={self.monitor}", "--client-name=edgecap-hil-keeper"],
                env={**os.environ, **self.env}, stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, preexec_fn=_preexec())
        except OSError:
            return
        self._keeper = k
        flowing = threading.Event()

        def drain() -> None:
            assert k.stdout is not None
            while k.stdout.read1(65536):
                flowing.set()

        threading.Thread(target=drain, name="pulse-keeper", daemon=True).start()
        flowing.wait(self.start_timeout_s)

    def _stop_keeper(self) -> None:
        k, self._keeper = self._keeper, None
        _terminate(k, 2.0)

    def _kill(self) -> None:
        self._stop_keeper()
        p, self._proc = self._proc, None
        _terminate(p)
        self.sink_module = None
        self.mic_module = None
