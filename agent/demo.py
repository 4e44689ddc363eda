"""``make demo``: the main job on the embedded default, end to end, with a summary.

The emulated rig (``hil/scenarios/city-drive.toml``: camera over MJPEG/HTTP, Ouster
LiDAR over UDP, NMEA GPS on a serial pty, a microphone through PulseAudio) is recorded by
the agent with its on-device labelers, the session is uploaded over CURVE to a local
ingest server, and the run is scored against the emulators' ground truth. Then the
recorded session is inspected (every segment verified against its manifest).

Run as ``python -m agent.demo [--out DIR] [--duration S]``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from rich.console import Console

from agent.cli.hil_cmd import run_scenario
from agent.cli.render import print_inspect
from agent.inspect import inspect_path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo-out", help="where the run is written (emptied)")
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of scenario")
    ap.add_argument("--scenario", default="city-drive")
    args = ap.parse_args(argv)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    con = Console(width=150) if not sys.stdout.isatty() else Console()
    con.rule(f"edgecap demo: emulated rig ({args.scenario}, {args.duration:g} s) → record → "
             "pre-label → upload → score")
    rc = run_scenario(args.scenario, args.duration, str(out), console=con)
    runs = sorted(p for p in out.iterdir() if p.is_dir()) if out.exists() else []
    if not runs:
        con.print("[red]the run produced no run directory[/red]")
        return rc or 3
    sessions = sorted(p.parent for p in (runs[-1] / "recordings").rglob("*.manifest.json"))
    if sessions:
        con.rule("the recorded session, verified segment by segment")
        rep = inspect_path(sessions[-1])
        print_inspect(rep, con)
        labels = {k: v["messages"] for k, v in rep["streams"].items()
                  if k.startswith("/labels/")}
        con.print(f"pre-label messages: {labels or 'none'}")
        con.print(f"session: {sessions[-1]}")
        if not rep["ok"]:
            rc = rc or 1
    con.rule("demo " + ("passed" if rc == 0 else f"FAILED (exit {rc})"))
    return rc


if __name__ == "__main__":
    sys.exit(main())
