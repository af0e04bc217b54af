"""Federated Cox equals the pooled fit of lifelines and scikit-survival on real data.

Data: GBSG2 (German Breast Cancer Study Group 2, 686 patients, 299 recurrences), shipped with
scikit-survival (``sksurv.datasets.load_gbsg2``); numeric covariates standardised, split
at random into four pseudo-sites. References, run here on the pooled rows:
``lifelines.CoxPHFitter().fit(df, "time", "event", [strata=["site"]], fit_options=TIGHT)``
and ``sksurv.linear_model.CoxPHSurvivalAnalysis(ties="breslow", tol=1e-12)``.
"""

from __future__ import annotations

import numpy as np
import pytest
from lifelines import CoxPHFitter
from scipy.optimize import approx_fprime
from sksurv.linear_model import CoxPHSurvivalAnalysis
from sksurv.util import Surv

from fedrad.common.cox import (FederatedCoxPH, combine_cox_event_times, combine_cox_risk_sets, cox_newton_from_risk_sets,
                        site_cox_event_times, site_cox_newton, site_cox_risk_sets)
from fedrad.common.newton import RankDeficientError

TIGHT = {"precision": 1e-12, "r_precision": 1e-14}


@pytest.fixture(scope="module")
def gbsg2(gbsg2):  # noqa: F811 - the shared fixture plus a lifelines frame
    Xn, y, site = gbsg2
    return Xn, y, site, Xn.assign(time=y["time"], event=y["cens"].astype(int), site=site)


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a) / np.asarray(b) - 1)))


@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_gradient_and_hessian_match_finite_differences(gbsg2, ties):
    Xn, y, _, _ = gbsg2
    X, time, event = Xn.to_numpy()[:200], y["time"][:200], y["cens"][:200]
    beta = np.array([0.1, -0.2, 0.3, -0.1, 0.2])
    s = site_cox_newton(X, time, event, beta, ties=ties)
    loglik = lambda b: site_cox_newton(X, time, event, b, ties=ties).loglik  # noqa: E731
    grad = lambda b: site_cox_newton(X, time, event, b, ties=ties).grad  # noqa: E731
    np.testing.assert_allclose(s.grad, approx_fprime(beta, loglik, 1e-6), rtol=1e-5, atol=1e-4)
    hess_fd = np.array([approx_fprime(beta, lambda b: grad(b)[i], 1e-6) for i in range(len(beta))])
    np.testing.assert_allclose(s.hess, hess_fd, rtol=1e-5, atol=1e-4)


def test_unstratified_exact_equals_lifelines(gbsg2):
    Xn, y, site, frame = gbsg2
    model = FederatedCoxPH(share_event_times=True).fit(Xn, y, site=site)
    ref = CoxPHFitter().fit(frame.drop(columns="site"), "time", "event", fit_options=TIGHT)
    assert _rel(model.coef_, ref.params_.to_numpy()) < 1e-6
    assert _rel(model.summary_["se"], ref.standard_errors_.to_numpy()) < 1e-6
    assert model.loglik_ == pytest.approx(ref.log_likelihood_, rel=1e-10)
    np.testing.assert_allclose(model.summary_["HR upper 95%"], ref.summary["exp(coef) upper 95%"], rtol=1e-6)
    np.testing.assert_allclose(model.summary_["p"], ref.summary["p"], rtol=1e-5, atol=1e-300)
    assert model.converged_ and model.n_iter_ <= 8
    assert len(model.event_times_) == len(np.unique(y["time"][y["cens"]]))


def test_stratified_by_site_equals_lifelines_strata(gbsg2):
    Xn, y, site, frame = gbsg2
    model = FederatedCoxPH().fit(Xn, y, site=site)
    ref = CoxPHFitter().fit(frame, "time", "event", strata=["site"], fit_options=TIGHT)
    assert _rel(model.coef_, ref.params_.to_numpy()) < 1e-6
    assert _rel(model.summary_["se"], ref.standard_errors_.to_numpy()) < 1e-6
    assert model.loglik_ == pytest.approx(ref.log_likelihood_, rel=1e-10)
    assert set(model.baseline_cumulative_hazard_) == {"A", "B", "C", "D"}


