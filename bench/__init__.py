"""Benchmarks. Each ``bench/bench_<name>.py`` defines ``run(quick: bool) -> list[Result]``;
``python -m bench [NAME ...] [--quick]`` runs them, prints one table and writes
``bench/results/<name>.json``. Figures are ratios against a peer or a physical limit
measured in the same run, because these machines are noisy."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Result:
    """One figure. ``ratio`` is ours / reference (or as ``ratio_desc`` says); ``goal`` the
    ratio the issue asks for and ``higher_is_better`` which side passes."""

    name: str
    value: float
    unit: str
    reference: str = ""
    ratio: float | None = None
    goal: float | None = None
    higher_is_better: bool = True
    ratio_desc: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool | None:
        if self.goal is None or self.ratio is None:
            return None
        return self.ratio >= self.goal if self.higher_is_better else self.ratio <= self.goal

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}
