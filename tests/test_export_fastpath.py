"""The exporters' fast path: recorded images copied from the segment files in the kernel
(no decode), byte for byte what was recorded, and point clouds read over the mapped
segment file, with the decode path taking over for compressed chunks, odd message layouts
and file systems without ``copy_file_range``."""

from __future__ import annotations

import errno
import functools
import hashlib
import os
import tempfile
from pathlib import Path

import pytest
from foxglove_schemas_protobuf.CompressedImage_pb2 import CompressedImage
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import test_replay_fixture
from agent.errors import BundleError
from agent.export import ExportOptions, export
from agent.export.common import FileWriter, Frame, image_data, stored_image
from agent.replay import MessageRef
from agent.types import Sample, StreamInfo, StreamKind
from test_replay_fixture import jpeg, make_session


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _recorded(session) -> dict[str, str]:
    """sha256 of every recorded camera frame by its export path."""
    return {f"images/{name.strip('/').replace('/', '_')}/{s.t_ns}.jpg": _sha(s.payload)
            for name, samples in session.samples.items() if name.startswith("/camera/")
            for s in samples}


def _exported(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): _sha(p.read_bytes())
            for p in (out / "images").rglob("*.jpg")}


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory):
    return make_session(tmp_path_factory.mktemp("plain"), duration_s=1.0)


@pytest.fixture(scope="module")
def zstd(tmp_path_factory: pytest.TempPathFactory):
    """The same session with zstd chunks (the recorder's setting without JPEG cameras)."""
    mp = pytest.MonkeyPatch()
    mp.setattr(test_replay_fixture, "Recorder",
               functools.partial(test_replay_fixture.Recorder, compression="zstd"))
    try:
        return make_session(tmp_path_factory.mktemp("zstd"), duration_s=1.0)
    finally:
        mp.undo()


@pytest.mark.parametrize("fmt", ["coco", "labelstudio", "cvat"])
def test_images_copied_from_segments_are_the_recorded_bytes(plain, fmt, tmp_path) -> None:
    res = export(str(plain.session_dir), fmt, ExportOptions(out_dir=tmp_path, progress=False))
    want = _recorded(plain)
    assert _exported(tmp_path) == want
    assert res["images_copied"] == len(want) and res["decode_errors"] == 0


def test_compressed_chunks_take_the_decode_path(zstd, tmp_path) -> None:
    from mcap.reader import make_reader

    seg = next(zstd.session_dir.glob("*.mcap"))
    with open(seg, "rb") as f:
        assert {ci.compression for ci in make_reader(f).get_summary().chunk_indexes} == \
            {"zstd"}
    res = export(str(zstd.session_dir), "coco", ExportOptions(out_dir=tmp_path,
                                                              progress=False))
    assert _exported(tmp_path) == _recorded(zstd)
    assert res["images_copied"] == 0 and res["images"] == len(_recorded(zstd))


def test_cvat_related_images_are_the_exported_files(plain, tmp_path) -> None:
    import json

    export(str(plain.session_dir), "cvat", ExportOptions(out_dir=tmp_path, progress=False))
    doc = json.loads((tmp_path / "pointcloud" / "annotations" / "default.json").read_text())
    related = [r for it in doc["items"] for r in it.get("related_images", [])]
    assert related
    for r in related:
        img = tmp_path / "images" / r["stream"].strip("/").replace("/", "_") / \
            f"{r['t_ns']}.jpg"
        assert os.path.samefile(img, tmp_path / "pointcloud" / r["path"])  # written once


@pytest.mark.parametrize("which", ["plain", "zstd"])
def test_view_payloads_are_the_decoded_ones(which, request, tmp_path) -> None:
    """Stored images and mapped point clouds stand for exactly what decoding gives."""
    import mmap

    import numpy as np

    from agent.export.common import SessionView
    from agent.replay import SessionReader

    session = request.getfixturevalue(which)
    view = SessionView(str(session.session_dir), ExportOptions(out_dir=tmp_path,
                                                               progress=False))
    reader = SessionReader(view.session)
    decoded = {(r.stream, r.t_ns): reader.sample(r).payload
               for r in reader.records(streams={"/lidar", "/camera/front"})}
    seen = {"/lidar": 0, "/camera/front": 0}
    for ev in view.events():
        if isinstance(ev, Frame) and ev.stream in seen:
            seen[ev.stream] += 1
            want, got = decoded[(ev.stream, ev.t_ns)], ev.sample.payload
            if ev.stream == "/lidar":
                assert got.dtype == want.dtype and np.array_equal(got, want)
                assert not got.flags.writeable
                assert isinstance(getattr(got.base, "obj", None), mmap.mmap) == \
                    (which == "plain")
            else:
                assert got == want if which == "zstd" else \
                    MessageRef(got.path, got.offset, got.length).read() == want
    assert seen == {n: len(session.samples[n]) for n in seen}


