"""Camera emulator: MJPEG over HTTP on 127.0.0.1, frames rendered from the world.

    emu = CameraEmulator(world, scenario.devices.camera, run_dir, run_t0_ns)
    emu.start()            # binds an ephemeral port, starts capturing on schedule
    emu.uri                # http://127.0.0.1:PORT/stream.mjpg
    emu.calibration        # the dict the rig's [streams.calibration] should carry
    emu.stop()

Wire format (what IP cameras and mjpg-streamer send; OpenCV's FFmpeg backend reads it):
``HTTP/1.0 200`` with ``Content-Type: multipart/x-mixed-replace; boundary=edgecapframe``,
then per frame ``--edgecapframe`` / ``Content-Type: image/jpeg`` / ``Content-Length: N``,
a blank line and the JPEG. Each JPEG carries a comment segment (``FF FE``) right after SOI:
``edgecap-hil t_dev_ns=<capture instant on the device clock> seq=<frame counter>``.
``GET /calibration.json`` returns :attr:`calibration`.

Timing: frame ``n`` is captured at true time ``run_t0_ns + n·period`` whether or not a
client is connected (a camera does not wait). Its image is rendered and encoded *ahead*
(right after frame ``n − 1`` was queued) and queued to every client connected then; each
client's sender thread waits for capture + jitter itself and sends. So, like a real camera
whose readout and compression latency is constant, the only variable delay is the
device's injected arrival jitter. Rendering and encoding run in a process of their own
(:class:`~hil.emulators.render_worker.RenderWorker`): they hold the interpreter lock for
milliseconds, and a sender waiting for it would leave late. Sender threads ask for
SCHED_FIFO (else nice −10) and the interpreter switch interval is lowered to 0.2 ms. A frame whose image is not ready by its send time leaves
late (``late_frames``); more than two periods late it is skipped (``overrun``; the
counter still advances). Each client's send is recorded (truth ``send``) so a scorer can
tell the emulator's own lateness from the agent's error.

Faults (``settings.faults``): ``dropout`` (each frame skipped with probability ``rate``;
the counter advances), ``stall`` (frames captured but none sent; connections stay open),
``disconnect`` (open connections are closed and new ones closed on accept while it
lasts), ``overexpose``, ``underexpose`` and ``blur`` (image defects of strength ``rate``;
frames sent),
``freeze`` (a hung image pipeline: the last JPEG is sent again with each new frame's
time and counter, so its image bytes repeat; truth boxes are the frozen image's).

Options (``[devices.camera.options]``): ``width`` (640), ``height`` (480), ``quality``
(80), ``calibration`` (dict; default :func:`hil.render.default_calibration`),
``flash_frames`` (1: frames the clapper flash covers), ``client_queue`` (4 frames per
client before the oldest is dropped for that client), ``sensor_noise`` (1.5: temporal
noise of that many DN, σ, over a black level of 3 DN, cycling through 8 precomputed
patterns, so two frames of a still scene are never byte-identical, as on a real sensor;
a noise-free renderer would make them so, and the quality report rightly calls that a
frozen camera; 0 turns it off).

Truth (``truth/camera.jsonl``): per frame ``{"type": "sample", "seq", "true_ns",
"device_ns", "sent", "clients", "reason"?, "boxes"?, "clapper"?, "defects"?}`` —
``sent`` means queued to at least one client; ``reason`` says why not (``dropout``,
``stall``, ``disconnect``, ``no_client``, ``overrun``); boxes are written for sent frames
(see :class:`hil.render.GtBox`) — plus one ``{"type": "fault", ...}`` record per fault
when it begins, and ``{"type": "fault", "kind": "client_drop", "seq", "client"}`` when a
slow client's queue overflowed and a queued frame was dropped for it; per frame and
client ``{"type": "send", "seq", "client", "sched_ns", "sent_ns", "done_ns"}`` (monotonic:
capture + jitter, when ``sendall`` started and when it returned; ``sent_ns − sched_ns``
is the emulator's lateness, counted ``late_sends`` past 1 ms, worst in
``max_late_ns``).
"""

from __future__ import annotations

import json
import math
import socket
import struct
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.config import _problems
from agent.errors import ConfigError
from agent.geometry import PinholeCamera

from ..render import default_calibration
from ..scenario import DeviceSettings
from ..world import World
from .base import Emulator, punctual_thread, sleep_until
from .render_worker import RenderWorker

BOUNDARY = "edgecapframe"
STREAM_PATH = "/stream.mjpg"


class CameraEmulatorOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    width: int = Field(default=640, ge=16, le=7680)
    height: int = Field(default=480, ge=16, le=4320)
    quality: int = Field(default=80, ge=10, le=100)
    calibration: dict[str, Any] | None = None
    flash_frames: int = Field(default=1, ge=1, le=30)
    client_queue: int = Field(default=4, ge=1, le=300)
    sensor_noise: float = Field(default=1.5, ge=0, le=20)


def insert_jpeg_comment(jpeg: bytes, text: bytes) -> bytes:
    """``jpeg`` with a COM segment holding ``text`` inserted right after SOI."""
    if jpeg[:2] != b"\xff\xd8" or len(text) > 65533:
        raise ValueError("not a JPEG or comment too long")
    return b"\xff\xd8\xff\xfe" + struct.pack(">H", len(text) + 2) + text + jpeg[2:]


class _Client:
    """One connected viewer: a bounded queue of parts and the thread sending them."""

    def __init__(self, sock: socket.socket, addr: Any, maxlen: int):
        self.sock = sock
        self.addr = addr
        self.parts: deque[tuple[int, int, bytes]] = deque()
        self.name = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
        self.maxlen = maxlen
        self.cond = threading.Condition()
        self.closed = False
        self.dropped = 0

    def push(self, send_at_ns: int, seq: int, part: bytes) -> int | None:
        """Queue a part; returns the seq of the oldest part dropped to make room."""
        dropped = None
        with self.cond:
            if len(self.parts) >= self.maxlen:
                dropped = self.parts.popleft()[1]
                self.dropped += 1
            self.parts.append((send_at_ns, seq, part))
            self.cond.notify()
        return dropped

    def close(self) -> None:
        with self.cond:
            self.closed = True
            self.cond.notify()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class CameraEmulator(Emulator):
    device = "camera"

    def __init__(self, world: World, settings: DeviceSettings, run_dir: Path, run_t0_ns: int):
        super().__init__(world, settings, run_dir, run_t0_ns)
        try:
            self.opts = CameraEmulatorOptions.model_validate(settings.options)
        except ValidationError as e:
            self.truth.close()
            raise ConfigError(world.sc.source_path,
                              _problems(e, ("devices", "camera", "options"))) from None
        o = self.opts
        self.fps = float(settings.rate_hz or 30.0)
        self.period_ns = int(round(1e9 / self.fps))
        self.calibration: dict[str, Any] = dict(o.calibration or
                                                default_calibration(o.width, o.height))
        self.calibration.setdefault("width", o.width)
        self.calibration.setdefault("height", o.height)
        self.camera = PinholeCamera.from_calibration(self.calibration, o.width, o.height)
        self._renderer = RenderWorker(world.sc, self.calibration, o.width, o.height,
                                      o.quality, o.sensor_noise)
        self.rng = np.random.default_rng(world.sc.seed * 1000 + 17)
        self.sent.update({"captured": 0, "skipped": 0, "late_frames": 0, "late_sends": 0})
        #: worst lateness of a send against capture + jitter (ns)
        self.max_late_ns = 0
        self._clients: set[_Client] = set()
        self._clients_lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._srv: socket.socket | None = None
        self._disconnected = False
        self._last_image: tuple[bytes, list[dict[str, Any]]] | None = None  # ``freeze``
        self._logged_faults: set[int] = set()
        #: CPU seconds spent capturing (scheduling here, render + encode in the render
        #: process), for the benchmark
        self.capture_cpu_s = 0.0

    # -- lifecycle --------------------------------------------------------------------
    def _start(self) -> None:
        self._renderer.start()   # warms the background and road caches
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", 0))
        srv.listen(16)
        srv.settimeout(0.2)
        self._srv = srv
        self.port = srv.getsockname()[1]
        self.uri = f"http://127.0.0.1:{self.port}{STREAM_PATH}"
        for target, name in ((self._accept_loop, "camera-accept"),
                             (self._capture_loop, "camera-capture")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)

    def _stop(self) -> None:
        if self._srv is not None:
            self._srv.close()
        self._close_clients()
        for t in self._threads:
            t.join(5.0)
        self._threads.clear()
        self._renderer.close()
        with self._clients_lock:
            self.count("client_drops", sum(c.dropped for c in self._clients))

    @property
    def clients(self) -> int:
        with self._clients_lock:
            return len(self._clients)

    def _close_clients(self) -> None:
        with self._clients_lock:
            clients = list(self._clients)
        for c in clients:
            c.close()

    # -- HTTP side --------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._srv is not None
        while not self.stop_event.is_set():
            try:
                conn, addr = self._srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self._disconnected:
                self.count("refused")
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn, addr), daemon=True,
                             name="camera-client").start()

    def _serve(self, conn: socket.socket, addr: Any) -> None:
        """One HTTP connection: read the request, answer, then stream until closed."""
        try:
            conn.settimeout(2.0)
            req = b""
            while b"\r\n\r\n" not in req and b"\n\n" not in req and len(req) < 16384:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                req += chunk
            line = req.split(b"\r\n", 1)[0].split(b"\n", 1)[0].decode("latin-1").split()
            path = line[1].split("?", 1)[0] if len(line) >= 2 else ""
            if len(line) < 2 or line[0] not in ("GET", "HEAD"):
                conn.sendall(b"HTTP/1.0 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                return
            if path == "/calibration.json":
                body = json.dumps(self.calibration).encode()
                conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(body) + body)
                return
            if path not in (STREAM_PATH, "/"):
                conn.sendall(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n")
                return
            conn.sendall(b"HTTP/1.0 200 OK\r\nServer: edgecap-hil\r\nConnection: close\r\n"
                         b"Cache-Control: no-cache, no-store\r\nPragma: no-cache\r\n"
                         b"Content-Type: multipart/x-mixed-replace; boundary="
                         + BOUNDARY.encode() + b"\r\n\r\n")
            if line[0] == "HEAD":
                return
            conn.settimeout(10.0)
            client = _Client(conn, addr, self.opts.client_queue)
            with self._clients_lock:
                self._clients.add(client)
            self.count("connections")
            try:
                self._send_loop(client)
            finally:
                with self._clients_lock:
                    self._clients.discard(client)
                self.count("client_drops", client.dropped)
        except OSError:
            pass
        finally:
            try:
                conn.close()
            except OSError:
                pass

    def _send_loop(self, c: _Client) -> None:
        punctual_thread()
        while not self.stop_event.is_set():
            with c.cond:
                while not c.parts and not c.closed and not self.stop_event.is_set():
                    c.cond.wait(0.2)
                if c.closed or self.stop_event.is_set():
                    return
                send_at_ns, seq, part = c.parts.popleft()
            if sleep_until(send_at_ns, self.stop_event):
                return
            t0 = time.monotonic_ns()
            c.sock.sendall(part)
            t1 = time.monotonic_ns()
            late = t0 - send_at_ns
            if late > self.max_late_ns:
                self.max_late_ns = late
            if late > 1_000_000:
                self.count("late_sends")
            self.truth.write({"type": "send", "seq": seq, "client": c.name,
                              "sched_ns": send_at_ns, "sent_ns": t0, "done_ns": t1})

    # -- capture side -----------------------------------------------------------------
    def _capture_loop(self) -> None:
        """Frame ``n``: decide faults and draw its jitter, render + encode it ahead of its
        capture instant and queue it at once to the connected clients, whose send threads
        wait for capture + jitter themselves (no thread hand-off at the send instant);
        then wait for the capture instant and go on with the next frame."""
        n = max(0, math.ceil((time.monotonic_ns() - self.run_t0_ns) / self.period_ns))
        seq = 0
        header = (f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: ").encode()
        while not self.stop_event.is_set():
            due_ns = self.run_t0_ns + n * self.period_ns
            cpu0 = time.thread_time()
            t_s = (due_ns - self.run_t0_ns) / 1e9
            faults = self.faults(t_s)
            self._log_faults(t_s, seq, due_ns)
            # a disconnect begins up to one period before its frame's instant (rendered ahead)
            self._disconnect_state("disconnect" in faults, due_ns)
            delay_ns = int(self.jitter.delay_s() * 1e9)
            drop = "dropout" in faults and self.rng.random() < faults["dropout"].rate
            device_ns = self.clock.device_ns(due_ns)
            rec: dict[str, Any] = {"type": "sample", "seq": seq, "true_ns": due_ns,
                                   "device_ns": device_ns}
            reason = None
            if time.monotonic_ns() - due_ns > 2 * self.period_ns:
                reason = "overrun"
            elif "disconnect" in faults:
                reason = "disconnect"
            elif "stall" in faults:
                reason = "stall"
            elif drop:
                reason = "dropout"
            else:
                with self._clients_lock:
                    clients = list(self._clients)
                if not clients:
                    reason = "no_client"
            self.count("captured")
            if reason is None:
                part, extra = self._frame(t_s, seq, device_ns, faults, header)
                rec.update(extra)
                late = time.monotonic_ns() - (due_ns + delay_ns)
                if late > 2 * self.period_ns:
                    reason = "overrun"  # the render finished far too late
            if reason is None:
                if late > 0:
                    self.count("late_frames")
                    rec["late_ns"] = late
                for c in clients:
                    lost = c.push(due_ns + delay_ns, seq, part)
                    if lost is not None:   # a slow client: the oldest queued frame goes
                        self.truth.write({"type": "fault", "kind": "client_drop",
                                          "seq": lost, "client": c.name})
                self.count("sent")
                rec.update(sent=True, clients=len(clients), sched_ns=due_ns + delay_ns)
            else:
                for k in ("boxes", "bytes", "clapper", "defects"):
                    rec.pop(k, None)
                self.count("skipped")
                self.count(reason)
                rec.update(sent=False, clients=0, reason=reason)
            self.truth.write(rec)
            self.capture_cpu_s += time.thread_time() - cpu0
            wait = (due_ns - time.monotonic_ns()) / 1e9
            if wait > 0 and self.stop_event.wait(wait):
                return
            n += 1
            seq += 1

    def _frame(self, t_s: float, seq: int, device_ns: int, faults: dict[str, Any],
               header: bytes) -> tuple[bytes, dict[str, Any]]:
        """Render, encode and wrap one frame as a multipart part; truth extras."""
        extra: dict[str, Any] = {}
        clap = self.world.clapper_active(t_s, self.opts.flash_frames * self.period_ns / 1e9)
        defects = {}
        if "blur" in faults:
            defects["blur_px"] = max(3, int(round(21 * faults["blur"].rate)))
        if "overexpose" in faults:
            defects["overexpose"] = float(faults["overexpose"].rate)
        light = self.world.brightness(t_s)
        if "underexpose" in faults:  # the scene's light times (1 - rate)
            light *= 1 - faults["underexpose"].rate
            defects["underexpose"] = 1.0
        if "freeze" in faults and self._last_image is not None:
            image, boxes = self._last_image  # the same bytes again
            defects["freeze"] = 1.0
        else:
            image, boxes, cpu_s = self._renderer.render(
                t_s, seq, light, flash=clap is not None, blur_px=defects.get("blur_px", 0),
                overexpose=defects.get("overexpose", 0.0))
            self.capture_cpu_s += cpu_s
            self._last_image = (image, boxes)
        jpeg = insert_jpeg_comment(image, f"edgecap-hil t_dev_ns={device_ns} seq={seq}".encode())
        extra["boxes"] = boxes
        if clap is not None:
            extra["clapper"] = clap
        if defects:
            extra["defects"] = sorted(defects)
        extra["bytes"] = len(jpeg)
        part = header + str(len(jpeg)).encode() + b"\r\n\r\n" + jpeg + b"\r\n"
        return part, extra

    def _log_faults(self, t_s: float, seq: int, due_ns: int) -> None:
        for i, f in enumerate(self.settings.faults):
            if i not in self._logged_faults and f.t_s <= t_s < f.t_s + max(f.duration_s, 1e-9):
                self._logged_faults.add(i)
                self.truth.write({"type": "fault", "kind": f.kind, "t_s": f.t_s,
                                  "duration_s": f.duration_s, "rate": f.rate,
                                  "true_ns": due_ns, "seq": seq})

    def _disconnect_state(self, active: bool, due_ns: int) -> None:
        if active and not self._disconnected:
            self._disconnected = True
            self._close_clients()
            self.count("disconnects")
        elif not active and self._disconnected:
            self._disconnected = False


def main(argv: list[str] | None = None) -> int:
    """Serve the emulator alone (for a viewer such as ``ffplay URI`` or the benchmark):
    prints the URI on the first line of stdout, then serves until the duration ends."""
    import argparse
    import signal
    import tempfile

    from ..scenario import load_scenario

    ap = argparse.ArgumentParser(prog="python -m hil.emulators.camera")
    ap.add_argument("--scenario", default="city-drive")
    ap.add_argument("--width", type=int)
    ap.add_argument("--height", type=int)
    ap.add_argument("--fps", type=float)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--run-dir")
    a = ap.parse_args(argv)
    sc = load_scenario(a.scenario)
    s = sc.devices.camera
    opts = dict(s.options)
    if a.width:
        opts["width"] = a.width
    if a.height:
        opts["height"] = a.height
    s = s.model_copy(update={"options": opts, "rate_hz": a.fps or s.rate_hz})
    run_dir = Path(a.run_dir or tempfile.mkdtemp(prefix="edgecap-cam-"))
    emu = CameraEmulator(World(sc), s, run_dir, time.monotonic_ns())
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    with emu:
        print(emu.uri, flush=True)
        try:
            done.wait(a.duration)
        except KeyboardInterrupt:
            pass
    print(f"sent {emu.sent} capture_cpu_s={emu.capture_cpu_s:.3f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
