"""``edgecap check-sync PATH``: cross-modal offsets from impulsive events (see
:mod:`agent.check_sync`)."""

from __future__ import annotations

import json
import sys

import click

from agent.errors import EdgecapError


def _region(value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        r = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter("six numbers: x0,x1,y0,y1,z0,z1 (m, sensor frame)") from None
    if len(r) != 6 or r[0] >= r[1] or r[2] >= r[3] or r[4] >= r[5]:
        raise click.BadParameter("six numbers x0,x1,y0,y1,z0,z1 with x0<x1, y0<y1, z0<z1")
    return r


@click.command("check-sync")
@click.argument("path", type=click.Path(exists=True))
@click.option("--stream", "streams", multiple=True,
              help="Only these streams (repeatable; default every camera, audio and LiDAR).")
@click.option("--max-offset-ms", type=float, default=250.0, show_default=True,
              help="Events of two streams further apart than this are not paired.")
@click.option("--lidar-region", help="LiDAR box x0,x1,y0,y1,z0,z1 (m, sensor frame) where "
              "an object appears [default: 1,12,-2,2,-1.5,3].")
@click.option("--lidar-timing", type=click.Choice(["auto", "scan", "points"]), default="auto",
              show_default=True, help="Time a LiDAR event by the scan's time or by its "
              "points' column times; auto: scan for HIL recordings, points otherwise.")
@click.option("--flash-min", type=float, default=40.0, show_default=True,
              help="Least brightness jump (grey levels, 0-255) of a camera flash.")
@click.option("--appear-min", type=int, default=100, show_default=True,
              help="Least jump of the LiDAR point count in the region.")
@click.option("--calibrate", metavar="STREAM",
              help="Suggest [clock.options] latency_ms for STREAM (e.g. the microphone) "
              "from its misalignment against --reference.")
@click.option("--reference", metavar="STREAM",
              help="The stream whose timing is trusted for --calibrate.")
@click.option("--max-abs-offset-ms", type=float,
              help="Exit 1 when a pair's misalignment bounds lie entirely beyond ±this "
              "(for CI: the streams are certainly misaligned).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def check_sync_cmd(path: str, streams: tuple[str, ...], max_offset_ms: float,
                   lidar_region: str | None, lidar_timing: str, flash_min: float,
                   appear_min: int, calibrate: str | None, reference: str | None,
                   max_abs_offset_ms: float | None, as_json: bool) -> None:
    """Find impulsive events (a camera flash, a click, an object appearing in front of the
    LiDAR: the HIL clapper, a clapperboard) in a recorded session and report the offset
    between the streams' timestamps of the same events. PATH: a session folder, a segment,
    or a HIL run folder. Exit 0; 1 with --max-abs-offset-ms exceeded or nothing paired; 2
    when PATH is not a readable session."""
    from agent.check_sync import (LIDAR_REGION, check_sync, latency_suggestion,
                                  recorded_latency_ms)

    if bool(calibrate) != bool(reference):
        raise click.UsageError("--calibrate and --reference go together")
    try:
        rep = check_sync(path, streams or None, max_offset_ms,
                         lidar_region=_region(lidar_region) or LIDAR_REGION,
                         lidar_timing=lidar_timing, flash_min=flash_min,
                         appear_min=appear_min)
    except EdgecapError as e:
        click.echo(f"check-sync: {e}", err=True)
        sys.exit(2)
    if calibrate and reference:
        cur = recorded_latency_ms(path, calibrate)
        rep["calibration"] = latency_suggestion(rep, calibrate, reference, cur) or {
            "stream": calibrate, "reference": reference,
            "note": "no consistent paired events between the two streams"}
    failed = []
    if max_abs_offset_ms is not None:
        for p in rep["pairs"]:
            b = p.get("bounds_ms")
            if b and (b[0] > max_abs_offset_ms or b[1] < -max_abs_offset_ms):
                failed.append(f"{p['a']} → {p['b']}")
    paired = any(p.get("n") for p in rep["pairs"])
    if as_json:
        click.echo(json.dumps(rep, indent=1))
    else:
        _print(rep, failed)
    sys.exit(1 if failed or not paired else 0)


def _print(rep: dict, failed: list[str]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from agent.check_sync import fmt_ms

    con = Console()
    con.print(f"session {escape(rep['session'])}")
    t = Table(title="events", title_justify="left")
    for c in ("stream", "kind", "samples", "events", "skipped"):
        t.add_column(c, justify="left" if c in ("stream", "kind") else "right")
    for n, s in rep["streams"].items():
        t.add_row(n, s["kind"], str(s["samples"]), str(s["events"]), str(s["skipped"]))
    con.print(t)
    t = Table(title="offsets B − A, ms", title_justify="left")
    for c in ("A → B", "n", "median", "spread", "bounds", "estimate"):
        t.add_column(c, justify="left" if c == "A → B" else "right", no_wrap=True)
    for p in rep["pairs"]:
        name = f"{p['a']} → {p['b']}"
        if not p.get("n"):
            t.add_row(name, "0", "—", "—", "—", "—")
            continue
        o = p["offset_ms"]
        b = p.get("bounds_ms")
        t.add_row(name, str(p["n"]), fmt_ms(o["median"]), f"{o['spread']:.3f}",
                  f"{fmt_ms(b[0])}…{fmt_ms(b[1])}" if b else "inconsistent",
                  fmt_ms(p.get("estimate_ms")))
    con.print(t)
    con.print("  median: t_B − t_A of the first samples showing each event (includes the "
              "sampling: up to a frame or scan); bounds: the misalignment all events allow, "
              "estimate its midpoint")
    for n in rep.get("notes", []):
        con.print(f"note: {escape(n)}")
    cal = rep.get("calibration")
    if cal:
        if "latency_ms" in cal:
            con.print(escape(
                f"calibration: {cal['stream']} against {cal['reference']} over "
                f"{cal['events']} event(s), ± {cal['uncertainty_ms']} ms; in the rig file:\n"
                f"  [clock.options]\n  latency_ms = {{ \"{cal['stream']}\" = "
                f"{cal['latency_ms']} }}"))
            if cal["uncertainty_ms"] > 1.0:
                con.print("  [yellow]wide:[/] the events sat at the same phase of the frames "
                          "or scans; clap ~30 times at irregular moments to narrow it")
        else:
            con.print(f"calibration: {escape(cal['note'])}")
    for f in failed:
        con.print(f"[red]misaligned:[/] {escape(f)}")


COMMANDS = [check_sync_cmd]
