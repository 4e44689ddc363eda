"""Configuration of both sides and CURVE key files: every problem is a ConfigError that
names the file, the key and what was expected."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner

from agent.cli import main
from agent.config import SyncConfig, loopback_endpoint, parse_config
from agent.errors import ConfigError
from sync import keys
from sync.ingest import IngestServer
from sync.ingest_config import load_ingest_config, parse_ingest_config
from sync.uploader import Uploader

ROOT = Path(__file__).resolve().parent.parent


def problems(excinfo) -> dict[str, str]:
    return dict(excinfo.value.problems)


def test_example_ingest_toml_is_valid():
    cfg = load_ingest_config(ROOT / "examples" / "ingest.toml")
    assert cfg.storage.backend == "fs" and not cfg.insecure
    assert cfg.limits.protocol_limits().max_chunk == 4096 << 10


def test_ingest_config_reports_every_problem_with_its_key():
    with pytest.raises(ConfigError) as ei:
        parse_ingest_config({"listn": "tcp://x:1", "limits": {"window": 0},
                             "storage": {"backend": "fs"}}, "ingest.toml")
    p = problems(ei)
    assert "unknown key" in p["listn"]
    assert "limits.window" in p
    assert str(ei.value).startswith("ingest.toml: ")


def test_ingest_config_requires_keys_unless_insecure():
    with pytest.raises(ConfigError) as ei:
        parse_ingest_config({}, "ingest.toml")
    assert set(problems(ei)) == {"server_secret_key_file", "clients_dir"}
    assert parse_ingest_config({"insecure": True}).insecure


@pytest.mark.parametrize("listen", ["tcp://0.0.0.0:7450", "tcp://10.0.0.5:7450",
                                    "tcp://eth0:7450", "tcp://*:7450"])
def test_insecure_only_on_loopback(listen):
    with pytest.raises(ConfigError) as ei:
        parse_ingest_config({"insecure": True, "listen": listen}, "ingest.toml")
    assert "loopback" in str(ei.value)


def test_storage_options_validated_by_the_backend():
    with pytest.raises(ConfigError) as ei:
        parse_ingest_config({"insecure": True, "storage": {"backend": "s3", "options": {
            "bucket": "b", "part_mb": 1, "colour": "red"}}}, "ingest.toml")
    p = problems(ei)
    assert "unknown key" in p["storage.options.colour"]
    assert "storage.options.part_mb" in p
    with pytest.raises(ConfigError) as ei:
        parse_ingest_config({"insecure": True, "storage": {"backend": "tape"}})
    assert "known: " in problems(ei)["storage.backend"]


def test_sync_config_rules():
    assert SyncConfig(insecure=True).insecure
    with pytest.raises(ValueError, match="loopback"):
        SyncConfig(insecure=True, server="tcp://192.168.1.2:7450")
    with pytest.raises(ValueError, match="22:00-06:00"):
        SyncConfig(upload_hours=["10-12"])
    assert loopback_endpoint("tcp://[::1]:1") and loopback_endpoint("ipc:///tmp/x")
    assert not loopback_endpoint("tcp://127.example.com:1")


def test_sync_window_is_auto_or_a_fixed_count():
    assert (SyncConfig().window, SyncConfig().window_max) == ("auto", 8)
    assert SyncConfig(window=1).window == 1 and SyncConfig(window=256).window == 256
    for bad in (0, 257, "fast", "2", 2.0, True, None):
        with pytest.raises(ValueError, match='"auto" or a whole number of chunks'):
            SyncConfig(window=bad)
    for bad in (0, 257):
        with pytest.raises(ValueError, match="window_max"):
            SyncConfig(window_max=bad)
    rig = {"device_id": "rig", "streams": [{"name": "/gps", "driver": "gps.synthetic"}],
           "sync": {"insecure": True, "window": "fast"}}
    with pytest.raises(ConfigError) as ei:
        parse_config(rig, "rig.toml", check_drivers=False)
    assert problems(ei)["sync.window"] == ('expected "auto" or a whole number of chunks '
                                           "from 1 to 256, got 'fast'")


def test_rig_file_sync_errors_name_the_key():
    rig = {"device_id": "rig", "streams": [{"name": "/gps", "driver": "gps.synthetic"}],
           "sync": {"insecure": True, "server": "tcp://8.8.8.8:7450", "bandwith_kbps": 5}}
    with pytest.raises(ConfigError) as ei:
        parse_config(rig, "rig.toml", check_drivers=False)
    assert "unknown key" in problems(ei)["sync.bandwith_kbps"]
    del rig["sync"]["bandwith_kbps"]
    with pytest.raises(ConfigError) as ei:
        parse_config(rig, "rig.toml", check_drivers=False)
    assert "loopback" in problems(ei)["sync"]


def test_keys_generate_modes_and_refusals(tmp_path):
    pub, sec = keys.generate(tmp_path / "k", "rig-1")
    assert stat.S_IMODE(sec.stat().st_mode) == 0o600
    assert stat.S_IMODE(pub.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "k").stat().st_mode) == 0o700
    with pytest.raises(ValueError, match="--force"):
        keys.generate(tmp_path / "k", "rig-1")
    old = keys.load_public_key(str(pub))
    keys.generate(tmp_path / "k", "rig-1", force=True)
    assert keys.load_public_key(str(pub)) != old
    with pytest.raises(ValueError):
        keys.generate(tmp_path / "k", "../evil")
    p, s = keys.load_secret_key(sec)
    assert len(p) == 40 and len(s) == 40
    assert keys.load_public_key(p.decode()) == p  # a Z85 string works too
    os.chmod(sec, 0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        keys.load_secret_key(sec)
    os.chmod(sec, 0o600)
    with pytest.raises(ValueError, match="no secret key"):
        os.chmod(pub, 0o600)
        keys.load_secret_key(pub)
    with pytest.raises(ValueError):
        keys.load_public_key("not-a-key-and-not-a-file")
    assert keys.load_allow_list(tmp_path / "k") == {p: "rig-1"}


def test_keys_cli(tmp_path):
    r = CliRunner().invoke(main, ["keys", "generate", "--out", str(tmp_path), "--name", "a"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "a.key_secret").exists()
    r = CliRunner().invoke(main, ["keys", "generate", "--out", str(tmp_path), "--name", "a"])
    assert r.exit_code == 1 and "--force" in r.output


def test_uploader_key_errors(tmp_path):
    with pytest.raises(ConfigError) as ei:
        Uploader(SyncConfig(), "rig", tmp_path, source_path="rig.toml")
    assert set(problems(ei)) == {"sync.server_public_key", "sync.client_secret_key_file"}
    _, sec = keys.generate(tmp_path, "rig")
    os.chmod(sec, 0o640)
    with pytest.raises(ConfigError) as ei:
        Uploader(SyncConfig(server_public_key=str(tmp_path / "rig.key"),
                            client_secret_key_file=str(sec)), "rig", tmp_path)
    assert "chmod 600" in problems(ei)["sync.client_secret_key_file"]


def test_server_key_errors_before_any_thread(tmp_path):
    cfg = parse_ingest_config({"listen": "tcp://127.0.0.1:0",
                               "server_secret_key_file": str(tmp_path / "none"),
                               "clients_dir": str(tmp_path / "nodir"),
                               "staging_dir": str(tmp_path / "st"),
                               "storage": {"options": {"root": str(tmp_path / "d")}}})
    with pytest.raises(ConfigError) as ei:
        IngestServer(cfg).start()
    assert "server_secret_key_file" in problems(ei)


def test_edge_side_never_imports_the_fleet_side():
    import subprocess
    import sys

    code = ("import sys, sync.uploader, sync.spool; "
            "print(sorted(m for m in sys.modules if m.startswith(('sync.ingest', "
            "'sync.storage', 'boto3'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == "[]"
