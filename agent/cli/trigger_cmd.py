"""``edgecap trigger NAME``: mark a manual trigger on the running agent."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from agent.config import load_config
from agent.errors import ConfigError
from agent.triggers import request_manual_trigger


@click.command("trigger")
@click.argument("name")
@click.option("--config", "-c", type=click.Path(dir_okay=False), default=None,
              help="The running agent's rig file (to find its recorder.out_dir).")
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None,
              help="The running agent's output directory (instead of --config).")
def trigger(name: str, config: str | None, out: str | None) -> None:
    """Keep the window around now: the agent marks [now − pre_s, now + post_s] of the
    manual trigger NAME (configured under [[triggers]] with kind = "manual")."""
    if out is None:
        if config is None:
            click.echo("give --config rig.toml or --out DIR", err=True)
            sys.exit(2)
        try:
            cfg = load_config(config)
        except ConfigError as e:
            click.echo(str(e), err=True)
            sys.exit(2)
        names = [t.name for t in cfg.triggers if t.kind == "manual"]
        if name not in names:
            click.echo(f"{config}: no manual trigger {name!r}; configured: {names}", err=True)
            sys.exit(2)
        out = cfg.recorder.out_dir
    p = request_manual_trigger(Path(out), name)
    click.echo(f"trigger {name} requested ({p.name}); the agent picks it up within 1 s")


COMMANDS = [trigger]
