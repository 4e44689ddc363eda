"""``make demo``: the main job on the embedded default, end to end, with a summary.

Today: record the synthetic rig (``examples/synthetic.toml``) for ~15 s and print what was
recorded and verified. Run as ``python -m agent.demo [--out DIR] [--duration S]``.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from rich.console import Console

from agent.cli.record import run_record
from agent.cli.render import print_inspect
from agent.inspect import inspect_path

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="demo-out")
    ap.add_argument("--duration", type=float, default=15.0)
    args = ap.parse_args(argv)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    con = Console(width=110)
    con.rule("edgecap demo: synthetic rig → record → verify")
    pipe = run_record(str(ROOT / "examples" / "synthetic.toml"), args.duration, str(out),
                      quiet=not sys.stderr.isatty())
    rep = inspect_path(pipe.session_dir)
    print_inspect(rep, con)
    con.print(f"session {pipe.session_id}: {len(rep['segments'])} segment(s) in "
              f"{pipe.session_dir}")
    return 0 if rep["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
