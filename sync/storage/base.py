"""The storage interface: content-addressed blobs plus small JSON objects for the index.

Layout (the same keys on every backend, under the backend's own root or prefix)::

    blobs/<sha[:2]>/<sha256>                          a bundle's bytes, written once
    devices/<device>/<session>/<bundle>.manifest.json  the manifest as uploaded
    devices/<device>/<session>/<bundle>.entry.json     the index entry (written last)

Blobs are named by their hash and written only if absent, and entries are written only if
absent, so several ingest servers can share one store without coordinating: a second
writer of the same blob or entry finds it present and stores nothing. An entry exists only
after its blob and manifest are durable, so a listed bundle is always complete.

A backend implements the eight primitive methods; the index logic lives here. Methods
block (disk or network) and are called from the ingest server's worker threads, so they
must be thread-safe. Failures raise :class:`StorageError`.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal

from pydantic import BaseModel, ConfigDict

from ..errors import StorageError
from ..protocol import valid_id, valid_sha256

ENTRY_VERSION = 1
ENTRY_SUFFIX = ".entry.json"
MANIFEST_SUFFIX = ".manifest.json"


class StorageOptions(BaseModel):
    """Base of every backend's options model (``[storage.options]``); unknown keys are
    errors."""

    model_config = ConfigDict(extra="forbid")


def blob_key(sha256: str) -> str:
    if not valid_sha256(sha256):
        raise ValueError(f"not a sha256: {sha256!r}")
    return f"blobs/{sha256[:2]}/{sha256}"


def bundle_prefix(device: str, session: str | None = None) -> str:
    for part in (device, session):
        if part is not None and not valid_id(part):
            raise ValueError(f"not a valid id: {part!r}")
    return f"devices/{device}/" + (f"{session}/" if session else "")


def entry_key(device: str, session: str, bundle: str) -> str:
    if not valid_id(bundle):
        raise ValueError(f"not a valid id: {bundle!r}")
    return bundle_prefix(device, session) + bundle + ENTRY_SUFFIX


def manifest_key(device: str, session: str, bundle: str) -> str:
    return entry_key(device, session, bundle).removesuffix(ENTRY_SUFFIX) + MANIFEST_SUFFIX


PutResult = Literal["created", "exists", "conflict"]


class Storage(ABC):
    """One storage backend. Subclasses set ``Options`` and implement the primitives."""

    key: ClassVar[str] = ""
    Options: ClassVar[type[StorageOptions]] = StorageOptions

    def __init__(self, options: StorageOptions):
        self.options = options

    # -- primitives ---------------------------------------------------------------------
    @abstractmethod
    def has_blob(self, sha256: str) -> bool:
        """True when the blob is stored."""

    @abstractmethod
    def put_blob(self, sha256: str, src: Path, size: int) -> bool:
        """Store the (already verified and fsynced) file ``src`` as blob ``sha256``,
        durably, only if absent. Returns True when stored now, False when it was already
        there. ``src`` is left in place (the caller removes it)."""

    @abstractmethod
    def read_blob(self, sha256: str) -> Iterator[bytes]:
        """The blob's bytes in blocks; raises StorageError when missing."""

    @abstractmethod
    def list_blobs(self) -> Iterator[str]:
        """Every stored blob's sha256."""

    @abstractmethod
    def get_object(self, key: str) -> bytes | None:
        """A small object's bytes, or None when absent."""

    @abstractmethod
    def put_object(self, key: str, data: bytes) -> None:
        """Write a small object durably (replacing it)."""

    @abstractmethod
    def put_object_if_absent(self, key: str, data: bytes) -> bool:
        """Write a small object durably only if absent; False when it was there."""

    @abstractmethod
    def list_keys(self, prefix: str) -> Iterator[str]:
        """Keys that start with ``prefix``."""

    def close(self) -> None:
        """Release clients and handles. Called once, after every other call returned."""

    def describe(self) -> str:
        return self.key

    # -- the index, shared by every backend ---------------------------------------------
    def get_entry(self, device: str, session: str, bundle: str) -> dict[str, Any] | None:
        raw = self.get_object(entry_key(device, session, bundle))
        if raw is None:
            return None
        try:
            entry = json.loads(raw)
        except ValueError as e:
            raise StorageError(f"index entry {device}/{session}/{bundle} is corrupt: "
                               f"{e}") from None
        if not isinstance(entry, dict) or not valid_sha256(entry.get("sha256")):
            raise StorageError(f"index entry {device}/{session}/{bundle} lacks a sha256")
        return entry

    def put_entry(self, entry: dict[str, Any], manifest: bytes) -> PutResult:
        """Record a bundle whose blob is stored: the manifest first, then the entry (only
        if absent). ``entry`` holds at least device, session, bundle, sha256 and size.
        Returns ``exists`` when the same bundle with the same hash is already indexed and
        ``conflict`` when the bundle id is indexed with a different hash (nothing is
        overwritten)."""
        dev, ses, bun = entry["device"], entry["session"], entry["bundle"]
        existing = self.get_entry(dev, ses, bun)
        if existing is not None:
            return "exists" if existing["sha256"] == entry["sha256"] else "conflict"
        mkey = manifest_key(dev, ses, bun)
        full = {"entry_version": ENTRY_VERSION, **entry, "blob": blob_key(entry["sha256"]),
                "manifest": mkey}
        self.put_object(mkey, manifest)
        if self.put_object_if_absent(entry_key(dev, ses, bun),
                                     json.dumps(full, sort_keys=True).encode()):
            return "created"
        existing = self.get_entry(dev, ses, bun)  # another server indexed it meanwhile
        if existing is not None and existing["sha256"] == entry["sha256"]:
            return "exists"
        return "conflict"

    def list_entries(self, device: str | None = None,
                     session: str | None = None) -> Iterator[dict[str, Any]]:
        """Index entries, optionally of one device (and session), in key order.
        Unreadable entries are skipped (and reported by ``verify``)."""
        prefix = bundle_prefix(device, session) if device else "devices/"
        for key in sorted(self.list_keys(prefix)):
            if not key.endswith(ENTRY_SUFFIX):
                continue
            raw = self.get_object(key)
            try:
                entry = json.loads(raw) if raw is not None else None
            except ValueError:
                continue
            if isinstance(entry, dict):
                yield entry
