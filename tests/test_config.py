"""Config validation: one test per kind of mistake, asserting the message names the file,
the key path and what was expected."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import load_config
from agent.errors import ConfigError

GOOD = """
device_id = "rig-1"
[[streams]]
name = "/camera/front"
driver = "camera.synthetic"
rate_hz = 10
[streams.options]
width = 320
height = 240
"""


def _err(tmp_path: Path, text: str) -> ConfigError:
    p = tmp_path / "rig.toml"
    p.write_text(text)
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    return ei.value


def test_good_config_loads_with_digest(tmp_path: Path, root: Path) -> None:
    p = tmp_path / "rig.toml"
    p.write_text(GOOD)
    cfg = load_config(p)
    assert cfg.device_id == "rig-1"
    assert cfg.streams[0].options == {"width": 320, "height": 240, "quality": 85, "cycle": 30}
    assert len(cfg.digest) == 64
    assert load_config(root / "examples" / "synthetic.toml").device_id == "synthetic-rig"


def test_unknown_top_level_key(tmp_path: Path) -> None:
    e = _err(tmp_path, "colour = 'red'\n" + GOOD)
    assert "rig.toml: colour: unknown key" in str(e)


def test_unknown_option_key_is_checked_by_the_driver(tmp_path: Path) -> None:
    e = _err(tmp_path, GOOD.replace("width = 320", "widht = 320"))
    assert "rig.toml: streams[0].options.widht: unknown key" in str(e)


def test_wrong_type_names_expected_and_got(tmp_path: Path) -> None:
    e = _err(tmp_path, GOOD.replace("rate_hz = 10", "rate_hz = 'fast'"))
    msg = str(e)
    assert "streams[0].rate_hz" in msg and "valid number" in msg and "'fast'" in msg


def test_out_of_range(tmp_path: Path) -> None:
    e = _err(tmp_path, GOOD.replace("rate_hz = 10", "rate_hz = -1"))
    assert "streams[0].rate_hz: Input should be greater than 0" in str(e)


def test_missing_required_key(tmp_path: Path) -> None:
    e = _err(tmp_path, GOOD.replace('device_id = "rig-1"', ""))
    assert "rig.toml: device_id: required key is missing" in str(e)


def test_unknown_driver_lists_known(tmp_path: Path) -> None:
    e = _err(tmp_path, GOOD.replace("camera.synthetic", "camera.magic"))
    assert "streams[0].driver: unknown driver 'camera.magic'" in str(e)
    assert "camera.opencv" in str(e)


def test_bad_topic_name(tmp_path: Path) -> None:
    e = _err(tmp_path, GOOD.replace('"/camera/front"', '"camera front"'))
    assert "streams[0].name: expected a topic path" in str(e)


def test_duplicate_streams(tmp_path: Path) -> None:
    block = GOOD.split("\n[[streams]]", 1)[1]
    e = _err(tmp_path, GOOD + "\n[[streams]]" + block)
    assert "repeated: /camera/front" in str(e)


def test_labeler_on_unknown_stream(tmp_path: Path) -> None:
    e = _err(tmp_path, GOOD + '\n[[labelers]]\nkind = "camera.yolo"\nstreams = ["/cam/x"]\n')
    assert "labelers[0] names unknown streams ['/cam/x']" in str(e)


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    e = _err(tmp_path, "device_id = \n")
    assert "rig.toml: not valid TOML" in str(e)
    with pytest.raises(ConfigError, match="cannot read file"):
        load_config(tmp_path / "nope.toml")


def test_config_check_cli_exits_nonzero(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from agent.cli import main

    p = tmp_path / "rig.toml"
    p.write_text(GOOD.replace("rate_hz = 10", "rate_hz = 0"))
    res = CliRunner().invoke(main, ["config", "check", str(p)])
    assert res.exit_code == 1
    assert "streams[0].rate_hz" in res.output
    p.write_text(GOOD)
    res = CliRunner().invoke(main, ["config", "check", str(p)])
    assert res.exit_code == 0 and "OK" in res.output
