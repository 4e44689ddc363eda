"""Retention: what happens to closed segments on the device.

Every closed segment's manifest carries ``retention``:

- ``keep``: record everything (no trigger configured), or a trigger window overlaps it —
  the manifest then also lists ``triggers`` and ``priority`` (upload goes first);
- ``pending``: triggers are configured and a window could still reach it (a trigger at
  ``t`` reaches back ``pre_s``); the uploader leaves it alone;
- ``untriggered``: no window reached it; it is deleted ``keep_s`` after its window ended.

Disk quota (``recorder.quota_gb``): when the spool is over it, segments are evicted in
this order — uploaded ones (``<seg>.uploaded`` marker, written by the uploader), then untriggered, then
records-everything ``keep`` segments without triggers, then pending, all oldest first;
triggered segments not yet uploaded only with ``evict_triggered = true``. Every eviction is
logged to ``<out_dir>/evictions.jsonl``. If that is not enough the recorder degrades:
first label streams, then the lowest-priority sensor streams are no longer written
(counted as ``degraded_drops``), with an alert, until usage falls below 90 % of the quota.

Runs on its own thread, ticking once a second; ``tick`` is also callable directly.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .manifest import MANIFEST_SUFFIX, manifest_path, read_manifest, write_manifest
from .triggers import TriggerEngine

log = logging.getLogger("edgecap.retention")

UPLOADED_SUFFIX = ".uploaded"


def uploaded_marker(segment: Path) -> Path:
    """``…/<name>.mcap`` → ``…/<name>.uploaded``, the uploader's durable-ack marker."""
    return segment.with_suffix(UPLOADED_SUFFIX)
DECISION_MARGIN_NS = 2_000_000_000  # label latency allowance before deciding


@dataclass
class _Seg:
    path: Path
    window: tuple[int, int]
    retention: str
    triggers: list[str]
    size: int
    closed_mono_ns: int
    #: from an earlier session (found at start): decided by that session's trigger log
    adopted: bool = False
    windows: list[tuple[int, int, list[str], int]] | None = None


def spool_usage(root: Path) -> int:
    """Bytes of every file under ``root`` (segments, manifests, markers)."""
    total = 0
    for p in root.rglob("*"):
        try:
            if p.is_file():
                total += p.stat().st_size
        except OSError:
            pass
    return total


