"""The sync service's errors. Raise only for configuration and programming errors and for
storage that cannot be written; bad input from a peer is a :class:`ProtocolError` that the
receiver counts and answers, never lets escape its loop."""

from __future__ import annotations

from agent.errors import EdgecapError


class SyncError(EdgecapError):
    """Base of the sync service's errors."""


class ProtocolError(SyncError):
    """A peer sent something the protocol does not allow. ``code`` is the short reason that
    goes back on the wire and into the ``rejected`` counters (see docs/sync-protocol.md)."""

    def __init__(self, code: str, detail: str = ""):
        self.code = code
        self.detail = detail
        super().__init__(f"{code}: {detail}" if detail else code)


class StorageError(SyncError):
    """A storage backend could not read or write durably (disk full, bucket unreachable)."""
