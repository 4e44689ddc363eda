"""``edgecap doctor`` (is this machine ready for this rig?) and ``edgecap status`` (a live
view of a running agent). See docs/operations.md."""

from __future__ import annotations

import json
import os
import sys
import time

import click
from rich.console import Console

from agent.config import load_config
from agent.errors import ConfigError

DEFAULT_RIG = "/etc/edgecap/rig.toml"
AREAS = ("devices", "clock", "disk", "models", "sync")
_STYLE = {"OK": "green", "WARN": "yellow", "FAIL": "bold red", "SKIP": "dim"}


@click.command("doctor")
@click.option("--config", "-c", type=click.Path(dir_okay=False), default=None,
              help=f"Rig file (default: {DEFAULT_RIG}).")
@click.option("--as-user", default=None, help="Check permissions as this user (mode bits).")
@click.option("--service", is_flag=True,
              help="Check as the systemd service: user edgecap with groups video, audio, "
                   "dialout.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None,
              help="Output directory to test (default: recorder.out_dir).")
@click.option("--write-test-mb", type=click.FloatRange(min=0), default=64.0, show_default=True,
              help="Size of the fsync'ed write test (0 skips it).")
@click.option("--skip", type=click.Choice(AREAS), multiple=True, help="Skip an area.")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=2.0, show_default=True,
              help="Seconds for network and subprocess probes.")
def doctor(config: str | None, as_user: str | None, service: bool, out_dir: str | None,
           write_test_mb: float, skip: tuple[str, ...], timeout: float) -> None:
    """Check devices, clock, disk, models and the ingest server for a rig; exit 1 on any
    FAIL, 2 when the rig file is invalid."""
    from agent.doctor import Principal, Probe, exit_code, run_checks

    path = config or DEFAULT_RIG
    if config is None and not os.path.exists(path):
        click.echo(f"no rig file at {DEFAULT_RIG}; pass --config rig.toml", err=True)
        sys.exit(2)
    try:
        cfg = load_config(path)
    except ConfigError as e:
        click.echo(str(e), err=True)
        sys.exit(2)
    try:
        if service:
            who = Principal.user(as_user or "edgecap", ("video", "audio", "dialout"))
        elif as_user:
            who = Principal.user(as_user)
        else:
            who = Principal.me()
    except KeyError as e:
        click.echo(f"unknown user or group: {e.args[0]}; create it with systemd/install.sh",
                   err=True)
        sys.exit(2)
    probe = Probe(timeout_s=timeout, write_test_mb=write_test_mb)
    checks = run_checks(cfg, who, probe, out_dir, [a for a in AREAS if a not in skip])
    con = Console(highlight=False, soft_wrap=True)
    con.print(f"edgecap doctor: {cfg.source_path} ({cfg.device_id}) as {who.name}")
    for c in checks:
        con.print(f"[{_STYLE[c.level.value]}]{c.level.value:<4}[/] {c.area:<8} {c.detail}",
                  markup=True)
        if c.hint and c.level.value != "OK":
            con.print(f"              fix: {c.hint}", style="dim", markup=False)
    counts = {lvl: sum(c.level.value == lvl for c in checks) for lvl in _STYLE}
    con.print(", ".join(f"{n} {lvl}" for lvl, n in counts.items() if n))
    sys.exit(exit_code(checks))


@click.command("status")
@click.option("--url", default="http://127.0.0.1:9108/metrics", show_default=True,
              help="The agent's metrics endpoint.")
@click.option("--sync-url", default="http://127.0.0.1:9109/metrics", show_default=True,
              help="The uploader's metrics endpoint ('' to skip).")
@click.option("--once", is_flag=True, help="Print one snapshot and exit.")
@click.option("--json", "as_json", is_flag=True, help="With --once: print JSON.")
@click.option("--interval", type=click.FloatRange(min=0.2), default=1.0, show_default=True)
def status(url: str, sync_url: str, once: bool, as_json: bool, interval: float) -> None:
    """Live view of a running agent: streams, rates, drops, clock lock, disk, spool, upload.
    Exit 1 when the agent's endpoint cannot be read."""
    from rich.live import Live
    from rich.text import Text

    from agent.status import StatusError, fetch_snapshot, render, snapshot_dict

    con = Console(highlight=False)
    if once:
        try:
            snap = fetch_snapshot(url, sync_url or None)
        except StatusError as e:
            click.echo(f"edgecap status: {e} (is the agent running with "
                       f"[operations] metrics_port set?)", err=True)
            sys.exit(1)
        if as_json:
            click.echo(json.dumps(snapshot_dict(snap), indent=1, sort_keys=True))
        else:
            con.print(render(snap))
        return
    with Live(Text("connecting…"), console=con, refresh_per_second=4,
              screen=False) as live:
        prev = None
        try:
            while True:
                try:
                    prev = fetch_snapshot(url, sync_url or None, prev=prev)
                    live.update(render(prev))
                except StatusError as e:
                    live.update(Text(f"{time.strftime('%H:%M:%S')}  {e} — retrying",
                                     style="red"))
                time.sleep(interval)
        except KeyboardInterrupt:
            pass


COMMANDS = [doctor, status]
