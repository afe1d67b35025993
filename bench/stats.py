"""Percentiles and the rows of the result table."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100.0 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def median(values: Sequence[float]) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[mid]
    return (ordered[mid - 1] + ordered[mid]) / 2


def ratio(a: float, b: float) -> float:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan


@dataclass
class Row:
    """One line of the table: a metric of a scenario, jitmesh against the baseline."""

    scenario: str
    metric: str
    jitmesh: float
    baseline: float = math.nan
    unit: str = "ms"
    target: str = ""
    note: str = ""

    @property
    def ratio(self) -> float:
        return ratio(self.jitmesh, self.baseline)

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["ratio"] = self.ratio
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in out.items()}


@dataclass
class Scenario:
    name: str
    size: str
    real: str
    rows: list[Row] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    error: str = ""

    def add(self, metric: str, jitmesh: float, baseline: float = math.nan, **kw: str) -> None:
        self.rows.append(Row(self.name, metric, jitmesh, baseline, **kw))
