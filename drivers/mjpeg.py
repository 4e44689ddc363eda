"""MJPEG-over-HTTP wire parsing for the camera driver: the multipart stream and JPEG headers.

Pure functions and one incremental parser; no I/O, no threads. Everything here takes
bytes from the outside world, so nothing raises on bad input: it is counted (``corrupt``)
and skipped, and the parser resynchronises on the next boundary.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field

MAX_HEADER = 8192
_SKIPPED = object()


@dataclass
class Part:
    """One multipart body (a JPEG as the camera sent it) and its part headers
    (lower-cased names)."""

    body: bytes
    headers: dict[str, str] = field(default_factory=dict)
    info: JpegInfo | None = None


@dataclass(frozen=True)
class JpegInfo:
    """What the header segments of a JPEG say, read without decoding: size from the SOF
    segment, ``comment`` from the first COM segment, ``has_dht`` (UVC cameras often omit
    the Huffman tables)."""

    width: int
    height: int
    comment: bytes | None
    has_dht: bool


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_info(buf: bytes | bytearray | memoryview) -> JpegInfo | None:
    """Walk the marker segments from SOI up to SOS. None unless it is a JPEG with a frame
    header and ends with EOI (a truncated frame is not a frame)."""
    b = bytes(buf[:65536 * 4]) if len(buf) > 65536 * 4 else bytes(buf)
    n = len(buf)
    if n < 4 or b[:2] != b"\xff\xd8":
        return None
    tail = bytes(buf[-16:]).rstrip(b"\r\n\x00 ")
    if not tail.endswith(b"\xff\xd9"):
        return None
    i, w, h, com, dht = 2, 0, 0, None, False
    while i + 4 <= len(b):
        if b[i] != 0xFF:
            return None
        m = b[i + 1]
        if m == 0xFF:          # fill byte
            i += 1
            continue
        if m in (0xD8, 0x01) or 0xD0 <= m <= 0xD7:
            i += 2
            continue
        (seglen,) = struct.unpack_from(">H", b, i + 2)
        if seglen < 2 or i + 2 + seglen > len(b):
            return None
        if m == 0xFE and com is None:
            com = b[i + 4:i + 2 + seglen]
        elif m == 0xC4:
            dht = True
        elif m in _SOF and seglen >= 7:
            h, w = struct.unpack_from(">HH", b, i + 5)
        elif m == 0xDA:        # start of scan: the headers are over
            return JpegInfo(w, h, com, dht) if w and h else None
        elif m == 0xD9:
            return None
        i += 2 + seglen
    return None


_KV = re.compile(rb"([A-Za-z_][A-Za-z0-9_]*)=(-?\d+)")


def parse_comment(com: bytes | None) -> tuple[int | None, int | None]:
    """``(t_dev_ns, seq)`` from a comment such as ``edgecap-hil t_dev_ns=123 seq=4``
    (either may be missing → None)."""
    if not com:
        return None, None
    kv = {k.decode(): int(v) for k, v in _KV.findall(com[:512])}
    return kv.get("t_dev_ns"), kv.get("seq")


def parse_x_timestamp(value: str | None) -> int | None:
    """mjpg-streamer's ``X-Timestamp: <sec>.<usec>`` part header → ns, else None."""
    if not value:
        return None
    m = re.fullmatch(r"\s*(\d{1,12})(?:\.(\d{1,9}))?\s*", value)
    if not m:
        return None
    frac = (m.group(2) or "").ljust(9, "0")
    return int(m.group(1)) * 1_000_000_000 + int(frac)


def boundary_of(content_type: str | None) -> bytes | None:
    """The multipart boundary from a ``Content-Type`` header, or None when the response
    is not ``multipart/x-mixed-replace`` (leading dashes, which some cameras put into the
    declaration, are dropped: the parser accepts the delimiter with or without them)."""
    if not content_type or "multipart" not in content_type.lower():
        return None
    m = re.search(r'boundary\s*=\s*"?([^";,\s]+)"?', content_type, re.I)
    if not m:
        return b""                    # learn it from the first delimiter line
    return m.group(1).lstrip("-").encode("latin-1")


