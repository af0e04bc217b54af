"""Cox proportional hazards by federated Newton-Raphson, equal to the pooled fit.

References: lifelines ``CoxPHFitter`` (Efron ties; strata), scikit-survival
``CoxPHSurvivalAnalysis`` (Breslow or Efron ties; ``BreslowEstimator`` baseline hazard).

Two ways to federate the partial likelihood:

* **Stratified by site (default).** Each site is its own stratum (its own baseline hazard),
  so the partial likelihood is a sum over sites and each site sends only log-likelihood,
  gradient and Hessian at β: p + p² + 1 numbers per Newton round. No event time leaves a
  site. Equals lifelines ``CoxPHFitter(strata=["site"])``. A site with no events adds 0.
* **Unstratified, exact (``share_event_times=True``).** One baseline hazard for everyone:
  the coordinator first collects the union of the sites' distinct event times (this
  *discloses each site's event times*), then each site sends, per event time, its
  risk-set sums Σw, Σwx, Σwxxᵀ and the same over its tied events (WebDISCO-style,
  Lu et al. 2015), from which the coordinator forms the pooled log-likelihood. Equals
  pooled lifelines ``CoxPHFitter()`` / sksurv ``CoxPHSurvivalAnalysis``.

Ties (Efron 1977, Breslow 1974), with w = exp(xβ), risk set R_k, tied events D_k (d_k of them):

.. math::

    \\ell(\\beta) = \\sum_k \\Big[\\sum_{i\\in D_k} x_i\\beta
        - \\sum_{l=0}^{d_k-1} \\log\\big(S^0_{R_k} - \\tfrac{l}{d_k} S^0_{D_k}\\big)\\Big]

(Breslow drops the ``l/d_k`` term). Survival outcomes are scikit-survival structured
arrays (``Surv.from_arrays(event, time)``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedrad.common.errors import FedradError
from fedrad.common.newton import NewtonSummary, combine_newton, newton_fit, wald_table
from fedrad.common.penalised import FederatedNetCV, NetProblem

__all__ = ["RiskSetSums", "site_cox_event_times", "combine_cox_event_times", "site_cox_risk_sets",
           "combine_cox_risk_sets", "cox_newton_from_risk_sets", "site_cox_newton", "cox_summary", "site_cox_baseline",
           "FederatedCoxPH", "FederatedCoxnetCV"]

TIES = ("efron", "breslow")


@dataclass(frozen=True)
class RiskSetSums:
    """Per event time (ascending) sums over the risk set and over the tied events.

    times : (T,); d : (T,) events; x_events : (T, p) Σx over events;
    s0, s1, s2 : (T,), (T, p), (T, p, p) risk-set Σw, Σwx, Σwxxᵀ;
    s0_tied, s1_tied, s2_tied : the same over the events tied at each time (Efron).
    Weights are w = exp(xβ - shift).
    """

    times: np.ndarray
    d: np.ndarray
    x_events: np.ndarray
    s0: np.ndarray
    s1: np.ndarray
    s2: np.ndarray
    s0_tied: np.ndarray
    s1_tied: np.ndarray
    s2_tied: np.ndarray


def site_cox_event_times(time, event) -> np.ndarray:
    """Distinct event times of a site (what ``share_event_times`` discloses)."""
    return np.unique(np.asarray(time, dtype=float)[np.asarray(event, dtype=bool)])


def combine_cox_event_times(parts: list[np.ndarray]) -> np.ndarray:
    return np.unique(np.concatenate([np.asarray(p, dtype=float) for p in parts])) if parts else np.empty(0)


def site_cox_risk_sets(X, time, event, beta, times=None, *, shift: float = 0.0) -> RiskSetSums:
    """Risk-set sums of one site (or stratum) at β on the grid ``times`` (default: its own event times)."""
    X = np.asarray(X, dtype=float)
    time = np.asarray(time, dtype=float)
    event = np.asarray(event, dtype=bool)
    times = site_cox_event_times(time, event) if times is None else np.asarray(times, dtype=float)
    n, p = X.shape
    n_times = len(times)
    w = np.exp(X @ beta - shift)
    s0, s1, s2 = np.zeros(n_times), np.zeros((n_times, p)), np.zeros((n_times, p, p))
    order = np.argsort(-time, kind="stable")
    acc0, acc1, acc2 = 0.0, np.zeros(p), np.zeros((p, p))
    j = 0
    for k in range(n_times - 1, -1, -1):  # latest time first: risk sets only grow
        start = j
        while j < n and time[order[j]] >= times[k]:
            j += 1
        if j > start:
            rows = order[start:j]
            wx = X[rows] * w[rows, None]
            acc0 += w[rows].sum()
            acc1 = acc1 + wx.sum(axis=0)
            acc2 = acc2 + wx.T @ X[rows]
        s0[k], s1[k], s2[k] = acc0, acc1, acc2
    d = np.zeros(n_times)
    x_events = np.zeros((n_times, p))
    s0_tied, s1_tied, s2_tied = np.zeros(n_times), np.zeros((n_times, p)), np.zeros((n_times, p, p))
    ev = np.flatnonzero(event)
    if len(ev):
        k = np.searchsorted(times, time[ev])
        if np.any(k >= n_times) or np.any(times[np.minimum(k, n_times - 1)] != time[ev]):
            raise ValueError("an event time of this site is missing from the event-time grid")
        np.add.at(d, k, 1)
        np.add.at(x_events, k, X[ev])
        np.add.at(s0_tied, k, w[ev])
        np.add.at(s1_tied, k, X[ev] * w[ev, None])
        np.add.at(s2_tied, k, X[ev][:, :, None] * X[ev][:, None, :] * w[ev, None, None])
    return RiskSetSums(times=times, d=d, x_events=x_events, s0=s0, s1=s1, s2=s2, s0_tied=s0_tied, s1_tied=s1_tied,
                       s2_tied=s2_tied)


def combine_cox_risk_sets(parts: list[RiskSetSums]) -> RiskSetSums:
    times = parts[0].times
    if any(len(p.times) != len(times) or np.any(p.times != times) for p in parts):
        raise ValueError("sites summed risk sets on different event-time grids")
    fields = ("d", "x_events", "s0", "s1", "s2", "s0_tied", "s1_tied", "s2_tied")
    return RiskSetSums(times=times, **{f: sum(getattr(p, f) for p in parts) for f in fields})


def cox_newton_from_risk_sets(sums: RiskSetSums, beta, *, ties: str = "efron", shift: float = 0.0,
                              n: int = 0) -> NewtonSummary:
    """Partial log-likelihood, gradient and Hessian at β from risk-set sums."""
    p = len(beta)
    loglik, grad, hess = 0.0, np.zeros(p), np.zeros((p, p))
    for k in np.flatnonzero(sums.d > 0):
        d = int(sums.d[k])
        loglik += float(sums.x_events[k] @ beta) - d * shift
        grad += sums.x_events[k]
        fractions = np.arange(d) / d if ties == "efron" else np.zeros(d)
        for f in fractions:
            den = sums.s0[k] - f * sums.s0_tied[k]
            m1 = (sums.s1[k] - f * sums.s1_tied[k]) / den
            m2 = (sums.s2[k] - f * sums.s2_tied[k]) / den
            loglik -= np.log(den)
            grad -= m1
            hess -= m2 - np.outer(m1, m1)
    return NewtonSummary(loglik=loglik, grad=grad, hess=hess, n=n, events=int(sums.d.sum()))


def site_cox_newton(X, time, event, beta, *, ties: str = "efron", strata=None) -> NewtonSummary:
    """One site's stratified summary: a sum over its strata (default: the site is one stratum)."""
    X = np.asarray(X, dtype=float)
    groups = [np.arange(len(X))] if strata is None else [np.flatnonzero(np.asarray(strata) == s)
                                                         for s in dict.fromkeys(strata)]
    parts = []
    for rows in groups:
        eta = X[rows] @ beta
        shift = float(eta.max()) if len(rows) else 0.0  # exp() cannot overflow; cancels in the likelihood
        sums = site_cox_risk_sets(X[rows], np.asarray(time)[rows], np.asarray(event)[rows], beta, shift=shift)
        parts.append(cox_newton_from_risk_sets(sums, beta, ties=ties, shift=shift, n=len(rows)))
    return combine_newton(parts)


