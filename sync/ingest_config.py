"""Ingest server configuration: ``ingest.toml``, validated before a socket opens.

``load_ingest_config(path)`` returns an :class:`IngestConfig` or raises
:class:`agent.errors.ConfigError` whose lines name the file, the key path
(``storage.options.bucket``) and what was expected — the same style as rig files. The
storage backend validates its own ``[storage.options]`` table. Relative paths are relative
to the current directory. See docs/sync.md for every key.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.config import _problems, loopback_endpoint, read_toml
from agent.errors import ConfigError

from . import storage
from .protocol import Limits


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LimitsConfig(_Strict):
    """Bounds on what one peer may send or hold (docs/sync-protocol.md, "Limits")."""

    max_chunk_kb: int = Field(default=4096, ge=16, le=65536)
    max_manifest_kb: int = Field(default=512, ge=1, le=16384)
    max_bundle_mb: int = Field(default=65536, ge=1, le=1 << 24)
    window: int = Field(default=16, ge=1, le=1024, description="chunks a client may send "
                        "ahead of acks (it uses the smaller of this and its own)")
    max_peers: int = Field(default=64, ge=1, le=100_000)
    max_peers_per_key: int = Field(default=4, ge=1, le=1000)
    max_transfers_per_peer: int = Field(default=4, ge=1, le=1000)
    max_transfers_per_device: int = Field(default=8, ge=1, le=10_000)
    msgs_per_s: float = Field(default=5000.0, gt=0, description="per peer, sustained")
    msg_burst: int = Field(default=2000, ge=1)
    max_errors: int = Field(default=50, ge=1, description="protocol errors before a mute")
    mute_s: float = Field(default=30.0, ge=0)
    peer_idle_s: float = Field(default=120.0, gt=0)
    staging_max_age_h: float = Field(default=72.0, gt=0)

    def protocol_limits(self) -> Limits:
        return Limits(max_chunk=self.max_chunk_kb << 10,
                      max_manifest=self.max_manifest_kb << 10,
                      max_bundle=self.max_bundle_mb << 20)


class StorageConfig(_Strict):
    backend: str = Field(default="fs", description="registry key: fs, s3, …")
    options: dict[str, Any] = Field(default_factory=dict)


class IngestConfig(_Strict):
    """The whole ``ingest.toml``. ``source_path`` is filled by the loader."""

    listen: str = Field(default="tcp://127.0.0.1:7450", pattern=r"^(tcp|ipc)://.+$")
    server_id: str = Field(default_factory=socket.gethostname, max_length=128)
    insecure: bool = False
    server_secret_key_file: str | None = None
    clients_dir: str | None = Field(default=None, description="allow-list: client *.key")
    device_keys: Literal["any", "name"] = Field(
        default="any", description="'name': a client key NAME.key may upload only as "
        "device NAME")
    staging_dir: str = "ingest-staging"
    workers: int = Field(default=2, ge=1, le=64)
    metrics_port: int | None = Field(default=None, ge=1, le=65535)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)

    source_path: str = Field(default="<memory>", exclude=True)

    @model_validator(mode="after")
    def _security(self) -> "IngestConfig":
        if self.insecure:
            if not loopback_endpoint(self.listen):
                raise ValueError(f"insecure = true (no CURVE encryption) is allowed only on "
                                 f"a loopback address such as tcp://127.0.0.1:7450, not "
                                 f"{self.listen}")
        return self


def parse_ingest_config(data: dict[str, Any], path: str = "<memory>") -> IngestConfig:
    """Validate an already-parsed TOML table; raises ConfigError listing every problem."""
    try:
        cfg = IngestConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(path, _problems(e)) from None
    probs: list[tuple[str, str]] = []
    if not cfg.insecure:
        for key in ("server_secret_key_file", "clients_dir"):
            if getattr(cfg, key) is None:
                probs.append((key, "required key is missing (CURVE is on unless "
                                   "insecure = true on loopback); see docs/sync.md"))
    try:
        cls = storage.get(cfg.storage.backend)
    except KeyError as e:
        probs.append(("storage.backend", str(e.args[0])))
    except ImportError as e:
        probs.append(("storage.backend", f"cannot load {cfg.storage.backend}: {e}"))
    else:
        try:
            cfg.storage.options = cls.Options.model_validate(cfg.storage.options).model_dump()
        except ValidationError as e:
            probs.extend(_problems(e, ("storage", "options")))
    if probs:
        raise ConfigError(path, probs)
    cfg.source_path = path
    return cfg


def load_ingest_config(path: str | Path) -> IngestConfig:
    """Read and validate an ``ingest.toml``."""
    return parse_ingest_config(read_toml(path), str(path))
