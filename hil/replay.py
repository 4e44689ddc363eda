"""Sensor-level replay: a recorded session played back through the HIL emulators'
interfaces, so an agent under test receives hardware-level input from real recorded data.

    rep = SensorReplay("recordings/rig_…", run_dir)
    uris = rep.start()     # {"camera": "http://127.0.0.1:P/stream.mjpg", "lidar": "udp://…",
                           #  "lidar_metadata": path, "gps": "serial://…", "gps_pps": …,
                           #  "audio": "pulse:…", "audio_pulse_server": …}
    rep.rig_values()       # the same placeholders HilRun fills into examples/hil-rig.toml
    rep.wait()             # until every device has sent its last sample
    rep.stop()

Each device reuses its emulator class (``hil/emulators``) with the world replaced by the
recording: the interface, wire format, pacing and truth log stay the emulator's own.

- camera: :class:`~hil.emulators.camera.CameraEmulator`'s MJPEG-over-HTTP server; each
  recorded JPEG is sent as recorded (a JPEG without an ``edgecap-hil`` comment gets one with
  the recorded device time and frame counter) at its recorded ``t_ns``.
- LiDAR: :class:`~hil.emulators.lidar.LidarEmulator`'s UDP sender. Raw packets are not in
  bundles, so each scan is re-encoded into Ouster packets with ouster-sdk (``LidarFrame`` →
  ``frame_to_packets`` with the metadata's ``PacketFormat``): ring → beam row, column from
  ``t_offset_ns``, range from the XYZ look-up table (exact to the millimetre for scans
  recorded from a sensor with the same metadata; other sources are re-projected onto its
  beams), SIGNAL from ``intensity``; column timestamps and ``frame_id`` from the recording.
  Packet ``p`` leaves when its last column fired, as the emulator spaces them.
- GPS: :class:`~hil.emulators.gps.GpsEmulator`'s pty; each recorded fix becomes the
  emulator's NMEA burst (pynmeagps) for the recorded UTC, ``latency_ms`` after the fix,
  paced at the baud rate. Speed and course come from consecutive fixes (LocationFix holds
  position only); fix quality 1.
- audio: :class:`~hil.emulators.audio.AudioEmulator`'s player into the PulseAudio null
  sink (``hil/pulse.py``); the recorded PCM (gaps as silence) is the emulator's content,
  played on its schedule (sample ``i`` at the first block's time + ``i / rate``).

Time: session time ``t`` is sent at host monotonic ``t0 + (t − start)`` with ``t0 =
start() + start_delay_s`` (the agent connects meanwhile), i.e. at 1×. A sample with a
device time is sent at the session time its device clock says (``pace="device"``: a robust
line through the stream's (device time, t_ns) pairs), so the arrival timing agrees with the
device times it carries and the recording agent's clock-estimation steps are not replayed
as arrival jitter; ``pace="t_ns"`` sends at the recorded ``t_ns`` as is. Truth logs in
``run_dir/truth/*.jsonl`` name each sample's send instant (``true_ns``) and the recorded
``t_ns_recorded``; ``run_dir/replay.json`` holds ``t0_mono_ns``, ``start_ns``, the streams
and URIs. Before ``t0`` the camera streams its first frame (preroll, counted back in frame
counter and device time) because an HTTP camera driver opens only once a frame came.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from agent.replay import NS, ReplaySourceOptions, SessionReader, open_session
from agent.types import Sample, StreamInfo, StreamKind

from .scenario import DeviceSettings, Devices, Origin, Scenario, Waypoint
from .world import World

log = logging.getLogger("edgecap.hil.replay")

DEVICES = ("camera", "lidar", "gps", "audio")
_KIND = {"camera": StreamKind.CAMERA, "lidar": StreamKind.LIDAR, "gps": StreamKind.GPS,
         "audio": StreamKind.AUDIO}
_GPS_RATES = (1, 2, 4, 5, 10)


class SensorReplay:
    """Plays one recorded session through the emulators (module doc).

    ``devices``: subset of camera/lidar/gps/audio (default: every kind the session has;
    audio only when a sound server can run). ``streams``: device → stream name when the
    session has several of a kind (default: the first). ``lidar_metadata``: the Ouster
    metadata JSON to encode packets with (default: the HIL emulator's OS1-64). ``pulse``:
    a running :class:`hil.pulse.PulseServer` to reuse. ``start``/``stop`` from one thread;
    the emulators run their own threads.
    """

    def __init__(self, session: str | Path, run_dir: str | Path,
                 devices: set[str] | None = None, streams: dict[str, str] | None = None,
                 start_delay_s: float = 2.0, from_s: float | None = None,
                 to_s: float | None = None, lidar_metadata: str | None = None,
                 gps_baud: int = 115200, pulse: Any = None, camera_queue: int = 120,
                 pace: str = "device", source: ReplaySourceOptions | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.session = open_session(str(session), source)
        self.reader = SessionReader(self.session)
        self.start_delay_s = start_delay_s
        self.lidar_metadata = lidar_metadata
        self.gps_baud = gps_baud
        self.camera_queue = camera_queue
        if pace not in ("device", "t_ns"):
            raise ValueError(f"pace must be 'device' or 't_ns', got {pace!r}")
        self.pace = pace
        self._fits: dict[str, tuple[int, int, float] | None] = {}
        self.pulse = pulse
        first, last = self.reader.span_ns()
        self.start_ns = first + int((from_s or 0.0) * NS)
        self.end_ns = first + int(to_s * NS) if to_s is not None else last + 1
        self.streams: dict[str, StreamInfo] = {}
        want = set(devices) if devices is not None else set(DEVICES)
        bad = want - set(DEVICES)
        if bad:
            raise ValueError(f"unknown device(s) {sorted(bad)}; known: {', '.join(DEVICES)}")
        for dev in DEVICES:
            if dev not in want:
                continue
            name = (streams or {}).get(dev)
            cands = [i for n, i in self.reader.infos.items()
                     if (n == name if name else i.kind == _KIND[dev])]
            if cands:
                self.streams[dev] = cands[0]
            elif name or devices is not None:
                raise ValueError(f"{dev}: no stream {name or 'of kind ' + dev} in "
                                 f"{self.session.session_id}")
        if "audio" in self.streams and pulse is None and devices is None:
            from .pulse import pulse_unavailable

            why = pulse_unavailable()
            if why:
                self.streams.pop("audio")
                log.info("sensor replay: audio left out: %s", why)
        self.emulators: dict[str, Any] = {}
        self.t0_mono_ns = 0
        self._own_pulse = False

    # -- time -----------------------------------------------------------------------
    def mono_of(self, t_ns: int) -> int:
        """Host monotonic instant at which session time ``t_ns`` is sent."""
        return self.t0_mono_ns + (t_ns - self.start_ns)

    def send_time(self, dev: str, s: Sample) -> int:
        """Session time at which sample ``s`` of ``dev`` is sent: with ``pace="device"``
        the sample's device time through a robust line fitted to the stream's (device time,
        t_ns) pairs — so the replayed arrival timing agrees with the device clock the
        sample carries, without the recording agent's clock-estimation errors — else (no
        device time, ``pace="t_ns"``) its recorded ``t_ns``."""
        if self.pace != "device" or s.device_t_ns is None:
            return s.t_ns
        if dev not in self._fits:
            self._fits[dev] = _fit_device_clock(
                [(x.device_t_ns, x.t_ns) for x in self.samples(dev)
                 if x.device_t_ns is not None])
        fit = self._fits[dev]
        if fit is None:
            return s.t_ns
        d0, t0, slope = fit
        return t0 + int(round((s.device_t_ns - d0) * slope))

    def samples(self, dev: str) -> Iterator[Sample]:
        """The device's recorded samples in ``[start, end)``, decoded (own file handles;
        any thread)."""
        name = self.streams[dev].name
        for rec in self.reader.records(self.start_ns, self.end_ns, {name}):
            s = self.reader.sample(rec)
            if s is not None:
                yield s

    def _world(self) -> World:
        """A still world: the emulators need one, the recording replaces what it renders."""
        lat, lon, alt = 0.0, 0.0, 0.0
        if "gps" in self.streams:
            fix = next(self.samples("gps"), None)
            if fix is not None:
                lat, lon, alt = fix.payload["lat"], fix.payload["lon"], fix.payload["alt"]
        dur = (self.end_ns - self.start_ns) / NS + self.start_delay_s + 10.0
        cam = self.streams.get("camera")
        cam_opts = {}
        if cam is not None:
            w, h = cam.params.get("width"), cam.params.get("height")
            if not (w and h):
                first = next(self.samples("camera"), None)
                if first is not None:
                    from agent.export.common import image_size

                    w, h = image_size(bytes(first.payload), cam.encoding) or (640, 480)
            # a replay should not lose frames to a client that is slow for a moment
            cam_opts = {"width": int(w or 640), "height": int(h or 480),
                        "client_queue": self.camera_queue}
            if cam.calibration:
                cam_opts["calibration"] = dict(cam.calibration)
        gps = self.streams.get("gps")
        gps_rate = min(_GPS_RATES, key=lambda r: abs(r - (gps.rate_hz or 1.0))) if gps else 1
        aud = self.streams.get("audio")
        sc = Scenario(
            name=f"replay-{self.session.session_id}", duration_s=dur, seed=0,
            origin=Origin(lat=lat, lon=lon, alt=alt), trajectory=[Waypoint(x=0.0, y=0.0)],
            devices=Devices(
                camera=DeviceSettings(rate_hz=cam.rate_hz if cam else 30.0, options=cam_opts),
                lidar=DeviceSettings(rate_hz=None),
                gps=DeviceSettings(rate_hz=gps_rate, options={"baud": self.gps_baud,
                                                              "high_precision": True}),
                audio=DeviceSettings(rate_hz=int(_sample_rate(aud)) if aud else 48000,
                                     options={"channels": min(2, int(aud.params.get(
                                         "channels", 1))) if aud else 1,
                                              "noise_dbfs": None, "save_wav": False})))
        return World(sc)

    # -- lifecycle ------------------------------------------------------------------
    def start(self) -> dict[str, str]:
        """Build and start the emulators; returns the URIs (and options) an agent's rig
        needs. Playback begins ``start_delay_s`` from now. Blocks ~0.3–3 s."""
        if not self.streams:
            raise ValueError("nothing to replay: the session has no camera, LiDAR, GPS or "
                             "audio stream")
        world = self._world()
        for dev, cls in (("camera", _camera_cls), ("lidar", _lidar_cls), ("gps", _gps_cls),
                         ("audio", _audio_cls)):
            if dev in self.streams:
                cls()  # import (open3d for the LiDAR takes seconds) before the clock runs
        self.t0_mono_ns = time.monotonic_ns() + int(self.start_delay_s * NS)
        d = world.sc.devices
        uris: dict[str, str] = {}
        try:
            if "camera" in self.streams:
                cam = _ReplayCamera(world, d.camera, self.run_dir, self.t0_mono_ns, self)
                cam.start()
                self.emulators["camera"] = cam
                uris["camera"] = cam.uri
            if "lidar" in self.streams:
                from .runner import free_udp_port

                opts = {"metadata": self.lidar_metadata} if self.lidar_metadata else {}
                li = _ReplayLidar(world, d.lidar.model_copy(update={"options": opts}),
                                  self.run_dir, self.t0_mono_ns, self,
                                  dest_port=free_udp_port())
                li.start()
                self.emulators["lidar"] = li
                uris["lidar"] = li.uri
                uris["lidar_metadata"] = str(li.metadata_path)
            if "gps" in self.streams:
                g = _ReplayGps(world, d.gps, self.run_dir, self.t0_mono_ns, self)
                g.start()
                self.emulators["gps"] = g
                uris["gps"] = g.uri
                uris["gps_pps"] = g.pps_uri
            if "audio" in self.streams:
                if self.pulse is None:
                    from .pulse import PulseServer

                    a = d.audio
                    self.pulse = PulseServer(rate=int(a.rate_hz or 48000),
                                             channels=int(a.options.get("channels", 1)))
                    self.pulse.start()
                    self._own_pulse = True
                au = _ReplayAudio(world, d.audio, self.run_dir, self.t0_mono_ns, self,
                                  self.pulse)
                au.start()
                self.emulators["audio"] = au
                uris["audio"] = au.uri
                uris["audio_pulse_server"] = self.pulse.server or ""
        except BaseException:
            self.stop()
            raise
        import json

        (self.run_dir / "replay.json").write_text(json.dumps({
            "session": self.session.session_id, "source": self.session.source,
            "t0_mono_ns": self.t0_mono_ns, "start_ns": self.start_ns, "end_ns": self.end_ns,
            "streams": {d: i.name for d, i in self.streams.items()}, "uris": uris},
            indent=1) + "\n")
        return uris

    def rig_values(self) -> dict[str, Any]:
        """Placeholder values for ``examples/hil-rig.toml`` (as :meth:`HilRun.rig_values`)."""
        v: dict[str, Any] = {}
        e = self.emulators
        if "camera" in e:
            c = e["camera"]
            v.update(camera_uri=c.uri, camera_rate_hz=float(c.fps), camera_width=c.opts.width,
                     camera_height=c.opts.height, camera_calibration=c.calibration)
        if "lidar" in e:
            v.update(lidar_uri=e["lidar"].uri, lidar_metadata=str(e["lidar"].metadata_path))
        if "gps" in e:
            g = e["gps"]
            v.update(gps_uri=g.uri, gps_rate_hz=float(1e9 / g.period_ns), gps_pps=g.pps_uri)
        if "audio" in e:
            a = e["audio"]
            v.update(audio_uri=a.uri, audio_pulse_server=self.pulse.server or "",
                     audio_rate=a.rate, audio_channels=a.channels)
        return v

    def wait(self, timeout_s: float | None = None) -> bool:
        """Block until every device has sent its last recorded sample (True) or the
        timeout passed (False)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for emu in self.emulators.values():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not emu.replay_done.wait(left):
                return False
        return True

    def stop(self) -> dict[str, dict[str, int]]:
        """Stop every emulator (idempotent); returns what each sent."""
        sent = {}
        for dev, emu in list(self.emulators.items()):
            try:
                emu.stop()
            except Exception:  # noqa: BLE001 - stop the others regardless
                log.exception("sensor replay: stopping %s failed", dev)
            sent[dev] = dict(emu.sent)
        if self._own_pulse and self.pulse is not None:
            self.pulse.stop()
            self._own_pulse = False
        return sent

    def __enter__(self) -> "SensorReplay":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _fit_device_clock(pairs: list[tuple[int, int]]) -> tuple[int, int, float] | None:
    """``(d0, t0, slope)`` with ``t ≈ t0 + (d − d0)·slope`` fitted to (device time,
    t_ns) pairs: least squares, then again without the points more than 4 MADs (at least
    2 ms) off — the steps and wobble of the recording's clock estimation."""
    if len(pairs) < 2:
        return None
    d = np.array([p[0] for p in pairs], np.float64)
    t = np.array([p[1] for p in pairs], np.float64)
    d0, t0 = d[0], t[0]
    x, y = d - d0, t - t0
    keep = np.ones(len(x), bool)
    for _ in range(3):
        if keep.sum() < 2 or np.ptp(x[keep]) == 0:
            return None
        slope, icpt = np.polyfit(x[keep], y[keep], 1)
        res = y - (slope * x + icpt)
        mad = np.median(np.abs(res[keep] - np.median(res[keep])))
        keep = np.abs(res - np.median(res[keep])) <= max(4 * 1.4826 * mad, 2e6)
    if not 0.99 < slope < 1.01:  # not one clock (a reset mid-session): use t_ns
        return None
    return int(d0), int(round(t0 + icpt)), float(slope)