def cox_summary(X, time, event, row_groups, beta, *, ties: str = "efron", grid=None) -> NewtonSummary:
    """The federation's summed summary at β, in one process: each row group is a site.

    ``grid=None``: stratified by site (a sum of :func:`site_cox_newton`); otherwise the sites'
    risk-set sums on the shared event-time ``grid`` are combined (unstratified, exact)."""
    if grid is None:
        return combine_newton([site_cox_newton(X[r], time[r], event[r], beta, ties=ties) for r in row_groups])
    total = combine_cox_risk_sets([site_cox_risk_sets(X[r], time[r], event[r], beta, grid) for r in row_groups])
    return cox_newton_from_risk_sets(total, beta, ties=ties, n=sum(len(r) for r in row_groups))


def site_cox_baseline(X, time, event, beta) -> pd.Series:
    """Breslow cumulative baseline hazard of one stratum at its event times (sksurv's ``BreslowEstimator``)."""
    sums = site_cox_risk_sets(X, time, event, beta)
    return pd.Series(np.cumsum(sums.d / sums.s0), index=pd.Index(sums.times, name="time"), name="cumhaz")


class FederatedCoxPH:
    """Cox PH fitted as a federation would fit it: by site summaries, in one process.

    Parameters
    ----------
    ties : {"efron", "breslow"}
    share_event_times : bool, default False
        False: stratified by site (no event time leaves a site). True: one baseline hazard,
        exact, at the price of disclosing each site's event times.
    ridge : float, default 0
        Penalty ½·ridge·|β|² (lifelines' ``penalizer`` with l1_ratio=0 uses the same form).
    tol, max_iter : Newton stopping rule and limit (see ``fedrad.common.newton``).

    Attributes
    ----------
    coef_ : (n_features,); hessian_ : (n_features, n_features) at coef_; summary_ : DataFrame with
    HR and 95% CI; loglik_, loglik_null_; n_iter_, converged_; event_times_ (shared mode);
    baseline_cumulative_hazard_ : {stratum: Series}.
    """

    def __init__(self, *, ties: str = "efron", share_event_times: bool = False, ridge: float = 0.0,
                 tol: float = 1e-10, max_iter: int = 100):
        self.ties = ties
        self.share_event_times = share_event_times
        self.ridge = ridge
        self.tol = tol
        self.max_iter = max_iter

    def _check(self, X, y, site):
        from sksurv.util import check_y_survival  # imported here: sites import this module for every message

        if self.ties not in TIES:
            raise ValueError(f"ties must be one of {TIES}, got {self.ties!r}")
        names = list(X.columns) if isinstance(X, pd.DataFrame) else [f"x{i}" for i in range(np.shape(X)[1])]
        X = np.asarray(X, dtype=float)
        event, time = check_y_survival(y)
        if len(X) != len(time):
            raise ValueError(f"X has {len(X)} rows but y has {len(time)}")
        bad = [names[j] for j in np.flatnonzero(~np.isfinite(X).all(axis=0))]
        if bad:
            raise FedradError(f"X has missing or non-finite values in column(s) {', '.join(bad)}")
        site = np.zeros(len(X), dtype=int) if site is None else np.asarray(site)
        groups = {s: np.flatnonzero(site == s) for s in dict.fromkeys(site.tolist())}
        return X, event, time, names, groups

    def fit(self, X, y, *, site=None):
        X, event, time, names, groups = self._check(X, y, site)
        self.feature_names_in_ = np.array(names, dtype=object)
        if self.share_event_times:
            self.event_times_ = combine_cox_event_times([site_cox_event_times(time[g], event[g])
                                                         for g in groups.values()])

        grid = self.event_times_ if self.share_event_times else None

        def evaluate(beta):
            return cox_summary(X, time, event, list(groups.values()), beta, ties=self.ties, grid=grid)

        state = newton_fit(evaluate, X.shape[1], ridge=self.ridge, tol=self.tol, max_iter=self.max_iter, names=names,
                           message=lambda *_: f"Cox Newton did not converge in {self.max_iter} iterations",
                           stacklevel=3)
        self.coef_ = state.beta
        final = evaluate(self.coef_)
        self.loglik_ = final.loglik
        self.loglik_null_ = state.loglik_null
        self.hessian_ = final.hess - self.ridge * np.eye(len(self.coef_))
        self.n_iter_ = state.iteration
        self.converged_ = state.converged
        self.summary_ = wald_table(self.coef_, self.hessian_, names, exp_name="HR")
        strata = {"all": np.arange(len(X))} if self.share_event_times else groups
        self.baseline_cumulative_hazard_ = {s: site_cox_baseline(X[g], time[g], event[g], self.coef_)
                                            for s, g in strata.items()}
        return self

    def predict(self, X) -> np.ndarray:
        """Risk score xβ (higher = worse prognosis)."""
        return np.asarray(X, dtype=float) @ self.coef_

    def score(self, X, y) -> float:
        """Harrell's C-index of the risk score."""
        from sksurv.metrics import concordance_index_censored
        from sksurv.util import check_y_survival

        event, time = check_y_survival(y)
        return concordance_index_censored(event, time, self.predict(X))[0]


