"""``edgecap hil run|emulate|score``: the emulated rig (hil/, docs/hil.md)."""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click

from agent.errors import ConfigError, EdgecapError

DEVICE_NAMES = ("camera", "lidar", "gps", "audio")


def _devices(value: str | None) -> set[str] | None:
    if not value:
        return None
    out = {v.strip() for v in value.split(",") if v.strip()}
    bad = out - set(DEVICE_NAMES)
    if bad:
        raise click.BadParameter(f"unknown device(s) {', '.join(sorted(bad))}; "
                                 f"choose from {', '.join(DEVICE_NAMES)}")
    return out


def _sigterm_as_interrupt() -> Any:
    """SIGTERM raises KeyboardInterrupt in the main thread, so the run's context manager
    stops every process it started (the default action would leave them running)."""
    return signal.signal(signal.SIGTERM, signal.default_int_handler)


def _console() -> Any:
    from rich.console import Console

    c = Console(stderr=False)
    return c if c.is_terminal else Console(width=140)


@click.group("hil")
def hil_group() -> None:
    """Hardware-in-the-loop: emulated devices on real interfaces, scored runs."""


@hil_group.command("run")
@click.argument("scenario")
@click.option("--duration", "-d", type=float, default=None,
              help="Seconds of scenario to run (default: the scenario's duration_s).")
@click.option("--report", type=click.Path(dir_okay=False), default=None,
              help="Also write the JSON report here (always in RUN_DIR/report.json).")
@click.option("--out", "-o", type=click.Path(file_okay=False), default="hil-runs",
              show_default=True, help="Directory the run directory is created in.")
@click.option("--no-upload", is_flag=True, help="Skip the upload to a loopback ingest server.")
@click.option("--no-labels", is_flag=True, help="Configure no labelers in the rig.")
@click.option("--devices", default=None,
              help="Comma-separated subset: camera,lidar,gps,audio (default: all the "
                   "scenario enables).")
@click.option("--quiet", "-q", is_flag=True, help="Only the report.")
def run_cmd(scenario: str, duration: float | None, report: str | None, out: str,
            no_upload: bool, no_labels: bool, devices: str | None, quiet: bool) -> None:
    """Run SCENARIO (a shipped name such as city-drive, or a .toml path) against the agent
    and score it. Exit status: 0 all assertions passed, 1 an assertion failed, 2 bad
    scenario or options, 3 the run itself failed."""
    sys.exit(run_scenario(scenario, duration, out, report, upload=not no_upload,
                          labels=not no_labels, devices=_devices(devices), quiet=quiet))


def run_scenario(scenario: str, duration: float | None = None, out: str = "hil-runs",
                 report: str | None = None, *, upload: bool = True, labels: bool = True,
                 devices: set[str] | None = None, quiet: bool = False,
                 console: Any = None) -> int:
    """Run, score and print one scenario; returns the exit status of ``edgecap hil run``
    (for ``make demo`` and other callers that want the run without the CLI). Blocks for
    the run; SIGTERM is turned into KeyboardInterrupt meanwhile so everything is stopped.
    Call from the main thread."""
    from hil.runner import HilError, HilRun, RunOptions
    from hil.scenario import load_scenario
    from hil.score import print_report, score_run

    try:
        sc = load_scenario(scenario, duration_s=duration)
        opts = RunOptions(out_dir=Path(out), devices=devices, upload=upload, labels=labels)
    except ConfigError as e:
        click.echo(str(e), err=True)
        return 2
    previous = _sigterm_as_interrupt()
    t0 = time.monotonic()

    def say(msg: str) -> None:
        if not quiet:
            click.echo(f"[{time.monotonic() - t0:5.1f} s] {msg}", err=True)

    try:
        with HilRun(sc, opts) as run:
            say(f"{sc.name}: {sc.duration_s:g} s, devices {', '.join(run.devices)}")
            res = run.run(on_status=say)
    except KeyboardInterrupt:
        click.echo("interrupted: every emulator and the agent were stopped", err=True)
        return 130
    except (HilError, EdgecapError) as e:
        click.echo(f"hil run failed: {e}", err=True)
        return 3
    finally:
        signal.signal(signal.SIGTERM, previous)
    say("scoring")
    rep = score_run(res.run_dir)
    text = json.dumps(rep, indent=1, default=str) + "\n"
    (Path(res.run_dir) / "report.json").write_text(text)
    if report:
        Path(report).write_text(text)
    print_report(rep, console or _console())
    click.echo(f"run directory: {res.run_dir}")
    if res.agent_stop == "killed" or (res.agent_rc not in (0, None)
                                      and res.agent_stop == "exited"):
        click.echo(f"the agent exited with status {res.agent_rc}; see {res.agent_log}", err=True)
        return 3
    return 0 if rep["assertions"]["ok"] else 1


