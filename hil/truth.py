"""Ground truth written by the emulators during a HIL run.

Layout of a run directory: ``truth/<device>.jsonl`` with one JSON object a line —
``{"type": "clock", ...}`` first (the device clock), then one record per thing sent
(``{"type": "sample", "seq", "true_ns", "device_ns", ...}``), deliberate faults
(``{"type": "fault", "kind", "seq"|"true_ns", ...}``) and, for world facts shared by all
devices, ``truth/world.jsonl`` (events, boxes). ``read_truth`` loads it back.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Iterator


class TruthLog:
    """Append-only JSONL log; ``write`` may be called from any thread (a lock serialises
    writers) and never raises on a full disk: it counts ``failed`` writes instead."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._f = open(path, "a", buffering=1 << 16)
        self._lock = threading.Lock()
        self.failed = 0

    def write(self, rec: dict[str, Any]) -> None:
        line = json.dumps(rec, separators=(",", ":"))
        with self._lock:
            try:
                self._f.write(line + "\n")
            except OSError:
                self.failed += 1

    def close(self) -> None:
        with self._lock:
            self._f.close()


def read_truth(path: Path) -> Iterator[dict[str, Any]]:
    with open(path) as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