def test_points_with_another_layout_are_decoded(tmp_path) -> None:
    import mmap

    import numpy as np
    from foxglove_schemas_protobuf.PointCloud_pb2 import PointCloud

    from agent.export.common import stored_points
    from agent.schemas import POINT_DTYPE
    from test_replay_fixture import points

    pts = points(2, 10)
    path = tmp_path / "pc.bin"
    for stride, data, ok in ((24, pts.tobytes(), True), (16, pts.tobytes(), False),
                             (24, pts.tobytes()[:-4], False)):
        b = PointCloud(frame_id="lidar", point_stride=stride, data=data).SerializeToString()
        path.write_bytes(b"pad" + b)
        with open(path, "rb") as f:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            got = stored_points(MessageRef(path, 3, len(b), b), f.fileno(), mapped)
        assert (got is not None) == ok
        if ok:
            assert got.dtype == POINT_DTYPE and np.array_equal(got, pts)


def test_kernel_copy_unavailable_falls_back_to_read_and_write(plain, tmp_path,
                                                              monkeypatch) -> None:
    calls = []

    def no_copy(*a, **k):
        calls.append(a)
        raise OSError(errno.ENOSYS, "copy_file_range not here")

    monkeypatch.setattr(os, "copy_file_range", no_copy, raising=False)
    # copies on this process's threads, where the patch applies (the copy helper process
    # runs the same copy_range, see test_copy_range_without_kernel_copy)
    monkeypatch.setattr(FileWriter, "copier_process", False)
    res = export(str(plain.session_dir), "coco", ExportOptions(out_dir=tmp_path,
                                                               progress=False))
    assert _exported(tmp_path) == _recorded(plain) and res["images_copied"] > 0
    assert 1 <= len(calls) <= 2  # once per writer thread, then plain copies


def test_copy_range_without_kernel_copy(tmp_path) -> None:
    from agent.export import _copier

    src = tmp_path / "seg.bin"
    src.write_bytes(bytes(range(256)) * 40)
    state = _copier.CopyState()
    state.kernel_copy = False
    fd = os.open(src, os.O_RDONLY)
    try:
        _copier.copy_range(fd, str(src), str(tmp_path / "out.bin"), 300, 5000, state)
    finally:
        os.close(fd)
    assert (tmp_path / "out.bin").read_bytes() == src.read_bytes()[300:5300]


@pytest.mark.parametrize("process", [True, False])
def test_truncated_segment_is_a_clear_error(tmp_path, monkeypatch, process) -> None:
    monkeypatch.setattr(FileWriter, "copier_process", process)
    src = tmp_path / "seg.bin"
    src.write_bytes(b"x" * 100)
    w = FileWriter()
    w.write(tmp_path / "out" / "a.jpg", MessageRef(src, 50, 80))
    with pytest.raises(BundleError, match="truncated"):
        w.close()


@pytest.mark.parametrize("process", [True, False])
def test_copies_and_links_in_either_writer(tmp_path, monkeypatch, process) -> None:
    monkeypatch.setattr(FileWriter, "copier_process", process)
    src = tmp_path / "seg.bin"
    src.write_bytes(os.urandom(300_000))
    with FileWriter() as w:
        for k in range(20):
            w.write(tmp_path / "out" / f"{k}.jpg", MessageRef(src, 1000 * k, 100_000 + k))
            w.link(tmp_path / "out" / f"{k}.jpg", tmp_path / "links" / str(k) / "x.jpg")
        w.write(tmp_path / "out" / "b.bin", b"bytes")
        w.link(tmp_path / "out" / "b.bin", tmp_path / "links" / "b.bin")
    for k in range(20):
        got = (tmp_path / "links" / str(k) / "x.jpg")
        assert got.read_bytes() == src.read_bytes()[1000 * k:1000 * k + 100_000 + k]
        assert got.stat().st_ino == (tmp_path / "out" / f"{k}.jpg").stat().st_ino
    assert (tmp_path / "links" / "b.bin").read_bytes() == b"bytes"
    assert w.files == 42 and w.copied == 20


def test_copy_jobs_go_to_the_helper_in_batches(tmp_path, monkeypatch) -> None:
    from agent.export import common

    monkeypatch.setattr(FileWriter, "copier_process", True)
    monkeypatch.setattr(common, "COPY_BATCH_S", 60.0)  # only the count flushes here
    src = tmp_path / "seg.bin"
    src.write_bytes(os.urandom(50_000))
    writes: list[int] = []
    with FileWriter() as w:
        for k in range(common.COPY_BATCH + 3):
            w.write(tmp_path / "out" / f"{k}.jpg", MessageRef(src, k, 1000))
            if k == 0:
                stdin = w._proc.stdin
                real = stdin.write
                monkeypatch.setattr(stdin, "write", lambda b: writes.append(len(b)) or real(b),
                                    raising=False)
    # one write for the full batch, one by close for the last 3 jobs
    assert len(writes) == 2 and writes[0] > 5 * writes[1] > 0
    for k in range(common.COPY_BATCH + 3):
        assert (tmp_path / "out" / f"{k}.jpg").read_bytes() == src.read_bytes()[k:k + 1000]


