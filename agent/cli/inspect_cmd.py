"""``edgecap inspect PATH [--json]``."""

from __future__ import annotations

import json
import sys

import click

from agent.errors import BundleError
from agent.inspect import inspect_path

from .render import print_inspect


@click.command("inspect")
@click.argument("path", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--quick", is_flag=True, help="Check sizes and hashes only, do not read every "
              "message.")
def inspect(path: str, as_json: bool, quick: bool) -> None:
    """Summarise and verify a session directory or one segment. Exits 1 when any segment
    fails verification or is left unclosed."""
    try:
        rep = inspect_path(path, deep=not quick)
    except BundleError as e:
        click.echo(str(e), err=True)
        sys.exit(2)
    if as_json:
        click.echo(json.dumps(rep, indent=1))
    else:
        print_inspect(rep)
    sys.exit(0 if rep["ok"] else 1)


COMMANDS = [inspect]
