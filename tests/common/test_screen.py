"""Federated univariate score screens equal the one-feature models' score tests on the pooled data.

Data: GBSG2 (686 patients, 299 recurrences; ``sksurv.datasets.load_gbsg2``) for Cox, and the
Wisconsin breast cancer features (569 cases, 30 image features; ``sklearn.datasets.load_breast_cancer``)
for logistic, each split at random into pseudo-sites. References, on the same rows:

* Cox: ``grad² / -hess`` of :func:`fedrad.common.cox.site_cox_newton` at β = 0 for each one-feature model,
  summed over sites (stratified), for both ties; and ``lifelines.statistics.logrank_test`` for a
  0/1 feature without tied times (the Cox score test is then the log-rank test).
* logistic: ``gᵀ(-H)⁻¹g`` of :func:`fedrad.common.logistic.site_logistic_newton` at the pooled
  intercept-only fit (logit p̂, 0) of the design [1, x_j]; ``n · r²`` from ``np.corrcoef``; and
  ``scipy.stats.chi2_contingency(correction=False)`` for a 0/1 feature.
* q-values: ``scipy.stats.false_discovery_control(p, method="bh")``.
"""

from __future__ import annotations

import numpy as np
import pytest
from lifelines.statistics import logrank_test
from scipy import stats
from scipy.special import logit
from sklearn.datasets import load_breast_cancer
from sksurv.datasets import load_gbsg2

from fedrad.common.cox import site_cox_newton
from fedrad.common.logistic import site_logistic_newton
from fedrad.common.newton import combine_newton
from fedrad.common.screen import (ScreenInputError, bh_fdr, combine_cox_screen, combine_logistic_screen, site_cox_screen,
                           site_logistic_screen, update_cox_screen, update_logistic_screen)


@pytest.fixture(scope="module")
def gbsg2():
    X, y = load_gbsg2()
    Xn = X[["age", "estrec", "pnodes", "progrec", "tsize"]].astype(float).to_numpy()
    Xn = np.column_stack([Xn, (X["horTh"] == "yes").to_numpy(float)])  # raw units, and one 0/1 feature
    site = np.random.default_rng(0).choice(["A", "B", "C", "D"], size=len(Xn))
    return Xn, y["time"].astype(float), y["cens"].astype(bool), site


@pytest.fixture(scope="module")
def wdbc():
    data = load_breast_cancer()
    site = np.random.default_rng(1).choice(["A", "B", "C"], size=len(data.target))
    return data.data, data.target, site


def _groups(site):
    return [np.flatnonzero(site == s) for s in np.unique(site)]


def _cox_screen(X, time, event, site, ties):
    return update_cox_screen(combine_cox_screen([site_cox_screen(X[g], time[g], event[g], ties=ties)
                                                 for g in _groups(site)]))


@pytest.mark.parametrize("ties", ["efron", "breslow"])
def test_stratified_cox_screen_equals_one_feature_newton_at_zero(gbsg2, ties):
    X, time, event, site = gbsg2
    assert len(np.unique(time[event])) < event.sum()  # GBSG2 has tied event times, so the ties matter
    result = _cox_screen(X, time, event, site, ties)
    for j in range(X.shape[1]):
        total = combine_newton([site_cox_newton(X[g][:, [j]], time[g], event[g], np.zeros(1), ties=ties)
                                for g in _groups(site)])
        assert abs(result.score[j] / total.grad[0] - 1) < 1e-11
        assert abs(result.information[j] / -total.hess[0, 0] - 1) < 1e-11
        assert abs(result.statistic[j] / (total.grad[0] ** 2 / -total.hess[0, 0]) - 1) < 1e-11
    assert result.n == len(X) and result.events == event.sum()
    np.testing.assert_allclose(result.p_value, stats.chi2.sf(result.statistic, 1), rtol=1e-14)
    np.testing.assert_allclose(result.q_value, stats.false_discovery_control(result.p_value, method="bh"),
                               rtol=1e-14)


def test_efron_and_breslow_differ_only_with_ties(gbsg2):
    X, time, event, site = gbsg2
    efron, breslow = (_cox_screen(X, time, event, site, ties) for ties in ("efron", "breslow"))
    assert np.max(np.abs(efron.statistic / breslow.statistic - 1)) > 1e-6
    jitter = time + np.random.default_rng(2).uniform(0, 1e-3, size=len(time))  # no ties left
    efron, breslow = (_cox_screen(X, jitter, event, site, ties) for ties in ("efron", "breslow"))
    np.testing.assert_allclose(efron.statistic, breslow.statistic, rtol=1e-12)


def test_cox_screen_of_a_binary_feature_is_the_logrank_test():
    rng = np.random.default_rng(3)
    group = rng.integers(0, 2, size=300).astype(float)
    time = rng.exponential(1 / np.exp(0.4 * group))
    event = rng.uniform(size=300) < 0.7
    result = update_cox_screen(site_cox_screen(group[:, None], time, event))
    reference = logrank_test(time[group == 0], time[group == 1], event[group == 0], event[group == 1])
    assert abs(result.statistic[0] / reference.test_statistic - 1) < 1e-12
    assert abs(result.p_value[0] / reference.p_value - 1) < 1e-10


