"""Synthetic drivers: a camera, a tone generator, a spinning point cloud and a GPS track,
paced by the host clock. Registered exactly like real drivers (``camera.synthetic`` …) so
tests and first demos run on any machine. Their device clock *is* the session timebase
(monotonic), so ``t_ns`` is exact; use the HIL emulators for realistic clocks.
"""

from __future__ import annotations

import math
import time
from abc import abstractmethod
from typing import Iterator

import numpy as np
from pydantic import Field

from agent.schemas import POINT_DTYPE
from agent.types import Sample, StreamInfo, StreamKind

from .base import Driver, DriverOptions
from .registry import register


class _Paced(Driver):
    """Emits one sample per period of ``rate_hz`` on the monotonic clock. ``duration_s``
    (option) ends the stream after that long; the driver is then not live."""

    device_clock_is_timebase = True
    default_rate = 10.0

    def _open(self) -> None:
        self._t0 = time.monotonic_ns()
        self._n = 0

    def _close(self) -> None:
        return None

    @property
    def period_ns(self) -> int:
        return int(1e9 / (self.rate_hz or self.default_rate))

    def _samples(self) -> Iterator[Sample]:
        # the clock starts when capture starts, not at open(): opening other devices or
        # loading models in between must not turn into a burst of overdue samples
        self._t0 = time.monotonic_ns()
        self._n = 0
        while not self.stopping:
            due = self._t0 + self._n * self.period_ns
            delay = (due - time.monotonic_ns()) / 1e9
            if delay > 0 and self._stop.wait(delay):
                return
            s = self.make(self._n, due)
            s.host_rx_ns = time.monotonic_ns()
            self.counters.inc("received")
            self._n += 1
            yield s

    @abstractmethod
    def make(self, n: int, t_ns: int) -> Sample:
        """Build sample ``n`` due at ``t_ns`` (monotonic); ``host_rx_ns`` is set after."""


class SyntheticCameraOptions(DriverOptions):
    width: int = Field(default=640, ge=16, le=7680)
    height: int = Field(default=480, ge=16, le=4320)
    quality: int = Field(default=85, ge=10, le=100)
    #: frames are pre-rendered once and cycled (cheap); 0 renders every frame
    cycle: int = Field(default=30, ge=0, le=10_000)


@register("camera.synthetic")
class SyntheticCamera(_Paced):
    """JPEG frames of a moving bar and the frame number, ``encoding = jpeg``."""

    Options = SyntheticCameraOptions
    default_rate = 10.0

    def streams(self) -> list[StreamInfo]:
        o = self.options
        return [StreamInfo(self.name, StreamKind.CAMERA, "jpeg", self.rate_hz or self.default_rate,
                           frame_id=self.name.strip("/").replace("/", "_"),
                           calibration=self.calibration,
                           params={"width": o.width, "height": o.height})]

    def _open(self) -> None:
        super()._open()
        o = self.options
        self._frames = [render_test_frame(i, o.width, o.height, o.quality)
                        for i in range(o.cycle)]

    def make(self, n: int, t_ns: int) -> Sample:
        o = self.options
        jpeg = (self._frames[n % len(self._frames)] if self._frames
                else render_test_frame(n, o.width, o.height, o.quality))
        return Sample(self.name, jpeg, 0, device_t_ns=t_ns, seq=n)


