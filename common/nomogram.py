"""Nomogram: a points scale for a linear model, and the outcome it implies.

Each predictor's axis spans its range; the predictor whose coefficient moves the linear
predictor most across its range gets 0–100 points, the others proportionally, and every
axis starts at the value of lowest risk (so points only add risk). Total points map back to
the linear predictor exactly — ``linear_predictor(total_points(x)) == intercept + x·β`` —
and from there to survival at a horizon (Cox: ``S(t|x) = exp(-H₀(t)·exp(x·β))``) or to a
probability (logistic). Ranges come from pooled moments (mean ± 2 SD; 0/1 for binary
columns) because a minimum or maximum is one patient's value and never leaves a site.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Axis", "Nomogram", "build_nomogram", "axis_ranges", "survival_at", "linear_predictor_for_survival",
           "MAX_POINTS"]

MAX_POINTS = 100.0
SPREAD_SD = 2.0


@dataclass(frozen=True)
class Axis:
    name: str
    coef: float
    low: float
    high: float
    binary: bool = False
    integer: bool = False   # whole-number column (grade, stage): ticks at whole numbers

    @property
    def reference(self) -> float:
        """The value that scores 0 points: the low-risk end."""
        return self.low if self.coef >= 0 else self.high


@dataclass(frozen=True)
class Nomogram:
    axes: tuple[Axis, ...]
    intercept: float   # logistic intercept; 0 for Cox
    scale: float       # linear-predictor units per point

    @property
    def offset(self) -> float:
        """Linear predictor at 0 total points."""
        return self.intercept + sum(a.coef * a.reference for a in self.axes)

    def points(self, name: str, value) -> np.ndarray:
        axis = next(a for a in self.axes if a.name == name)
        return axis.coef * (np.asarray(value, dtype=float) - axis.reference) / self.scale

    def total_points(self, values: dict) -> np.ndarray:
        return sum(self.points(a.name, values[a.name]) for a in self.axes)

    def linear_predictor(self, total) -> np.ndarray:
        return self.offset + np.asarray(total, dtype=float) * self.scale

    def points_for_linear_predictor(self, lp) -> np.ndarray:
        return (np.asarray(lp, dtype=float) - self.offset) / self.scale

    def max_total(self) -> float:
        return float(sum(abs(a.coef) * (a.high - a.low) for a in self.axes) / self.scale)

    def to_dict(self) -> dict:
        return {"intercept": self.intercept, "scale": self.scale, "offset": self.offset,
                "axes": [{"name": a.name, "coef": a.coef, "low": a.low, "high": a.high, "binary": a.binary,
                          "integer": a.integer, "points_per_unit": abs(a.coef) / self.scale} for a in self.axes]}


def axis_ranges(n: float, col_sum, col_sumsq, binary, integer=None,
                nonnegative=None) -> list[tuple[float, float, bool, bool]]:
    """(low, high, binary, integer) per column from pooled n, Σx, Σx², an all-0/1 flag, an
    all-whole-numbers flag (range rounded inward to whole numbers) and an all-≥0 flag (a size
    or Ki-67 axis does not run below 0)."""
    mean = np.asarray(col_sum, dtype=float) / n
    var = np.maximum(np.asarray(col_sumsq, dtype=float) / n - mean ** 2, 0.0) * n / max(n - 1, 1)
    sd = np.sqrt(var)
    integer = np.zeros(len(mean), bool) if integer is None else np.asarray(integer, dtype=bool)
    nonnegative = np.zeros(len(mean), bool) if nonnegative is None else np.asarray(nonnegative, dtype=bool)
    ranges = []
    for m, s, b, i, positive in zip(mean, sd, np.asarray(binary, dtype=bool), integer, nonnegative):
        low, high = m - SPREAD_SD * s, m + SPREAD_SD * s
        low = max(low, 0.0) if positive else low
        if b:
            low, high = 0.0, 1.0
        elif i:
            low, high = np.ceil(low), np.floor(high)  # inward: stays within the 2 SD
        ranges.append((float(low), float(high), bool(b), bool(i or b)))
    return ranges


def build_nomogram(coefficients: dict[str, float], ranges: dict[str, tuple[float, float, bool]],
                   intercept: float = 0.0) -> Nomogram:
    """Axes for every non-zero coefficient (a zero one adds no points and no axis)."""
    axes = tuple(Axis(name, float(coef), *ranges[name]) for name, coef in coefficients.items()
                 if coef != 0 and name != "intercept")
    if not axes:
        raise ValueError("a nomogram needs at least one non-zero coefficient")
    widest = max(abs(a.coef) * (a.high - a.low) for a in axes)
    if widest <= 0:
        raise ValueError("every predictor of the nomogram is constant")
    return Nomogram(axes=axes, intercept=float(intercept), scale=widest / MAX_POINTS)


def survival_at(lp, cumulative_hazard: float) -> np.ndarray:
    return np.exp(-cumulative_hazard * np.exp(np.asarray(lp, dtype=float)))


def linear_predictor_for_survival(survival, cumulative_hazard: float) -> np.ndarray:
    return np.log(-np.log(np.asarray(survival, dtype=float)) / cumulative_hazard)
