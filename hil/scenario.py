"""HIL scenario files (TOML): the synthetic world, its events and every emulated device's
clock and faults. ``load_scenario(path_or_name)`` validates like the rig config does
(unknown keys rejected, errors name the file and key path).

Shipped scenarios live in ``hil/scenarios/<name>.toml`` and load by bare name
(``city-drive``). Positions are metres in a local east-north-up frame whose origin is
``[origin]``; times are seconds from the start of the run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agent.config import _problems, read_toml
from agent.errors import ConfigError

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"

ObjectClass = Literal["car", "pedestrian", "cyclist", "sign"]
FaultKind = Literal["dropout", "corrupt", "disconnect", "stall", "truncate", "garbage",
                    "bad_checksum", "outage", "overexpose", "underexpose", "blur", "freeze",
                    "clip", "silence"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Origin(_Strict):
    lat: float = Field(ge=-90, le=90)
    lon: float = Field(ge=-180, le=180)
    alt: float = 0.0


class Waypoint(_Strict):
    """Drive to ``(x, y)`` at ``speed_mps``; then wait ``stop_s`` seconds there."""

    x: float
    y: float
    speed_mps: float = Field(default=8.0, gt=0, le=70)
    stop_s: float = Field(default=0.0, ge=0)


class WorldObject(_Strict):
    """A box in the world. Static at ``position`` or moving along ``path`` (looped)."""

    id: str
    cls: ObjectClass = Field(alias="class")
    size: tuple[float, float, float] = Field(description="length, width, height in m")
    position: tuple[float, float, float] = (0.0, 0.0, 0.0)
    yaw: float = 0.0
    path: list[tuple[float, float]] = Field(default_factory=list)
    speed_mps: float = Field(default=1.4, gt=0)
    appear_s: float = 0.0
    vanish_s: float | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class SoundEvent(_Strict):
    kind: Literal["horn", "click", "siren"]
    t_s: float = Field(ge=0)
    duration_s: float = Field(default=0.3, gt=0, le=30)


class Speech(_Strict):
    t_s: float = Field(ge=0)
    text: str = Field(min_length=1)


class Fault(_Strict):
    """A fault at ``t_s`` lasting ``duration_s``. ``rate`` is the share of samples or
    packets hit while it lasts (1 = all)."""

    kind: FaultKind
    t_s: float = Field(ge=0)
    duration_s: float = Field(default=1.0, ge=0)
    rate: float = Field(default=1.0, gt=0, le=1)


class DeviceSettings(_Strict):
    """One emulated device: rate, its clock against the truth, arrival jitter, faults."""

    enabled: bool = True
    rate_hz: float | None = Field(default=None, gt=0)
    clock_offset_s: float = 0.0
    drift_ppm: float = Field(default=0.0, ge=-1000, le=1000)
    jitter_mean_ms: float = Field(default=0.0, ge=0)
    spike_ms: float = Field(default=0.0, ge=0)
    spike_prob: float = Field(default=0.0, ge=0, le=1)
    faults: list[Fault] = Field(default_factory=list)
    options: dict[str, Any] = Field(default_factory=dict)


class Devices(_Strict):
    camera: DeviceSettings = Field(default_factory=lambda: DeviceSettings(rate_hz=30))
    lidar: DeviceSettings = Field(default_factory=lambda: DeviceSettings(rate_hz=10))
    gps: DeviceSettings = Field(default_factory=lambda: DeviceSettings(rate_hz=10))
    audio: DeviceSettings = Field(default_factory=lambda: DeviceSettings(rate_hz=48000))


class Scenario(_Strict):
    name: str
    description: str = ""
    duration_s: float = Field(gt=0)
    seed: int = 0
    origin: Origin
    trajectory: list[Waypoint] = Field(min_length=1)
    objects: list[WorldObject] = Field(default_factory=list)
    sounds: list[SoundEvent] = Field(default_factory=list)
    speech: list[Speech] = Field(default_factory=list)
    clapper_s: list[float] = Field(default_factory=list)
    lighting: list[tuple[float, float]] = Field(
        default_factory=list, description="(t_s, brightness 0..2) keyframes")
    devices: Devices = Field(default_factory=Devices)
    assertions: dict[str, float] = Field(default_factory=dict)

    source_path: str = Field(default="<memory>", exclude=True)

    @model_validator(mode="after")
    def _ids_unique(self) -> "Scenario":
        ids = [o.id for o in self.objects]
        if len(ids) != len(set(ids)):
            raise ValueError("object ids must be unique")
        return self


def scenario_path(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix == ".toml" or p.exists():
        return p
    return SCENARIO_DIR / f"{name_or_path}.toml"


def load_scenario(name_or_path: str | Path, duration_s: float | None = None) -> Scenario:
    """Load a shipped scenario by name or any scenario file by path; ``duration_s``
    overrides the file's duration (events after it simply never happen)."""
    p = scenario_path(name_or_path)
    if not p.exists():
        shipped = ", ".join(sorted(x.stem for x in SCENARIO_DIR.glob("*.toml")))
        raise ConfigError(str(p), [("", f"no such scenario; shipped: {shipped}")])
    data = read_toml(p)
    if duration_s is not None:
        data["duration_s"] = duration_s
    try:
        sc = Scenario.model_validate(data)
    except ValidationError as e:
        raise ConfigError(str(p), _problems(e)) from None
    sc.source_path = str(p)
    return sc
