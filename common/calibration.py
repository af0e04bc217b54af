"""Calibration of predicted probabilities, from sums a site can send.

Bins are fixed by the coordinator (e.g. the training cohort's risk deciles), so per-bin
counts add up across sites and the pooled calibration curve and Hosmer–Lemeshow statistic
are exact. Calibration-in-the-large comes from Σy and Σp; the calibration slope is the
logistic regression of y on logit(p) (intercept + slope), fitted by the same federated
Newton as every logistic model (:func:`fedrad.common.logistic.site_logistic_newton` on the design
``[1, logit p]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = ["CalibrationSums", "site_calibration_sums", "combine_calibration_sums", "calibration_table",
           "hosmer_lemeshow", "calibration_in_the_large", "in_the_large", "slope_design", "decile_edges", "EPS"]

#: probabilities are clipped to [EPS, 1 - EPS] before taking logits
EPS = 1e-12


@dataclass(frozen=True)
class CalibrationSums:
    """Per bin: cases n, observed events Σy, expected events Σp, and Σp(1−p)."""

    edges: np.ndarray
    n: np.ndarray
    observed: np.ndarray
    expected: np.ndarray
    variance: np.ndarray


def decile_edges(p, groups: int = 10) -> np.ndarray:
    """Interior cut points at the quantiles of ``p`` (from the training cohort), plus ±inf."""
    inner = np.quantile(np.asarray(p, float), np.linspace(0, 1, groups + 1)[1:-1])
    return np.r_[-np.inf, inner, np.inf]


def site_calibration_sums(y, p, edges) -> CalibrationSums:
    y, p, edges = np.asarray(y, float), np.asarray(p, float), np.asarray(edges, float)
    which = np.clip(np.searchsorted(edges, p, side="left") - 1, 0, len(edges) - 2)  # (a, b] as pandas.qcut
    k = len(edges) - 1
    return CalibrationSums(edges=edges, n=np.bincount(which, minlength=k).astype(float),
                           observed=np.bincount(which, weights=y, minlength=k),
                           expected=np.bincount(which, weights=p, minlength=k),
                           variance=np.bincount(which, weights=p * (1 - p), minlength=k))


def combine_calibration_sums(parts: list[CalibrationSums]) -> CalibrationSums:
    return CalibrationSums(edges=parts[0].edges, n=sum(s.n for s in parts), observed=sum(s.observed for s in parts),
                           expected=sum(s.expected for s in parts), variance=sum(s.variance for s in parts))


def calibration_table(sums: CalibrationSums):
    """Mean predicted vs observed rate per non-empty bin (the calibration curve)."""
    import pandas as pd

    keep = sums.n > 0
    return pd.DataFrame({"n": sums.n[keep], "predicted": sums.expected[keep] / sums.n[keep],
                         "observed": sums.observed[keep] / sums.n[keep]})


def hosmer_lemeshow(sums: CalibrationSums) -> tuple[float, int, float]:
    """Σ (O − E)² / (E(1 − E/n)) over non-empty bins; χ² with (bins − 2) degrees of freedom."""
    keep = sums.n > 0
    o, e, n = sums.observed[keep], sums.expected[keep], sums.n[keep]
    statistic = float(np.sum((o - e) ** 2 / (e * (1 - e / n))))
    df = int(keep.sum()) - 2
    return statistic, df, float(stats.chi2.sf(statistic, df)) if df > 0 else float("nan")


def calibration_in_the_large(sums: CalibrationSums) -> dict:
    """Observed minus mean predicted risk, and the observed/expected ratio, over all bins."""
    return in_the_large(sums.n.sum(), sums.observed.sum(), sums.expected.sum())


def in_the_large(n: float, observed: float, expected: float) -> dict:
    """From totals: n cases, Σy observed events, Σp expected events."""
    return {"observed_rate": float(observed / n), "predicted_rate": float(expected / n),
            "difference": float((observed - expected) / n),
            "o_e_ratio": float(observed / expected) if expected else None}


def slope_design(p) -> np.ndarray:
    """[1, logit p]: a logistic fit of y on it gives calibration intercept and slope."""
    p = np.clip(np.asarray(p, float), EPS, 1 - EPS)
    return np.column_stack([np.ones(len(p)), np.log(p / (1 - p))])