def test_logistic_screen_equals_score_test_at_the_intercept_only_fit(wdbc):
    X, y, site = wdbc
    groups = _groups(site)
    result = update_logistic_screen(combine_logistic_screen([site_logistic_screen(X[g], y[g]) for g in groups]))
    beta = np.array([logit(y.mean()), 0.0])
    for j in range(X.shape[1]):
        total = combine_newton([site_logistic_newton(np.column_stack([np.ones(len(g)), X[g, j]]), y[g], beta)
                                for g in groups])
        expected = total.grad @ np.linalg.solve(-total.hess, total.grad)
        assert abs(result.statistic[j] / expected - 1) < 1e-10
        assert abs(result.score[j] / total.grad[1] - 1) < 1e-10
    r = np.array([np.corrcoef(X[:, j], y)[0, 1] for j in range(X.shape[1])])
    np.testing.assert_allclose(result.statistic, len(y) * r**2, rtol=1e-12)
    np.testing.assert_allclose(result.q_value, stats.false_discovery_control(result.p_value, method="bh"),
                               rtol=1e-13)


def test_logistic_screen_of_a_binary_feature_is_pearson_chi_square(wdbc):
    X, y, site = wdbc
    x = (X[:, 0] > np.median(X[:, 0])).astype(float)
    result = update_logistic_screen(combine_logistic_screen([site_logistic_screen(x[g, None], y[g])
                                                             for g in _groups(site)]))
    table = np.array([[np.sum((x == a) & (y == b)) for b in (0, 1)] for a in (0, 1)])
    chi2, p, *_ = stats.chi2_contingency(table, correction=False)
    assert abs(result.statistic[0] / chi2 - 1) < 1e-12
    assert abs(result.p_value[0] / p - 1) < 1e-10


def test_logistic_pooling_is_exact_with_a_large_offset(wdbc):
    """Σx² - (Σx)²/n would cancel at an offset 1e6 times the spread; the centred sums do not."""
    X, y, site = wdbc
    x = 1e6 + X[:, :3] / X[:, :3].std(axis=0)
    federated = update_logistic_screen(combine_logistic_screen([site_logistic_screen(x[g], y[g])
                                                                for g in _groups(site)]))
    pooled = update_logistic_screen(site_logistic_screen(x - 1e6, y))
    np.testing.assert_allclose(federated.statistic, pooled.statistic, rtol=1e-8)


def test_bh_fdr_equals_scipy():
    rng = np.random.default_rng(4)
    p = np.concatenate([rng.uniform(size=200), rng.uniform(0, 1e-3, size=20), [0.0, 1.0, 0.5, 0.5]])
    rng.shuffle(p)
    np.testing.assert_allclose(bh_fdr(p), stats.false_discovery_control(p, method="bh"), rtol=1e-15, atol=0)
    assert bh_fdr(np.array([])).shape == (0,)


def test_bad_inputs_are_refused_with_the_reason(gbsg2, wdbc):
    X, time, event, _ = gbsg2
    with pytest.raises(ScreenInputError, match="ties must be one of"):
        site_cox_screen(X, time, event, ties="exact")
    with pytest.raises(ScreenInputError, match="X has 10 rows but the outcome has 686"):
        site_cox_screen(X[:10], time, event)
    bad = X.copy()
    bad[[5, 9], 2] = np.nan
    with pytest.raises(ScreenInputError, match=r"feature 2 has 2 missing or non-finite value\(s\)"):
        site_cox_screen(bad, time, event)
    censored = site_cox_screen(X[:20], time[:20], np.zeros(20, bool))
    assert censored.events == 0 and not censored.score.any()
    with pytest.raises(ScreenInputError, match="all 20 samples are censored at every site"):
        update_cox_screen(censored)
    constant = np.column_stack([X[:, 0], np.full(len(X), 7.0)])
    with pytest.raises(ScreenInputError, match=r"1 feature\(s\) carry no information .* e\.g\. glcm_Id"):
        update_cox_screen(site_cox_screen(constant, time, event), feature_names=["age", "glcm_Id"])
    Xw, y, _ = wdbc
    with pytest.raises(ScreenInputError, match="y must be binary"):
        site_logistic_screen(Xw[:5], np.array([0, 1, 2, 0, 1]))
    with pytest.raises(ScreenInputError, match="all 40 outcomes are 1; a logistic screen needs both classes"):
        update_logistic_screen(site_logistic_screen(Xw[:40], np.ones(40)))
    with pytest.raises(ScreenInputError, match="different numbers of features: \\[2, 3\\]"):
        combine_logistic_screen([site_logistic_screen(Xw[:9, :2], y[:9]), site_logistic_screen(Xw[:9, :3], y[:9])])
    with pytest.raises(ScreenInputError, match=r"p-values must lie in \[0, 1\]"):
        bh_fdr([0.1, np.nan])
