"""Triggers: rules that mark windows of the timebase worth keeping.

A trigger firing at ``t`` marks ``[t − pre_s, t + post_s)``; overlapping or touching windows
merge (names united, highest priority kept). Sources:

- ``label``: a pre-label matching ``classes``, ``min_score``, ``min_count`` (detections of
  those classes in one frame) and optionally ``region`` ``[x0, y0, x1, y1]`` (0..1 of the
  image) or ``streams``;
- ``speech``: a speech segment from the VAD labeler (``min_duration_s``);
- ``geofence``: a GPS fix inside ``center = [lat, lon]`` + ``radius_m`` (entering fires);
- ``speed``: a GPS fix with ``speed_mps`` above ``above_mps`` or below ``below_mps``;
- ``manual``: ``edgecap trigger NAME`` on the running agent (a request file dropped in
  ``<out_dir>/.control/``; the request carries the host monotonic time it was made).

Windows are disk-backed: every new or extended window is appended to
``<session_dir>/triggers.jsonl`` so a restart (or a later upload) knows them. Thread model:
``on_label``/``on_fix`` are called from labeler and reader threads; a lock guards state.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from .config import TriggerConfig

log = logging.getLogger("edgecap.triggers")

CONTROL_DIR = ".control"


@dataclass
class Window:
    start_ns: int
    end_ns: int
    names: set[str] = field(default_factory=set)
    priority: int = 0

    def overlaps(self, a: int, b: int) -> bool:
        return self.start_ns < b and a < self.end_ns


def merge_windows(windows: Iterable[Window]) -> list[Window]:
    """Union of windows: overlapping or touching ones merge (names united, max priority)."""
    out: list[Window] = []
    for w in sorted(windows, key=lambda w: w.start_ns):
        if out and w.start_ns <= out[-1].end_ns:
            last = out[-1]
            last.end_ns = max(last.end_ns, w.end_ns)
            last.names |= w.names
            last.priority = max(last.priority, w.priority)
        else:
            out.append(Window(w.start_ns, w.end_ns, set(w.names), w.priority))
    return out


def _haversine_m(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * 6_371_000 * math.asin(math.sqrt(a))


class TriggerEngine:
    """Evaluates trigger rules and keeps the merged windows."""

    def __init__(self, triggers: list[TriggerConfig], session_dir: Path | None = None):
        self.rules = triggers
        self.session_dir = session_dir
        self._windows: list[Window] = []
        self._lock = threading.Lock()
        self._inside: dict[str, bool] = {}
        self.fired: dict[str, int] = {t.name: 0 for t in triggers}
        self._log_path = session_dir / "triggers.jsonl" if session_dir else None

    @property
    def configured(self) -> bool:
        return bool(self.rules)

    @property
    def max_pre_ns(self) -> int:
        return int(max((t.pre_s for t in self.rules), default=0.0) * 1e9)

    @property
    def max_post_ns(self) -> int:
        return int(max((t.post_s for t in self.rules), default=0.0) * 1e9)

    # -- firing -----------------------------------------------------------------------
    def fire(self, name: str, t_ns: int, source: str = "") -> Window | None:
        """Mark the window of trigger ``name`` around ``t_ns`` (timebase)."""
        rule = next((r for r in self.rules if r.name == name), None)
        if rule is None:
            log.warning("unknown trigger %r ignored; configured: %s", name,
                        [r.name for r in self.rules])
            return None
        w = Window(t_ns - int(rule.pre_s * 1e9), t_ns + int(rule.post_s * 1e9), {name},
                   rule.priority)
        with self._lock:
            self.fired[name] = self.fired.get(name, 0) + 1
            before = [(x.start_ns, x.end_ns) for x in self._windows]
            self._windows = merge_windows(self._windows + [w])
            changed = [(x.start_ns, x.end_ns) for x in self._windows] != before
        if changed and self._log_path is not None:
            try:
                with open(self._log_path, "a") as f:
                    f.write(json.dumps({"name": name, "t_ns": t_ns, "start_ns": w.start_ns,
                                        "end_ns": w.end_ns, "priority": rule.priority,
                                        "source": source}) + "\n")
            except OSError as e:
                log.error("cannot persist trigger window: %s", e)
        return w

    def on_label(self, ev: dict[str, Any]) -> None:
        """A labeler result: ``{stream, t_ns, kind, detections: [{cls, score, box}],
        segments: [...]}`` (box as normalised ``[x0, y0, x1, y1]`` when known)."""
        for r in self.rules:
            o = r.options
            if r.kind == "label":
                if o.get("streams") and ev.get("stream") not in o["streams"]:
                    continue
                dets = [d for d in ev.get("detections", [])
                        if (not o.get("classes") or d.get("cls") in o["classes"])
                        and d.get("score", 1.0) >= o.get("min_score", 0.5)
                        and _in_region(d.get("box"), o.get("region"))]
                if len(dets) >= int(o.get("min_count", 1)):
                    self.fire(r.name, ev["t_ns"], f"label {ev.get('stream')}")
            elif r.kind == "speech":
                for seg in ev.get("segments", []):
                    if seg.get("kind") != "speech":
                        continue
                    if (seg["end_ns"] - seg["start_ns"]) / 1e9 >= o.get("min_duration_s", 0.3):
                        self.fire(r.name, seg["start_ns"], "speech")

    def on_fix(self, t_ns: int, fix: dict[str, Any]) -> None:
        """A GPS fix (LocationFix payload dict) for geofence and speed rules."""
        for r in self.rules:
            o = r.options
            if r.kind == "geofence" and fix.get("fix_quality", 1):
                lat, lon = o["center"]
                inside = _haversine_m(lat, lon, fix["lat"], fix["lon"]) <= o["radius_m"]
                if inside and not self._inside.get(r.name):
                    self.fire(r.name, t_ns, "geofence")
                self._inside[r.name] = inside
            elif r.kind == "speed" and fix.get("speed_mps") is not None:
                v = fix["speed_mps"]
                if ("above_mps" in o and v > o["above_mps"]) or (
                        "below_mps" in o and v < o["below_mps"]):
                    self.fire(r.name, t_ns, "speed")

    def poll_manual(self, out_dir: Path, mono_to_timebase: Any = None) -> int:
        """Consume ``edgecap trigger`` requests from ``<out_dir>/.control``."""
        d = out_dir / CONTROL_DIR
        n = 0
        if not d.is_dir():
            return 0
        for p in sorted(d.glob("trigger-*.json")):
            try:
                req = json.loads(p.read_text())
                mono = int(req["mono_ns"])
                t = mono_to_timebase(mono) if mono_to_timebase else mono
                if self.fire(str(req["name"]), t, "manual") is not None:
                    n += 1
            except (OSError, ValueError, KeyError) as e:
                log.warning("bad trigger request %s: %s", p.name, e)
            p.unlink(missing_ok=True)
        return n

    # -- queries ----------------------------------------------------------------------
    def windows(self) -> list[Window]:
        with self._lock:
            return [Window(w.start_ns, w.end_ns, set(w.names), w.priority)
                    for w in self._windows]

    def match(self, start_ns: int, end_ns: int) -> tuple[list[str], int]:
        """Trigger names and priority of the windows overlapping ``[start, end)``."""
        names: set[str] = set()
        prio = 0
        for w in self.windows():
            if w.overlaps(start_ns, end_ns):
                names |= w.names
                prio = max(prio, w.priority)
        return sorted(names), prio


def _in_region(box: Any, region: Any) -> bool:
    if not region or not box:
        return True
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return region[0] <= cx <= region[2] and region[1] <= cy <= region[3]


def request_manual_trigger(out_dir: Path, name: str) -> Path:
    """What ``edgecap trigger NAME`` does: drop a request for the running agent."""
    d = out_dir / CONTROL_DIR
    d.mkdir(parents=True, exist_ok=True)
    mono = time.monotonic_ns()
    tmp = d / f".trigger-{mono}.tmp"
    tmp.write_text(json.dumps({"name": name, "mono_ns": mono, "unix_ns": time.time_ns()}))
    final = d / f"trigger-{mono}-{name}.json"
    tmp.rename(final)
    return final
