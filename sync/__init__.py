"""Sync service: the edge-side spool and uploader, and the fleet-side ingest server with its
storage backends. The edge side (``sync.spool``, ``sync.uploader``) never imports the fleet
side (``sync.ingest``, ``sync.storage``); they meet on the wire and at the spool directory."""
