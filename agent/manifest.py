"""Segment manifests: the JSON sidecar ``NAME.manifest.json`` beside each closed
``NAME.mcap``, and their verification.

A manifest is written only after its segment is closed and renamed, via a temporary file,
fsync and rename, so a manifest that exists always describes a complete file. The sync
service uploads a segment only once its manifest exists.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .errors import BundleError

MANIFEST_VERSION = 1
MANIFEST_SUFFIX = ".manifest.json"


def manifest_path(segment: Path) -> Path:
    """``.../seg.mcap`` → ``.../seg.manifest.json``."""
    return segment.with_name(segment.name.removesuffix(".mcap") + MANIFEST_SUFFIX)


def write_manifest(segment: Path, manifest: dict[str, Any]) -> Path:
    """Write ``manifest`` durably beside ``segment``; returns its path."""
    path = manifest_path(segment)
    tmp = path.with_name(path.name + ".tmp")
    data = json.dumps({"manifest_version": MANIFEST_VERSION, **manifest}, indent=1,
                      sort_keys=True).encode()
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_manifest(path: Path) -> dict[str, Any]:
    """Load a manifest; raises BundleError when it is missing or not valid JSON."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path}: manifest missing") from None
    except (OSError, ValueError) as e:
        raise BundleError(f"{path}: manifest unreadable: {e}") from None
    if not isinstance(data, dict) or "sha256" not in data or "size" not in data:
        raise BundleError(f"{path}: manifest lacks sha256/size")
    return data


def file_sha256(path: Path, block: int = 4 << 20) -> tuple[str, int]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
            n += len(chunk)
    return h.hexdigest(), n


def verify_segment(segment: Path, deep: bool = True) -> list[str]:
    """Check a closed segment against its manifest. Returns a list of problems (empty when
    it verifies): missing/unreadable manifest, size or sha256 mismatch, and with ``deep``
    an MCAP that does not read to the end with valid CRCs or whose per-stream counts
    differ from the manifest."""
    problems: list[str] = []
    try:
        man = read_manifest(manifest_path(segment))
    except BundleError as e:
        return [str(e)]
    try:
        sha, size = file_sha256(segment)
    except OSError as e:
        return [f"{segment}: unreadable: {e.strerror}"]
    if size != man["size"]:
        problems.append(f"{segment.name}: size {size} != manifest {man['size']}")
    if sha != man["sha256"]:
        problems.append(f"{segment.name}: sha256 does not match the manifest")
    if deep and not problems:
        try:
            counts = count_messages(segment)
        except BundleError as e:
            problems.append(str(e))
        else:
            want = {k: v.get("messages", 0) for k, v in man.get("streams", {}).items()}
            got = {k: counts.get(k, 0) for k in want}
            if got != want:
                problems.append(f"{segment.name}: message counts {got} != manifest {want}")
    return problems


def count_messages(segment: Path) -> dict[str, int]:
    """Read every message record (validating chunk CRCs) and count per topic. Raises
    BundleError on a truncated or corrupt file."""
    from mcap.exceptions import McapError
    from mcap.reader import make_reader

    counts: dict[str, int] = {}
    try:
        with open(segment, "rb") as f:
            reader = make_reader(f, validate_crcs=True)
            for _schema, channel, _msg in reader.iter_messages(log_time_order=False):
                counts[channel.topic] = counts.get(channel.topic, 0) + 1
    except (McapError, ValueError, KeyError, EOFError, OSError, Exception) as e:
        raise BundleError(f"{segment.name}: not a readable MCAP: "
                          f"{type(e).__name__}: {e}") from None
    return counts
