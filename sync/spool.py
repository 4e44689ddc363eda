"""The spool (edge side): what the recorder leaves in ``<out_dir>`` and what the uploader
has done with it.

Input contract (written by the recorder)::

    <spool>/<session_id>/<session_id>_<NNNNN>.mcap            closed segment
    <spool>/<session_id>/<session_id>_<NNNNN>.manifest.json   written after it closed
    <spool>/<session_id>/<session_id>_<NNNNN>.mcap.active     still being written: ignored

A segment is uploadable only once its manifest exists and agrees with the file (size,
ids). The uploader adds, each written atomically (temporary file, fsync, rename)::

    <segment>.uploaded      JSON: the server's durable ack (sha256, server, outcome, time)
    <segment>.rejected      JSON: the server refused the bundle for good (conflict, bad
                            manifest) or the local file does not match its manifest
    <spool>/.sync-state.json  bytes sent/acknowledged of bundles in flight

Called from the uploader's thread only.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .protocol import valid_id, valid_sha256

log = logging.getLogger("sync.spool")

MANIFEST_SUFFIX = ".manifest.json"
UPLOADED_SUFFIX = ".uploaded"
REJECTED_SUFFIX = ".rejected"
STATE_FILE = ".sync-state.json"


@dataclass(frozen=True)
class SpoolBundle:
    """One closed segment with its manifest, ready to upload."""

    device: str
    session: str
    bundle: str
    path: Path
    manifest_path: Path
    size: int
    sha256: str
    priority: int
    triggered: bool
    order_ns: int  # closed_unix_ns from the manifest, else the file's mtime (wall clock)
    index: int

    @property
    def key(self) -> str:
        return f"{self.session}/{self.bundle}"

    def sort_key(self) -> tuple[Any, ...]:
        """Higher priority first, then triggered, then oldest."""
        return (-self.priority, not self.triggered, self.order_ns, self.session, self.index)


def write_json_atomic(path: Path, obj: Any, fsync: bool = True) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    data = json.dumps(obj, indent=1, sort_keys=True).encode()
    with open(tmp, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)


class Spool:
    """Scans a spool directory. Manifests are parsed once per (mtime, size) and bad ones
    are logged once and counted in ``skipped`` by reason."""

    def __init__(self, root: str | os.PathLike[str], device_id: str | None = None,
                 max_manifest: int = 512 << 10):
        self.root = Path(root)
        self.device_id = device_id
        self.max_manifest = max_manifest
        self._cache: dict[Path, tuple[tuple[int, int], SpoolBundle | str]] = {}
        self.skipped: dict[str, int] = {}

    def _skip(self, path: Path, reason: str, detail: str) -> str:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        log.warning("not uploading %s: %s", path, detail)
        return reason

    def _parse(self, session_dir: Path, mpath: Path, stat: os.stat_result) -> SpoolBundle | str:
        stem = mpath.name.removesuffix(MANIFEST_SUFFIX)
        seg = session_dir / f"{stem}.mcap"
        if not valid_id(session_dir.name) or not valid_id(stem):
            return self._skip(mpath, "bad_id", "session or segment name is not a valid id")
        if stat.st_size > self.max_manifest:
            return self._skip(mpath, "manifest_too_large",
                              f"manifest of {stat.st_size} bytes > {self.max_manifest}")
        try:
            man = json.loads(mpath.read_bytes())
        except (OSError, ValueError) as e:
            return self._skip(mpath, "bad_manifest", f"unreadable manifest: {e}")
        if not isinstance(man, dict):
            return self._skip(mpath, "bad_manifest", "manifest is not a JSON object")
        sha, size = man.get("sha256"), man.get("size")
        device = man.get("device_id")
        priority = man.get("priority", 0)
        triggers = man.get("triggers", [])
        problems = []
        if not valid_sha256(sha):
            problems.append("sha256 missing or malformed")
        if type(size) is not int or size < 0:
            problems.append("size missing or not an integer")
        if not valid_id(device):
            problems.append("device_id missing or not a valid id")
        if man.get("session_id", session_dir.name) != session_dir.name:
            problems.append(f"session_id {man.get('session_id')!r} != folder name")
        if man.get("segment", stem) != stem:
            problems.append(f"segment {man.get('segment')!r} != file name")
        if type(priority) is not int or not -1_000_000 <= priority <= 1_000_000:
            problems.append("priority is not an integer")
        if not isinstance(triggers, list):
            problems.append("triggers is not a list")
        if problems:
            return self._skip(mpath, "bad_manifest", "; ".join(problems))
        if man.get("retention", "keep") != "keep":
            # the recorder has not decided yet (pending a trigger window) or will expire
            # it (untriggered): normal, not worth a warning; re-read when it changes
            return "retention_" + str(man.get("retention"))
        try:
            seg_stat = seg.stat()
        except OSError:
            return self._skip(mpath, "missing_segment", f"{seg.name} is missing")
        if seg_stat.st_size != size:
            return self._skip(mpath, "size_mismatch", f"{seg.name} has {seg_stat.st_size} "
                              f"bytes, manifest says {size}")
        closed = man.get("closed_unix_ns")
        order = closed if type(closed) is int else seg_stat.st_mtime_ns
        index = man.get("index")
        return SpoolBundle(device, session_dir.name, stem, seg, mpath, size, sha, priority,
                           bool(triggers), order, index if type(index) is int else 0)

    def scan(self) -> list[SpoolBundle]:
        """Every uploadable bundle (manifest present and consistent, not yet uploaded or
        rejected), best first. Never raises for a bad file; counts it."""
        out: list[SpoolBundle] = []
        seen: set[Path] = set()
        try:
            sessions = sorted(p for p in self.root.iterdir()
                              if p.is_dir() and not p.name.startswith("."))
        except OSError:
            return out
        for sdir in sessions:
            try:
                names = os.listdir(sdir)
            except OSError:
                continue
            nameset = set(names)
            for name in names:
                if not name.endswith(MANIFEST_SUFFIX) or name.startswith("."):
                    continue
                stem = name.removesuffix(MANIFEST_SUFFIX)
                if stem + UPLOADED_SUFFIX in nameset or stem + REJECTED_SUFFIX in nameset:
                    continue
                if stem + ".mcap" not in nameset:
                    continue  # deleted after upload, or not there yet
                mpath = sdir / name
                try:
                    st = mpath.stat()
                except OSError:
                    continue
                seen.add(mpath)
                sig = (st.st_mtime_ns, st.st_size)
                cached = self._cache.get(mpath)
                if cached is None or cached[0] != sig:
                    cached = (sig, self._parse(sdir, mpath, st))
                    self._cache[mpath] = cached
                res = cached[1]
                if isinstance(res, SpoolBundle):
                    if self.device_id is not None and res.device != self.device_id:
                        self._cache[mpath] = (sig, self._skip(
                            mpath, "other_device", f"device_id {res.device!r} is not this "
                            f"rig's {self.device_id!r}"))
                        continue
                    out.append(res)
        for gone in set(self._cache) - seen:
            del self._cache[gone]
        out.sort(key=SpoolBundle.sort_key)
        return out

    def manifest_bytes(self, b: SpoolBundle) -> bytes:
        return b.manifest_path.read_bytes()

    def mark(self, b: SpoolBundle, suffix: str, info: dict[str, Any]) -> Path:
        """Write ``<segment><suffix>`` (``.uploaded``/``.rejected``) atomically."""
        path = b.path.with_name(b.bundle + suffix)
        write_json_atomic(path, {"bundle": b.bundle, "session": b.session,
                                 "sha256": b.sha256, "size": b.size,
                                 "unix_ns": time.time_ns(), **info})
        self._cache.pop(b.manifest_path, None)
        return path

    def delete_segment(self, b: SpoolBundle) -> bool:
        """Remove the uploaded segment file (the manifest and marker stay)."""
        if not b.path.with_name(b.bundle + UPLOADED_SUFFIX).exists():
            raise AssertionError("delete only after the .uploaded marker is durable")
        try:
            b.path.unlink()
            return True
        except FileNotFoundError:
            return False

    def pending_bytes(self, bundles: list[SpoolBundle]) -> int:
        return sum(b.size for b in bundles)


class SyncState:
    """``<spool>/.sync-state.json``: per bundle in flight, the highest offset sent and the
    last offset the server acknowledged, so a restarted uploader knows what it re-sends.
    The server's answer to an offer is what counts for resuming; this file is bookkeeping.
    A corrupt file is logged and replaced."""

    VERSION = 1

    def __init__(self, spool_root: Path):
        self.path = spool_root / STATE_FILE
        self.inflight: dict[str, dict[str, Any]] = {}
        self._dirty = False
        try:
            data = json.loads(self.path.read_bytes())
            if isinstance(data, dict) and isinstance(data.get("inflight"), dict):
                self.inflight = {k: v for k, v in data["inflight"].items()
                                 if isinstance(v, dict)}
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:
            log.warning("%s unreadable (%s); starting a fresh one", self.path, e)

    def get(self, key: str, sha256: str) -> dict[str, Any]:
        rec = self.inflight.get(key)
        if rec is None or rec.get("sha256") != sha256:
            return {"sha256": sha256, "sent": 0, "acked": 0}
        return rec

    def update(self, key: str, sha256: str, sent: int, acked: int) -> None:
        self.inflight[key] = {"sha256": sha256, "sent": int(sent), "acked": int(acked)}
        self._dirty = True

    def remove(self, key: str) -> None:
        if self.inflight.pop(key, None) is not None:
            self._dirty = True

    def save(self) -> None:
        if not self._dirty:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.path, {"version": self.VERSION, "inflight": self.inflight})
            self._dirty = False
        except OSError as e:
            log.warning("cannot write %s: %s", self.path, e.strerror)