def test_breslow_equals_sksurv_with_its_baseline_hazard(gbsg2):
    Xn, y, site, _ = gbsg2
    model = FederatedCoxPH(ties="breslow", share_event_times=True).fit(Xn, y, site=site)
    ref = CoxPHSurvivalAnalysis(ties="breslow", tol=1e-12).fit(Xn, y)
    assert _rel(model.coef_, ref.coef_) < 1e-6
    cumhaz = model.baseline_cumulative_hazard_["all"]
    np.testing.assert_allclose(cumhaz.to_numpy(), ref.cum_baseline_hazard_(cumhaz.index.to_numpy()), rtol=1e-6)
    assert model.score(Xn, y) == pytest.approx(ref.score(Xn, y), abs=1e-12)


def test_one_site_equals_many_sites(gbsg2):
    Xn, y, site, _ = gbsg2
    many = FederatedCoxPH(share_event_times=True).fit(Xn, y, site=site)
    one = FederatedCoxPH(share_event_times=True).fit(Xn, y)
    np.testing.assert_allclose(many.coef_, one.coef_, rtol=1e-10)


def test_risk_set_sums_add_up_across_sites(gbsg2):
    Xn, y, site, _ = gbsg2
    X, time, event = Xn.to_numpy(), y["time"], y["cens"]
    beta = np.full(5, 0.1)
    grid = combine_cox_event_times([site_cox_event_times(time[site == s], event[site == s]) for s in "ABCD"])
    summed = combine_cox_risk_sets([site_cox_risk_sets(X[site == s], time[site == s], event[site == s], beta, grid)
                                    for s in "ABCD"])
    pooled = site_cox_risk_sets(X, time, event, beta, grid)
    np.testing.assert_allclose(summed.s2, pooled.s2, rtol=1e-12)
    a = cox_newton_from_risk_sets(summed, beta)
    b = site_cox_newton(X, time, event, beta)
    assert a.loglik == pytest.approx(b.loglik, rel=1e-12)


def test_site_without_events_adds_nothing_to_the_stratified_fit(gbsg2):
    Xn, y, site, frame = gbsg2
    censored = y.copy()
    censored["cens"][site == "D"] = False
    with_d = FederatedCoxPH().fit(Xn, censored, site=site)
    keep = site != "D"
    without_d = FederatedCoxPH().fit(Xn[keep], y[keep], site=site[keep])
    np.testing.assert_allclose(with_d.coef_, without_d.coef_, rtol=1e-12)


def test_collinear_columns_are_named(gbsg2):
    Xn, y, site, _ = gbsg2
    X = Xn.assign(age_twice=2 * Xn["age"], constant=1.0)
    with pytest.raises(RankDeficientError, match="2 column\\(s\\).*(age|age_twice).*constant"):
        FederatedCoxPH().fit(X, y, site=site)
    ridge = FederatedCoxPH(ridge=1.0).fit(X, y, site=site)  # a ridge makes it identifiable
    assert ridge.converged_


def test_ridge_equals_lifelines_penalizer(gbsg2):
    Xn, y, _, frame = gbsg2
    model = FederatedCoxPH(share_event_times=True, ridge=5.0).fit(Xn, y)
    # lifelines: loglik/n - penalizer * ½|β|² (l1_ratio=0), so ridge = penalizer * n
    ref = CoxPHFitter(penalizer=5.0 / len(Xn)).fit(frame.drop(columns="site"), "time", "event", fit_options=TIGHT)
    assert _rel(model.coef_, ref.params_.to_numpy()) < 1e-6


def test_bad_inputs_are_named(gbsg2):
    Xn, y, site, _ = gbsg2
    with pytest.raises(ValueError, match="686 rows but y has 10"):
        FederatedCoxPH().fit(Xn, y[:10])
    with pytest.raises(ValueError, match="column\\(s\\) tsize"):
        FederatedCoxPH().fit(Xn.assign(tsize=np.nan), y)
    with pytest.raises(ValueError, match="ties must be one of"):
        FederatedCoxPH(ties="exact").fit(Xn, y)
    with pytest.raises(ValueError, match="all samples are censored"):
        FederatedCoxPH().fit(Xn, Surv.from_arrays(np.zeros(len(y), bool), y["time"]))
