"""The storage contract, run across every backend: fs, s3 (moto's S3 API on 127.0.0.1)
and the in-memory fake registered like the real ones."""

from __future__ import annotations

import hashlib
import threading

import pytest

from sync import storage
from sync.errors import StorageError
from sync.storage.base import blob_key, entry_key
from sync.testing import MemoryStorage, S3Fixture, verify_store


@pytest.fixture(scope="module")
def s3():
    fx = S3Fixture()
    yield fx
    fx.stop()


_n = [0]


@pytest.fixture(params=["fs", "s3", "memory"])
def backend(request, tmp_path, s3):
    if request.param == "fs":
        be = storage.create("fs", {"root": str(tmp_path / "store")})
    elif request.param == "s3":
        _n[0] += 1
        be = storage.create("s3", s3.options(bucket=f"contract-{_n[0]}", prefix="p/"))
    else:
        be = storage.create("memory", {})
    yield be
    be.close()


def blob(tmp_path, data: bytes):
    p = tmp_path / f"src-{hashlib.sha256(data).hexdigest()[:8]}"
    p.write_bytes(data)
    return hashlib.sha256(data).hexdigest(), p


def entry(sha, size, bundle="s1_00000", device="rig", session="s1"):
    return {"device": device, "session": session, "bundle": bundle, "sha256": sha,
            "size": size}


def test_registry_knows_builtins_and_fakes():
    assert {"fs", "s3", "memory"} <= set(storage.known_keys())
    assert storage.get("memory") is MemoryStorage
    with pytest.raises(KeyError, match="known"):
        storage.get("tape")


def test_blob_written_once(backend, tmp_path):
    sha, src = blob(tmp_path, b"hello bundle" * 1000)
    assert not backend.has_blob(sha)
    assert backend.put_blob(sha, src, 12000) is True
    assert backend.put_blob(sha, src, 12000) is False  # content addressed: no second copy
    assert backend.has_blob(sha)
    assert b"".join(backend.read_blob(sha)) == b"hello bundle" * 1000
    assert list(backend.list_blobs()) == [sha]
    assert src.exists()  # the caller owns the staging file


def test_multipart_blob(backend, tmp_path):
    data = hashlib.shake_256(b"big").digest(11 << 20)  # > part_mb (5) on s3: 3 parts
    sha, src = blob(tmp_path, data)
    assert backend.put_blob(sha, src, len(data))
    h = hashlib.sha256()
    for block in backend.read_blob(sha):
        h.update(block)
    assert h.hexdigest() == sha


def test_entries_conditional_and_listed(backend, tmp_path):
    sha, src = blob(tmp_path, b"a" * 10)
    backend.put_blob(sha, src, 10)
    e = entry(sha, 10)
    assert backend.put_entry(e, b'{"m": 1}') == "created"
    assert backend.put_entry(e, b'{"m": 1}') == "exists"
    assert backend.put_entry({**e, "sha256": "0" * 64}, b"{}") == "conflict"
    assert backend.get_object("devices/rig/s1/s1_00000.manifest.json") == b'{"m": 1}'
    backend.put_entry(entry(sha, 10, bundle="s1_00001"), b"{}")
    backend.put_entry(entry(sha, 10, device="rig2", session="s9", bundle="s9_00000"), b"{}")
    assert [x["bundle"] for x in backend.list_entries("rig")] == ["s1_00000", "s1_00001"]
    assert len(list(backend.list_entries())) == 3
    assert [x["device"] for x in backend.list_entries("rig2", "s9")] == ["rig2"]
    got = backend.get_entry("rig", "s1", "s1_00000")
    assert got["blob"] == blob_key(sha) and got["entry_version"] == 1
    assert verify_store(backend) == {"blobs": 1, "entries": 3, "problems": []}


def test_concurrent_writers_store_once(backend, tmp_path):
    """Two servers sharing a store race on the same blob and entry: one wins, nothing is
    stored twice, both see success."""
    sha, src = blob(tmp_path, b"race" * 5000)
    results: list[object] = []

    def writer() -> None:
        stored = backend.put_blob(sha, src, 20000)
        results.append((stored, backend.put_entry(entry(sha, 20000), b"{}")))

    threads = [threading.Thread(target=writer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(1 for stored, _ in results if stored) == 1
    assert sorted(r for _, r in results).count("created") == 1
    assert all(r in ("created", "exists") for _, r in results)
    assert list(backend.list_blobs()) == [sha]


def test_unsafe_keys_refused():
    with pytest.raises(ValueError):
        entry_key("rig", "..", "b")
    with pytest.raises(ValueError):
        entry_key("rig", "s", "a/b")
    with pytest.raises(ValueError):
        blob_key("../../etc/passwd")


def test_fs_refuses_paths_outside_root(tmp_path):
    be = storage.create("fs", {"root": str(tmp_path)})
    with pytest.raises(StorageError):
        be.get_object("../outside")


def test_s3_unreachable_is_a_storage_error():
    with pytest.raises(StorageError):
        storage.create("s3", {"bucket": "nope", "endpoint_url": "http://127.0.0.1:9",
                              "region": "us-east-1", "access_key_id": "x",
                              "secret_access_key": "y", "max_attempts": 1,
                              "connect_timeout_s": 0.5})


def test_s3_missing_bucket_without_create(s3):
    with pytest.raises(StorageError, match="bucket"):
        storage.create("s3", s3.options(bucket="never-made", create_bucket=False))