def _frame(ref: MessageRef) -> Frame:
    info = StreamInfo("/camera/x", StreamKind.CAMERA, "jpeg", 10.0)
    return Frame(Sample("/camera/x", ref, 0, t_ns=0), info)


def test_image_size_past_the_head_reads_the_whole_image(tmp_path) -> None:
    img = jpeg(3, 80, 60)
    big = img[:2] + b"\xff\xfe" + (9000).to_bytes(2, "big") + b"c" * 8998 + img[2:]  # COM
    path = tmp_path / "img.bin"
    path.write_bytes(big)
    data, ext, size = image_data(_frame(MessageRef(path, 0, len(big), big[:4096])))
    assert (data, ext, size) == (big, ".jpg", (80, 60))
    data, _, size = image_data(_frame(MessageRef(path, 0, len(img) + 9002, big[:20_000])))
    assert isinstance(data, MessageRef) and size == (80, 60)


# -- the message walk against protobuf's own parser --------------------------------------

def _key(num: int, wt: int) -> bytes:
    return _varint(num << 3 | wt)


def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        out.append(v & 0x7F | (0x80 if v > 0x7F else 0))
        v >>= 7
        if not v:
            return bytes(out)


def _timestamp(v: tuple[int, int]) -> bytes:
    from google.protobuf.timestamp_pb2 import Timestamp

    return Timestamp(seconds=v[0], nanos=v[1]).SerializeToString()


#: fields of a CompressedImage as a recorder or another tool may lay them out: any order,
#: repeats, unknown fields, a wrong wire type, broken submessages and strings
_field = st.one_of(
    st.tuples(st.just(1), st.just(2), st.tuples(st.integers(0, 2**33), st.integers(0, 999))
              .map(_timestamp)),
    st.tuples(st.just(2), st.just(2), st.binary(max_size=40)),
    st.tuples(st.sampled_from([3, 4]), st.just(2), st.text(max_size=8).map(str.encode)),
    st.tuples(st.sampled_from([1, 3, 9]), st.just(2), st.binary(max_size=12)),
    st.tuples(st.sampled_from([2, 5, 7]), st.just(0), st.integers(0, 2**40)),
    st.tuples(st.sampled_from([2, 6]), st.sampled_from([1, 5]), st.binary(min_size=8,
                                                                            max_size=8)),
)


def _encode(fields: list[tuple[int, int, object]]) -> bytes:
    out = b""
    for num, wt, v in fields:
        if wt == 2:
            out += _key(num, 2) + _varint(len(v)) + v
        elif wt == 0:
            out += _key(num, 0) + _varint(v)
        else:
            out += _key(num, wt) + v[:8 if wt == 1 else 4]
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(before=st.lists(_field, max_size=4), data=st.binary(max_size=60),
       after=st.lists(_field, max_size=4), head=st.integers(0, 400), pad=st.binary(max_size=5))
def test_stored_image_agrees_with_protobuf(before, data, after, head, pad) -> None:
    """Whatever the layout: the reference, when given, holds exactly the bytes protobuf's
    parser returns as ``data``."""
    msg = _encode(before + [(2, 2, data)] + after)
    with tempfile.NamedTemporaryFile() as f:
        f.write(pad + msg + b"trailing")
        f.flush()
        got = stored_image(MessageRef(Path(f.name), len(pad), len(msg), msg[:head]),
                           f.fileno())
        if got is not None:
            want = CompressedImage.FromString(msg).data
            assert os.pread(f.fileno(), got.length, got.offset) == want
            assert got.head == want[:len(got.head)]


@settings(max_examples=100, deadline=None)
@given(data=st.binary(min_size=1, max_size=5000), fmt=st.sampled_from(["jpeg", "png", ""]),
       frame_id=st.text(max_size=20), head=st.integers(0, 40), seconds=st.integers(0, 2**40))
def test_stored_image_finds_every_canonical_message(data, fmt, frame_id, head,
                                                    seconds) -> None:
    """A message as protobuf writes it (an image present: proto3 leaves out empty bytes)
    is always recognised once the head holds the fields before the image."""
    m = CompressedImage(format=fmt, frame_id=frame_id, data=data)
    m.timestamp.seconds = seconds
    b = m.SerializeToString()
    before = len(b) - len(data) - len(fmt.encode()) - len(frame_id.encode()) - 10
    with tempfile.NamedTemporaryFile() as f:
        f.write(b)
        f.flush()
        got = stored_image(MessageRef(Path(f.name), 0, len(b), b[:max(head, before + 30)]),
                           f.fileno())
        assert got is not None and os.pread(f.fileno(), got.length, got.offset) == data