def _sample_rate(info: StreamInfo) -> float:
    p = info.params
    return float(p.get("sample_rate") or (info.rate_hz if (info.rate_hz or 0) >= 4000
                                          else 48000))


def _wait_mono(stop: threading.Event, mono_ns: int) -> bool:
    """Sleep until ``mono_ns``; False when stopped meanwhile."""
    d = (mono_ns - time.monotonic_ns()) / NS
    return not (d > 0 and stop.wait(d)) and not stop.is_set()


# -- camera ---------------------------------------------------------------------------

def _camera_cls() -> type:
    from .emulators.camera import BOUNDARY, CameraEmulator

    class ReplayCamera(CameraEmulator):
        """The camera emulator's HTTP server sending recorded frames."""

        def __init__(self, world: World, settings: DeviceSettings, run_dir: Path,
                     run_t0_ns: int, rep: SensorReplay):
            super().__init__(world, settings, run_dir, run_t0_ns)
            self.rep = rep
            self.replay_done = threading.Event()

        def _capture_loop(self) -> None:
            header = (f"--{BOUNDARY}\r\nContent-Type: image/jpeg\r\nContent-Length: ").encode()
            try:
                first = True
                for s in self.rep.samples("camera"):
                    if first:
                        first = False
                        if not self._preroll(s, header):
                            return
                    due = self.rep.mono_of(self.rep.send_time("camera", s))
                    if not _wait_mono(self.stop_event, due):
                        return
                    dev = s.device_t_ns if s.device_t_ns is not None else \
                        self.clock.device_ns(due)
                    seq = s.seq if s.seq is not None else self.sent.get("captured", 0)
                    jpeg = _with_comment(bytes(s.payload), dev, seq)
                    with self._clients_lock:
                        clients = list(self._clients)
                    self.count("captured")
                    rec: dict[str, Any] = {"type": "sample", "seq": seq, "true_ns": due,
                                           "device_ns": dev, "t_ns_recorded": s.t_ns}
                    if clients:
                        part = header + str(len(jpeg)).encode() + b"\r\n\r\n" + jpeg + b"\r\n"
                        for c in clients:
                            c.push(due, seq, part)
                        self.count("sent")
                        rec.update(sent=True, clients=len(clients))
                    else:
                        self.count("skipped")
                        self.count("no_client")
                        rec.update(sent=False, clients=0, reason="no_client")
                    self.truth.write(rec)
            finally:
                self.replay_done.set()

        def _preroll(self, s: Sample, header: bytes) -> bool:
            """Until playback begins, stream the first recorded frame at the camera's rate
            (a camera is streaming before anyone records it, and an HTTP camera driver
            opens only once a frame came): frame counter and device time count back from
            the first frame's, so the recorded frames follow without a jump. Preroll frames
            are ``"preroll": true`` in the truth log. False when stopped meanwhile."""
            period = self.period_ns
            t_first = self.rep.mono_of(self.rep.send_time("camera", s))
            dev0 = s.device_t_ns if s.device_t_ns is not None else \
                self.clock.device_ns(t_first)
            seq0 = s.seq if s.seq is not None else 0
            k = max(0, (t_first - time.monotonic_ns()) // period)
            while k > 0:
                due = t_first - k * period
                if not _wait_mono(self.stop_event, due):
                    return False
                with self._clients_lock:
                    clients = list(self._clients)
                if clients:
                    jpeg = _with_comment(bytes(s.payload), dev0 - k * period, seq0 - k)
                    part = header + str(len(jpeg)).encode() + b"\r\n\r\n" + jpeg + b"\r\n"
                    for c in clients:
                        c.push(due, seq0 - k, part)
                    self.count("preroll")
                    self.truth.write({"type": "sample", "seq": seq0 - k, "true_ns": due,
                                      "device_ns": dev0 - k * period, "sent": True,
                                      "clients": len(clients), "preroll": True})
                k -= 1
            return True

    return ReplayCamera


def _with_comment(jpeg: bytes, dev_ns: int, seq: int) -> bytes:
    """The JPEG with the HIL comment carrying the *recorded* device time and frame counter
    (an ``edgecap-hil`` comment already there is replaced: the recording's stamps are what
    the agent saw)."""
    from drivers.mjpeg import jpeg_info

    from .emulators.camera import insert_jpeg_comment

    if jpeg[2:4] == b"\xff\xfe":
        info = jpeg_info(jpeg)
        if info is not None and info.comment is not None and \
                info.comment.startswith(b"edgecap-hil"):
            jpeg = jpeg[:2] + jpeg[2 + 4 + len(info.comment):]
    try:
        return insert_jpeg_comment(jpeg, f"edgecap-hil t_dev_ns={dev_ns} seq={seq}".encode())
    except ValueError:  # not a JPEG: sent as recorded, the driver counts it
        return jpeg


def _ReplayCamera(*a: Any) -> Any:  # noqa: N802 - a factory named like the class it builds
    return _camera_cls()(*a)


# -- LiDAR ----------------------------------------------------------------------------

def _lidar_cls() -> type:
    import open3d  # noqa: F401 - the emulator's ray caster imports it (seconds) on __init__

    from .emulators.lidar import LidarEmulator, _Frame
    from .raycast import YIELD_S

    class ReplayLidar(LidarEmulator):
        """The LiDAR emulator's UDP sender with recorded scans re-encoded into packets."""

        def __init__(self, world: World, settings: DeviceSettings, run_dir: Path,
                     run_t0_ns: int, rep: SensorReplay, dest_port: int):
            super().__init__(world, settings, run_dir, run_t0_ns, dest_port=dest_port)
            from ouster.sdk.core import XYZLut

            self.rep = rep
            self.replay_done = threading.Event()
            lut = XYZLut(self.info, use_extrinsics=False)
            # the driver's projection: xyz (m) = range (mm) × direction (per mm) + offset (m)
            self.lut_dir = np.asarray(lut.direction, np.float64).reshape(self.h, self.w, 3)
            self.lut_off = np.asarray(lut.offset, np.float64).reshape(self.h, self.w, 3)
            self.sent.update({"scans": 0, "points_in": 0, "points_encoded": 0})

        def _start(self) -> None:
            import socket

            self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 21)
            for target, name in ((self._render_loop, "lidar-replay-encode"),
                                 (self._send_loop, "lidar-send")):
                t = threading.Thread(target=target, args=(0,) if target == self._render_loop
                                     else (), name=name, daemon=True)
                t.start()
                self._threads.append(t)

        def _render_loop(self, _k: int) -> None:
            from ouster.sdk.core import LidarFrame

            frame = LidarFrame(self.info)
            try:
                for k, s in enumerate(self.rep.samples("lidar")):
                    if self.stop_event.is_set():
                        return
                    f = self.encode(k, s, frame)
                    while not self.stop_event.is_set():
                        try:
                            self._q.put(f, timeout=0.1)
                            break
                        except queue.Full:
                            continue
            finally:
                # the sender finishes what is queued; done once the queue is empty
                while not self.stop_event.is_set() and not self._q.empty():
                    time.sleep(0.05)
                time.sleep(0.15)
                self.replay_done.set()

        def pixels(self, pts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
            """``(row, col, range_mm, first_col)`` of each point of a POINT_DTYPE scan."""
            row = np.clip(pts["ring"].astype(np.int64), 0, self.h - 1)
            rel = np.rint(pts["t_offset_ns"].astype(np.float64) * self.w / self.period_ns
                          ).astype(np.int64)
            xyz = np.stack([pts["x"], pts["y"], pts["z"]], 1).astype(np.float64)
            first = 0
            if len(pts):  # which column fired first: the one whose beam points there
                sel = np.linspace(0, len(pts) - 1, min(16, len(pts))).astype(np.int64)
                votes = []
                for i in sel:
                    d = xyz[i] - self.lut_off[row[i], 0]
                    az = math.atan2(d[1], d[0])
                    beams = self.lut_dir[row[i]]
                    baz = np.arctan2(beams[:, 1], beams[:, 0])
                    c = int(np.argmin(np.abs(np.angle(np.exp(1j * (baz - az))))))
                    votes.append((c - rel[i]) % self.w)
                first = int(np.bincount(votes).argmax())
            col = (first + rel) % self.w
            d = xyz - self.lut_off[row, col]
            bd = self.lut_dir[row, col]
            rng_mm = np.einsum("ij,ij->i", d, bd) / np.einsum("ij,ij->i", bd, bd)
            return row, col, rng_mm, first

        def encode(self, k: int, s: Sample, frame: Any) -> Any:
            from ouster.sdk.core import LidarPacket, frame_to_packets

            pts = s.payload
            t_send = self.rep.mono_of(self.rep.send_time("lidar", s))
            row, col, rng_mm, first = self.pixels(pts)
            rng = np.zeros((self.h, self.w), np.uint32)
            sig = np.zeros((self.h, self.w), np.uint16)
            ok = (rng_mm > 0.5) & (rng_mm < (1 << 19) - 1)
            rng[row[ok], col[ok]] = np.rint(rng_mm[ok]).astype(np.uint32)
            sig[row[ok], col[ok]] = np.clip(pts["intensity"][ok], 0, 65535).astype(np.uint16)
            frame.field("RANGE")[:] = rng
            frame.field("SIGNAL")[:] = sig
            frame.field("REFLECTIVITY")[:] = 0
            frame.field("NEAR_IR")[:] = 0
            dev0 = (s.device_t_ns if s.device_t_ns is not None else
                    self.clock.device_ns(t_send)) - int(self.col_off_ns[first])
            frame.timestamp[:] = (dev0 + self.col_off_ns).astype(np.uint64)
            frame.measurement_id[:] = np.arange(self.w, dtype=np.uint16)
            fid = int(s.seq if s.seq is not None else k) & 0xFFFF
            frame.frame_id = fid
            status = frame.status
            datas: list[bytes] = []
            step = 8 * self.cpp
            for a in range(0, self.w, step):  # as the emulator: 8 packets, then yield
                status[:] = 0
                status[a:a + step] = 1
                datas += [p.buf.tobytes() for p in frame_to_packets(
                    frame, self.pf, self.info.init_id, self.info.sn)
                    if isinstance(p, LidarPacket)]
                time.sleep(YIELD_S)
            status[:] = 1
            t0 = t_send - int(self.col_off_ns[first])
            last_col = np.arange(1, self.ppf + 1) * self.cpp - 1
            due = [t0 + int(self.col_off_ns[c]) for c in last_col]
            # a packet due before the scan's first column is sent with it (wrap-around)
            due = [max(x, t_send) for x in due]
            n_ok = int(ok.sum())
            self.count("scans")
            self.count("points_in", len(pts))
            self.count("points_encoded", n_ok)
            truth = {"type": "sample", "seq": fid, "frame": k, "true_ns": t_send,
                     "device_ns": int(dev0 + self.col_off_ns[first]), "packets": len(datas),
                     "points": n_ok, "points_recorded": len(pts), "first_col": first,
                     "t_ns_recorded": s.t_ns}
            return _Frame(k, fid, truth["device_ns"], truth["true_ns"], datas, due, truth)

    return ReplayLidar


def _ReplayLidar(*a: Any, **kw: Any) -> Any:  # noqa: N802
    return _lidar_cls()(*a, **kw)


# -- GPS ------------------------------------------------------------------------------

def _gps_cls() -> type:
    from .emulators.gps import GpsEmulator

    class ReplayGps(GpsEmulator):
        """The GPS emulator's pty sending the NMEA bursts of recorded fixes."""

        def __init__(self, world: World, settings: DeviceSettings, run_dir: Path,
                     run_t0_ns: int, rep: SensorReplay):
            super().__init__(world, settings, run_dir, run_t0_ns)
            self.rep = rep
            self.replay_done = threading.Event()
            first = next(rep.samples("gps"), None)
            if first is not None and (first.device_t_ns or 0) > 10 ** 18:
                # the receiver's UTC is the recorded one: PPS edges and NMEA times agree
                self.utc_shift_ns = first.device_t_ns - self.clock.device_ns(
                    rep.mono_of(rep.send_time("gps", first)))
                self.pps_spec = self._pps_spec()
                self.pps_uri = self.pps_spec.to_uri()
                self.truth.write({"type": "timescale", "device_clock": "utc",
                                  "utc_minus_device_ns": self.utc_shift_ns,
                                  "source": "recorded UTC", "pps_uri": self.pps_uri})

        def _loop(self) -> None:
            try:
                prev: Sample | None = None
                for seq, s in enumerate(self.rep.samples("gps")):
                    fix = s.payload
                    true = self.rep.mono_of(self.rep.send_time("gps", s))
                    utc = s.device_t_ns if (s.device_t_ns or 0) > 10 ** 18 else \
                        self.utc_ns(true)
                    state = _fix_state(fix, prev, s.t_ns)
                    prev = s
                    send_at = true + int(self.opts.latency_ms * 1e6)
                    if not _wait_mono(self.stop_event, send_at):
                        return
                    data = b"".join(self.sentences(utc, state))
                    self._check_baud()
                    tx = self._paced_write(data)
                    self.count("sent")
                    self.count("epochs")
                    self.count("bytes", len(data))
                    self.truth.write({"type": "sample", "seq": seq, "true_ns": true,
                                      "device_ns": utc, **state, "bytes": len(data),
                                      "tx_start_ns": tx, "t_ns_recorded": s.t_ns})
            finally:
                self.replay_done.set()

    return ReplayGps


def _fix_state(fix: dict[str, Any], prev: Sample | None, t_ns: int) -> dict[str, Any]:
    """The emulator's fix state for a recorded fix: speed and course from the previous
    fix (LocationFix holds position only), fix quality 1."""
    speed, course = 0.0, 0.0
    if prev is not None and t_ns > prev.t_ns:
        p = prev.payload
        lat0, lon0, lat1, lon1 = map(math.radians, (p["lat"], p["lon"], fix["lat"], fix["lon"]))
        dn = (lat1 - lat0) * 6_371_000.0
        de = (lon1 - lon0) * 6_371_000.0 * math.cos((lat0 + lat1) / 2)
        speed = math.hypot(dn, de) / ((t_ns - prev.t_ns) / NS)
        course = math.degrees(math.atan2(de, dn)) % 360.0
    return {"lat": fix["lat"], "lon": fix["lon"], "alt": fix["alt"], "speed": speed,
            "course": course, "fix_quality": 1, "hdop": 0.9, "satellites": 10}


def _ReplayGps(*a: Any) -> Any:  # noqa: N802
    return _gps_cls()(*a)


# -- audio ----------------------------------------------------------------------------

def _audio_cls() -> type:
    from .emulators.audio import AudioEmulator

    class ReplayAudio(AudioEmulator):
        """The microphone emulator's player with the recorded PCM as its content."""

        def __init__(self, world: World, settings: DeviceSettings, run_dir: Path,
                     run_t0_ns: int, rep: SensorReplay, pulse: Any):
            blocks = list(rep.samples("audio"))
            self.rep = rep
            self.replay_done = threading.Event()
            self.t_audio0 = blocks[0].t_ns if blocks else rep.start_ns
            super().__init__(world, settings, run_dir, rep.mono_of(self.t_audio0), pulse=pulse)
            rate = self.rate
            ends = [int(round((b.t_ns - self.t_audio0) * rate / NS)) + len(b.payload)
                    for b in blocks]
            self.pcm = np.zeros(max(ends, default=0), np.float32)
            for b in blocks:
                i = int(round((b.t_ns - self.t_audio0) * rate / NS))
                x = np.asarray(b.payload)
                x = x[:, 0] if x.ndim == 2 else x
                self.pcm[i:i + len(x)] = x.astype(np.float32) / 32767.0
            self.ratio = 1.0
            self.sent.update({"blocks_recorded": len(blocks)})

        def _render_events(self) -> list:
            return []

        def compose(self, i0: int, n: int) -> np.ndarray:
            out = np.zeros(n, np.float64)
            if i0 < len(self.pcm):
                seg = self.pcm[i0:i0 + n]
                out[:len(seg)] = seg
            elif not self.replay_done.is_set():
                self.replay_done.set()
            return out

    return ReplayAudio


def _ReplayAudio(*a: Any) -> Any:  # noqa: N802
    return _audio_cls()(*a)
