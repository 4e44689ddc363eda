"""The agent's error hierarchy. Raise only for configuration and programming errors;
bad input from devices and peers is counted, not raised."""

from __future__ import annotations


class EdgecapError(Exception):
    """Base of every error edgecap raises on purpose."""


class ConfigError(EdgecapError):
    """A configuration file is unreadable or invalid.

    ``problems`` is a list of ``(key_path, message)``; ``str()`` renders one line each,
    prefixed by the file name, e.g. ``rig.toml: streams[0].rate_hz: expected a number > 0``.
    """

    def __init__(self, path: str, problems: list[tuple[str, str]]):
        self.path = path
        self.problems = problems
        super().__init__("\n".join(f"{path}: {key}: {msg}" if key else f"{path}: {msg}"
                                   for key, msg in problems))


class DriverError(EdgecapError):
    """A device cannot be opened (missing, no permission, wrong URI)."""


class BundleError(EdgecapError):
    """A segment or manifest is corrupt, truncated or does not verify."""


class RecorderError(EdgecapError):
    """The recorder cannot write (disk full, permission, I/O error)."""
