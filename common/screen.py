"""Univariate feature screens: one Rao score test per feature, Cox or logistic, with BH q-values.

Each feature x_j is tested on its own, at β_j = 0, by the score (Rao, Lagrange-multiplier) test

.. math::

    \\chi^2_j = U_j^2 / I_j \\sim \\chi^2_1, \\qquad U_j = \\partial\\ell/\\partial\\beta_j, \\quad
    I_j = \\text{(efficient) information for } \\beta_j,

both at the null model, so no model is fitted per feature and every site answers for all
features in one message (one round trip per screen).

* **Cox, stratified by site** (as :class:`fedrad.common.cox.FederatedCoxPH`'s default): the partial
  likelihood is a sum over sites, so ``U_j`` and ``I_j`` are sums of the sites' values, which each
  site computes from its risk sets at β = 0 for all features at once (vectorised; no Newton loop).
  Ties: Breslow (1974) or Efron (1977), as in :mod:`fedrad.common.cox`; with no tied event times both are
  the same, and for a 0/1 feature in one stratum the statistic is then the log-rank statistic.
  Equals ``grad² / -hess`` of :func:`fedrad.common.cox.site_cox_newton` at β = 0 for the one-feature
  model, summed over sites.
* **Logistic with intercept**: the test of adding x_j to the intercept-only model, whose fit is
  the pooled p̂ = events / n. With pooled sums,

  .. math::

      U_j = \\sum_i (y_i - \\hat p) x_{ij} = \\sum_i y_i (x_{ij} - \\bar x_j), \\qquad
      I_j = \\hat p (1 - \\hat p) \\sum_i (x_{ij} - \\bar x_j)^2

  (the inverse of the β_j entry of the inverse information of (intercept, β_j)), so
  χ²_j = n · r²(x_j, y), n times the squared point-biserial correlation. Sites send n, events,
  mean (p,), Σ(x - x̄_s)² and Σ y (x - x̄_s) about their own means, pooled with Chan et al.'s
  update (as :mod:`fedrad.common.zscore`), which is the same information as Σx, Σx², Σyx without the
  cancellation of Σx² - (Σx)²/n. Equals statsmodels' ``Logit(y, [1, x_j]).score_test`` and, for
  a 0/1 feature, the Pearson χ² of the 2 × 2 table without continuity correction.

p-values are upper χ²₁ tails; q-values are Benjamini-Hochberg (1995) adjusted p-values over the
features screened together (:func:`bh_fdr`, as ``scipy.stats.false_discovery_control``).

References
----------
Rao, C. R. (1948). Large sample tests of statistical hypotheses... Proc. Camb. Phil. Soc. 44, 50-57.
Benjamini, Y. & Hochberg, Y. (1995). Controlling the false discovery rate. JRSS B 57(1), 289-300.
lifelines ``CoxPHFitter`` (ties, strata); statsmodels ``discrete_model.py`` (``Logit``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from fedrad.common.errors import FedradError
from fedrad.common.zscore import pool_moments

__all__ = ["ScreenInputError", "CoxScreenSums", "LogisticScreenSums", "ScreenResult", "site_cox_screen",
           "combine_cox_screen", "update_cox_screen", "site_logistic_screen", "combine_logistic_screen",
           "update_logistic_screen", "bh_fdr"]

TIES = ("efron", "breslow")


class ScreenInputError(FedradError):
    """Data or summaries that cannot be screened (shapes, missing values, no events, no information)."""


@dataclass(frozen=True)
class CoxScreenSums:
    """Score and information at β = 0 of one site (its own stratum), or their sum over sites.

    score : (n_features,) U_j; information : (n_features,) I_j = -∂²ℓ/∂β_j²; n : cases; events : events.
    """

    score: np.ndarray
    information: np.ndarray
    n: int
    events: int


@dataclass(frozen=True)
class LogisticScreenSums:
    """Centred sums of one site, or pooled.

    n : int; events : int (Σy); mean : (n_features,) x̄; m2 : (n_features,) Σ(x - x̄)²;
    sxy : (n_features,) Σ y (x - x̄); all about this summary's own mean.
    """

    n: int
    events: int
    mean: np.ndarray
    m2: np.ndarray
    sxy: np.ndarray


@dataclass(frozen=True)
class ScreenResult:
    """One score test per feature, shape (n_features,) each.

    statistic : χ²₁ = U² / I; p_value; q_value : Benjamini-Hochberg over the screened features;
    score : U (its sign is the direction of the association); information : I; n, events : totals.
    """

    statistic: np.ndarray
    p_value: np.ndarray
    q_value: np.ndarray
    score: np.ndarray
    information: np.ndarray
    n: int
    events: int


def _features(X, n_rows: int | None = None) -> np.ndarray:
    X = np.asarray(X, dtype=float)
    if X.ndim != 2:
        raise ScreenInputError(f"X must be 2-D (n_samples, n_features); got shape {X.shape}")
    if n_rows is not None and len(X) != n_rows:
        raise ScreenInputError(f"X has {len(X)} rows but the outcome has {n_rows}")
    bad = ~np.isfinite(X)
    if bad.any():
        j = int(np.flatnonzero(bad.any(axis=0))[0])
        raise ScreenInputError(f"feature {j} has {int(bad[:, j].sum())} missing or non-finite value(s)")
    return X


def _result(score, information, n, events, feature_names) -> ScreenResult:
    empty = np.flatnonzero(~(information > 0))
    if empty.size:
        names = [feature_names[i] if feature_names else str(i) for i in empty[:10]]
        raise ScreenInputError(f"{empty.size} feature(s) carry no information for the score test (constant "
                               f"where it matters, e.g. {', '.join(names)}); drop them before the screen")
    statistic = score**2 / information
    p_value = stats.chi2.sf(statistic, df=1)
    return ScreenResult(statistic=statistic, p_value=p_value, q_value=bh_fdr(p_value), score=score,
                        information=information, n=n, events=events)


# -- Cox -----------------------------------------------------------------------------------------------
def site_cox_screen(X, time, event, *, ties: str = "efron") -> CoxScreenSums:
    """Score and information at β = 0 of every one-feature Cox model, one site as one stratum.

    Parameters
    ----------
    X : (n_samples, n_features)
    time : (n_samples,)
        Follow-up times.
    event : (n_samples,)
        True (1) for an event, False (0) for censoring.
    ties : {"efron", "breslow"}

    Returns
    -------
    CoxScreenSums
        score, information : (n_features,); n; events. A site without events sends zeros.

    Notes
    -----
    At β = 0 every weight is 1. With risk set R_k (size S0_k), tied events D_k (d_k of them) and,
    per feature, S1 = Σ_R x, S2 = Σ_R x², D1 = Σ_D x, D2 = Σ_D x², for l = 0..d_k-1 and
    f = l/d_k (Efron; f = 0 for Breslow):

    .. math::

        U = \\sum_k \\Big[D1_k - \\sum_l \\frac{S1_k - f D1_k}{S0_k - l}\\Big], \\quad
        I = \\sum_k \\sum_l \\Big[\\frac{S2_k - f D2_k}{S0_k - l}
            - \\Big(\\frac{S1_k - f D1_k}{S0_k - l}\\Big)^2\\Big].

    Both are unchanged by shifting x, so the site centres each feature on its own mean first.
    """
    if ties not in TIES:
        raise ScreenInputError(f"ties must be one of {TIES}, got {ties!r}")
    time = np.asarray(time, dtype=float)
    event = np.asarray(event)
    if time.ndim != 1 or event.shape != time.shape:
        raise ScreenInputError(f"time and event must be 1-D of equal length; got shapes {time.shape} and "
                               f"{event.shape}")
    if not np.all(np.isfinite(time)) or np.any(time < 0):
        raise ScreenInputError("time has missing, non-finite or negative values")
    X = _features(X, len(time))
    event = event.astype(bool)
    n, p = X.shape
    if n == 0:
        raise ScreenInputError("no rows to summarise")
    if not event.any():
        return CoxScreenSums(score=np.zeros(p), information=np.zeros(p), n=n, events=0)
    X = X - X.mean(axis=0)
    order = np.argsort(time, kind="stable")
    t_sorted, x_sorted = time[order], X[order]
    suffix1 = np.cumsum(x_sorted[::-1], axis=0)[::-1]  # row i: Σ over the rows with time >= t_sorted[i]
    suffix2 = np.cumsum(x_sorted[::-1] ** 2, axis=0)[::-1]
    times, d = np.unique(time[event], return_counts=True)
    first = np.searchsorted(t_sorted, times, side="left")
    s0, s1, s2 = (n - first).astype(float), suffix1[first], suffix2[first]
    k_of_event = np.searchsorted(times, time[event])
    d1, d2 = np.zeros((len(times), p)), np.zeros((len(times), p))
    np.add.at(d1, k_of_event, X[event])
    np.add.at(d2, k_of_event, X[event] ** 2)
    # one term per event: tied time k repeated d_k times, l = 0..d_k-1
    k = np.repeat(np.arange(len(times)), d)
    l_idx = np.arange(len(k)) - np.repeat(np.cumsum(d) - d, d)
    f = (l_idx / d[k] if ties == "efron" else np.zeros(len(k)))[:, None]
    den = (s0[k] - (l_idx if ties == "efron" else 0))[:, None]
    m1 = (s1[k] - f * d1[k]) / den
    m2 = (s2[k] - f * d2[k]) / den
    return CoxScreenSums(score=d1.sum(axis=0) - m1.sum(axis=0), information=(m2 - m1**2).sum(axis=0), n=n,
                         events=int(event.sum()))


def combine_cox_screen(parts: list[CoxScreenSums]) -> CoxScreenSums:
    """Sum over sites (strata)."""
    if not parts:
        raise ScreenInputError("no site summaries to combine")
    shapes = {p.score.shape for p in parts}
    if len(shapes) > 1:
        raise ScreenInputError(f"sites sent different numbers of features: {sorted(s[0] for s in shapes)}")
    return CoxScreenSums(score=sum(p.score for p in parts), information=sum(p.information for p in parts),
                         n=sum(p.n for p in parts), events=sum(p.events for p in parts))


def update_cox_screen(total: CoxScreenSums, *, feature_names: list[str] | None = None) -> ScreenResult:
    """χ²₁ statistics, p-values and BH q-values of the stratified Cox score tests."""
    if total.events == 0:
        raise ScreenInputError(f"all {total.n} samples are censored at every site; a Cox screen needs events")
    return _result(total.score, total.information, total.n, total.events, feature_names)


# -- logistic ------------------------------------------------------------------------------------------
def site_logistic_screen(X, y) -> LogisticScreenSums:
    """Centred sums of one site for the logistic score screen.

    Parameters
    ----------
    X : (n_samples, n_features)
    y : (n_samples,)
        Outcomes in {0, 1}; a site whose outcomes are all 0 (or all 1) is fine.

    Returns
    -------
    LogisticScreenSums
        n, events, mean, m2 = Σ(x - x̄)², sxy = Σ y (x - x̄), each (n_features,).
    """
    y = np.asarray(y)
    if y.ndim != 1:
        raise ScreenInputError(f"y must be 1-D (n_samples,); got shape {y.shape}")
    if not np.all(np.isin(y, (0, 1))):
        raise ScreenInputError("y must be binary (0/1 or boolean)")
    X = _features(X, len(y))
    if len(y) == 0:
        raise ScreenInputError("no rows to summarise")
    y = y.astype(float)
    mean = X.mean(axis=0)
    centred = X - mean
    return LogisticScreenSums(n=len(y), events=int(y.sum()), mean=mean, m2=(centred**2).sum(axis=0),
                              sxy=y @ centred)


def combine_logistic_screen(parts: list[LogisticScreenSums]) -> LogisticScreenSums:
    """Pool with Chan's update (:func:`fedrad.common.zscore.pool_moments`): m2 += n_s (x̄_s - x̄)²,
    sxy += n_s (x̄_s - x̄)(ȳ_s - ȳ) (sxy = Σ y (x - x̄) is the co-moment of x and y; associative)."""
    if not parts:
        raise ScreenInputError("no site summaries to combine")
    shapes = {p.mean.shape for p in parts}
    if len(shapes) > 1:
        raise ScreenInputError(f"sites sent different numbers of features: {sorted(s[0] for s in shapes)}")
    counts, means = [p.n for p in parts], [p.mean for p in parts]
    x = pool_moments(counts, means, [p.m2 for p in parts])
    xy = pool_moments(counts, means, [p.sxy for p in parts], other_means=[p.events / p.n for p in parts])
    return LogisticScreenSums(n=x.n, events=sum(p.events for p in parts), mean=x.mean, m2=x.m2, sxy=xy.m2)


def update_logistic_screen(total: LogisticScreenSums, *, feature_names: list[str] | None = None) -> ScreenResult:
    """χ²₁ statistics, p-values and BH q-values of the logistic score tests (intercept-only null)."""
    if total.events in (0, total.n):
        raise ScreenInputError(f"all {total.n} outcomes are {1 if total.events else 0}; a logistic screen needs "
                               "both classes")
    p_hat = total.events / total.n
    return _result(total.sxy, p_hat * (1 - p_hat) * total.m2, total.n, total.events, feature_names)


# -- multiple testing ----------------------------------------------------------------------------------
def bh_fdr(p) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values).

    Parameters
    ----------
    p : (m,)
        p-values in [0, 1].

    Returns
    -------
    q : (m,)
        ``q_(i) = min_{j >= i} m p_(j) / j`` over the ascending p-values, capped at 1, in the input's
        order; as ``scipy.stats.false_discovery_control(p, method="bh")``.
    """
    p = np.asarray(p, dtype=float)
    if p.ndim != 1:
        raise ScreenInputError(f"p must be 1-D; got shape {p.shape}")
    if not np.all((p >= 0) & (p <= 1)):
        raise ScreenInputError("p-values must lie in [0, 1] (no NaN)")
    m = len(p)
    order = np.argsort(p, kind="stable")
    scaled = p[order] * m / np.arange(1, m + 1)
    q = np.empty(m)
    q[order] = np.minimum(np.minimum.accumulate(scaled[::-1])[::-1], 1.0)
    return q
