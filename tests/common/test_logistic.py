"""Federated logistic regression equals pooled scikit-learn, whatever the split of rows into sites.

Oracle: scikit-learn 1.9 ``LogisticRegression(solver="newton-cg", tol=1e-12, max_iter=10000)``
run here on the pooled rows. scikit-learn >= 1.8 deprecates ``penalty``: no penalty is ``C=np.inf``
(formerly ``penalty=None``) and l2 is the default ``l1_ratio=0`` with finite ``C``.

Penalty correspondence: scikit-learn minimises ``C · Σ_i loss_i + ½ |w|²`` (``w`` without the
intercept; ``_logistic.py``: "objective ... C * sum(pointwise_loss) + penalty"). fedrad maximises
``ℓ(β) - ½ · ridge · |w|²``, i.e. minimises ``Σ_i loss_i + ½ · ridge · |w|²``; multiplying by ``C``
gives scikit-learn's objective when ``C · ridge = 1``, so ``C = 1 / ridge``, intercept unpenalised
in both.

statsmodels is not installed in this environment, so the Wald standard errors are checked
against ``sqrt(diag((Xᵀ W X)⁻¹))`` computed here with numpy at scikit-learn's coefficients.

Data: scikit-survival's GBSG-2 (686 breast-cancer patients), outcome = ``cens`` (recurrence or
death observed), six numeric columns, unstandardised.
Measured (this environment), max relative difference of (intercept, coef) vs scikit-learn:
4.1e-13 unpenalised (3, 4, 6 sites), 7.0e-13 / 4.6e-13 / 3.2e-13 with ridge = 0.5 / 2 / 50;
Wald SE vs numpy 1.4e-13; 1 site vs 6 sites 7.5e-16; separated data with ridge = 1: 4.7e-13.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.optimize import approx_fprime, check_grad
from scipy.special import expit
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.utils._param_validation import InvalidParameterError
from sksurv.datasets import load_gbsg2

from fedrad.common.errors import FedradError
from fedrad.common.logistic import (
    FederatedLogisticRegression,
    LogisticInputError,
    SeparationError,
    site_logistic_newton,
    update_logistic_newton,
)
from fedrad.common.newton import ConvergenceWarning, RankDeficientError, combine_newton, start_newton

FEATURES = ["age", "tsize", "pnodes", "progrec", "estrec", "horTh"]


@pytest.fixture(scope="module")
def gbsg2():
    X, y = load_gbsg2()
    X = X[FEATURES[:-1]].assign(horTh=(X["horTh"] == "yes").astype(float))
    return X, y["cens"].astype(int)


def sklearn_fit(X, y, ridge=0.0):
    ref = LogisticRegression(C=np.inf if ridge == 0 else 1.0 / ridge, solver="newton-cg", tol=1e-12,
                             max_iter=10000).fit(np.asarray(X), np.asarray(y))
    return np.r_[ref.intercept_, ref.coef_[0]]


def params(model):
    return np.r_[model.intercept_, model.coef_]


def max_rel(a, b):
    return float(np.max(np.abs(a - b) / np.abs(b)))


def sites_of(n, k, seed=0):
    """Unequal pseudo-sites: a fixed random label in 0..k-1 with probabilities 1..k."""
    weights = np.arange(1, k + 1) / np.arange(1, k + 1).sum()
    return np.random.default_rng(seed).choice([f"S{i}" for i in range(k)], size=n, p=weights)


# -- the site function ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small():
    rng = np.random.default_rng(3)
    X = np.column_stack([np.ones(40), rng.normal(size=(40, 3))])
    y = (rng.random(40) < expit(X @ [0.2, 1.0, -0.5, 0.3])).astype(float)
    return X, y, np.array([0.1, 0.7, -0.2, 0.4])


def test_gradient_matches_finite_differences(small):
    X, y, beta = small
    err = check_grad(lambda b: site_logistic_newton(X, y, b).loglik, lambda b: site_logistic_newton(X, y, b).grad,
                     beta)
    assert err < 1e-5 * np.linalg.norm(site_logistic_newton(X, y, beta).grad)


def test_hessian_matches_finite_differences_of_gradient(small):
    X, y, beta = small
    hess = site_logistic_newton(X, y, beta).hess
    numeric = np.array([approx_fprime(beta, lambda b: site_logistic_newton(X, y, b).grad[i], 1e-6)
                        for i in range(len(beta))])
    np.testing.assert_allclose(numeric, hess, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(hess, hess.T)


def test_site_summary_counts_and_sums(small):
    X, y, beta = small
    whole = site_logistic_newton(X, y, beta)
    parts = combine_newton([site_logistic_newton(X[:15], y[:15], beta), site_logistic_newton(X[15:], y[15:], beta)])
    assert (whole.n, whole.events) == (40, int(y.sum())) == (parts.n, parts.events)
    np.testing.assert_allclose(parts.grad, whole.grad, rtol=1e-12)
    np.testing.assert_allclose(parts.hess, whole.hess, rtol=1e-12)
    assert parts.loglik == pytest.approx(whole.loglik, rel=1e-12)


def test_no_overflow_for_large_linear_predictor():
    X = np.array([[1.0, 800.0], [1.0, -800.0], [1.0, 5.0]])
    y = np.array([0.0, 1.0, 1.0])
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        s = site_logistic_newton(X, y, np.array([0.0, 1.0]))
    # rows 1 and 2 are wrong by |eta| = 800; row 3 contributes -log(1 + e^-5)
    assert s.loglik == pytest.approx(-1600.0 - np.log1p(np.exp(-5.0)), rel=1e-12)
    assert np.all(np.isfinite(s.grad)) and np.all(np.isfinite(s.hess))


# -- equality with scikit-learn on real data ------------------------------------------------------------

@pytest.mark.parametrize("k", [3, 4, 6])
def test_federated_equals_sklearn_unpenalised(gbsg2, k):
    X, y = gbsg2
    model = FederatedLogisticRegression().fit(X, y, site=sites_of(len(y), k))
    assert model.converged_ and model.n_sites_ == k
    assert max_rel(params(model), sklearn_fit(X, y)) < 1e-6  # measured 4.1e-13
    assert list(model.summary_.index) == ["intercept", *FEATURES]
    assert list(model.feature_names_in_) == FEATURES


def test_one_site_equals_k_sites(gbsg2):
    X, y = gbsg2
    one = FederatedLogisticRegression().fit(X, y)
    six = FederatedLogisticRegression().fit(X, y, site=sites_of(len(y), 6, seed=5))
    assert max_rel(params(six), params(one)) < 1e-10
    assert six.n_iter_ == one.n_iter_
    assert six.loglik_ == pytest.approx(one.loglik_, rel=1e-12)
    np.testing.assert_allclose(six.hessian_, one.hessian_, rtol=1e-10)


def test_site_with_one_outcome_class_still_contributes(gbsg2):
    X, y = gbsg2
    site = np.where(y == 0, "A", "B")  # A: all 0, B: all 1
    site[::3] = "C"
    model = FederatedLogisticRegression().fit(X, y, site=site)
    assert max_rel(params(model), sklearn_fit(X, y)) < 1e-6


def test_wald_se_equals_inverse_information(gbsg2):
    X, y = gbsg2
    model = FederatedLogisticRegression().fit(X, y, site=sites_of(len(y), 4))
    beta = sklearn_fit(X, y)
    design = np.column_stack([np.ones(len(y)), X.to_numpy()])
    p = expit(design @ beta)
    se = np.sqrt(np.diag(np.linalg.inv(design.T @ (design * (p * (1 - p))[:, None]))))
    assert max_rel(model.summary_["se"].to_numpy(), se) < 1e-6
    np.testing.assert_allclose(model.summary_["OR"], np.exp(params(model)))
    lower = np.exp(params(model) - 1.959963984540054 * model.summary_["se"].to_numpy())
    np.testing.assert_allclose(model.summary_["OR lower 95%"], lower, rtol=1e-9)


def test_loglik_and_null_loglik(gbsg2):
    X, y = gbsg2
    model = FederatedLogisticRegression().fit(X, y, site=sites_of(len(y), 3))
    eta = model.decision_function(X)
    assert model.loglik_ == pytest.approx(float(np.sum(y * eta - np.logaddexp(0, eta))), rel=1e-12)
    # statsmodels' llnull: the intercept-only fit, whose probability is the event rate
    rate = y.mean()
    assert model.loglik_null_ == pytest.approx(len(y) * (rate * np.log(rate) + (1 - rate) * np.log(1 - rate)),
                                               rel=1e-12)
    intercept_only = FederatedLogisticRegression().fit(np.empty((len(y), 0)), y, site=sites_of(len(y), 3))
    assert intercept_only.loglik_ == pytest.approx(model.loglik_null_, rel=1e-12)
    no_intercept = FederatedLogisticRegression(fit_intercept=False).fit(X, y)
    assert no_intercept.loglik_null_ == pytest.approx(-len(y) * np.log(2), rel=1e-12)


@pytest.mark.parametrize("ridge", [0.5, 2.0, 50.0])
def test_ridge_equals_sklearn_l2_with_c_one_over_ridge(gbsg2, ridge):
    X, y = gbsg2
    model = FederatedLogisticRegression(ridge=ridge).fit(X, y, site=sites_of(len(y), 5))
    assert model.converged_
    assert max_rel(params(model), sklearn_fit(X, y, ridge=ridge)) < 1e-6  # measured 4.6e-13 at ridge=2


def test_predictions_and_auc(gbsg2):
    X, y = gbsg2
    model = FederatedLogisticRegression().fit(X, y, site=sites_of(len(y), 4))
    proba = model.predict_proba(X)
    assert proba.shape == (len(y), 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_allclose(proba[:, 1], expit(model.decision_function(X)))
    np.testing.assert_array_equal(model.predict(X), (proba[:, 1] > 0.5).astype(int))
    assert model.score(X, y) == pytest.approx(roc_auc_score(y, proba[:, 1]))
    np.testing.assert_allclose(model.decision_function(X[FEATURES[::-1]]), model.decision_function(X))
    with pytest.raises(LogisticInputError, match="X has 2 features; the model was fitted with 6"):
        model.decision_function(np.zeros((3, 2)))


def test_sklearn_manners(gbsg2):
    X, y = gbsg2
    model = FederatedLogisticRegression(ridge=1.0, max_iter=20)
    assert clone(model).get_params() == {"fit_intercept": True, "ridge": 1.0, "tol": 1e-10, "max_iter": 20}
    with pytest.raises(TypeError):
        FederatedLogisticRegression(True)
    with pytest.raises(InvalidParameterError, match="ridge"):
        FederatedLogisticRegression(ridge=-1.0).fit(X, y)


def test_no_intercept_matches_sklearn(gbsg2):
    X, y = gbsg2
    Xc = (X - X.mean()) / X.std()
    model = FederatedLogisticRegression(fit_intercept=False).fit(Xc, y, site=sites_of(len(y), 3))
    ref = LogisticRegression(C=np.inf, fit_intercept=False, solver="newton-cg", tol=1e-12, max_iter=10000).fit(
        Xc.to_numpy(), y)
    assert model.intercept_ == 0.0 and list(model.summary_.index) == FEATURES
    assert max_rel(model.coef_, ref.coef_[0]) < 1e-6


def test_separation_at_max_iter_only_warns_naming_the_column():
    X, y, site = separated("quasi")
    with pytest.warns(ConvergenceWarning, match="steps were not shrinking, as under separation: 'marker'"):
        model = FederatedLogisticRegression(max_iter=8).fit(X, y, site=site)
    assert model.converged_ is False


def test_max_iter_warns_and_leaves_not_converged(gbsg2):
    X, y = gbsg2
    with pytest.warns(ConvergenceWarning, match="did not converge in 2 iterations"):
        model = FederatedLogisticRegression(max_iter=2).fit(X, y)
    assert model.converged_ is False and model.n_iter_ == 2


# -- separation and aliasing ------------------------------------------------------------------------------

def separated(kind):
    rng = np.random.default_rng(7)
    n = 200
    X = pd.DataFrame({"noise": rng.normal(size=n), "marker": rng.normal(size=n)})
    if kind == "complete":  # marker > 0.3 <=> y = 1
        y = (X["marker"] > 0.3).astype(int)
    else:  # quasi-complete: every marker = 1 has y = 1, the others are mixed
        X["marker"] = (rng.random(n) < 0.3).astype(float)
        y = np.where(X["marker"] == 1, 1, (rng.random(n) < 0.4).astype(int))
    return X, y, np.arange(n) % 3


@pytest.mark.parametrize("kind", ["complete", "quasi"])
def test_separation_is_refused_naming_the_column(kind):
    X, y, site = separated(kind)
    rule = "deviance" if kind == "complete" else "steps were not shrinking"
    with pytest.raises(SeparationError, match=rf"{rule}.*separating column\(s\): 'marker'.*ridge"):
        FederatedLogisticRegression().fit(X, y, site=site)


@pytest.mark.parametrize("kind", ["complete", "quasi"])
def test_separation_with_ridge_converges_to_sklearn(kind):
    X, y, site = separated(kind)
    model = FederatedLogisticRegression(ridge=1.0).fit(X, y, site=site)
    assert model.converged_
    assert max_rel(params(model), sklearn_fit(X, y, ridge=1.0)) < 1e-6


def test_coordinator_step_refuses_separation_from_sums_only():
    """The coordinator loop by hand: only NewtonSummary sums reach update_logistic_newton."""
    X, y, site = separated("complete")
    design = np.column_stack([np.ones(len(y)), X.to_numpy()])
    state = start_newton(3)
    with pytest.raises(SeparationError, match="'marker'"):
        for _ in range(100):
            total = combine_newton([site_logistic_newton(design[site == s], y[site == s], state.beta)
                                    for s in range(3)])
            state = update_logistic_newton(state, total, names=["intercept", "noise", "marker"])


@pytest.mark.parametrize("extra, named", [("a + 2 b", "'?(a|b|c)'?"), ("constant", "c")])
def test_aliased_column_is_named(extra, named):
    rng = np.random.default_rng(1)
    X = pd.DataFrame({"a": rng.normal(size=100), "b": rng.normal(size=100)})
    X["c"] = X["a"] + 2 * X["b"] if extra == "a + 2 b" else 3.0
    y = (rng.random(100) < 0.5).astype(int)
    with pytest.raises(RankDeficientError, match=rf"linear combinations of the others: {named};"):
        FederatedLogisticRegression().fit(X, y, site=np.arange(100) % 2)


# -- validation messages -------------------------------------------------------------------------------------

def test_non_binary_y_names_the_values():
    X = np.zeros((5, 1))
    with pytest.raises(LogisticInputError, match=r"y must be binary .*found value\(s\) 2, -1"):
        FederatedLogisticRegression().fit(X, [0, 1, 2, -1, 1])
    with pytest.raises(LogisticInputError, match=r"found value\(s\) 'yes', 'no'"):
        FederatedLogisticRegression().fit(X, ["yes", "no", "yes", "no", "no"])
    with pytest.raises(LogisticInputError, match=r"found value\(s\) nan"):
        FederatedLogisticRegression().fit(X, [0, 1, np.nan, 1, 0])
    assert issubclass(LogisticInputError, FedradError) and issubclass(LogisticInputError, ValueError)


def test_boolean_y_is_accepted(gbsg2):
    X, y = gbsg2
    model = FederatedLogisticRegression().fit(X, y.astype(bool))
    assert max_rel(params(model), sklearn_fit(X, y)) < 1e-6


def test_length_mismatch_gives_both_lengths():
    with pytest.raises(LogisticInputError, match="X has 5 rows but y has 4"):
        FederatedLogisticRegression().fit(np.zeros((5, 2)), [0, 1, 0, 1])
    with pytest.raises(LogisticInputError, match=r"X has 4 rows but site has shape \(3,\)"):
        FederatedLogisticRegression().fit(np.zeros((4, 2)), [0, 1, 0, 1], site=["A", "B", "A"])


def test_missing_value_in_x_names_the_column():
    X = pd.DataFrame({"age": [50.0, 60.0, 70.0, 40.0], "size": [1.0, np.nan, 2.0, 3.0]})
    with pytest.raises(LogisticInputError, match=r"column 'size' has 1 missing or non-finite value\(s\) "
                                                 r"\(first at row 1\)"):
        FederatedLogisticRegression().fit(X, [0, 1, 0, 1])
    with pytest.raises(LogisticInputError, match="column 'x1'"):
        FederatedLogisticRegression().fit(X.to_numpy(), [0, 1, 0, 1])


def test_non_numeric_column_is_named():
    X = pd.DataFrame({"age": [50.0, 60.0, 70.0, 40.0], "grade": ["I", "II", "I", "III"]})
    with pytest.raises(LogisticInputError, match="column 'grade' is not numeric"):
        FederatedLogisticRegression().fit(X, [0, 1, 0, 1])


def test_single_outcome_class_is_refused():
    with pytest.raises(LogisticInputError, match="all 4 outcomes are 1; logistic regression needs both classes"):
        FederatedLogisticRegression().fit(np.arange(8.0).reshape(4, 2), [1, 1, 1, 1])