class MultipartParser:
    """Incremental ``multipart/x-mixed-replace`` parser. ``feed(data)`` returns the parts
    completed by ``data``; the caller's thread only. Uses ``Content-Length`` when a part
    has one (and checks it: a body that is not a whole JPEG is counted ``corrupt`` and the
    parser resynchronises on the next delimiter), otherwise reads up to the next delimiter.
    Bytes between parts that are not whitespace or dashes count as ``corrupt`` once per
    run of garbage. Never raises on input; memory is bounded by ``max_part``."""

    def __init__(self, boundary: bytes = b"", max_part: int = 32 << 20,
                 require_jpeg: bool = True):
        self.boundary = boundary.lstrip(b"-")
        self.max_part = max_part
        self.require_jpeg = require_jpeg
        self.buf = bytearray()
        self.corrupt = 0
        self.parts = 0
        self._garbage = False

    @property
    def delim(self) -> bytes:
        return b"--" + self.boundary

    def feed(self, data: bytes | bytearray | memoryview) -> list[Part]:
        self.buf += data
        out: list[Part] = []
        while True:
            got = self._next()
            if got is None:
                break
            if isinstance(got, Part):
                out.append(got)
        if len(self.buf) > self.max_part + MAX_HEADER:
            # no delimiter in a buffer this big: drop it, keep a tail that may hold one
            keep = len(self.delim) + 2
            del self.buf[:-keep]
            self._mark_garbage()
        return out

    def finish(self) -> int:
        """The stream ended: a partly received part left in the buffer counts as
        ``corrupt`` (returned: 0 or 1). The parser is then empty and may be fed anew."""
        rest = bytes(self.buf).strip(b"\r\n\t -")
        self.buf.clear()
        self._garbage = False
        if rest and rest != self.boundary:
            self.corrupt += 1
            return 1
        return 0

    def _mark_garbage(self) -> None:
        if not self._garbage:
            self.corrupt += 1
            self._garbage = True

    def _learn_boundary(self) -> bool:
        m = re.search(rb"(?:^|\n)--([!-~]{1,70})\r?\n", bytes(self.buf[:MAX_HEADER]))
        if m is None:
            return False
        self.boundary = m.group(1).lstrip(b"-")
        return bool(self.boundary)

    def _next(self) -> Part | object | None:
        """The next part; ``_SKIPPED`` when bytes were consumed without a part; None
        when more data is needed."""
        buf = self.buf
        if not self.boundary and not self._learn_boundary():
            if len(buf) > MAX_HEADER:
                del buf[:-64]
                self._mark_garbage()
            return None
        d = self.delim
        i = buf.find(d)
        if i < 0:
            # keep enough to see a delimiter split across reads
            junk = len(buf) - len(d) - 2
            if junk > 0:
                if bytes(buf[:junk]).strip(b"\r\n\t -"):
                    self._mark_garbage()
                del buf[:junk]
            return None
        if i > 0:
            if bytes(buf[:i]).strip(b"\r\n\t -"):
                self._mark_garbage()
            del buf[:i]
        # buf starts with the delimiter; find the end of the part headers
        he = buf.find(b"\r\n\r\n", len(d), MAX_HEADER)
        sep = 4
        he2 = buf.find(b"\n\n", len(d), MAX_HEADER)
        if he2 >= 0 and (he < 0 or he2 < he):
            he, sep = he2, 2
        if he < 0:
            if len(buf) >= MAX_HEADER:
                self._mark_garbage()
                del buf[:len(d)]
                return _SKIPPED
            return None
        head = bytes(buf[len(d):he])
        inner = head.find(d)
        if inner >= 0:                   # a delimiter with no part: skip to the next one
            if head[:inner].strip(b"\r\n\t -"):
                self._mark_garbage()
            del buf[:len(d) + inner]
            return _SKIPPED
        if head.startswith(b"--"):       # closing delimiter: the stream ends here
            del buf[:he + sep]
            return _SKIPPED
        headers = {}
        for line in head.decode("latin-1").splitlines():
            k, colon, v = line.partition(":")
            if colon:
                headers[k.strip().lower()] = v.strip()
            elif line.strip(" \t\r"):
                self._mark_garbage()     # not a header line
        start = he + sep
        clen = headers.get("content-length", "")
        if clen.isdigit() and int(clen) <= self.max_part:
            n = int(clen)
            if len(buf) < start + n:
                return None
            body = bytes(buf[start:start + n])
            info = jpeg_info(body)
            if not self.require_jpeg or info is not None:
                del buf[:start + n]
                self._garbage = False
                self.parts += 1
                return Part(body, headers, info)
            # the length lied (truncated part) or the body is damaged: resync from here
            self.corrupt += 1
            self._garbage = True
            del buf[:len(d)]
            return _SKIPPED
        # no usable Content-Length: the body runs to the next delimiter
        j = buf.find(d, start)
        if j < 0:
            if len(buf) - start > self.max_part:
                self.corrupt += 1
                del buf[:len(d)]
                return _SKIPPED
            return None
        body = bytes(buf[start:j])
        if body.endswith(b"\r\n"):
            body = body[:-2]
        elif body.endswith(b"\n"):
            body = body[:-1]
        del buf[:j]
        if not body.strip(b"\r\n\t "):
            return _SKIPPED              # an empty part (a stray delimiter line)
        info = jpeg_info(body)
        if self.require_jpeg and info is None:
            self.corrupt += 1
            return _SKIPPED
        self._garbage = False
        self.parts += 1
        return Part(body, headers, info)
