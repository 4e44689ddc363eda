"""Terminal rendering shared by the commands (rich tables, one-line status)."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.table import Table


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def status_line(pipe: Any, elapsed_s: float) -> str:
    """``12.3s  /camera/front 300 (0 drop)  …  segs 1``: one line, for a terminal."""
    st = pipe.stats()
    parts = [f"{elapsed_s:6.1f}s"]
    for name, s in st["streams"].items():
        loss = s.get("queue_drops", 0) + s.get("gaps", 0)
        parts.append(f"{name} {s.get('enqueued', 0)}" + (f" ({loss} lost)" if loss else ""))
    parts.append(f"segs {st.get('closed_segments', 0)}")
    if st.get("alerts"):
        parts.append(f"ALERT {st['alerts'][-1]}")
    return "  ".join(parts)


def print_inspect(rep: dict[str, Any], console: Console | None = None) -> None:
    """The inspect report as a table plus verification lines."""
    console = console or Console(width=None if sys.stdout.isatty() else 150)
    t = Table(title=f"{rep['path']}  ({len(rep['segments'])} segment(s), "
                    f"{rep['duration_s']:.1f} s, {human_bytes(rep['size'])})")
    for col in ("stream", "kind", "messages", "rate Hz", "bytes", "queue drops", "gaps",
                "corrupt"):
        t.add_column(col, justify="left" if col in ("stream", "kind") else "right")
    for name, s in sorted(rep["streams"].items()):
        rate = f"{s['rate_hz']:.2f}" if s.get("rate_hz") else "-"
        t.add_row(name, str(s.get("kind")), str(s["messages"]), rate, human_bytes(s["bytes"]),
                  str(s["queue_drops"]), str(s["gaps"]), str(s["corrupt"]))
    console.print(t)
    seg_table = Table(title="segments")
    for col in ("segment", "size", "verified", "retention", "triggers", "quality", "flags"):
        seg_table.add_column(col)
    for s in rep["segments"]:
        name = s["file"].rsplit("/", 1)[-1]
        seg_table.add_row(name + (" (recovered)" if s.get("recovered") else ""),
                          human_bytes(s.get("size") or 0),
                          {True: "✓", False: "[red]✗[/red]", None: "-"}[s.get("verified")],
                          s.get("retention", ""), ",".join(s.get("triggers", [])),
                          _verdict(s.get("quality")), ", ".join(s.get("flags", []))[:60])
    console.print(seg_table)
    verified = sum(1 for s in rep["segments"] if s.get("verified"))
    if rep.get("reverified", True):
        console.print(f"verified {verified}/{len(rep['segments'])} segment(s) against their "
                      f"manifests" + ("" if rep["ok"] else " — PROBLEMS:"))
    else:
        console.print(f"{len(rep['segments'])} closed segment(s), summarised from their "
                      "manifests (`edgecap inspect` re-verifies every byte)"
                      + ("" if rep["ok"] else " — PROBLEMS:"))
    for p in rep["problems"]:
        console.print(f"  [red]✗[/red] {p}")


def _verdict(v: str | None) -> str:
    colour = {"ok": "green", "warn": "yellow", "fail": "red"}.get(v or "", "white")
    return f"[{colour}]{v or '-'}[/{colour}]"