class FederatedCoxnetCV(FederatedNetCV):
    """Elastic-net Cox path with site-local K-fold cross-validation (see :mod:`fedrad.common.penalised`).

    Parameters
    ----------
    l1_ratio : float in (0, 1]; alphas : penalties (default: ``n_alphas`` from λ_max down to
    ``alpha_min_ratio`` · λ_max); cv : folds (0: no cross-validation); rule : "min" or "1se";
    ties, share_event_times : as :class:`FederatedCoxPH` (Coxnet's reference uses Breslow);
    seed : fold assignment (each site's folds come from the seed and the site's name).

    Attributes
    ----------
    alphas_ : (L,); coef_path_ : (L, p) on all data; coef_ : (p,) at the chosen λ; alpha_ ;
    cv_deviance_ : (K, L) -2·CV partial log-likelihood per fold; cv_mean_, cv_se_ : (L,);
    n_rounds_ : round trips a federation needs (all folds and λ share each round).
    """

    kind = "cox"

    def __init__(self, *, l1_ratio: float = 1.0, alphas=None, n_alphas: int = 50, alpha_min_ratio: float = 0.01,
                 cv: int = 5, rule: str = "min", ties: str = "breslow", share_event_times: bool = False,
                 seed: int = 0, tol: float = 1e-9):
        super().__init__(l1_ratio=l1_ratio, alphas=alphas, n_alphas=n_alphas, alpha_min_ratio=alpha_min_ratio, cv=cv,
                         rule=rule, seed=seed, tol=tol)
        self.ties = ties
        self.share_event_times = share_event_times

    def _problem(self, X, y, site) -> NetProblem:
        X, event, time, names, groups = FederatedCoxPH(ties=self.ties)._check(X, y, site)
        self.feature_names_in_ = np.array(names, dtype=object)
        if self.share_event_times:  # one baseline hazard: the likelihood is not a sum over sites
            grid = combine_cox_event_times([site_cox_event_times(time[g], event[g]) for g in groups.values()])

            def pooled(rows, beta):
                member = np.zeros(len(X), dtype=bool)
                member[rows] = True
                return cox_summary(X, time, event, [g[member[g]] for g in groups.values()], beta, ties=self.ties,
                                   grid=grid)

            units = [(np.arange(len(X)), pooled)]
        else:
            def stratum(rows, beta):
                return site_cox_newton(X[rows], time[rows], event[rows], beta, ties=self.ties)

            units = [(g, stratum) for g in groups.values()]
        p = X.shape[1]
        return NetProblem(groups=groups, stratify=event, units=units, factors=np.ones(p), beta0=np.zeros(p),
                          alphas=self.alphas)

    def _store(self, path, chosen):
        self.coef_path_ = path
        self.coef_ = self.coef_path_[chosen]

    def predict(self, X) -> np.ndarray:
        return np.asarray(X, dtype=float) @ self.coef_

    score = FederatedCoxPH.score