def render_test_frame(n: int, width: int, height: int, quality: int = 85) -> bytes:
    """A JPEG test card: gradient, a bar moving with ``n`` and the number printed."""
    import cv2

    x = np.linspace(0, 255, width, dtype=np.float32)
    img = np.empty((height, width, 3), np.uint8)
    img[..., 0] = x[None, :].astype(np.uint8)
    img[..., 1] = np.linspace(0, 255, height, dtype=np.float32)[:, None].astype(np.uint8)
    img[..., 2] = 96
    bar = (n * 8) % width
    img[:, bar:bar + max(4, width // 40)] = 255
    cv2.putText(img, f"{n:06d}", (10, height // 2), cv2.FONT_HERSHEY_SIMPLEX,
                max(0.5, width / 640), (0, 0, 0), 2)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    return buf.tobytes()


class SyntheticAudioOptions(DriverOptions):
    sample_rate: int = Field(default=48_000, ge=8000, le=192_000)
    channels: int = Field(default=1, ge=1, le=8)
    block: int = Field(default=1024, ge=64, le=65536)
    tone_hz: float = Field(default=440.0, gt=0)
    amplitude: float = Field(default=0.2, ge=0, le=1)


@register("audio.synthetic")
class SyntheticAudio(_Paced):
    """A sine tone in pcm-s16 blocks; the sample index is the device clock."""

    Options = SyntheticAudioOptions

    @property
    def period_ns(self) -> int:
        return int(self.options.block * 1e9 / self.options.sample_rate)

    def streams(self) -> list[StreamInfo]:
        o = self.options
        return [StreamInfo(self.name, StreamKind.AUDIO, "pcm-s16", o.sample_rate / o.block,
                           params={"sample_rate": o.sample_rate, "channels": o.channels,
                                   "block": o.block})]

    def make(self, n: int, t_ns: int) -> Sample:
        o = self.options
        idx = n * o.block
        t = (idx + np.arange(o.block)) / o.sample_rate
        mono = (o.amplitude * 32767 * np.sin(2 * math.pi * o.tone_hz * t)).astype("<i2")
        pcm = np.repeat(mono[:, None], o.channels, axis=1)
        return Sample(self.name, pcm, 0,
                      device_t_ns=self._t0 + idx * 1_000_000_000 // o.sample_rate,
                      seq=idx, meta={"sample_index": idx})


class SyntheticLidarOptions(DriverOptions):
    rings: int = Field(default=32, ge=1, le=256)
    columns: int = Field(default=512, ge=8, le=4096)
    radius_m: float = Field(default=10.0, gt=0)


@register("lidar.synthetic")
class SyntheticLidar(_Paced):
    """A ring of walls around the sensor whose radius breathes with time."""

    Options = SyntheticLidarOptions

    def streams(self) -> list[StreamInfo]:
        return [StreamInfo(self.name, StreamKind.LIDAR, "points", self.rate_hz or 10.0,
                           frame_id=self.name.strip("/").replace("/", "_"),
                           calibration=self.calibration)]

    def make(self, n: int, t_ns: int) -> Sample:
        o = self.options
        az = np.linspace(0, 2 * np.pi, o.columns, endpoint=False)
        el = np.linspace(-0.3, 0.3, o.rings)
        r = o.radius_m * (1 + 0.1 * math.sin(n / 10))
        pts = np.zeros(o.rings * o.columns, POINT_DTYPE)
        aa, ee = np.meshgrid(az, el)
        pts["x"] = (r * np.cos(ee) * np.cos(aa)).ravel()
        pts["y"] = (r * np.cos(ee) * np.sin(aa)).ravel()
        pts["z"] = (r * np.sin(ee)).ravel()
        pts["intensity"] = 100.0
        pts["ring"] = np.repeat(np.arange(o.rings), o.columns)
        pts["t_offset_ns"] = np.tile((np.arange(o.columns) * self.period_ns // o.columns)
                                     .astype(np.uint32), o.rings)
        return Sample(self.name, pts, 0, device_t_ns=t_ns, seq=n)


class SyntheticGpsOptions(DriverOptions):
    lat: float = Field(default=48.137, ge=-90, le=90)
    lon: float = Field(default=11.575, ge=-180, le=180)
    alt: float = 520.0
    speed_mps: float = Field(default=10.0, ge=0)


@register("gps.synthetic")
class SyntheticGps(_Paced):
    """A fix moving east at ``speed_mps`` from (lat, lon)."""

    Options = SyntheticGpsOptions
    default_rate = 1.0

    def streams(self) -> list[StreamInfo]:
        return [StreamInfo(self.name, StreamKind.GPS, "fix", self.rate_hz or 1.0,
                           frame_id="gps")]

    def make(self, n: int, t_ns: int) -> Sample:
        o = self.options
        east = o.speed_mps * n / (self.rate_hz or 1.0)
        lon = o.lon + east / (111_320 * math.cos(math.radians(o.lat)))
        fix = {"lat": o.lat, "lon": lon, "alt": o.alt, "fix_quality": 1, "hdop": 0.9,
               "satellites": 10, "covariance": [1.0, 0, 0, 0, 1.0, 0, 0, 0, 4.0]}
        return Sample(self.name, fix, 0, device_t_ns=t_ns, seq=n)
