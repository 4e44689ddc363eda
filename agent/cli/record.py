"""``edgecap record``: capture a session until Ctrl-C, SIGTERM or ``--duration``."""

from __future__ import annotations

import signal
import sys
import threading
import time

import click

from agent.config import load_config
from agent.errors import ConfigError, DriverError, RecorderError
from agent.labelers import LabelerError
from agent.pipeline import Pipeline

from .render import print_inspect, status_line


def run_record(config: str, duration: float | None, out: str | None,
               quiet: bool = False) -> Pipeline:
    """Record with a live one-line status on stderr; returns the stopped pipeline."""
    cfg = load_config(config)
    pipe = Pipeline(cfg, out_dir=out)
    pipe.open()
    from agent.ops import Operations

    ops = Operations.attach(pipe)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set())
                for sig in (signal.SIGINT, signal.SIGTERM)}
    t0 = time.monotonic()
    try:
        pipe.start()
        while not stop.wait(0.5):
            ops.tick()
            elapsed = time.monotonic() - t0
            if not quiet and sys.stderr.isatty():
                click.echo("\r" + status_line(pipe, elapsed), nl=False, err=True)
            if duration is not None and elapsed >= duration:
                break
            if not pipe.live and pipe.wait_sources_done(0):
                break
    finally:
        ops.close()
        if not quiet:
            click.echo(("\r" if sys.stderr.isatty() else "") + status_line(pipe, time.monotonic() - t0) + "  stopping…",
                       err=True)
        pipe.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return pipe


@click.command("record")
@click.option("--config", "-c", required=True, type=click.Path(dir_okay=False),
              help="Rig file (rig.toml).")
@click.option("--duration", "-d", type=float, default=None,
              help="Stop after this many seconds (default: until Ctrl-C/SIGTERM).")
@click.option("--out", "-o", type=click.Path(file_okay=False), default=None,
              help="Output directory (default: recorder.out_dir of the rig file).")
@click.option("--quiet", "-q", is_flag=True, help="No live status line.")
def record(config: str, duration: float | None, out: str | None, quiet: bool) -> None:
    """Record a session. Ctrl-C and SIGTERM close the current segment cleanly."""
    try:
        pipe = run_record(config, duration, out, quiet)
    except ConfigError as e:
        click.echo(str(e), err=True)
        sys.exit(2)
    except LabelerError as e:
        click.echo(f"cannot load labelers: {e}", err=True)
        sys.exit(2)
    except DriverError as e:
        click.echo(f"cannot open device: {e}", err=True)
        sys.exit(3)
    except RecorderError as e:
        click.echo(f"cannot record: {e}", err=True)
        sys.exit(4)
    click.echo(f"session {pipe.session_id} → {pipe.session_dir}")
    from agent.inspect import inspect_path

    # a summary from the manifests; `edgecap inspect` re-verifies (slow for big sessions,
    # and a service being stopped must not spend minutes hashing)
    print_inspect(inspect_path(pipe.session_dir, verify=False))


COMMANDS = [record]