class Retention:
    """Decides pending segments, expires untriggered ones, enforces the quota."""

    def __init__(self, out_dir: Path, engine: TriggerEngine, keep_s: float | None,
                 quota_bytes: int | None, evict_triggered: bool = False,
                 now_ns: Callable[[], int] = time.monotonic_ns,
                 degrade: Callable[[bool], list[str]] | None = None):
        self.out_dir = out_dir
        self.engine = engine
        self.keep_ns = int((keep_s if keep_s is not None else 60.0) * 1e9)
        self.quota = quota_bytes
        self.evict_triggered = evict_triggered
        self.now_ns = now_ns
        self.degrade = degrade
        self.degraded: list[str] = []
        self.segments: dict[Path, _Seg] = {}
        self.counts = {"kept": 0, "expired": 0, "evicted": 0, "evicted_bytes": 0}
        self.alerts: list[str] = []
        #: callables run on every tick of the retention thread (e.g. manual triggers)
        self.periodic: list[Callable[[], Any]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def initial_state(self) -> str:
        """``retention`` to write into a manifest at close."""
        return "pending" if self.engine.configured else "keep"

    def _match(self, seg: _Seg) -> tuple[list[str], int]:
        if not seg.adopted:
            return self.engine.match(*seg.window)
        names: set[str] = set()
        prio = 0
        for a, b, ns, p in seg.windows or []:
            if a < seg.window[1] and seg.window[0] < b:
                names |= set(ns)
                prio = max(prio, p)
        return sorted(names), prio

    def adopt_existing(self, skip: Path | None = None) -> int:
        """At start: take over the segments earlier sessions left in the spool, so their
        quota, expiry and undecided (``pending``, e.g. after a crash) segments are handled;
        pending ones are decided against that session's ``triggers.jsonl``. Returns how
        many were adopted. Never raises."""
        n = 0
        for mp in sorted(self.out_dir.glob(f"*/*{MANIFEST_SUFFIX}")):
            if skip is not None and mp.parent == skip:
                continue
            seg = mp.with_name(mp.name.removesuffix(MANIFEST_SUFFIX) + ".mcap")
            try:
                man = read_manifest(mp)
                windows = _session_windows(mp.parent)
                st = seg.stat()
            except Exception:
                continue
            with self._lock:
                self.segments[seg] = _Seg(seg, (man.get("window_start_ns") or 0,
                                                man.get("window_end_ns") or 0),
                                          man.get("retention", "keep"),
                                          man.get("triggers", []), st.st_size,
                                          time.monotonic_ns(), adopted=True, windows=windows)
            n += 1
        return n

    def on_closed(self, path: Path, manifest: dict[str, Any]) -> None:
        """Recorder hook (writer thread): remember a closed segment."""
        with self._lock:
            self.segments[path] = _Seg(path, (manifest["window_start_ns"],
                                              manifest["window_end_ns"]),
                                       manifest.get("retention", "keep"),
                                       manifest.get("triggers", []), manifest["size"],
                                       time.monotonic_ns())

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="edgecap-retention",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and settle what can be settled now (a final tick)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.tick(final=True)

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                for fn in self.periodic:
                    fn()
                self.tick()
            except Exception:
                log.exception("retention tick failed")

    # -- the decisions ----------------------------------------------------------------
    def tick(self, final: bool = False) -> None:
        now = self.now_ns()
        horizon = self.engine.max_pre_ns + DECISION_MARGIN_NS
        with self._lock:
            segs = list(self.segments.values())
        for seg in segs:
            if seg.retention == "pending":
                names, prio = self._match(seg)
                if names:
                    self._set(seg, "keep", names, prio)
                elif final or now >= seg.window[1] + horizon:
                    # at stop no trigger can come any more: decide now
                    self._set(seg, "untriggered", [], 0)
            elif seg.retention == "keep" and self.engine.configured and not seg.adopted:
                names, prio = self.engine.match(*seg.window)
                if set(names) - set(seg.triggers):  # a later window reached it too
                    self._set(seg, "keep", names, prio)
            if seg.retention == "untriggered" and (
                    (seg.adopted and time.monotonic_ns() - seg.closed_mono_ns >= self.keep_ns)
                    or (not seg.adopted and now >= seg.window[1] + self.keep_ns)):
                self._delete(seg, "expired")
        if self.quota is not None:
            self._enforce_quota()

    def _set(self, seg: _Seg, state: str, names: list[str], prio: int) -> None:
        mp = manifest_path(seg.path)
        try:
            man = read_manifest(mp)
        except Exception as e:
            log.error("retention: %s", e)
            return
        man.update(retention=state, triggers=names, priority=prio)
        man.pop("manifest_version", None)
        write_manifest(seg.path, man)
        if state == "keep" and seg.retention != "keep":
            self.counts["kept"] += 1
        seg.retention, seg.triggers = state, names

    def _delete(self, seg: _Seg, reason: str) -> None:
        for p in (seg.path, manifest_path(seg.path), uploaded_marker(seg.path)):
            p.unlink(missing_ok=True)
        with self._lock:
            self.segments.pop(seg.path, None)
        key = "expired" if reason == "expired" else "evicted"
        self.counts[key] += 1
        if key == "evicted":
            self.counts["evicted_bytes"] += seg.size
        try:
            with open(self.out_dir / "evictions.jsonl", "a") as f:
                f.write(json.dumps({"segment": seg.path.name, "reason": reason,
                                    "retention": seg.retention, "triggers": seg.triggers,
                                    "size": seg.size, "unix_ns": time.time_ns()}) + "\n")
        except OSError:
            pass
        log.info("retention: %s %s (%s)", reason, seg.path.name, seg.retention)

    def eviction_order(self) -> list[_Seg]:
        """Segments in the order the quota evicts them (see the module doc)."""
        with self._lock:
            segs = sorted(self.segments.values(), key=lambda s: s.window[0])
        uploaded = [s for s in segs if uploaded_marker(s.path).exists()]
        rest = [s for s in segs if s not in uploaded]
        order = uploaded
        order += [s for s in rest if s.retention == "untriggered"]
        order += [s for s in rest if s.retention == "keep" and not s.triggers]
        order += [s for s in rest if s.retention == "pending"]
        if self.evict_triggered:
            order += [s for s in rest if s.retention == "keep" and s.triggers]
        return order

    def _enforce_quota(self) -> None:
        assert self.quota is not None
        used = spool_usage(self.out_dir)
        if used > self.quota:
            for seg in self.eviction_order():
                if used <= self.quota:
                    break
                self._delete(seg, "quota")
                used -= seg.size
        if used > self.quota and self.degrade is not None:
            self.degraded = self.degrade(True)
            msg = (f"spool over quota ({used / 1e6:.1f} of {self.quota / 1e6:.1f} MB) with "
                   f"nothing left to evict; not recording {', '.join(self.degraded)}")
            if not self.alerts or self.alerts[-1] != msg:
                self.alerts.append(msg)
                log.error(msg)
        elif self.degraded and used < 0.9 * self.quota and self.degrade is not None:
            self.degraded = self.degrade(False)
            log.warning("spool below 90%% of quota again; recording every stream")

    def stats(self) -> dict[str, Any]:
        with self._lock:
            states: dict[str, int] = {}
            for s in self.segments.values():
                states[s.retention] = states.get(s.retention, 0) + 1
        return {**self.counts, "states": states, "degraded": list(self.degraded),
                "alerts": self.alerts[-5:]}


def _session_windows(session_dir: Path) -> list[tuple[int, int, list[str], int]]:
    """The trigger windows a session logged (``triggers.jsonl``), unmerged."""
    out = []
    try:
        for line in (session_dir / "triggers.jsonl").read_text().splitlines():
            try:
                d = json.loads(line)
                out.append((int(d["start_ns"]), int(d["end_ns"]), [str(d["name"])],
                            int(d.get("priority", 0))))
            except (ValueError, KeyError, TypeError):
                continue
    except OSError:
        pass
    return out


def is_uploadable(manifest: dict[str, Any]) -> bool:
    """The uploader's rule: only segments whose retention is decided and kept."""
    return manifest.get("retention", "keep") == "keep"


__all__ = ["Retention", "is_uploadable", "spool_usage", "UPLOADED_SUFFIX", "MANIFEST_SUFFIX"]
