"""Paired comparisons: two methods measured on the same units (seed; target and seed; task
and seed), their differences, the mean difference and a 95% interval over the units.

The interval is Student's t over the units' differences: `mean +- t(0.975, n - 1) * sd / sqrt(n)`.
With one unit there is no spread to measure and the interval is unbounded.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

LEVEL = 0.95
INTERVAL = "95% t-interval over units"


@dataclass(frozen=True)
class Paired:
    """Differences `a - b` in points (100 x the metric), unit by unit, and their summary."""

    units: tuple[tuple, ...]
    diffs: tuple[float, ...]

    @property
    def n(self) -> int:
        return len(self.diffs)

    @property
    def mean(self) -> float:
        return float(np.mean(self.diffs)) if self.diffs else math.nan

    @property
    def interval(self) -> tuple[float, float]:
        return t_interval(self.diffs)

    def verdict(self, target: float) -> str:
        """`met` when the interval lies above `target`, `not met` when below, else `undecided`."""
        lo, hi = self.interval
        if self.n and lo > target:
            return "met"
        if self.n and hi < target:
            return "not met"
        return "undecided"

    def text(self) -> str:
        """`+1.2 [-0.3, +2.7], n = 24`."""
        lo, hi = self.interval
        return f"{self.mean:+.1f} [{lo:+.1f}, {hi:+.1f}], n = {self.n}"


def t_quantile(p: float, dof: int) -> float:
    """The `p` quantile of Student's t with `dof` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(p, dof))


def t_interval(diffs: Sequence[float], level: float = LEVEL) -> tuple[float, float]:
    """The `level` t-interval of the mean of `diffs` (unbounded with fewer than two)."""
    n = len(diffs)
    if n < 2:
        return -math.inf, math.inf
    d = np.asarray(diffs, dtype=np.float64)
    half = t_quantile(0.5 + level / 2, n - 1) * d.std(ddof=1) / math.sqrt(n)
    return float(d.mean() - half), float(d.mean() + half)


def pair(a: Sequence[dict], b: Sequence[dict], unit: Sequence[str], value_a: Callable[[dict], float | None],
         value_b: Callable[[dict], float | None], scale: float = 100.0) -> Paired:
    """The paired differences `scale * (a - b)` of rows `a` and rows `b` on the units (tuples
    of the `unit` fields) both hold a value for. A unit with two rows on one side is an
    error: the comparison would not be paired."""
    def index(rows: Sequence[dict], value: Callable[[dict], float | None], side: str) -> dict[tuple, float]:
        out: dict[tuple, float] = {}
        for r in rows:
            v = value(r)
            if v is None:
                continue
            key = tuple(r.get(k) for k in unit)
            if key in out:
                raise ValueError(f"two {side} rows for the unit {dict(zip(unit, key))}: not a paired comparison")
            out[key] = float(v)
        return out

    ia, ib = index(a, value_a, "first"), index(b, value_b, "second")
    units = tuple(sorted((k for k in ia if k in ib), key=str))
    return Paired(units, tuple(scale * (ia[k] - ib[k]) for k in units))
