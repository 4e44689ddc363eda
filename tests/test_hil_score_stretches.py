"""The scorer's audio error per stretch of unchanged sound path (hil.score.stretch_stats)."""

from __future__ import annotations

import numpy as np
import pytest

from hil.score import RELOCK_GUARD_NS, stretch_stats

MS = 1_000_000
T = list(range(0, 60_000 * MS, 10 * MS))            # 60 s of 10 ms blocks


def _err(steps: dict[int, int], noise_ms: float = 0.0) -> list[int]:
    rng = np.random.default_rng(1)
    return [sum(v for at, v in steps.items() if t >= at) + int(rng.normal(0, noise_ms) * MS)
            for t in T]


def test_without_changes_there_is_one_stretch() -> None:
    st = stretch_stats(_err({}, 0.1), T, [], settle_from_ns=10_000 * MS)
    assert st["stretches"] == 1 and st["steps_ms"] == []
    assert 0.1 < st["spread_p99_ms"] < 0.4          # ~2.6 σ of 0.1 ms


def test_a_latency_step_at_a_sound_path_change_is_not_error() -> None:
    err = _err({30_000 * MS: 40 * MS}, 0.1)
    st = stretch_stats(err, T, [30_000 * MS], settle_from_ns=10_000 * MS)
    assert st["stretches"] == 2 and st["spread_p99_ms"] < 0.4
    assert st["steps_ms"] == [pytest.approx(40.0, abs=0.05)]


def test_a_step_without_a_sound_path_change_is_error() -> None:
    err = _err({30_000 * MS: 40 * MS}, 0.1)
    st = stretch_stats(err, T, [], settle_from_ns=10_000 * MS)
    assert st["stretches"] == 1 and st["spread_p99_ms"] > 19


def test_the_agent_gets_its_relock_time_after_a_replug() -> None:
    at = 30_000 * MS
    err = _err({at: 40 * MS})
    for i, t in enumerate(T):                        # re-acquiring: 5 ms off for 1.5 s
        if at <= t < at + 1_500 * MS:
            err[i] += 5 * MS
    st = stretch_stats(err, T, [], settle_from_ns=10_000 * MS, relocks_ns=[at])
    assert st["spread_p99_ms"] < 0.01
    assert st["n"] == sum(1 for t in T if t >= 10_000 * MS and not at <= t < at + RELOCK_GUARD_NS)

