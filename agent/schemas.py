"""How each stream's samples become MCAP messages: Foxglove well-known protobuf schemas for
sensor data and pre-labels, JSON schemas for edgecap's own records.

One :class:`Codec` per payload encoding. ``codec_for(info)`` picks it; ``encode(sample)``
returns the serialized message. Payloads already in their wire form (JPEG bytes) are copied
into the message as they came, never decoded or recompressed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from foxglove_schemas_protobuf.CompressedImage_pb2 import CompressedImage
from foxglove_schemas_protobuf.LocationFix_pb2 import LocationFix
from foxglove_schemas_protobuf.PackedElementField_pb2 import PackedElementField
from foxglove_schemas_protobuf.PointCloud_pb2 import PointCloud
from foxglove_schemas_protobuf.RawAudio_pb2 import RawAudio
from foxglove_schemas_protobuf.RawImage_pb2 import RawImage
from google.protobuf.message import Message

from .types import Sample, StreamInfo

#: Layout of a LiDAR point array (``encoding = "points"``) and of the PointCloud ``data``.
POINT_DTYPE = np.dtype([
    ("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("intensity", "<f4"),
    ("t_offset_ns", "<u4"), ("ring", "<u2"), ("_pad", "<u2"),
])

_F = PackedElementField
_POINT_FIELDS = [
    _F(name="x", offset=0, type=_F.FLOAT32), _F(name="y", offset=4, type=_F.FLOAT32),
    _F(name="z", offset=8, type=_F.FLOAT32), _F(name="intensity", offset=12, type=_F.FLOAT32),
    _F(name="t_offset_ns", offset=16, type=_F.UINT32), _F(name="ring", offset=20, type=_F.UINT16),
]


@dataclass(frozen=True)
class Codec:
    """Serializer for one payload encoding.

    ``schema_name`` and ``schema_encoding``/``message_encoding`` go into the MCAP schema and
    channel records; ``proto_class`` is set for protobuf schemas (its file descriptor set is
    the schema data), ``json_schema`` for JSON ones.
    """

    schema_name: str
    message_encoding: str  # "protobuf" | "json"
    encode: Callable[[Sample, StreamInfo], bytes]
    proto_class: type[Message] | None = None
    json_schema: dict[str, Any] | None = None


def _stamp(msg: Message, t_ns: int) -> None:
    msg.timestamp.seconds, msg.timestamp.nanos = divmod(int(t_ns), 1_000_000_000)


def _compressed_image(s: Sample, info: StreamInfo) -> bytes:
    msg = CompressedImage(frame_id=info.frame_id or info.name, format=info.encoding,
                          data=bytes(s.payload))
    _stamp(msg, s.t_ns)
    return msg.SerializeToString()


def _raw_image(s: Sample, info: StreamInfo) -> bytes:
    img = np.ascontiguousarray(s.payload)
    h, w = img.shape[:2]
    msg = RawImage(frame_id=info.frame_id or info.name, width=w, height=h,
                   encoding=info.encoding, step=int(img.strides[0]), data=img.tobytes())
    _stamp(msg, s.t_ns)
    return msg.SerializeToString()


def _raw_audio(s: Sample, info: StreamInfo) -> bytes:
    pcm = np.ascontiguousarray(s.payload, dtype="<i2")
    channels = 1 if pcm.ndim == 1 else pcm.shape[1]
    msg = RawAudio(data=pcm.tobytes(), format="pcm-s16",
                   sample_rate=int(info.params.get("sample_rate", info.rate_hz or 0)),
                   number_of_channels=channels)
    _stamp(msg, s.t_ns)
    return msg.SerializeToString()


def _point_cloud(s: Sample, info: StreamInfo) -> bytes:
    pts = s.payload
    if not (isinstance(pts, np.ndarray) and pts.dtype == POINT_DTYPE):
        raise TypeError(f"{info.name}: point payload must be an array of POINT_DTYPE")
    msg = PointCloud(frame_id=info.frame_id or info.name, point_stride=POINT_DTYPE.itemsize,
                     fields=_POINT_FIELDS, data=pts.tobytes())
    msg.pose.orientation.w = 1.0
    _stamp(msg, s.t_ns)
    return msg.SerializeToString()


def _location_fix(s: Sample, info: StreamInfo) -> bytes:
    fix = s.payload
    msg = LocationFix(frame_id=info.frame_id or info.name,
                      latitude=float(fix.get("lat", 0.0)), longitude=float(fix.get("lon", 0.0)),
                      altitude=float(fix.get("alt", 0.0)))
    cov = fix.get("covariance")
    if cov is not None:
        msg.position_covariance.extend(float(c) for c in cov)
        msg.position_covariance_type = LocationFix.APPROXIMATED
    _stamp(msg, s.t_ns)
    return msg.SerializeToString()


def _protobuf(s: Sample, info: StreamInfo) -> bytes:
    return s.payload.SerializeToString()


def _json(s: Sample, info: StreamInfo) -> bytes:
    return json.dumps(s.payload, separators=(",", ":"), default=_json_default).encode()


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


_OPEN_JSON_SCHEMA = {"type": "object"}

_CODECS: dict[str, Codec] = {
    "jpeg": Codec("foxglove.CompressedImage", "protobuf", _compressed_image, CompressedImage),
    "png": Codec("foxglove.CompressedImage", "protobuf", _compressed_image, CompressedImage),
    "bgr8": Codec("foxglove.RawImage", "protobuf", _raw_image, RawImage),
    "rgb8": Codec("foxglove.RawImage", "protobuf", _raw_image, RawImage),
    "mono8": Codec("foxglove.RawImage", "protobuf", _raw_image, RawImage),
    "pcm-s16": Codec("foxglove.RawAudio", "protobuf", _raw_audio, RawAudio),
    "points": Codec("foxglove.PointCloud", "protobuf", _point_cloud, PointCloud),
    "fix": Codec("foxglove.LocationFix", "protobuf", _location_fix, LocationFix),
}


def codec_for(info: StreamInfo) -> Codec:
    """The codec for a stream. ``encoding`` is a key of the table above, ``protobuf`` (the
    payload is a protobuf message of ``info.params["proto_class"]``) or ``json`` (schema name
    from ``info.params["schema"]``, default ``edgecap.<kind>``)."""
    enc = info.encoding
    if enc in _CODECS:
        return _CODECS[enc]
    if enc == "protobuf":
        cls = info.params["proto_class"]
        return Codec(cls.DESCRIPTOR.full_name, "protobuf", _protobuf, cls)
    if enc == "json":
        name = info.params.get("schema", f"edgecap.{info.kind.value}")
        return Codec(name, "json", _json, json_schema=info.params.get("json_schema",
                                                                        _OPEN_JSON_SCHEMA))
    raise ValueError(f"stream {info.name}: no codec for encoding {enc!r}; known: "
                     f"{', '.join(sorted(_CODECS))}, protobuf, json")


def decode_points(data: bytes) -> np.ndarray:
    """PointCloud ``data`` written by this module back to a POINT_DTYPE array."""
    return np.frombuffer(data, dtype=POINT_DTYPE)


class JsonDecoderFactory:
    """mcap reader plug-in for edgecap's JSON channels (answers None for anything else)."""

    def decoder_for(self, message_encoding: str, schema: Any) -> Callable[[bytes], Any] | None:
        if message_encoding != "json":
            return None
        return lambda data: json.loads(data)


def decoder_factories() -> list[Any]:
    """Decoder factories for every encoding edgecap writes (protobuf and JSON)."""
    from mcap_protobuf.decoder import DecoderFactory

    return [DecoderFactory(), JsonDecoderFactory()]
