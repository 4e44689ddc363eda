"""Device drivers: one module per device kind, each registered under a key such as
``camera.opencv`` (see :mod:`drivers.registry`)."""

from .base import Counters, Driver, DriverOptions
from .registry import get, known_keys, register

__all__ = ["Counters", "Driver", "DriverOptions", "get", "known_keys", "register"]