@hil_group.command("score")
@click.argument("run_dir", type=click.Path(file_okay=False, exists=True))
@click.option("--report", type=click.Path(dir_okay=False), default=None,
              help="Write the JSON report here.")
def score_cmd(run_dir: str, report: str | None) -> None:
    """Score a finished run directory again (e.g. after changing the scorer)."""
    from hil.score import print_report, score_run

    try:
        rep = score_run(run_dir)
    except (OSError, ValueError, KeyError) as e:
        click.echo(f"{run_dir}: not a HIL run directory ({e})", err=True)
        sys.exit(2)
    if report:
        Path(report).write_text(json.dumps(rep, indent=1, default=str) + "\n")
    print_report(rep, _console())
    sys.exit(0 if rep["assertions"]["ok"] else 1)


@hil_group.command("emulate")
@click.argument("scenario")
@click.option("--duration", "-d", type=float, default=None,
              help="Seconds to run (default: the scenario's duration_s).")
@click.option("--out", "-o", type=click.Path(file_okay=False), default="hil-runs",
              show_default=True, help="Directory the run directory is created in.")
@click.option("--devices", default=None, help="Comma-separated subset of devices.")
@click.option("--rig", type=click.Path(dir_okay=False), default=None,
              help="Also write the rendered rig file here (always RUN_DIR/rig.toml).")
def emulate_cmd(scenario: str, duration: float | None, out: str, devices: str | None,
                rig: str | None) -> None:
    """Only run the emulators of SCENARIO and print where they are, for a rig (or a
    viewer) started by hand: `edgecap record -c RUN_DIR/rig.toml`. Ctrl-C stops them."""
    from hil.runner import HilError, HilRun, RunOptions
    from hil.scenario import load_scenario

    try:
        sc = load_scenario(scenario, duration_s=duration)
        opts = RunOptions(out_dir=Path(out), devices=_devices(devices), upload=False,
                          start_delay_s=1.0)
    except ConfigError as e:
        click.echo(str(e), err=True)
        sys.exit(2)
    previous = _sigterm_as_interrupt()
    try:
        with HilRun(sc, opts) as run:
            run.start_emulators()
            path = run.render()
            if rig:
                Path(rig).write_text(path.read_text())
            for dev, emu in run.emulators.items():
                click.echo(f"{dev:7s} {emu.uri}")
            v = run.rig_values()
            if "lidar_metadata" in v:
                click.echo(f"        lidar metadata {v['lidar_metadata']}")
            if "gps_pps" in v:
                click.echo(f"        gps pps {v['gps_pps']}")
            if "audio_pulse_server" in v:
                click.echo(f"        PULSE_SERVER={v['audio_pulse_server']}")
            click.echo(f"rig     {path}" + (f" (and {rig})" if rig else ""))
            click.echo(f"truth   {run.run_dir / 'truth'}")
            click.echo(f"record with: edgecap record -c {path}", err=True)
            end = run.run_t0_ns + int(sc.duration_s * 1e9)
            while time.monotonic_ns() < end:
                time.sleep(0.2)
    except KeyboardInterrupt:
        click.echo("stopped", err=True)
    except (HilError, EdgecapError) as e:
        click.echo(f"hil emulate failed: {e}", err=True)
        sys.exit(3)
    finally:
        signal.signal(signal.SIGTERM, previous)


COMMANDS = [hil_group]
