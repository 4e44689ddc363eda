"""Integration over real sockets: uploader → ZeroMQ (CURVE) → ingest server → fs or a real
S3 API (moto on 127.0.0.1). Every test checks the store afterwards: each bundle once,
every stored hash verified, index entries matching the manifests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest

from sync import storage
from sync.ingest import IngestServer
from sync.spool import REJECTED_SUFFIX, STATE_FILE, UPLOADED_SUFFIX
from sync.testing import (MemoryStorage, S3Fixture, free_port, ingest_config, make_bundle,
                          make_keys, sync_config, verify_store)
from sync.uploader import Uploader

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def keyset(tmp_path_factory):
    return make_keys(tmp_path_factory.mktemp("keys"), clients=("rig", "intruder", "other"))


@pytest.fixture(scope="module")
def allow_rig_only(keyset):
    (keyset["clients_dir"] / "intruder.key").unlink(missing_ok=True)
    return keyset


@pytest.fixture(scope="module")
def s3():
    fx = S3Fixture()
    yield fx
    fx.stop()


def spool_with(tmp_path, sizes, device="rig", session="rig_s1", **kw):
    spool = tmp_path / "spool"
    for i, n in enumerate(sizes):
        make_bundle(spool, device, session, i, n, **kw)
    return spool


def check_store(be, spool, n_expected):
    rep = verify_store(be)
    assert rep["problems"] == [] and rep["entries"] == n_expected
    for e in be.list_entries():
        seg = spool / e["session"] / f"{e['bundle']}.manifest.json"
        man = json.loads(seg.read_text())
        assert man["sha256"] == e["sha256"] and man["size"] == e["size"]
        assert json.loads(be.get_object(e["manifest"])) == man
    return rep


def test_fs_backend_end_to_end_in_priority_order(tmp_path, allow_rig_only):
    keys = allow_rig_only
    spool = tmp_path / "spool"
    for i, n in enumerate([300_000, 1_500_000, 20, 700_001]):
        make_bundle(spool, "rig", "rig_s1", i, n, closed_unix_ns=i)
    make_bundle(spool, "rig", "rig_s1", 4, 5000, triggers=[{"kind": "label"}],
                closed_unix_ns=9)
    make_bundle(spool, "rig", "rig_s1", 5, 5000, priority=3, closed_unix_ns=10)
    (spool / "rig_s1" / "rig_s1_00006.mcap.active").write_bytes(b"being written")
    with IngestServer(ingest_config(tmp_path, keys)) as srv:
        up = Uploader(sync_config(srv.endpoint, keys, chunk_kb=64), "rig", spool)
        s = up.run_once(give_up_s=20)
        up.close()
        stats = srv.stats()
        rep = check_store(srv.backend, spool, 6)
    assert (s.uploaded, s.stored, s.verified, s.pending, s.failed) == (6, 6, 6, 0, 0)
    assert s.offered == ["rig_s1/rig_s1_00005", "rig_s1/rig_s1_00004", "rig_s1/rig_s1_00000",
                         "rig_s1/rig_s1_00001", "rig_s1/rig_s1_00002", "rig_s1/rig_s1_00003"]
    assert sorted(s.bundles) == sorted(s.offered)
    assert s.bundle_bytes == s.bytes_sent == 300_000 + 1_500_000 + 20 + 700_001 + 10_000
    assert s.resent_bytes == 0
    assert rep["blobs"] == 6 and stats["bundles.stored"] == 6
    assert len(list(spool.glob(f"*/*{UPLOADED_SUFFIX}"))) == 6
    assert json.loads((spool / STATE_FILE).read_text())["inflight"] == {}
    assert not list((tmp_path / "staging").rglob("*.part"))
    reg = up.metrics.registry
    assert reg.get_sample_value("edgecap_sync_upload_bytes_sent_total") == s.bytes_sent
    assert reg.get_sample_value("edgecap_sync_upload_bundles_total",
                                {"outcome": "stored"}) == 6
    # window = "auto": what it chose and the round trip it measured, in both places
    assert s.window >= 1 and s.rtt_ms is not None and s.rtt_ms > 0
    assert reg.get_sample_value("edgecap_sync_upload_window_chunks") == s.window
    assert reg.get_sample_value("edgecap_sync_upload_rtt_seconds") == pytest.approx(
        s.rtt_ms / 1e3)


def test_s3_backend_end_to_end_multipart(tmp_path, allow_rig_only, s3):
    keys = allow_rig_only
    spool = spool_with(tmp_path, [11 << 20, 2_000_000, 1])  # 11 MiB: 3 parts of 5 MiB
    cfg = ingest_config(tmp_path, keys, backend="s3",
                        options=s3.options(bucket="e2e-s3", prefix="fleet/"))
    with IngestServer(cfg) as srv:
        up = Uploader(sync_config(srv.endpoint, keys), "rig", spool)
        s = up.run_once(give_up_s=30)
        up.close()
        check_store(srv.backend, spool, 3)
    assert (s.uploaded, s.stored, s.pending) == (3, 3, 0)
    # the same bucket read by a fresh client sees the per-device namespace
    be = storage.create("s3", s3.options(bucket="e2e-s3", prefix="fleet/"))
    keys_ = sorted(be.list_keys("devices/rig/rig_s1/"))
    assert keys_[0] == "devices/rig/rig_s1/rig_s1_00000.entry.json"
    assert len(keys_) == 6


def test_duplicates_are_acknowledged_not_stored_twice(tmp_path, allow_rig_only):
    keys = allow_rig_only
    be = MemoryStorage(MemoryStorage.Options())
    spool = spool_with(tmp_path, [400_000, 50_000])
    # a second session holds a byte-identical segment (content addressing must notice)
    same = (spool / "rig_s1" / "rig_s1_00000.mcap").read_bytes()
    make_bundle(spool, "rig", "rig_s2", 0, len(same), data=same)
    with IngestServer(ingest_config(tmp_path, keys, backend="memory"), backend=be) as srv:
        up = Uploader(sync_config(srv.endpoint, keys), "rig", spool)
        s1 = up.run_once(give_up_s=20)
        for m in spool.glob(f"*/*{UPLOADED_SUFFIX}"):  # forget we uploaded: a re-upload
            m.unlink()
        s2 = up.run_once(give_up_s=20)
        up.close()
        assert srv.stats()["bundles.indexed"] == 3
    assert s1.uploaded == 3 and s1.stored == 2 and s1.duplicates == 1
    assert s2.uploaded == 3 and s2.duplicates == 3 and s2.bytes_sent == 0
    assert set(be.blob_writes.values()) == {1} and len(be.blob_writes) == 2
    assert verify_store(be) == {"blobs": 2, "entries": 3, "problems": []}


def test_unknown_client_key_is_refused_then_allowed(tmp_path, keyset):
    keys = dict(keyset)
    allow = tmp_path / "allow"
    allow.mkdir()
    shutil.copy(keys["rig_public"], allow)
    keys["clients_dir"] = allow
    spool = spool_with(tmp_path, [1000], device="intruder", session="intruder_s1")
    with IngestServer(ingest_config(tmp_path, keys)) as srv:
        up = Uploader(sync_config(srv.endpoint, keys, client="intruder"), "intruder", spool)
        s = up.run_once(give_up_s=5)
        assert s.auth_rejected and s.uploaded == 0 and s.pending == 1
        # the server counts the refusal when its loop reads the monitor event, which can
        # come after the client has already seen the refused handshake
        deadline = time.monotonic() + 5
        while srv.stats()["auth_failures"] < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert srv.stats()["auth_failures"] >= 1
        assert verify_store(srv.backend)["entries"] == 0
        shutil.copy(keys["intruder_public"], allow)  # the operator allows it
        assert srv.reload_keys() == 2
        s = up.run_once(give_up_s=10)
        up.close()
        assert s.uploaded == 1 and not s.auth_rejected


def test_wrong_server_key_never_uploads(tmp_path, allow_rig_only):
    keys = dict(allow_rig_only)
    keys["server_public"] = keys["other_public"]  # the client pins the wrong server
    spool = spool_with(tmp_path, [1000])
    with IngestServer(ingest_config(tmp_path, allow_rig_only)) as srv:
        up = Uploader(sync_config(srv.endpoint, keys, timeout_s=1.0), "rig", spool)
        s = up.run_once(give_up_s=2)
        up.close()
        assert s.uploaded == 0 and s.pending == 1
        assert verify_store(srv.backend)["entries"] == 0


def test_device_bound_to_key_name(tmp_path, allow_rig_only):
    spool = spool_with(tmp_path, [1000], device="not-rig", session="not-rig_s1")
    cfg = ingest_config(tmp_path, allow_rig_only, device_keys="name")
    with IngestServer(cfg) as srv:
        up = Uploader(sync_config(srv.endpoint, allow_rig_only), "not-rig", spool)
        s = up.run_once(give_up_s=5)
        up.close()
        assert s.uploaded == 0 and "refused device" in s.error
        assert srv.stats()["rejected.device_mismatch"] == 1


def test_delete_after_upload_keeps_manifest_and_marker(tmp_path):
    spool = spool_with(tmp_path, [10_000, 20_000])
    with IngestServer(ingest_config(tmp_path)) as srv:
        up = Uploader(sync_config(srv.endpoint, delete_after_upload=True), "rig", spool)
        s = up.run_once(give_up_s=10)
        up.close()
        check_store(srv.backend, spool, 2)
    assert s.deleted == 2
    assert not list(spool.glob("*/*.mcap"))
    assert len(list(spool.glob("*/*.manifest.json"))) == 2
    assert len(list(spool.glob(f"*/*{UPLOADED_SUFFIX}"))) == 2


def test_conflicting_bundle_id_is_rejected_not_overwritten(tmp_path):
    spool_a = spool_with(tmp_path / "a", [5000])
    spool_b = tmp_path / "b" / "spool"
    make_bundle(spool_b, "rig", "rig_s1", 0, 5000, data=b"y" * 5000)  # same id, other bytes
    with IngestServer(ingest_config(tmp_path)) as srv:
        for sp in (spool_a, spool_b):
            up = Uploader(sync_config(srv.endpoint), "rig", sp)
            s = up.run_once(give_up_s=10)
            up.close()
        assert s.uploaded == 0 and s.skipped == 1
        assert list(spool_b.glob(f"*/*{REJECTED_SUFFIX}"))
        e = srv.backend.get_entry("rig", "rig_s1", "rig_s1_00000")
        assert e["sha256"] == json.loads(
            (spool_a / "rig_s1" / "rig_s1_00000.manifest.json").read_text())["sha256"]


def test_throttle_and_upload_windows(tmp_path):
    spool = spool_with(tmp_path, [600_000])
    with IngestServer(ingest_config(tmp_path)) as srv:
        closed = Uploader(sync_config(srv.endpoint, upload_hours=["02:00-03:00"]), "rig",
                          spool, now=lambda: datetime(2026, 1, 1, 12, 0))
        s = closed.run_once()
        closed.close()
        assert s.outside_window and s.uploaded == 0
        up = Uploader(sync_config(srv.endpoint, bandwidth_kbps=4000), "rig", spool)
        t0 = time.monotonic()
        s = up.run_once(give_up_s=10)
        dt = time.monotonic() - t0
        up.close()
    assert s.uploaded == 1
    # 600 kB at 500 kB/s: about 1.2 s; never faster than the cap allows (one chunk lent)
    assert dt >= (600_000 - 50_000) / 500_000, dt


def test_cli_serve_run_ls(tmp_path, allow_rig_only):
    keys = allow_rig_only
    port = free_port()
    ingest = tmp_path / "ingest.toml"
    ingest.write_text(f'''
listen = "tcp://127.0.0.1:{port}"
server_secret_key_file = "{keys['server_secret']}"
clients_dir = "{keys['clients_dir']}"
staging_dir = "{tmp_path / 'staging'}"
[storage.options]
root = "{tmp_path / 'store'}"
''')
    spool = spool_with(tmp_path, [100_000, 200_000])
    rig = tmp_path / "rig.toml"
    rig.write_text(f'''
device_id = "rig"
[[streams]]
name = "/gps"
driver = "gps.synthetic"
[recorder]
out_dir = "{spool}"
[sync]
server = "tcp://127.0.0.1:{port}"
server_public_key = "{keys['server_public']}"
client_secret_key_file = "{keys['rig_secret']}"
timeout_s = 3
''')
    exe = [str(Path(sys.executable).parent / "edgecap")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    srv = subprocess.Popen(exe + ["sync", "serve", "-c", str(ingest)], env=env,
                           stderr=subprocess.PIPE, text=True)
    try:
        r = subprocess.run(exe + ["sync", "run", "-c", str(rig), "--once", "--give-up", "20"],
                           capture_output=True, text=True, timeout=60, env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "uploaded 2 bundle(s) (2 stored" in r.stdout
        r = subprocess.run(exe + ["sync", "status", "-c", str(rig)], capture_output=True,
                           text=True, timeout=30)
        assert "0 pending" in r.stdout and "2 uploaded" in r.stdout
    finally:
        srv.terminate()
        srv.wait(10)
    assert srv.returncode == 0, srv.stderr.read() if srv.stderr else ""
    r = subprocess.run(exe + ["sync", "ls", "-c", str(ingest), "--verify"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 bundle(s), 0 failed verification" in r.stdout
    bad = subprocess.run(exe + ["sync", "serve", "-c", str(tmp_path / "none.toml")],
                         capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "cannot read file" in bad.stderr


def test_run_forever_picks_up_new_segments_and_stops(tmp_path):
    import threading

    spool = spool_with(tmp_path, [10_000])
    with IngestServer(ingest_config(tmp_path)) as srv:
        up = Uploader(sync_config(srv.endpoint, poll_s=0.1), "rig", spool)
        stop = threading.Event()
        t = threading.Thread(target=up.run_forever, args=(stop,))
        t.start()
        try:
            deadline = time.monotonic() + 10
            while not list(spool.glob(f"*/*{UPLOADED_SUFFIX}")) and time.monotonic() < deadline:
                time.sleep(0.05)
            # the recorder closes another segment (and starts one that is still .active)
            make_bundle(spool, "rig", "rig_s2", 0, 20_000, triggers=[{"kind": "manual"}])
            (spool / "rig_s2" / "rig_s2_00001.mcap.active").write_bytes(b"x")
            while len(list(spool.glob(f"*/*{UPLOADED_SUFFIX}"))) < 2 \
                    and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            stop.set()
            t.join(10)
            up.close()
        assert not t.is_alive()
        check_store(srv.backend, spool, 2)
        assert up.metrics.registry.get_sample_value(
            "edgecap_sync_upload_pending_bundles") == 0
