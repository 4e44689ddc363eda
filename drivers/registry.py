"""Driver registry: keys such as ``camera.opencv`` map to Driver classes.

Built-in drivers are imported lazily (a rig without LiDAR never imports ouster-sdk); tests
register fakes with :func:`register` exactly like the real ones.
"""

from __future__ import annotations

from agent.registry import LazyRegistry

from .base import Driver

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

_REGISTRY: LazyRegistry[type[Driver]] = LazyRegistry("driver", BUILTIN)

#: ``@register("camera.opencv")`` makes a Driver class available under that key
register = _REGISTRY.register
known_keys = _REGISTRY.known_keys
#: the Driver class for a key; raises KeyError naming the known keys
get = _REGISTRY.get
