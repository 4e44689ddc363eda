"""Shared fixtures. Tests run against the real libraries; fakes are registered like the
real drivers (see ``drivers.registry.register``)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def root() -> Path:
    return ROOT


#: attempts for a ``realtime`` test: it judges timing on a shared host (a VM's vCPU can be
#: stolen for 100 ms), so one spoiled attempt is not a verdict; three spoiled ones are
REALTIME_RERUNS = 2


def pytest_collection_modifyitems(config, items):
    """A ``realtime`` test is re-run (pytest-rerunfailures) when it fails, at most
    ``REALTIME_RERUNS`` times, a second apart; the rerun is reported as such."""
    for item in items:
        if item.get_closest_marker("realtime") and not item.get_closest_marker("flaky"):
            item.add_marker(pytest.mark.flaky(reruns=REALTIME_RERUNS, reruns_delay=1))


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
