"""``edgecap recover PATH``: turn crash-left ``.mcap.active`` segments into valid ones."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from agent.recovery import recover_all


@click.command("recover")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
def recover(path: str) -> None:
    """Recover every unclosed segment under PATH (the recorder also does this at start).
    Exits 1 when a segment could not be recovered."""
    reports = recover_all(Path(path))
    if not reports:
        click.echo("nothing to recover")
    for r in reports:
        if r.get("empty"):
            click.echo(f"removed {Path(r['active']).name}: created but never written")
        elif r.get("manifest_rebuilt"):
            click.echo(f"rebuilt the manifest of {Path(r['file']).name} "
                       f"({r['messages']} messages; the file was complete)")
        elif r["ok"]:
            lost = r["lost_interval_ns"]
            span = (lost[1] - lost[0]) / 1e9 if None not in lost else float("nan")
            click.echo(f"recovered {Path(r['file']).name}: {r['messages']} messages, "
                       f"{r['torn_bytes']} torn bytes dropped, at most {span:.2f} s "
                       f"of the window lost")
        else:
            click.echo(f"FAILED {r['active']}: {r.get('error')}", err=True)
    sys.exit(0 if all(r["ok"] for r in reports) else 1)


COMMANDS = [recover]
