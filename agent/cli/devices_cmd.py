"""``edgecap devices [--probe URI --driver KEY]``."""

from __future__ import annotations

import json
import sys

import click
from rich.console import Console
from rich.table import Table

from agent import devices as dev

_GUESS = {"http": "camera.opencv", "rtsp": "camera.opencv", "/dev/video": "camera.opencv",
          "udp": "lidar.ouster", "pcap": "lidar.ouster", "serial": "gps.nmea",
          "/dev/tty": "gps.nmea", "pulse": "audio.sounddevice"}


def _guess_driver(uri: str) -> str | None:
    return next((k for p, k in _GUESS.items() if uri.startswith(p)), None)


@click.command("devices")
@click.option("--probe", "probe_uri", default=None, help="Open this URI and show what it gives.")
@click.option("--driver", default=None, help="Driver key for --probe (guessed from the URI).")
@click.option("--option", "-O", multiple=True, help="Driver option KEY=VALUE (JSON value).")
@click.option("--json", "as_json", is_flag=True)
def devices(probe_uri: str | None, driver: str | None, option: tuple[str, ...],
            as_json: bool) -> None:
    """List cameras, audio inputs, serial ports, PPS and PTP devices; or probe one URI."""
    if probe_uri:
        key = driver or _guess_driver(probe_uri)
        if key is None:
            click.echo("cannot guess the driver for this URI; give --driver", err=True)
            sys.exit(2)
        opts = {}
        for kv in option:
            k, _, v = kv.partition("=")
            try:
                opts[k] = json.loads(v)
            except ValueError:
                opts[k] = v
        rep = dev.probe(key, probe_uri, opts)
        click.echo(json.dumps(rep, indent=1, default=str))
        sys.exit(1 if "error" in rep else 0)
    found = dev.list_all()
    if as_json:
        click.echo(json.dumps(found, indent=1))
        return
    con = Console()
    for kind, items in found.items():
        t = Table(title=kind.replace("_", " "))
        keys = sorted({k for i in items for k in i if k != "formats"}) or ["(none found)"]
        for k in keys:
            t.add_column(k)
        for i in items:
            t.add_row(*[str(i.get(k, "")) for k in keys])
        con.print(t)


COMMANDS = [devices]
