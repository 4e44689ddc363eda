"""Kernel receive stamps (drivers.rxstamp) on real loopback sockets."""

from __future__ import annotations

import socket
import sys
import time

import pytest

from drivers import rxstamp

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="SO_TIMESTAMPNS is Linux's")
HELD_NS = 80_000_000   # the datagram waits this long in the socket before it is read


def _enable(sock: socket.socket) -> None:
    """Turn stamping on and give the kernel a moment: it switches its global "stamp every
    packet" key from a work item, so the first packets after the first socket asks may be
    stamped only when read (what a long-running driver never notices)."""
    assert rxstamp.enable(sock)
    time.sleep(0.3)


def _udp_pair() -> tuple[socket.socket, socket.socket]:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.connect(rx.getsockname())
    return rx, tx


def test_a_udp_datagram_is_stamped_when_it_arrived_not_when_it_was_read() -> None:
    rx, tx = _udp_pair()
    try:
        _enable(rx)
        buf = bytearray(2048)
        sent = time.monotonic_ns()
        tx.send(b"x" * 100)
        time.sleep(HELD_NS / 1e9)
        n, stamp = rxstamp.recv_into(rx, buf)
        read = time.monotonic_ns()
    finally:
        rx.close()
        tx.close()
    assert n == 100 and bytes(buf[:n]) == b"x" * 100
    assert sent <= stamp < sent + HELD_NS // 2     # at the send, on loopback
    assert read - stamp >= HELD_NS                 # not the read's time


def test_without_the_option_the_stamp_is_the_read() -> None:
    rx, tx = _udp_pair()
    try:
        tx.send(b"y")
        time.sleep(HELD_NS / 1e9)
        before = time.monotonic_ns()
        n, stamp = rxstamp.recv_into(rx, bytearray(64))
    finally:
        rx.close()
        tx.close()
    assert n == 1 and stamp >= before


def test_a_tcp_read_is_stamped_with_its_segment_arrival() -> None:
    srv = socket.create_server(("127.0.0.1", 0))
    cli = socket.create_connection(srv.getsockname())
    conn, _ = srv.accept()
    try:
        _enable(cli)
        sent = time.monotonic_ns()
        conn.sendall(b"z" * 30000)
        time.sleep(HELD_NS / 1e9)
        buf = bytearray(65536)
        n, stamp = rxstamp.recv_into(cli, buf)
        read = time.monotonic_ns()
        while n < 30000:                   # (a loopback segment is 64 KB; just in case)
            n += rxstamp.recv_into(cli, memoryview(buf)[n:])[0]
    finally:
        for s in (cli, conn, srv):
            s.close()
    assert n == 30000
    assert sent <= stamp < sent + HELD_NS // 2 and read - stamp >= HELD_NS
