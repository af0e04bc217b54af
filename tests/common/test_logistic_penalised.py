"""Federated elastic-net logistic path with site-local CV equals pooled scikit-learn and a scipy reference.

Objective at each alpha (fedrad, glmnet's binomial scaling), intercept ``b`` unpenalised:
``-ℓ(b, w) / n + alpha · (r |w|₁ + (1-r)/2 |w|²)`` with ``r = l1_ratio``.
scikit-learn 1.9 ``LogisticRegression`` minimises ``C · Σ_i loss_i + r |w|₁ + (1-r)/2 |w|²`` with
``Σ_i loss_i = -ℓ`` (``_logistic.py``: "C * sum(pointwise_loss) + penalty"; ``penalty`` is deprecated,
``l1_ratio`` picks the mix). Dividing fedrad's objective by ``alpha`` gives
``-ℓ / (n · alpha) + r |w|₁ + (1-r)/2 |w|²``, scikit-learn's with ``C = 1 / (n · alpha)``; the minimisers
agree. Oracle, on the pooled rows::

    LogisticRegression(solver="saga", C=1 / (n * alpha), l1_ratio=r, tol=1e-12, max_iter=100_000,
                       random_state=0)

saga is stochastic: with some ``random_state`` (2, 4, 6 of 0-7) it stops early at ``alphas_[0]``, where
every coefficient is 0, with its intercept 1e-4 to 4e-4 off ``logit(mean y)``; elsewhere it agrees to
1e-9. The second reference (``pooled_reference``) minimises the same objective with scipy's L-BFGS-B,
``w = u - v``, ``u, v >= 0``, so that the L1 term is smooth (``Σ u + v``).

Data: GBSG-2 (scikit-survival ``load_gbsg2``, 686 patients), outcome ``cens``, the five numeric columns
standardised, four random pseudo-sites.
Measured (this environment), lasso / r = 0.5: path vs saga max abs 1.5e-11 / 9.4e-10, vs L-BFGS-B
7.3e-9 / 4.4e-9; CV deviance vs L-BFGS-B refits max rel 1.1e-9 / 4.2e-10; 1 site vs 4 sites 3.9e-16 /
2.8e-16; 7 round trips for 3 folds × 12 alphas.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import expit, logit
from sklearn.linear_model import LogisticRegression
from sklearn.utils._param_validation import InvalidParameterError

from fedrad.common.logistic import FederatedLogisticNetCV, LogisticInputError, site_logistic_newton

from tests.conftest import GBSG2_COLUMNS as COLUMNS


@pytest.fixture(scope="module")
def gbsg2_binary(gbsg2):
    Xn, y, site = gbsg2
    return Xn, y["cens"].astype(int), site


@pytest.fixture(scope="module", params=[1.0, 0.5], ids=["lasso", "enet"])
def fitted(request, gbsg2_binary):
    Xn, y, site = gbsg2_binary
    return FederatedLogisticNetCV(l1_ratio=request.param, n_alphas=12, cv=3).fit(Xn, y, site=site)


def pooled_reference(X, y, alpha, l1_ratio):
    """(intercept, w) minimising -ℓ/n + alpha (r Σ(u + v) + (1-r)/2 |u - v|²), u, v >= 0, by L-BFGS-B."""
    n, p = X.shape
    r = l1_ratio

    def objective(z):
        b, u, v = z[0], z[1:p + 1], z[p + 1:]
        w = u - v
        eta = b + X @ w
        resid = y - expit(eta)
        value = -np.sum(y * eta - np.logaddexp(0.0, eta)) / n + alpha * (r * np.sum(u + v) + 0.5 * (1 - r) * w @ w)
        grad_w = -X.T @ resid / n + alpha * (1 - r) * w
        return value, np.r_[-resid.sum() / n, grad_w + alpha * r, -grad_w + alpha * r]

    start = np.r_[logit(y.mean()), np.zeros(2 * p)]
    res = minimize(objective, start, jac=True, method="L-BFGS-B", bounds=[(None, None)] + [(0, None)] * (2 * p),
                   options={"ftol": 1e-16, "gtol": 1e-13, "maxiter": 10_000, "maxcor": 30})
    return res.x[0], res.x[1:p + 1] - res.x[p + 1:]


def test_path_equals_sklearn_saga(gbsg2_binary, fitted):
    Xn, y, _ = gbsg2_binary
    n = len(y)
    worst = 0.0
    for alpha, coef, intercept in zip(fitted.alphas_, fitted.coef_path_, fitted.intercept_path_):
        ref = LogisticRegression(solver="saga", C=1 / (n * alpha), l1_ratio=fitted.l1_ratio, tol=1e-12,
                                 max_iter=100_000, random_state=0).fit(Xn.to_numpy(), y)
        worst = max(worst, np.abs(ref.coef_[0] - coef).max(), abs(ref.intercept_[0] - intercept))
    assert worst < 1e-4


def test_path_equals_scipy_reference(gbsg2_binary, fitted):
    Xn, y, _ = gbsg2_binary
    for alpha, coef, intercept in zip(fitted.alphas_, fitted.coef_path_, fitted.intercept_path_):
        b, w = pooled_reference(Xn.to_numpy(), y, alpha, fitted.l1_ratio)
        np.testing.assert_allclose(np.r_[intercept, coef], np.r_[b, w], rtol=0, atol=1e-6)


def test_alpha_max_is_exact(gbsg2_binary, fitted):
    """At alphas_[0] every coefficient is 0 and the intercept is logit(mean y); just below, one is not."""
    Xn, y, site = gbsg2_binary
    X, yv = Xn.to_numpy(), y
    expected = np.abs(X.T @ (yv - yv.mean())).max() / (len(yv) * fitted.l1_ratio)
    assert fitted.alphas_[0] == pytest.approx(expected, rel=1e-12)
    assert np.all(fitted.coef_path_[0] == 0)
    assert fitted.intercept_path_[0] == pytest.approx(logit(yv.mean()), abs=1e-12)
    below = FederatedLogisticNetCV(l1_ratio=fitted.l1_ratio, alphas=fitted.alphas_[0] * np.array([1, 0.999]),
                                   cv=0).fit(Xn, y, site=site)
    assert np.all(below.coef_path_[0] == 0)
    assert np.count_nonzero(below.coef_path_[1]) >= 1


def test_cv_deviance_equals_pooled_refits_per_fold(gbsg2_binary, fitted):
    """Each fold refitted on its pooled training rows (L-BFGS-B); deviance = -2 × held-out log-likelihood."""
    Xn, y, _ = gbsg2_binary
    X, yv = Xn.to_numpy(), y
    assert fitted.cv_deviance_.shape == (3, 12)
    for k in range(3):
        train, held = fitted.folds_ != k, fitted.folds_ == k
        expected = []
        for alpha in fitted.alphas_:
            b, w = pooled_reference(X[train], yv[train], alpha, fitted.l1_ratio)
            design = np.column_stack([np.ones(held.sum()), X[held]])
            expected.append(-2 * site_logistic_newton(design, yv[held], np.r_[b, w]).loglik)
        np.testing.assert_allclose(fitted.cv_deviance_[k], expected, rtol=1e-5)
    np.testing.assert_allclose(fitted.cv_mean_, fitted.cv_deviance_.mean(axis=0))
    assert fitted.alpha_ == fitted.alphas_[np.argmin(fitted.cv_mean_)]


def test_whole_cross_validated_path_takes_few_round_trips(fitted):
    assert fitted.n_rounds_ <= 12


def test_folds_stay_within_sites_and_balance_outcomes(gbsg2_binary, fitted):
    _, y, site = gbsg2_binary
    for s in np.unique(site):
        rows = site == s
        per_fold = np.bincount(fitted.folds_[rows][y[rows] == 1], minlength=3)
        assert per_fold.max() - per_fold.min() <= 1


def test_one_site_equals_four_sites(gbsg2_binary):
    Xn, y, site = gbsg2_binary
    one = FederatedLogisticNetCV(l1_ratio=0.5, n_alphas=12, cv=0).fit(Xn, y)
    four = FederatedLogisticNetCV(l1_ratio=0.5, n_alphas=12, cv=0).fit(Xn, y, site=site)
    np.testing.assert_allclose(four.alphas_, one.alphas_, rtol=1e-13)
    np.testing.assert_allclose(four.coef_path_, one.coef_path_, rtol=0, atol=1e-12)
    np.testing.assert_allclose(four.intercept_path_, one.intercept_path_, rtol=0, atol=1e-12)
    assert four.alpha_ == four.alphas_[-1] and getattr(four, "cv_deviance_", None) is None


def test_one_standard_error_rule_prefers_the_sparser_model(gbsg2_binary):
    Xn, y, site = gbsg2_binary
    best = FederatedLogisticNetCV(n_alphas=12, cv=3).fit(Xn, y, site=site)
    sparse = FederatedLogisticNetCV(n_alphas=12, cv=3, rule="1se").fit(Xn, y, site=site)
    assert sparse.alpha_ >= best.alpha_
    chosen = np.flatnonzero(sparse.alphas_ == sparse.alpha_)[0]
    assert sparse.cv_mean_[chosen] <= best.cv_mean_.min() + best.cv_se_[np.argmin(best.cv_mean_)]


def test_prediction_uses_the_chosen_alpha(gbsg2_binary, fitted):
    Xn, y, _ = gbsg2_binary
    eta = fitted.intercept_ + Xn.to_numpy() @ fitted.coef_
    np.testing.assert_allclose(fitted.decision_function(Xn), eta)
    np.testing.assert_allclose(fitted.predict_proba(Xn)[:, 1], expit(eta))
    np.testing.assert_array_equal(fitted.predict(Xn), (eta > 0).astype(int))
    assert 0.5 < fitted.score(Xn, y) < 1
    assert list(fitted.feature_names_in_) == COLUMNS


def test_bad_inputs_are_named(gbsg2_binary):
    Xn, y, site = gbsg2_binary
    with pytest.raises(InvalidParameterError, match="'cv' parameter"):
        FederatedLogisticNetCV(cv=1).fit(Xn, y)
    with pytest.raises(InvalidParameterError, match="'rule' parameter"):
        FederatedLogisticNetCV(rule="max").fit(Xn, y)
    with pytest.raises(LogisticInputError, match="y must be binary"):
        FederatedLogisticNetCV().fit(Xn, y * 2)
    with pytest.raises(LogisticInputError, match="needs both classes"):
        FederatedLogisticNetCV().fit(Xn, np.zeros(len(y)))
    with pytest.raises(LogisticInputError, match="site has shape"):
        FederatedLogisticNetCV().fit(Xn, y, site=site[:-1])
    with pytest.raises(ValueError, match="alphas must be"):
        FederatedLogisticNetCV(alphas=[0.1, -1.0]).fit(Xn, y)
    with pytest.raises(AttributeError, match="not fitted"):
        FederatedLogisticNetCV().predict(Xn)
