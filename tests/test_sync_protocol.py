"""The sync wire protocol: round trips, every rejection path, and a property test that
decode() raises nothing but ProtocolError on arbitrary bytes."""

from __future__ import annotations

import hashlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sync.errors import ProtocolError
from sync.protocol import (CLIENT_TYPES, PROTOCOL_VERSION, SCHEMAS, SERVER_TYPES, Limits,
                           decode, encode, valid_id, valid_sha256)

SHA = hashlib.sha256(b"x").hexdigest()
LIM = Limits(max_chunk=1024, max_manifest=256, max_bundle=1 << 20)


def offer(**kw):
    base = dict(tid=1, session="rig_s1", bundle="rig_s1_00000", size=10, sha256=SHA,
                priority=0, manifest=b"{}")
    return {**base, **kw}


def raw(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def test_round_trip_every_client_message():
    cases = {
        "hello": dict(device="rig-1", agent="edgecap 0.1"),
        "offer": offer(),
        "commit": dict(tid=7),
        "ping": {},
    }
    for mtype, fields in cases.items():
        m = decode(encode(mtype, **fields), CLIENT_TYPES, LIM)
        assert m.type == mtype and m.fields == fields and m.payload is None
    m = decode(encode("chunk", b"abc", tid=3, off=5, crc=12), CLIENT_TYPES, LIM)
    assert (m["tid"], m["off"], m["crc"], bytes(m.payload)) == (3, 5, 12, b"abc")


def test_round_trip_server_messages():
    m = decode(encode("welcome", server="s", boot="b", max_chunk=1, max_manifest=1,
                      max_bundle=1, window=4), SERVER_TYPES, LIM)
    assert m["window"] == 4
    m = decode(encode("error", code="busy", tid=3, offset=9), SERVER_TYPES, LIM)
    assert (m["code"], m["tid"], m["offset"]) == ("busy", 3, 9)
    assert set(SCHEMAS) == CLIENT_TYPES | SERVER_TYPES


@pytest.mark.parametrize("frames,code", [
    ([], "bad_message"),
    ([b"a", b"b", b"c"], "bad_message"),
    ([b"\xc1"], "bad_message"),                                   # never-used msgpack byte
    ([raw([1, 2])], "bad_message"),                                # not a map
    ([raw({"t": "ping"})], "bad_message"),                         # no version
    ([raw({"v": PROTOCOL_VERSION + 1, "t": "ping"})], "bad_version"),
    ([raw({"v": 1, "t": "launch"})], "unknown_type"),
    ([raw({"v": 1, "t": "welcome", "server": "x", "boot": "b", "max_chunk": 1,
           "max_manifest": 1, "max_bundle": 1, "window": 1})], "unknown_type"),  # wrong way
    ([raw({"v": 1, "t": "ping", "extra": 1})], "unknown_key"),
    ([raw({"v": 1, "t": "commit"})], "bad_field"),                 # missing tid
    ([raw({"v": 1, "t": "commit", "tid": -1})], "bad_field"),
    ([raw({"v": 1, "t": "commit", "tid": True})], "bad_field"),    # bool is not an int
    ([raw({"v": 1, "t": "commit", "tid": 2**40})], "bad_field"),
    ([raw({"v": 1, "t": "offer", **offer(size=(1 << 20) + 1)})], "bad_field"),  # > max
    ([raw({"v": 1, "t": "offer", **offer(sha256="A" * 64)})], "bad_field"),
    ([raw({"v": 1, "t": "offer", **offer(manifest=b"x" * 257)})], "bad_field"),
    ([raw({"v": 1, "t": "offer", **offer(manifest="{}")})], "bad_field"),  # str not bytes
    ([raw({"v": 1, "t": "offer", **offer(session="../etc")})], "bad_field"),
    ([raw({"v": 1, "t": "offer", **offer(bundle="a/b")})], "bad_field"),
    ([raw({"v": 1, "t": "hello", "device": "x" * 200, "agent": "a"})], "bad_field"),
    ([raw({"v": 1, "t": "chunk", "tid": 1, "off": 0})], "bad_message"),  # no payload
    ([raw({"v": 1, "t": "chunk", "tid": 1, "off": 0}), b""], "too_large"),
    ([raw({"v": 1, "t": "chunk", "tid": 1, "off": 0}), b"x" * 1025], "too_large"),
    ([raw({"v": 1, "t": "ping"}), b"x"], "bad_message"),           # payload on non-chunk
    ([b"\x00" * (256 + 4097)], "too_large"),                       # header over the cap
    ([b"\x91" * 4000], "bad_message"),                             # deep nesting
])
def test_rejections(frames, code):
    with pytest.raises(ProtocolError) as ei:
        decode(frames, CLIENT_TYPES, LIM)
    assert ei.value.code == code


@pytest.mark.parametrize("value,ok", [
    ("rig-1", True), ("rig_s1_00000", True), ("a.b", True), ("A" * 128, True),
    ("", False), (".hidden", False), ("..", False), ("a..b", False), ("a/b", False),
    ("a\\b", False), ("a b", False), ("-x", False), ("A" * 129, False), ("é", False),
    ("a\n", False), (None, False), (5, False),
])
def test_ids(value, ok):
    assert valid_id(value) is ok


def test_sha256():
    assert valid_sha256(SHA)
    assert not valid_sha256(SHA.upper())
    assert not valid_sha256(SHA[:-1])
    assert not valid_sha256(SHA + "\n")


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=600), min_size=0, max_size=3))
def test_fuzz_bytes_only_raise_protocol_error(frames):
    try:
        m = decode(frames, CLIENT_TYPES, LIM)
    except ProtocolError as e:
        assert e.code
    else:  # random bytes rarely form a message; when they do it is a client type
        assert m.type in CLIENT_TYPES


_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=40),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12)


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(sorted(CLIENT_TYPES)), st.dictionaries(
    st.sampled_from(["tid", "off", "crc", "device", "agent", "session", "bundle", "size",
                     "sha256", "priority", "manifest", "x"]), _values, max_size=8),
    st.booleans())
def test_fuzz_structured_maps(mtype, fields, payload):
    frames = [raw({"v": 1, "t": mtype, **fields})] + ([b"p" * 8] if payload else [])
    try:
        m = decode(frames, CLIENT_TYPES, LIM)
    except ProtocolError:
        return
    # whatever passed is well-typed per the schema
    for name, spec in SCHEMAS[m.type].items():
        if spec[1]:
            assert name in m.fields
    if "tid" in m.fields:
        assert type(m["tid"]) is int and m["tid"] >= 0
