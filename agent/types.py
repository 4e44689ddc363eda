"""Core value types that flow through the pipeline: `Sample` and `StreamInfo`.

Times are integer nanoseconds. Every sample carries three of them:

- ``t_ns``: the shared session timebase (see :mod:`agent.clock`); set by the clock stage
  in the pipeline, 0 until then.
- ``device_t_ns``: the device's own clock (sensor timestamp, frame PTS, audio sample
  index converted to ns, GPS UTC), or ``None`` where the device has none.
- ``host_rx_ns``: host arrival time on ``time.monotonic_ns()``, taken by the driver as soon
  as the data is in user space.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np

Payload = Union[bytes, bytearray, memoryview, np.ndarray, dict]


class StreamKind(str, enum.Enum):
    """What a stream carries; decides the bundle schema it is written with."""

    CAMERA = "camera"
    AUDIO = "audio"
    LIDAR = "lidar"
    GPS = "gps"
    LABEL = "label"
    CLOCK = "clock"
    TIMEREF = "timeref"
    EVENT = "event"


@dataclass
class Sample:
    """One timestamped unit of data from one stream (a frame, an audio block, a scan, a fix).

    ``payload`` is bytes (e.g. JPEG as it came from the device), a numpy array (raw image,
    PCM block, structured point array) or a small dict (GPS fix, label); the stream's
    ``StreamInfo.encoding`` says which. ``meta`` holds small per-sample facts (flags such as
    ``incomplete``, frame size, gap markers) and is kept JSON-serialisable.
    """

    stream: str
    payload: Payload
    host_rx_ns: int
    device_t_ns: int | None = None
    seq: int | None = None
    t_ns: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def nbytes(self) -> int:
        """Approximate payload size in bytes (used for queue and segment accounting)."""
        p = self.payload
        if isinstance(p, np.ndarray):
            return int(p.nbytes)
        if isinstance(p, (bytes, bytearray, memoryview)):
            return len(p)
        return 256


@dataclass(frozen=True)
class StreamInfo:
    """Static description of a stream, known once its driver has opened.

    ``encoding`` names the payload layout: ``jpeg``/``png`` (compressed image bytes),
    ``bgr8``/``rgb8``/``mono8`` (raw image array), ``pcm-s16`` (int16 array, frames ×
    channels), ``points`` (structured array, see :data:`agent.schemas.POINT_DTYPE`),
    ``fix`` (dict), ``json`` (dict).
    """

    name: str
    kind: StreamKind
    encoding: str
    rate_hz: float | None = None
    frame_id: str = ""
    calibration: dict[str, Any] | None = None
    params: dict[str, Any] = field(default_factory=dict)
