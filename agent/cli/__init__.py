"""The ``edgecap`` command line. Each command group lives in its own module and is added
to :data:`main` here; a module that cannot import (a missing optional library) is skipped
with a note rather than breaking every other command."""

from __future__ import annotations

import importlib
import logging
import sys

import click

from agent import __version__

#: modules that define click commands; each exposes ``COMMANDS`` (a list of commands)
COMMAND_MODULES = [
    "agent.cli.record",
    "agent.cli.inspect_cmd",
    "agent.cli.config_cmd",
    "agent.cli.recover_cmd",
    "agent.cli.trigger_cmd",
    "agent.cli.devices_cmd",
    "agent.cli.ops_cmd",
    "agent.cli.sync_cmd",
    "agent.cli.replay_cmd",
    "agent.cli.hil_cmd",
    "agent.cli.checksync_cmd",
]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgecap")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
def main(verbose: int) -> None:
    """edgecap: capture, pre-label and upload time-aligned sensor bundles."""
    level = logging.WARNING - 10 * min(verbose, 2)
    from agent.logfmt import configure_logging

    configure_logging(level)


def _load() -> None:
    for mod in COMMAND_MODULES:
        try:
            m = importlib.import_module(mod)
        except ImportError as e:  # pragma: no cover - depends on the machine
            print(f"edgecap: commands in {mod} unavailable: {e}", file=sys.stderr)
            continue
        for cmd in m.COMMANDS:
            main.add_command(cmd)


_load()
