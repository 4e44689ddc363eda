"""``make bench``: run every benchmark (or those named) and print a table of figures."""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys
import time
import traceback
from pathlib import Path

from rich.console import Console
from rich.table import Table

import bench

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("names", nargs="*", help="benchmark names (default: all)")
    ap.add_argument("--quick", action="store_true", help="smaller loads, for a smoke run")
    args = ap.parse_args(argv)
    names = args.names or sorted(m.name.removeprefix("bench_")
                                 for m in pkgutil.iter_modules(bench.__path__)
                                 if m.name.startswith("bench_"))
    con = Console(width=140)
    table = Table(title="edgecap benchmarks")
    for col in ("bench", "figure", "value", "reference", "ratio", "goal", "ok"):
        table.add_column(col)
    RESULTS.mkdir(exist_ok=True)
    failed = 0
    for name in names:
        con.print(f"[bold]running {name}…[/bold]")
        t0 = time.monotonic()
        try:
            results = importlib.import_module(f"bench.bench_{name}").run(quick=args.quick)
        except Exception:
            traceback.print_exc()
            failed += 1
            table.add_row(name, "ERROR", "", "", "", "", "✗")
            continue
        doc = {"bench": name, "seconds": time.monotonic() - t0, "quick": args.quick,
               "unix_time": time.time(), "results": [r.as_dict() for r in results]}
        (RESULTS / f"{name}.json").write_text(json.dumps(doc, indent=1))
        for r in results:
            ok = {True: "✓", False: "✗", None: ""}[r.ok]
            goal = "" if r.goal is None else ("≥" if r.higher_is_better else "≤") + f"{r.goal:g}"
            table.add_row(name, r.name, f"{r.value:.4g} {r.unit}", r.reference,
                          "" if r.ratio is None else f"{r.ratio:.3g}×" + (
                              f" {r.ratio_desc}" if r.ratio_desc else ""), goal, ok)
    con.print(table)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
