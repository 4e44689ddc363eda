"""Summaries of recorded sessions and segments for ``edgecap inspect``.

``inspect_path(path)`` accepts a session directory, a directory of sessions, or one
``.mcap`` file, verifies every segment against its manifest and aggregates per-stream
counts, rates and losses. Segments still ``.active`` are listed as unclosed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .errors import BundleError
from .manifest import manifest_path, read_manifest, verify_segment
from .segment import ACTIVE_SUFFIX


def find_segments(path: Path) -> tuple[list[Path], list[Path]]:
    """``(closed .mcap files, .mcap.active files)`` under ``path``, sorted by name."""
    if path.is_file():
        return ([path], []) if path.suffix == ".mcap" else ([], [path])
    closed = sorted(p for p in path.rglob("*.mcap") if p.is_file())
    active = sorted(p for p in path.rglob(f"*{ACTIVE_SUFFIX}") if p.is_file())
    return closed, active


def inspect_path(path: str | Path, deep: bool = True, verify: bool = True) -> dict[str, Any]:
    """Aggregate every segment under ``path``. Never raises for bad segments: each problem
    is listed under ``problems`` and ``ok`` is False. ``verify=False`` only aggregates the
    manifests (no re-hashing: for the summary right after recording, whose hashes were
    computed while writing)."""
    path = Path(path)
    if not path.exists():
        raise BundleError(f"{path}: no such file or directory")
    closed, active = find_segments(path)
    streams: dict[str, dict[str, Any]] = {}
    segments = []
    problems: list[str] = []
    sessions: set[str] = set()
    t_min = t_max = None
    total = 0
    for seg in closed:
        probs = verify_segment(seg, deep=deep) if verify else []
        problems.extend(probs)
        try:
            man = read_manifest(manifest_path(seg))
        except BundleError:
            segments.append({"file": str(seg), "verified": False})
            continue
        sessions.add(man.get("session_id", "?"))
        total += man.get("size", 0)
        segments.append({"file": str(seg), "size": man.get("size"),
                         "verified": (not probs) if verify else None,
                         "recovered": man.get("recovered", False),
                         "window_start_ns": man.get("window_start_ns"),
                         "window_end_ns": man.get("window_end_ns"),
                         "triggers": man.get("triggers", []),
                         "retention": man.get("retention", "keep"),
                         "quality": (man.get("quality") or {}).get("verdict"),
                         "flags": (man.get("quality") or {}).get("flags", [])})
        if man.get("t_first_ns") is not None:
            t_min = man["t_first_ns"] if t_min is None else min(t_min, man["t_first_ns"])
            t_max = man["t_last_ns"] if t_max is None else max(t_max, man["t_last_ns"])
        for name, st in man.get("streams", {}).items():
            agg = streams.setdefault(name, {"kind": st.get("kind"), "messages": 0, "bytes": 0,
                                            "queue_drops": 0, "gaps": 0, "corrupt": 0,
                                            "t_first_ns": None, "t_last_ns": None,
                                            "rate_hz_nominal": st.get("rate_hz")})
            agg["messages"] += st.get("messages", 0)
            agg["bytes"] += st.get("bytes", 0)
            agg["queue_drops"] += st.get("queue_drops", 0)
            dev = st.get("device", {})
            agg["gaps"] += dev.get("gaps", 0)
            agg["corrupt"] += dev.get("corrupt", 0)
            for k, fn in (("t_first_ns", min), ("t_last_ns", max)):
                if st.get(k) is not None:
                    agg[k] = st[k] if agg[k] is None else fn(agg[k], st[k])
    for name, agg in streams.items():
        n, a, b = agg["messages"], agg["t_first_ns"], agg["t_last_ns"]
        agg["rate_hz"] = (n - 1) / ((b - a) / 1e9) if n > 1 and b and a and b > a else None
    for a in active:
        problems.append(f"{a.name}: unclosed segment (crash?); run `edgecap recover` on it")
    return {"path": str(path), "sessions": sorted(sessions), "segments": segments,
            "unclosed": [str(a) for a in active], "streams": streams,
            "duration_s": (t_max - t_min) / 1e9 if t_min is not None and t_max else 0.0,
            "size": total, "problems": problems, "ok": not problems and bool(closed),
            "reverified": verify}
