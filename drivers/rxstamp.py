"""Kernel receive timestamps: when a datagram or TCP segment reached the host, not when a
driver thread got round to reading it.

    if rxstamp.enable(sock):                      # SO_TIMESTAMPNS (Linux), else False
        n, rx_ns = rxstamp.recv_into(sock, buf)   # rx_ns on time.monotonic_ns()

A thread stamping ``time.monotonic_ns()`` after ``recv`` adds its own wake-up and
interpreter-lock wait to every arrival (tens of µs to milliseconds on a busy 2-core rig);
the kernel stamps the packet as the network stack receives it. The clock estimators take
the minimum-delay envelope of arrivals, so that floor is their bias: kernel stamps lower it
from ~0.1 ms to the stack's own latency.

Contract: :func:`recv_into` returns ``(nbytes, rx_ns)``; ``rx_ns`` is the kernel's stamp
converted from CLOCK_REALTIME to CLOCK_MONOTONIC with the offset between the two read right
after the call (a wall-clock step between the packet's arrival and the read would move it;
a converted stamp later than now or more than :data:`MAX_AGE_NS` old is replaced by now).
Without a kernel stamp (the option not set, another OS, a socket type without it) it is
``time.monotonic_ns()`` after the read, as before. For TCP the kernel reports the stamp of
the last segment the read consumed. Linux turns its "stamp every packet" switch on from a
work item after the first socket asks, so packets in the first moments may carry a stamp
taken at the read instead (no worse than before). Exceptions are those of
``socket.recvmsg_into``.
"""

from __future__ import annotations

import socket
import struct
import sys
import time

#: Linux's SO_TIMESTAMPNS (= SCM_TIMESTAMPNS): a struct timespec per received message
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_TIMESPEC = struct.Struct("@qq")
_ANC_SIZE = socket.CMSG_SPACE(_TIMESPEC.size) if hasattr(socket, "CMSG_SPACE") else 0
#: a converted stamp older than this (a wall-clock step in between) is not trusted
MAX_AGE_NS = 5_000_000_000


def enable(sock: socket.socket) -> bool:
    """Ask for kernel receive stamps on ``sock``; False where the OS cannot."""
    if not sys.platform.startswith("linux") or not _ANC_SIZE:
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    except OSError:
        return False
    return True


def recv_into(sock: socket.socket, buf: bytearray | memoryview | object) -> tuple[int, int]:
    """``recvmsg_into`` with the arrival stamp (see module); ``(nbytes, rx_ns)``."""
    n, anc, _flags, _addr = sock.recvmsg_into([buf], _ANC_SIZE)
    now = time.monotonic_ns()
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and \
                len(data) >= _TIMESPEC.size:
            sec, nsec = _TIMESPEC.unpack_from(data)
            offset = time.clock_gettime_ns(time.CLOCK_REALTIME) - time.monotonic_ns()
            rx = sec * 1_000_000_000 + nsec - offset
            if now - MAX_AGE_NS <= rx <= now:
                return n, rx
    return n, now
