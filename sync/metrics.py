"""Prometheus metrics of the uploader and of the ingest server.

Each instance owns its own ``CollectorRegistry`` (``.registry``), so several uploaders or
servers in one process (tests, the demo) never collide; the ops side exposes a registry
with ``prometheus_client.start_http_server(port, registry=m.registry)`` or merges it into
its own. Counters are updated from the owning object's threads; prometheus-client makes
that thread-safe.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class UploaderMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry if registry is not None else CollectorRegistry()
        p = "edgecap_sync_upload_"
        self.bundles = Counter(p + "bundles", "Bundles the server acknowledged, by outcome "
                               "(stored, duplicate)", ["outcome"], registry=r)
        self.bytes_sent = Counter(p + "bytes_sent", "Chunk payload bytes sent", registry=r)
        self.bytes_resent = Counter(p + "bytes_resent", "Payload bytes sent again after a "
                                    "lost link, restart or rejected chunk", registry=r)
        self.failures = Counter(p + "failures", "Failed attempts by reason", ["reason"],
                                registry=r)
        self.skipped = Counter(p + "skipped", "Local bundles not uploadable, by reason",
                               ["reason"], registry=r)
        self.reconnects = Counter(p + "reconnects", "New connections after the first",
                                  registry=r)
        self.deleted = Counter(p + "deleted", "Local segments deleted after the durable ack",
                               registry=r)
        self.pending = Gauge(p + "pending_bundles", "Bundles waiting in the spool",
                             registry=r)
        self.pending_bytes = Gauge(p + "pending_bytes", "Bytes waiting in the spool",
                                   registry=r)
        self.connected = Gauge(p + "connected", "1 while a session with the server is up",
                               registry=r)
        self.window = Gauge(p + "window_chunks", "Chunks the uploader may have in flight "
                            "now (fixed, or sized from rate x round trip)", registry=r)
        self.rtt = Gauge(p + "rtt_seconds", "Round-trip estimate: the smallest ping (or "
                         "hello) round trip of the last 30 s", registry=r)


class IngestMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry if registry is not None else CollectorRegistry()
        p = "edgecap_ingest_"
        self.messages = Counter(p + "messages", "Valid messages received, by type", ["type"],
                                registry=r)
        self.rejected = Counter(p + "rejected", "Messages rejected, by reason", ["reason"],
                                registry=r)
        self.bytes_received = Counter(p + "bytes_received", "Chunk bytes appended to "
                                      "staging", registry=r)
        self.bundles = Counter(p + "bundles", "Bundles acknowledged, by outcome (stored, "
                               "duplicate, indexed)", ["outcome"], registry=r)
        self.resumed = Counter(p + "resumed", "Offers answered with an offset > 0 (from "
                               "staging, or taken over from a dead connection)", registry=r)
        self.bad_hash = Counter(p + "bad_hash", "Commits whose sha256 did not verify",
                                registry=r)
        self.storage_errors = Counter(p + "storage_errors", "Storage operations that "
                                      "failed", registry=r)
        self.auth_failures = Counter(p + "auth_failures", "Handshakes refused (unknown "
                                     "client key or bad CURVE)", registry=r)
        self.peers = Gauge(p + "peers", "Peers with a session", registry=r)
        self.transfers = Gauge(p + "transfers", "Open transfers", registry=r)
