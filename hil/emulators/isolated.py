"""An emulator in a process of its own, so it keeps time beside the others.

The camera (render + JPEG, ~14 ms a frame at 30 fps) and the LiDAR (ray casting) emulators
are Python threads; in one process they and the GPS and microphone emulators share one
interpreter lock, and on a busy 2-core rig the camera then falls behind its frame clock
(frames withheld as ``overrun``: the emulator's shortfall, not the agent's). Run in a child
process each has its own lock and is scheduled by the kernel like a real device.

    emu = Isolated("camera", world.sc, settings, run_dir, run_t0_ns, attrs=("fps", ...))
    emu.start()      # the child built and started the emulator: emu.uri, emu.fps, ...
    emu.stop()       # the child stopped it (truth log closed); emu.sent has its counts

Same contract as :class:`hil.emulators.base.Emulator` for the runner: ``start`` returns once
the interface is up (or raises what the child raised, as :class:`IsolatedError` with its
message), ``stop`` is idempotent and ``sent`` holds the counts after it. The child is
a fresh interpreter (``python -m hil.emulators.isolated``: no fork of a threaded
parent; arguments and messages are pickles over its stdin/stdout) and dies with its parent
(``PR_SET_PDEATHSIG``), so a killed runner leaves no emulator behind.
"""

from __future__ import annotations

import importlib
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

from ..scenario import DeviceSettings, Scenario

#: device → (module, class) of its emulator
CLASSES = {"camera": ("hil.emulators.camera", "CameraEmulator"),
           "lidar": ("hil.emulators.lidar", "LidarEmulator")}


class IsolatedError(RuntimeError):
    """The emulator could not start (or answer) in its child process."""


def die_with_parent() -> None:
    """In a child: be sent SIGTERM when the parent process dies (Linux; else nothing)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _child() -> int:
    """The child's side (``python -m hil.emulators.isolated``): read the pickled
    arguments from stdin, build and start the emulator, report its interface, serve until
    told to stop (or stdin closes: the parent is gone), stop it and report its counts.
    Messages are pickles on the original stdout; anything printed goes to stderr."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the runner stops us by message
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    inp = sys.stdin.buffer

    def say(msg: dict[str, Any]) -> None:
        pickle.dump(msg, out)
        out.flush()

    from ..world import World

    device, sc, settings, run_dir, run_t0_ns, kwargs, attrs = pickle.load(inp)
    module, name = CLASSES[device]
    try:
        cls = getattr(importlib.import_module(module), name)
        emu = cls(World(sc), settings, Path(run_dir), run_t0_ns, **kwargs)
        emu.start()
    except Exception as e:  # noqa: BLE001 - said to the parent, which raises it
        say({"error": f"{type(e).__name__}: {e}"})
        return 1
    say({"uri": emu.uri, "attrs": {a: getattr(emu, a) for a in attrs}})
    try:
        pickle.load(inp)  # "stop"
    except (EOFError, OSError, pickle.UnpicklingError):
        pass
    emu.stop()
    try:
        say({"sent": dict(emu.sent)})
    except OSError:
        pass
    return 0


def python_child(module: str) -> subprocess.Popen[bytes]:
    """``python -m MODULE`` (this interpreter, this checkout on its path) with pipes on its
    stdin and stdout, for the pickled-message children here and in render_worker."""
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.Popen([sys.executable, "-m", module], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, env=env)


class Isolated:
    """Proxy of an emulator running in a child process (see the module doc)."""

    def __init__(self, device: str, sc: Scenario, settings: DeviceSettings, run_dir: Path,
                 run_t0_ns: int, attrs: tuple[str, ...] = (), start_timeout_s: float = 30.0,
                 **kwargs: Any):
        if device not in CLASSES:
            raise ValueError(f"no isolated emulator for {device!r}")
        self.device = device
        self.uri = ""
        self.sent: dict[str, Any] = {"sent": 0}
        self._args = (device, sc, settings, str(run_dir), run_t0_ns, kwargs, tuple(attrs))
        self._attrs: dict[str, Any] = {}
        self._timeout = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        attrs = self.__dict__.get("_attrs", {})
        if name in attrs:
            return attrs[name]
        raise AttributeError(f"{name!r}: not one of the attributes the isolated "
                             f"{self.__dict__.get('device', '?')} emulator reports")

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        proc = python_child("hil.emulators.isolated")
        self._proc = proc
        assert proc.stdin is not None and proc.stdout is not None
        pickle.dump(self._args, proc.stdin)
        proc.stdin.flush()
        msg = self._read(proc.stdout, self._timeout)
        if msg is None:
            self._kill()
            raise IsolatedError(f"the {self.device} emulator did not start within "
                                f"{self._timeout:.0f} s (exit {proc.poll()})")
        if "error" in msg:
            self._kill()
            raise IsolatedError(f"the {self.device} emulator: {msg['error']}")
        self.uri = msg["uri"]
        self._attrs = msg["attrs"]

    @staticmethod
    def _read(f: IO[bytes], timeout_s: float) -> dict[str, Any] | None:
        """The child's next message, or None when it says nothing in time or has died."""
        if not select.select([f], [], [], timeout_s)[0]:
            return None
        try:
            return pickle.load(f)
        except (EOFError, OSError, pickle.UnpicklingError):
            return None

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the child's emulator and collect its counts; idempotent."""
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is None:
            return
        assert proc.stdin is not None and proc.stdout is not None
        try:
            pickle.dump("stop", proc.stdin)
            proc.stdin.close()
            msg = self._read(proc.stdout, timeout_s)
            if msg is not None:
                self.sent = dict(msg.get("sent", self.sent))
        except OSError:
            pass
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        proc.stdout.close()

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait(5)
            for f in (proc.stdin, proc.stdout):
                if f is not None:
                    f.close()

    def __enter__(self) -> "Isolated":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    raise SystemExit(_child())
