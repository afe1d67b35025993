"""Percentiles and the rows of the result table."""

from __future__ import annotations

import math
import re
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

    @property
    def status(self) -> str:
        """ "met" or "missed" against `target`; "" when there is none, or it is stated for
        another size than the one measured (a target with its size in parentheses, e.g.
        "< 1 s (100,000)", is judged only when the metric names that size)."""
        return verdict(self.target, self.metric, self.jitmesh, self.ratio, self.unit)

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["ratio"] = self.ratio
        out["status"] = self.status
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


_TARGET = re.compile(r"(<=|>=|<|>)?\s*([0-9][0-9,.]*)\s*(x|s|ms|%|KiB|MiB|MB|/s)?\s*(?:\((.+)\))?$")
_SCALE = {("s", "ms"): 1000.0, ("MB", "MiB"): 1.0}


def verdict(target: str, metric: str, value: float, ratio_: float, unit: str) -> str:
    """Whether `value` (or the ratio, for a target in "x") meets `target` ("<= 1.5x",
    ">= 2000", "<= 30 s", "0 %", "< 1 s (100,000)"); "" when it cannot be judged here."""
    found = _TARGET.match(target.strip())
    if found is None or math.isnan(value):
        return ""
    op, number, tunit, size = found.groups()
    if size and size.replace(",", "") not in metric.replace(",", ""):
        return ""
    bound = float(number.replace(",", ""))
    subject = value
    if tunit == "x":
        if math.isnan(ratio_):
            return ""
        subject = ratio_
    elif tunit and tunit != unit:
        bound *= _SCALE.get((tunit, unit), 1.0)
    ok = {
        "<=": subject <= bound,
        ">=": subject >= bound,
        "<": subject < bound,
        ">": subject > bound,
        None: subject == bound,
    }[op]
    return "met" if ok else "missed"
