"""The camera emulator's renderer in a process of its own.

    w = RenderWorker(scenario, calibration, width, height, quality=80, sensor_noise=1.5)
    w.start()                  # python -m hil.emulators.render_worker; waits until warm (~0.6 s)
    jpeg, boxes, cpu_s = w.render(t_s, seq, light, flash=False, blur_px=0, overexpose=0.0)
    w.close()

Why a process: rendering and JPEG encoding hold the interpreter lock for milliseconds at a
time (numpy), so in the emulator's own process a sender thread woken at a frame's send
instant waited for the lock: frames left 0.2 ms late at the median and 2 ms at p90, and
that lateness is indistinguishable, for the agent, from transport delay. With the renderer
here, the emulator's process only schedules, queues and sends.

Contract: ``render`` returns the JPEG bytes of the scene at ``t_s`` (sensor noise pattern
``seq % 8`` added, as the in-process renderer did), the ground-truth boxes as dicts
(:meth:`hil.render.GtBox.as_dict`) and the worker's CPU seconds for that frame. It blocks
without holding the caller's interpreter lock. A worker that died or failed raises
:class:`RenderError` (with the worker's traceback text). Messages are pickles over the
worker's stdin/stdout; it exits when its stdin closes and dies with its parent
(``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import sys
import time
import traceback
from typing import IO, Any

from ..scenario import Scenario
from .isolated import die_with_parent, python_child

START_TIMEOUT_S = 60.0
NOISE_PATTERNS = 8


class RenderError(RuntimeError):
    """The render process failed or is gone."""


def _child() -> int:
    """The worker (``python -m hil.emulators.render_worker``): read the pickled set-up from
    stdin, warm up, then answer one pickled request with one pickled reply until stdin
    closes (the parent is gone or done). Anything printed goes to stderr."""
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the emulator ends us by closing stdin
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    inp = sys.stdin.buffer

    def say(msg: tuple[str, Any]) -> None:
        pickle.dump(msg, out, protocol=pickle.HIGHEST_PROTOCOL)
        out.flush()

    try:
        sc, calibration, width, height, quality, sensor_noise = pickle.load(inp)
        import cv2
        import numpy as np

        from agent.geometry import PinholeCamera

        from ..render import render
        from ..world import World

        world = World(sc)
        camera = PinholeCamera.from_calibration(calibration, width, height)
        rng = np.random.default_rng(sc.seed * 1000 + 17)
        noise = [np.clip(rng.normal(3.0, sensor_noise, (height, width, 3)), 0, 255)
                 .astype(np.uint8) for _ in range(NOISE_PATTERNS)] if sensor_noise > 0 else []
        render(world, 0.0, camera)   # warm the background and road caches
        params = [cv2.IMWRITE_JPEG_QUALITY, quality]
    except BaseException:  # noqa: BLE001 - reported to the parent
        say(("error", traceback.format_exc()))
        return 1
    say(("ready", None))
    while True:
        try:
            req = pickle.load(inp)
        except (EOFError, OSError, pickle.UnpicklingError):
            return 0
        cpu0 = time.process_time()
        try:
            t_s, seq, light, flash, blur_px, overexpose = req
            img, boxes = render(world, t_s, camera, light, flash=flash, blur_px=blur_px,
                                overexpose=overexpose)
            if noise:
                img = cv2.add(img, noise[seq % len(noise)])
            ok, enc = cv2.imencode(".jpg", img, params)
            if not ok:
                raise RenderError(f"JPEG encoding failed at t={t_s:.3f} s")
            reply: tuple[str, Any] = ("ok", (enc.tobytes(), [b.as_dict() for b in boxes],
                                             time.process_time() - cpu0))
        except Exception:  # noqa: BLE001 - reported to the parent, the worker goes on
            reply = ("error", traceback.format_exc())
        try:
            say(reply)
        except OSError:
            return 0


class RenderWorker:
    """A child process rendering and encoding camera frames on request (see module)."""

    def __init__(self, sc: Scenario, calibration: dict[str, Any], width: int, height: int,
                 quality: int = 80, sensor_noise: float = 1.5):
        self._args = (sc, dict(calibration), width, height, quality, sensor_noise)
        self._proc: Any = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def start(self) -> None:
        """Start the worker and wait until it has warmed up; RenderError if it cannot."""
        proc = python_child("hil.emulators.render_worker")
        self._proc = proc
        pickle.dump(self._args, proc.stdin)
        proc.stdin.flush()
        if not select.select([proc.stdout], [], [], START_TIMEOUT_S)[0]:
            self.close()
            raise RenderError(f"the render process did not start in {START_TIMEOUT_S:.0f} s")
        self._reply(proc.stdout)

    def render(self, t_s: float, seq: int, light: float, *, flash: bool = False,
               blur_px: int = 0, overexpose: float = 0.0
               ) -> tuple[bytes, list[dict[str, Any]], float]:
        """One frame: ``(jpeg, boxes, worker_cpu_s)``; RenderError on failure."""
        proc = self._proc
        if proc is None:
            raise RenderError("the render process is not running")
        try:
            pickle.dump((t_s, seq, light, flash, blur_px, overexpose), proc.stdin)
            proc.stdin.flush()
        except (OSError, ValueError) as e:
            raise RenderError(f"the render process is gone ({e})") from None
        return self._reply(proc.stdout)

    def _reply(self, f: IO[bytes]) -> Any:
        try:
            kind, value = pickle.load(f)
        except (EOFError, OSError, ValueError, pickle.UnpicklingError) as e:
            code = self._proc.poll() if self._proc is not None else None
            raise RenderError(f"the render process is gone (exit {code}; {e!r})") from None
        if kind not in ("ok", "ready"):
            raise RenderError(f"the render process failed:\n{value}")
        return value

    def close(self) -> None:
        """Close its stdin (the worker exits) and reap the process; idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        for f in (proc.stdin, proc.stdout):
            try:
                f.close()
            except OSError:
                pass
        try:
            proc.wait(5.0)
        except Exception:  # noqa: BLE001 - subprocess.TimeoutExpired
            proc.kill()
            proc.wait(5.0)


if __name__ == "__main__":
    raise SystemExit(_child())
