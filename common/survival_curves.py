"""Kaplan–Meier curves of risk groups and the log-rank test, from a risk table sites can sum.

On a time grid t₁ < … < t_K each site counts, per risk group g, the events in (t_{k−1}, t_k]
and the number at risk at t_k with those events moved to t_k (an event time is rounded up
to the grid; censoring times are not). Tables add up across sites. With the grid = every
distinct event time the KM curve and the log-rank test are exactly the pooled ones; a
coarser grid (what a site can share without disclosing event times) rounds event times up
to it. Cells with fewer than ``min_count`` at risk are the evaluation stage's to suppress.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = ["RiskTable", "site_risk_table", "combine_risk_tables", "kaplan_meier", "logrank_test", "risk_groups"]


@dataclass(frozen=True)
class RiskTable:
    grid: np.ndarray       # (K,)
    at_risk: np.ndarray    # (G, K)
    events: np.ndarray     # (G, K)


def risk_groups(score, cutoffs) -> np.ndarray:
    """Group 0 below the first cut-off, 1 between the first and second, ... (cut-offs from training)."""
    return np.searchsorted(np.asarray(cutoffs, float), np.asarray(score, float), side="right")


def site_risk_table(time, event, group, grid, n_groups: int) -> RiskTable:
    time, event, group = np.asarray(time, float), np.asarray(event, bool), np.asarray(group, int)
    grid = np.asarray(grid, float)
    slot = np.searchsorted(grid, time, side="left")  # event in (t_{k-1}, t_k] -> k; after t_K -> K (dropped)
    at_risk = np.zeros((n_groups, len(grid)))
    events = np.zeros((n_groups, len(grid)))
    for g in range(n_groups):
        mine = group == g
        counted = mine & event & (slot < len(grid))
        events[g] = np.bincount(slot[counted], minlength=len(grid))[: len(grid)]
        at_or_after = (time[mine][None, :] >= grid[:, None]).sum(axis=1)
        events_inside = events[g] - np.array([np.sum(mine & event & (time == t)) for t in grid])
        at_risk[g] = at_or_after + events_inside
    return RiskTable(grid=grid, at_risk=at_risk, events=events)


def combine_risk_tables(parts: list[RiskTable]) -> RiskTable:
    return RiskTable(grid=parts[0].grid, at_risk=sum(t.at_risk for t in parts), events=sum(t.events for t in parts))


def kaplan_meier(table: RiskTable):
    """Survival per group at each grid time (product-limit), with Greenwood's standard error."""
    import pandas as pd

    with np.errstate(divide="ignore", invalid="ignore"):
        hazard = np.where(table.at_risk > 0, table.events / table.at_risk, 0.0)
        survival = np.cumprod(1 - hazard, axis=1)
        term = np.where(table.at_risk > table.events,
                        table.events / (table.at_risk * (table.at_risk - table.events)), 0.0)
    se = survival * np.sqrt(np.cumsum(term, axis=1))
    rows = [{"group": g, "time": t, "at_risk": table.at_risk[g, k], "events": table.events[g, k],
             "survival": survival[g, k], "se": se[g, k]}
            for g in range(table.at_risk.shape[0]) for k, t in enumerate(table.grid)]
    return pd.DataFrame(rows)


def logrank_test(table: RiskTable) -> tuple[float, int, float]:
    """The (G-group) log-rank χ² with the hypergeometric variance, degrees of freedom, p."""
    n, d = table.at_risk, table.events
    n_all, d_all = n.sum(axis=0), d.sum(axis=0)
    use = n_all > 0
    n, d, n_all, d_all = n[:, use], d[:, use], n_all[use], d_all[use]
    expected = n * d_all / n_all
    observed_minus_expected = (d - expected).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        spread = np.where(n_all > 1, d_all * (n_all - d_all) / (n_all - 1), 0.0)
    share = n / n_all
    cov = np.diag(share @ spread) - np.einsum("k,gk,hk->gh", spread, share, share)
    groups = n.shape[0]
    keep = slice(0, groups - 1)  # one group is redundant: O − E sums to 0
    statistic = float(observed_minus_expected[keep] @ np.linalg.solve(cov[keep, keep], observed_minus_expected[keep]))
    df = groups - 1
    return statistic, df, float(stats.chi2.sf(statistic, df))
