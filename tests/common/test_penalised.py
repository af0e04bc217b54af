"""Elastic-net paths with site-local cross-validation equal the pooled references.

Data: GBSG2 from scikit-survival (686 patients), five standardised numeric covariates, four
random pseudo-sites. References: ``sksurv.linear_model.CoxnetSurvivalAnalysis(l1_ratio, alphas,
tol=1e-12)`` (Breslow ties, objective -ℓ/n + λ·penalty) on the pooled rows; scikit-learn
``Lasso`` for the coordinate-descent sub-solver.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import Lasso
from sksurv.linear_model import CoxnetSurvivalAnalysis

from fedrad.common.cox import FederatedCoxnetCV, site_cox_newton
from fedrad.common.penalised import Penalty, cv_choice, fold_ids, solve_penalised_quadratic

@pytest.fixture(scope="module")
def fitted(gbsg2):
    Xn, y, site = gbsg2
    return FederatedCoxnetCV(l1_ratio=0.5, n_alphas=12, cv=3, share_event_times=True).fit(Xn, y, site=site)


def test_quadratic_subsolver_equals_sklearn_lasso():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(80, 6))
    y = X @ np.array([1.5, 0, -2, 0, 0.3, 0]) + rng.normal(size=80)
    # Gaussian log-likelihood -½|y - Xβ|²: gradient Xᵀy and Hessian -XᵀX at β = 0
    beta = solve_penalised_quadratic(np.zeros(6), X.T @ y, -X.T @ X, 80, 0.1, Penalty(1.0, np.ones(6)))
    reference = Lasso(alpha=0.1, fit_intercept=False, tol=1e-14, max_iter=100_000).fit(X, y).coef_
    np.testing.assert_allclose(beta, reference, atol=1e-10)


def test_path_equals_coxnet(gbsg2, fitted):
    Xn, y, _ = gbsg2
    reference = CoxnetSurvivalAnalysis(l1_ratio=0.5, alphas=fitted.alphas_, tol=1e-12, max_iter=100_000).fit(Xn, y)
    assert np.abs(fitted.coef_path_ - reference.coef_.T).max() < 1e-5
    assert fitted.alphas_[0] == pytest.approx(
        CoxnetSurvivalAnalysis(l1_ratio=0.5, n_alphas=3).fit(Xn, y).alphas_[0], rel=1e-10)  # same λ_max
    assert not fitted.coef_path_[0].any()  # everything is zero at λ_max


def test_whole_cross_validated_path_takes_few_round_trips(fitted):
    assert fitted.n_rounds_ <= 12  # all folds x λ values share every round


def test_cv_deviance_equals_pooled_refits_per_fold(gbsg2, fitted):
    """Each fold refitted by Coxnet on the pooled training rows; CVPL = ℓ_all(β) - ℓ_train(β)."""
    Xn, y, _ = gbsg2
    X, time, event = Xn.to_numpy(), y["time"], y["cens"]
    for k in range(3):
        train = fitted.folds_ != k
        ref = CoxnetSurvivalAnalysis(l1_ratio=0.5, alphas=fitted.alphas_, tol=1e-12, max_iter=100_000).fit(
            Xn[train], y[train])
        deviance = [-2 * (site_cox_newton(X, time, event, b, ties="breslow").loglik
                          - site_cox_newton(X[train], time[train], event[train], b, ties="breslow").loglik)
                    for b in ref.coef_.T]
        np.testing.assert_allclose(fitted.cv_deviance_[k], deviance, rtol=1e-6)
    chosen = int(np.argmin(fitted.cv_deviance_.mean(axis=0)))
    assert fitted.alpha_ == fitted.alphas_[chosen]
    np.testing.assert_array_equal(fitted.coef_, fitted.coef_path_[chosen])


def test_folds_stay_within_sites_and_balance_events():
    event = np.array([1] * 10 + [0] * 20)
    folds = fold_ids(30, 5, seed=[0, 1], stratify=event)
    assert np.bincount(folds).tolist() == [6] * 5
    assert np.bincount(folds[event == 1]).tolist() == [2] * 5


def test_one_standard_error_rule_prefers_the_sparser_model():
    deviance = np.array([[10.0, 9.0, 8.9, 9.5], [10.2, 8.9, 8.8, 9.4], [9.8, 8.95, 9.0, 9.6]])
    lambdas = np.array([1.0, 0.5, 0.25, 0.1])
    assert cv_choice(deviance, lambdas, "min")[0] == 2
    assert cv_choice(deviance, lambdas, "1se")[0] == 1
