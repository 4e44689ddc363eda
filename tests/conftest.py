"""Shared fixtures. Tests run against the real libraries; fakes are registered like the
real drivers (see ``drivers.registry.register``)."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def root() -> Path:
    return ROOT


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
