"""Rig configuration: one TOML file per rig, validated before any device opens.

``load_config(path)`` returns a :class:`RigConfig` or raises :class:`ConfigError` whose
lines name the file, the key path (``streams[1].options.width``) and what was expected.
Each driver validates its own ``options`` table with its ``Options`` model, so option typos
are caught here too, not when the device opens.
"""

from __future__ import annotations

import hashlib
import json
import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from .errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamConfig(_Strict):
    """One ``[[streams]]`` entry: a device and how it is captured."""

    name: str = Field(description="topic path, e.g. /camera/front")
    driver: str = Field(description="registry key, e.g. camera.opencv")
    uri: str = ""
    rate_hz: float | None = Field(default=None, gt=0)
    required: bool = True
    queue_size: int = Field(default=64, ge=1, le=100_000)
    queue_mb: float = Field(default=256.0, gt=0)
    drop_policy: Literal["drop_oldest", "drop_newest"] = "drop_oldest"
    priority: int = Field(default=0, description="higher is kept longer when degrading")
    options: dict[str, Any] = Field(default_factory=dict)
    calibration: dict[str, Any] | None = None

    @field_validator("name")
    @classmethod
    def _topic(cls, v: str) -> str:
        if not v.startswith("/") or v.endswith("/") or "//" in v or " " in v:
            raise ValueError("expected a topic path such as /camera/front")
        return v


class LabelerConfig(_Strict):
    """One ``[[labelers]]`` entry: a model applied to some streams."""

    kind: str = Field(description="registry key, e.g. camera.yolo")
    streams: list[str] = Field(min_length=1)
    model: str | None = None
    every_n: int = Field(default=1, ge=1)
    max_rate_hz: float | None = Field(default=None, gt=0)
    threads: int = Field(default=1, ge=1, le=64)
    queue_size: int = Field(default=4, ge=1, le=1000)
    options: dict[str, Any] = Field(default_factory=dict)


class RecorderConfig(_Strict):
    out_dir: str = "recordings"
    window_s: float = Field(default=10.0, gt=0, le=3600)
    max_segment_mb: float = Field(default=2048.0, gt=0)
    compression: Literal["auto", "none", "zstd", "lz4"] = "auto"
    chunk_kb: int = Field(default=4096, ge=16, le=262_144)
    fsync_interval_s: float = Field(default=1.0, gt=0, le=60)
    late_grace_s: float = Field(default=1.0, ge=0, le=60)
    quota_gb: float | None = Field(default=None, gt=0)
    keep_s: float | None = Field(default=None, gt=0,
                                 description="untriggered segments expire after this")
    evict_triggered: bool = Field(default=False, description="quota may evict triggered "
                                  "segments that are not uploaded yet")


class TriggerConfig(_Strict):
    name: str
    kind: Literal["label", "speech", "geofence", "speed", "manual"]
    pre_s: float = Field(default=10.0, ge=0)
    post_s: float = Field(default=10.0, ge=0)
    priority: int = 1
    options: dict[str, Any] = Field(default_factory=dict)


class SyncConfig(_Strict):
    server: str = "tcp://127.0.0.1:7450"
    server_public_key: str | None = None
    client_secret_key_file: str | None = None
    insecure: bool = False
    spool_dir: str | None = Field(default=None, description="default: recorder.out_dir")
    bandwidth_kbps: float | None = Field(default=None, gt=0)
    delete_after_upload: bool = False
    chunk_kb: int = Field(default=1024, ge=16, le=65536)
    window: int | Literal["auto"] = Field(
        default="auto", description='chunks in flight: "auto" (one chunk plus rate x round '
        'trip, docs/sync.md) or a fixed 1..256')
    window_max: int = Field(default=8, ge=1, le=256,
                            description='most chunks in flight with window = "auto"')
    upload_hours: list[str] = Field(default_factory=list,
                                    description='local-time windows, e.g. ["22:00-06:00"]')
    poll_s: float = Field(default=2.0, gt=0, le=3600, description="spool scan interval")
    timeout_s: float = Field(default=10.0, gt=0, le=600, description="silent link is dead")
    reconnect_max_s: float = Field(default=30.0, gt=0, le=3600)
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("upload_hours")
    @classmethod
    def _hours(cls, v: list[str]) -> list[str]:
        import re

        for w in v:
            m = re.fullmatch(r"([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-4]):([0-5]\d)", w)
            if not m or (m[3] == "24" and m[4] != "00"):
                raise ValueError(f"expected windows like '22:00-06:00', got {w!r}")
        return v

    @field_validator("window", mode="before")
    @classmethod
    def _window(cls, v: Any) -> Any:
        if v == "auto" or (type(v) is int and 1 <= v <= 256):
            return v
        raise ValueError(f'expected "auto" or a whole number of chunks from 1 to 256, '
                         f'got {v!r}')

    @model_validator(mode="after")
    def _plain_only_on_loopback(self) -> "SyncConfig":
        if self.insecure and not loopback_endpoint(self.server):
            raise ValueError(f"insecure = true (no CURVE encryption) is allowed only for a "
                             f"loopback server such as tcp://127.0.0.1:7450, not {self.server}")
        return self


def loopback_endpoint(endpoint: str) -> bool:
    """True for a ZeroMQ endpoint that cannot leave this machine: ``ipc://``/``inproc://``
    or ``tcp://`` on localhost, 127.0.0.0/8 or ::1."""
    import ipaddress

    scheme, _, rest = endpoint.partition("://")
    if scheme in ("ipc", "inproc"):
        return True
    if scheme != "tcp":
        return False
    host = rest.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ProvenanceConfig(_Strict):
    source: str = "unspecified"
    collection_method: str = "unspecified"
    consent_status: Literal["unknown", "not_required", "obtained", "pending",
                            "withdrawn"] = "unknown"
    annotation_approach: str = "on-device pre-labels, human review pending"
    known_limitations: list[str] = Field(default_factory=list)


