"""``edgecap config check FILE``."""

from __future__ import annotations

import sys

import click

from agent.config import load_config
from agent.errors import ConfigError


@click.group("config")
def config_group() -> None:
    """Rig configuration files."""


@config_group.command("check")
@click.argument("file", type=click.Path(dir_okay=False))
def check(file: str) -> None:
    """Validate FILE; print every problem (file: key: what was expected) and exit 1."""
    try:
        cfg = load_config(file)
    except ConfigError as e:
        for line in str(e).splitlines():
            click.echo(line, err=True)
        click.echo(f"{len(e.problems)} problem(s) in {file}", err=True)
        sys.exit(1)
    click.echo(f"{file}: OK — device {cfg.device_id}, {len(cfg.streams)} stream(s), "
               f"{len(cfg.labelers)} labeler(s), {len(cfg.triggers)} trigger(s); "
               f"digest {cfg.digest[:12]}")


COMMANDS = [config_group]
