"""Sync service: the edge-side spool and uploader, and the fleet-side ingest server with its
storage backends. The edge side (``sync.spool``, ``sync.uploader``) never imports the fleet
side (``sync.ingest``, ``sync.storage``); they meet on the wire and at the spool directory.

Shared by both: ``sync.protocol`` (messages and their validation), ``sync.keys`` (CURVE key
files), ``sync.errors``, ``sync.metrics``. Edge only: ``sync.throttle`` (token bucket,
credit window), ``sync.schedule`` (upload hours). Fleet only: ``sync.ingest_config``.
Tests and benchmarks: ``sync.testing``. See docs/sync.md and docs/sync-protocol.md."""
