"""Discrimination: Harrell's C from pair counts, ROC AUC with DeLong's variance and test.

Pair counts add up across sites, so the pooled figure from summed counts is exact for the
pairs *within* sites (site-stratified C / AUC): a pair of patients from two hospitals
would need both patients' rows in one place, and is never formed. DeLong's variance needs
every case's placement value, so it is computed at a site; the pooled variance of the
site-stratified AUC is the pair-weighted sum of the sites' variances (sites are
independent).

References: Harrell et al. (1996); DeLong, DeLong & Clarke-Pearson (1988), Biometrics 44:
837–845, with the placement-value form of Sun & Xu (2014).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = ["PairCounts", "site_concordance_counts", "site_auc_counts", "combine_pair_counts", "DeLong",
           "delong_auc", "delong_test", "midranks"]


@dataclass(frozen=True)
class PairCounts:
    """Usable pairs and how the score orders them; C = (concordant + ½·tied) / pairs."""

    concordant: float
    discordant: float
    tied: float

    @property
    def pairs(self) -> float:
        return self.concordant + self.discordant + self.tied

    @property
    def c(self) -> float:
        return (self.concordant + 0.5 * self.tied) / self.pairs if self.pairs else float("nan")


#: risk scores this close count as tied (scikit-survival's ``tied_tol``)
TIED_TOL = 1e-8


def site_concordance_counts(time, event, risk) -> PairCounts:
    """Harrell's pairs: i had the event before j's time, or j was censored at i's event time; the
    higher risk should fail first. Two events at the same time make no pair (scikit-survival's
    ``concordance_index_censored``)."""
    time, event, risk = np.asarray(time, float), np.asarray(event, bool), np.asarray(risk, float)
    concordant = discordant = tied = 0
    for i in np.flatnonzero(event):
        usable = (time > time[i]) | ((time == time[i]) & ~event)
        ties = np.abs(risk[usable] - risk[i]) <= TIED_TOL
        tied += int(ties.sum())
        concordant += int(np.sum((risk[usable] < risk[i]) & ~ties))
        discordant += int(np.sum((risk[usable] > risk[i]) & ~ties))
    return PairCounts(concordant, discordant, tied)


def site_auc_counts(y, score) -> PairCounts:
    """Mann–Whitney pairs (one case, one control): the AUC is their C."""
    y, score = np.asarray(y).astype(bool), np.asarray(score, float)
    cases, controls = np.sort(score[y]), np.sort(score[~y])
    below = np.searchsorted(controls, cases, side="left")
    at_or_below = np.searchsorted(controls, cases, side="right")
    concordant = float(below.sum())
    tied = float((at_or_below - below).sum())
    return PairCounts(concordant, len(cases) * len(controls) - concordant - tied, tied)


def combine_pair_counts(parts: list[PairCounts]) -> PairCounts:
    return PairCounts(sum(p.concordant for p in parts), sum(p.discordant for p in parts), sum(p.tied for p in parts))


def midranks(x) -> np.ndarray:
    """Ranks 1..n with ties given their mean rank."""
    return stats.rankdata(x, method="average")


@dataclass(frozen=True)
class DeLong:
    """AUCs of k scores on the same cases, and DeLong's covariance matrix of them."""

    auc: np.ndarray        # (k,)
    cov: np.ndarray        # (k, k)
    n_cases: int
    n_controls: int

    def ci(self, level: float = 0.95) -> np.ndarray:
        """Normal-theory interval on the AUC scale, clipped to [0, 1] (pROC's ``ci.auc(method="delong")``)."""
        q = stats.norm.ppf(0.5 + level / 2)
        se = np.sqrt(np.diag(self.cov))
        return np.clip(np.column_stack([self.auc - q * se, self.auc + q * se]), 0, 1)


def delong_auc(y, *scores) -> DeLong:
    """DeLong's structural components by midranks: placement values V10 (per case) and V01 (per
    control); Var(AUC) = S10/m + S01/n with S the sample covariances of the placements."""
    y = np.asarray(y).astype(bool)
    if y.all() or not y.any():
        raise ValueError("the AUC needs both cases (y = 1) and controls (y = 0)")
    m, n = int(y.sum()), int((~y).sum())
    v10, v01, auc = [], [], []
    for score in scores:
        score = np.asarray(score, float)
        pos, neg = score[y], score[~y]
        rank_all = midranks(np.r_[pos, neg])
        rank_pos, rank_neg = midranks(pos), midranks(neg)
        placement_pos = (rank_all[:m] - rank_pos) / n       # share of controls each case beats
        placement_neg = 1 - (rank_all[m:] - rank_neg) / m   # share of cases that beat each control
        auc.append(placement_pos.mean())
        v10.append(placement_pos)
        v01.append(placement_neg)
    s10 = np.atleast_2d(np.cov(np.array(v10)))
    s01 = np.atleast_2d(np.cov(np.array(v01)))
    return DeLong(auc=np.array(auc), cov=s10 / m + s01 / n, n_cases=m, n_controls=n)


def delong_test(y, score_a, score_b) -> tuple[float, float]:
    """DeLong's z for AUC(a) − AUC(b) on the same cases, and its two-sided p (pROC's ``roc.test``)."""
    d = delong_auc(y, score_a, score_b)
    var = d.cov[0, 0] + d.cov[1, 1] - 2 * d.cov[0, 1]
    z = (d.auc[0] - d.auc[1]) / np.sqrt(var)
    return float(z), float(2 * stats.norm.sf(abs(z)))