class ClockConfig(_Strict):
    timebase: Literal["monotonic", "realtime", "tai", "ptp"] = "monotonic"
    ptp_device: str | None = None
    options: dict[str, Any] = Field(default_factory=dict,
                                    description="agent.clock.ClockOptions (docs/clock.md)")

    @field_validator("options")
    @classmethod
    def _clock_options(cls, v: dict[str, Any]) -> dict[str, Any]:
        from .clock import ClockOptions

        return ClockOptions.model_validate(v).model_dump()

    @model_validator(mode="after")
    def _ptp_needs_device(self) -> "ClockConfig":
        if self.timebase == "ptp" and not self.ptp_device:
            raise ValueError("timebase = 'ptp' needs ptp_device (e.g. /dev/ptp0)")
        return self


class OperationsConfig(_Strict):
    """``[operations]``: systemd watchdog, metrics endpoint (see docs/operations.md)."""

    stall_periods: float = Field(default=3.0, gt=0, description="a required stream with no "
                                 "sample for max(stall_periods / rate_hz, stall_min_s) is stalled")
    stall_min_s: float = Field(default=1.0, gt=0)
    stall_unknown_rate_s: float = Field(default=5.0, gt=0,
                                        description="stall deadline of a stream without rate_hz")
    require_clock_lock: bool = True
    clock_lock_grace_s: float = Field(default=30.0, ge=0,
                                      description="after READY, an unlocked clock is tolerated")
    degraded_ok: bool = Field(default=False, description="keep feeding the watchdog while "
                              "unhealthy, with a loud STATUS")
    status_interval_s: float = Field(default=2.0, gt=0, le=600)
    metrics_port: int = Field(default=9108, ge=0, le=65535, description="0 = no endpoint")
    metrics_bind: str = "127.0.0.1"


class RigConfig(_Strict):
    """The whole rig file. ``source_path`` and ``digest`` are filled by ``load_config``."""

    device_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    clock: ClockConfig = Field(default_factory=ClockConfig)
    streams: list[StreamConfig] = Field(min_length=1)
    labelers: list[LabelerConfig] = Field(default_factory=list)
    recorder: RecorderConfig = Field(default_factory=RecorderConfig)
    triggers: list[TriggerConfig] = Field(default_factory=list)
    sync: SyncConfig = Field(default_factory=SyncConfig)
    provenance: ProvenanceConfig = Field(default_factory=ProvenanceConfig)
    operations: OperationsConfig = Field(default_factory=OperationsConfig)

    source_path: str = Field(default="<memory>", exclude=True)
    digest: str = Field(default="", exclude=True)

    @model_validator(mode="after")
    def _unique_streams(self) -> "RigConfig":
        names = [s.name for s in self.streams]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"stream names must be unique; repeated: {', '.join(dup)}")
        known = set(names)
        for i, lab in enumerate(self.labelers):
            missing = [s for s in lab.streams if s not in known]
            if missing:
                raise ValueError(f"labelers[{i}] names unknown streams {missing}; "
                                 f"configured: {sorted(known)}")
        return self

    def stream(self, name: str) -> StreamConfig:
        for s in self.streams:
            if s.name == name:
                return s
        raise KeyError(name)


def _key_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _problems(err: ValidationError, prefix: tuple[Any, ...] = ()) -> list[tuple[str, str]]:
    probs = []
    for e in err.errors():
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see docs/config.md)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif "input" in e and e["type"] not in ("value_error", "model_type"):
            msg = f"{msg}, got {e['input']!r}"
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        probs.append((_key_path(prefix + tuple(e["loc"])), msg))
    return probs


def _validate_driver_options(cfg: RigConfig) -> list[tuple[str, str]]:
    from drivers import registry

    probs: list[tuple[str, str]] = []
    for i, s in enumerate(cfg.streams):
        try:
            cls = registry.get(s.driver)
        except KeyError as e:
            probs.append((f"streams[{i}].driver", str(e.args[0])))
            continue
        except ImportError as e:  # a driver whose library is missing on this machine
            probs.append((f"streams[{i}].driver", f"cannot load {s.driver}: {e}"))
            continue
        try:
            s.options = cls.Options.model_validate(s.options).model_dump()
        except ValidationError as e:
            probs.extend(_problems(e, ("streams", i, "options")))
    return probs


def parse_config(data: dict[str, Any], path: str = "<memory>",
                 check_drivers: bool = True) -> RigConfig:
    """Validate an already-parsed TOML table. Raises ConfigError listing every problem."""
    try:
        cfg = RigConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(path, _problems(e)) from None
    if check_drivers:
        probs = _validate_driver_options(cfg)
        if probs:
            raise ConfigError(path, probs)
    cfg.source_path = path
    canon = json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()
    cfg.digest = hashlib.sha256(canon).hexdigest()
    return cfg


def read_toml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a TOML file; ConfigError naming the file when it is unreadable or invalid."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(str(p), [("", f"cannot read file: {e.strerror}")]) from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(str(p), [("", f"not valid TOML: {e}")]) from None


def load_config(path: str | os.PathLike[str], check_drivers: bool = True) -> RigConfig:
    """Read and validate a rig TOML file. Relative ``recorder.out_dir`` stays relative to
    the current directory (as a user typing a path expects)."""
    return parse_config(read_toml(path), str(path), check_drivers)
