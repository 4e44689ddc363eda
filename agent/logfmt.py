"""Structured log lines that read well in journald and in a terminal.

Each record becomes one line of ``key=value`` pairs (logfmt): ``level``, ``logger``,
``msg``, then any ``extra={...}`` fields, then ``exc`` (the traceback, newlines escaped so
one record stays one journal entry). Under journald (``$JOURNAL_STREAM`` names our stderr)
each line starts with the syslog priority ``<N>`` — journald strips it and files the entry
at that priority (``journalctl -p warning`` works) — and no timestamp is written, since the
journal keeps its own. Elsewhere lines start with ``ts=`` (UTC, ms).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import IO, Any

#: Python level → syslog priority (sd-daemon(3))
PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
            logging.DEBUG: 7}

_STD_ATTRS = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message", "asctime", "taskName"}


def priority(levelno: int) -> int:
    """Syslog priority of a Python log level (levels between map to the next severer)."""
    for lvl in sorted(PRIORITY, reverse=True):
        if levelno >= lvl:
            return PRIORITY[lvl]
    return 7


def under_journal(stream: IO[Any] | None = None) -> bool:
    """True when ``stream`` (default stderr) is connected to journald, per
    ``$JOURNAL_STREAM=<dev>:<inode>`` (systemd.exec(5)); False on any doubt."""
    val = os.environ.get("JOURNAL_STREAM", "")
    if ":" not in val:
        return False
    stream = sys.stderr if stream is None else stream
    try:
        dev, ino = (int(x) for x in val.split(":", 1))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return st.st_dev == dev and st.st_ino == ino


def quote(value: Any) -> str:
    """A logfmt value: bare when safe, else double-quoted with ``\\ " \\n`` escaped."""
    s = value if isinstance(value, str) else repr(value) if isinstance(value, float) else str(value)
    if s and not any(c in s for c in ' ="\\\n\r\t'):
        return s
    return '"' + (s.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
                  .replace("\r", "\\r").replace("\t", "\\t")) + '"'


class KeyValueFormatter(logging.Formatter):
    """logfmt lines; ``journal`` selects the ``<N>`` prefix (default: detect)."""

    def __init__(self, journal: bool | None = None):
        super().__init__()
        self.journal = under_journal() if journal is None else journal

    def format(self, record: logging.LogRecord) -> str:
        pairs: list[tuple[str, Any]] = []
        if not self.journal:
            t = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            pairs.append(("ts", f"{t}.{int(record.msecs):03d}Z"))
        pairs += [("level", record.levelname.lower()), ("logger", record.name),
                  ("msg", record.getMessage())]
        for k, v in record.__dict__.items():
            if k not in _STD_ATTRS and not k.startswith("_"):
                pairs.append((k, v))
        if record.exc_info:
            pairs.append(("exc", self.formatException(record.exc_info)))
        line = " ".join(f"{k}={quote(v)}" for k, v in pairs)
        return f"<{priority(record.levelno)}>{line}" if self.journal else line


def configure_logging(level: int = logging.WARNING, stream: IO[Any] | None = None) -> None:
    """Install one stderr handler with :class:`KeyValueFormatter` on the root logger
    (replacing handlers a previous call installed). Call once, from the CLI entry point."""
    stream = sys.stderr if stream is None else stream
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_edgecap", False):
            root.removeHandler(h)
    h = logging.StreamHandler(stream)
    h.setFormatter(KeyValueFormatter(journal=under_journal(stream)))
    h._edgecap = True  # type: ignore[attr-defined]
    root.addHandler(h)
    root.setLevel(level)
