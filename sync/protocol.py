"""The sync wire protocol, shared by the uploader (edge) and the ingest server (fleet).

A message is one ZeroMQ multipart message: a msgpack map (the *header*) that always holds
``v`` (protocol version) and ``t`` (type), and, for ``chunk`` only, a second frame with the
raw bytes. :func:`decode` is the only way a received message is read: it bounds every size,
checks every field's type and range, refuses unknown types and unknown keys, and raises
:class:`ProtocolError` with a short code for anything else. It never raises anything else.
The full message-by-message specification is docs/sync-protocol.md.

Pure functions, no I/O, safe from any thread.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import msgpack

from .errors import ProtocolError

PROTOCOL_VERSION = 1

#: device, session and bundle ids: no path separators, no leading dot, no ``..``
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SHA_RE = re.compile(r"[0-9a-f]{64}")

#: message types each side accepts
CLIENT_TYPES = frozenset({"hello", "offer", "chunk", "commit", "ping"})
SERVER_TYPES = frozenset({"welcome", "resume", "have", "ack", "nack", "done", "error",
                          "pong"})

#: error codes the server may send (``error.code`` / ``nack.code``)
ERROR_CODES = frozenset({
    "bad_message", "bad_version", "unknown_type", "unknown_key", "bad_field", "too_large",
    "not_hello", "device_mismatch", "rate_limited", "busy", "unknown_transfer",
    "bad_offset", "bad_crc", "incomplete", "bad_hash", "bad_manifest", "conflict",
    "storage", "superseded",
})

_U31 = 2**31 - 1


def valid_id(value: object) -> bool:
    """True for a device/session/bundle id that is safe as one path or key component."""
    return (isinstance(value, str) and _ID_RE.fullmatch(value) is not None
            and ".." not in value)


def valid_sha256(value: object) -> bool:
    """True for a lowercase hex sha256 digest."""
    return isinstance(value, str) and _SHA_RE.fullmatch(value) is not None


@dataclass(frozen=True)
class Limits:
    """Size bounds a receiver enforces. The server announces its own in ``welcome``."""

    max_chunk: int = 4 << 20
    max_manifest: int = 512 << 10
    max_bundle: int = 64 << 30

    @property
    def max_header(self) -> int:
        return self.max_manifest + 4096

    @property
    def max_frame(self) -> int:
        """The largest single frame a peer may send (for ZMQ_MAXMSGSIZE)."""
        return max(self.max_chunk, self.max_header)


@dataclass
class Message:
    """A decoded, validated message. ``payload`` is set for ``chunk`` only (a buffer that
    stays valid as long as the received frame does)."""

    type: str
    fields: dict[str, Any] = field(default_factory=dict)
    payload: Any = None

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


# kind, required[, bound]. Kinds: id, sha, str (max len), bool, int (lo, hi), size and
# offset (0..max_bundle), chunk (1..max_chunk), bytes_manifest (len <= max_manifest).
_Spec = tuple
SCHEMAS: dict[str, dict[str, _Spec]] = {
    "hello": {"device": ("id", True), "agent": ("str", True, 64)},
    "welcome": {"server": ("str", True, 128), "boot": ("str", True, 64),
                "max_chunk": ("int", True, (1, 1 << 30)),
                "max_manifest": ("int", True, (1, 1 << 30)),
                "max_bundle": ("int", True, (1, 1 << 62)),
                "window": ("int", True, (1, 4096))},
    "offer": {"tid": ("int", True, (0, _U31)), "session": ("id", True),
              "bundle": ("id", True), "size": ("size", True), "sha256": ("sha", True),
              "priority": ("int", True, (-1_000_000, 1_000_000)),
              "manifest": ("bytes_manifest", True)},
    "resume": {"tid": ("int", True, (0, _U31)), "offset": ("offset", True)},
    "have": {"tid": ("int", True, (0, _U31))},
    "chunk": {"tid": ("int", True, (0, _U31)), "off": ("offset", True),
              "crc": ("int", False, (0, 2**32 - 1))},
    "ack": {"tid": ("int", True, (0, _U31)), "off": ("offset", True)},
    "nack": {"tid": ("int", True, (0, _U31)), "off": ("offset", True),
             "code": ("str", True, 32)},
    "commit": {"tid": ("int", True, (0, _U31))},
    "done": {"tid": ("int", True, (0, _U31)), "stored": ("bool", True),
             "dedup": ("bool", True)},
    "error": {"code": ("str", True, 32), "msg": ("str", False, 512),
              "tid": ("int", False, (0, _U31)), "offset": ("offset", False)},
    "ping": {}, "pong": {"boot": ("str", False, 64)},
}


def encode(mtype: str, payload: Any = None, **fields: Any) -> list[Any]:
    """Build the frames of one message. The caller passes valid fields (the receiver
    checks them anyway); ``payload`` (bytes or a buffer) only for ``chunk``."""
    head = msgpack.packb({"v": PROTOCOL_VERSION, "t": mtype, **fields}, use_bin_type=True)
    return [head] if payload is None else [head, payload]


def _check(name: str, spec: _Spec, value: Any, limits: Limits) -> None:
    kind = spec[0]
    ok: bool
    if kind == "id":
        ok = valid_id(value)
    elif kind == "sha":
        ok = valid_sha256(value)
    elif kind == "str":
        ok = isinstance(value, str) and len(value) <= spec[2]
    elif kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "int":
        lo, hi = spec[2]
        ok = type(value) is int and lo <= value <= hi
    elif kind in ("size", "offset"):
        ok = type(value) is int and 0 <= value <= limits.max_bundle
    elif kind == "bytes_manifest":
        ok = isinstance(value, bytes) and len(value) <= limits.max_manifest
    else:  # pragma: no cover - a typo in SCHEMAS
        raise AssertionError(kind)
    if not ok:
        shown = repr(value)
        raise ProtocolError("bad_field", f"{name}={shown[:40]}")


def _buffer(frame: Any) -> Any:
    return frame.buffer if hasattr(frame, "buffer") else frame


def decode(frames: Iterable[Any], allowed: frozenset[str],
           limits: Limits = Limits()) -> Message:
    """Validate and decode one received message (frames without the routing id; bytes or
    ``zmq.Frame``). Raises :class:`ProtocolError` (and nothing else) when it is not a
    well-formed message of a type in ``allowed``."""
    frames = list(frames)
    if not frames or len(frames) > 2:
        raise ProtocolError("bad_message", f"{len(frames)} frames")
    head = _buffer(frames[0])
    if len(head) > limits.max_header:
        raise ProtocolError("too_large", f"header of {len(head)} bytes")
    try:
        obj = msgpack.unpackb(head, raw=False, strict_map_key=True, use_list=True,
                              max_str_len=limits.max_header, max_bin_len=limits.max_header,
                              max_array_len=64, max_map_len=32, max_ext_len=0)
    except Exception as e:  # msgpack raises many kinds on hostile input
        raise ProtocolError("bad_message", f"not msgpack ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad_message", "header is not a map")
    version = obj.get("v")
    if type(version) is not int:
        raise ProtocolError("bad_message", "no version")
    if version != PROTOCOL_VERSION:
        raise ProtocolError("bad_version", f"v={version}, speak {PROTOCOL_VERSION}")
    mtype = obj.get("t")
    if not isinstance(mtype, str) or mtype not in SCHEMAS or mtype not in allowed:
        raise ProtocolError("unknown_type", repr(mtype)[:40])
    schema = SCHEMAS[mtype]
    extra = [k for k in obj if k not in schema and k not in ("v", "t")]
    if extra:
        raise ProtocolError("unknown_key", ",".join(str(k)[:20] for k in extra[:4]))
    fields: dict[str, Any] = {}
    for name, spec in schema.items():
        if name in obj:
            _check(name, spec, obj[name], limits)
            fields[name] = obj[name]
        elif spec[1]:
            raise ProtocolError("bad_field", f"{name} missing")
    payload = None
    if mtype == "chunk":
        if len(frames) != 2:
            raise ProtocolError("bad_message", "chunk without payload frame")
        payload = _buffer(frames[1])
        if not 0 < len(payload) <= limits.max_chunk:
            raise ProtocolError("too_large", f"chunk of {len(payload)} bytes")
    elif len(frames) != 1:
        raise ProtocolError("bad_message", f"{mtype} with a payload frame")
    return Message(mtype, fields, payload)
