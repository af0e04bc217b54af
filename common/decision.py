"""Decision curve analysis (Vickers & Elkin 2006) from counts a site can send.

Net benefit at threshold probability pₜ: TP/n − FP/n · pₜ/(1 − pₜ); "treat all":
prevalence − (1 − prevalence) · pₜ/(1 − pₜ); "treat none": 0. TP and FP per threshold
add up across sites, so the pooled curve is exact. For survival outcomes a site passes the
binary "event by the horizon" (cases censored earlier are left out, and counted).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["DecisionCounts", "site_decision_counts", "combine_decision_counts", "net_benefit", "DEFAULT_THRESHOLDS"]

DEFAULT_THRESHOLDS = np.round(np.arange(0.01, 1.0, 0.01), 2)


@dataclass(frozen=True)
class DecisionCounts:
    thresholds: np.ndarray
    true_positive: np.ndarray
    false_positive: np.ndarray
    n: float
    events: float


def site_decision_counts(y, p, thresholds=DEFAULT_THRESHOLDS) -> DecisionCounts:
    y, p, thresholds = np.asarray(y).astype(bool), np.asarray(p, float), np.asarray(thresholds, float)
    treated = p[None, :] >= thresholds[:, None]
    return DecisionCounts(thresholds=thresholds, true_positive=(treated & y).sum(axis=1).astype(float),
                          false_positive=(treated & ~y).sum(axis=1).astype(float), n=float(len(y)),
                          events=float(y.sum()))


def combine_decision_counts(parts: list[DecisionCounts]) -> DecisionCounts:
    return DecisionCounts(thresholds=parts[0].thresholds, true_positive=sum(c.true_positive for c in parts),
                          false_positive=sum(c.false_positive for c in parts), n=sum(c.n for c in parts),
                          events=sum(c.events for c in parts))


def net_benefit(counts: DecisionCounts):
    """Net benefit of the model, of treating all and of treating none, per threshold."""
    import pandas as pd

    odds = counts.thresholds / (1 - counts.thresholds)
    prevalence = counts.events / counts.n
    return pd.DataFrame({"threshold": counts.thresholds,
                         "model": counts.true_positive / counts.n - counts.false_positive / counts.n * odds,
                         "treat_all": prevalence - (1 - prevalence) * odds,
                         "treat_none": np.zeros(len(odds))})
