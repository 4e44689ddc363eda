"""Driver registry: keys such as ``camera.opencv`` map to Driver classes.

Built-in drivers are imported lazily (a rig without LiDAR never imports ouster-sdk); tests
register fakes with :func:`register` exactly like the real ones.
"""

from __future__ import annotations

import importlib
from typing import Callable, TypeVar

from .base import Driver

D = TypeVar("D", bound=type[Driver])

#: key -> module that registers it when imported
BUILTIN: dict[str, str] = {
    "camera.synthetic": "drivers.synthetic",
    "audio.synthetic": "drivers.synthetic",
    "lidar.synthetic": "drivers.synthetic",
    "gps.synthetic": "drivers.synthetic",
    "camera.opencv": "drivers.camera",
    "audio.sounddevice": "drivers.audio",
    "lidar.ouster": "drivers.lidar",
    "gps.nmea": "drivers.gps",
    "replay.mcap": "agent.replay",
}

_REGISTRY: dict[str, type[Driver]] = {}


def register(key: str) -> Callable[[D], D]:
    """Class decorator: make ``cls`` available under ``key``."""

    def deco(cls: D) -> D:
        cls.key = key
        _REGISTRY[key] = cls
        return cls

    return deco


def known_keys() -> list[str]:
    return sorted(set(BUILTIN) | set(_REGISTRY))


def get(key: str) -> type[Driver]:
    """The Driver class for ``key``; raises KeyError naming the known keys."""
    if key not in _REGISTRY and key in BUILTIN:
        importlib.import_module(BUILTIN[key])
    try:
        return _REGISTRY[key]
    except KeyError:
        raise KeyError(f"unknown driver {key!r}; known: {', '.join(known_keys())}") from None
