"""Federated correlation equals ``np.corrcoef`` on the pooled rows; mRMR skips a redundant copy.

Data: the Wisconsin breast cancer features (569 cases, 30 image features in very different units;
``sklearn.datasets.load_breast_cancer``) split at random into three pseudo-sites.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_breast_cancer

from fedrad.common.correlation import (CorrelationInputError, combine_correlation, mrmr, relevance_from_statistic,
                                site_correlation, update_correlation)
from fedrad.common.screen import combine_logistic_screen, site_logistic_screen, update_logistic_screen


@pytest.fixture(scope="module")
def wdbc():
    data = load_breast_cancer()
    site = np.random.default_rng(1).choice(["A", "B", "C"], size=len(data.target))
    return data.data, data.target, [np.flatnonzero(site == s) for s in ("A", "B", "C")]


def _federated(X, groups):
    return update_correlation(combine_correlation([site_correlation(X[g]) for g in groups]))


def test_three_sites_equal_numpy_corrcoef(wdbc):
    X, _, groups = wdbc
    reference = np.corrcoef(X, rowvar=False)
    assert np.max(np.abs(_federated(X, groups) - reference)) < 1e-12
    assert np.max(np.abs(_federated(X, [np.arange(len(X))]) - reference)) < 1e-12
    pooled = combine_correlation([site_correlation(X[g]) for g in groups])
    np.testing.assert_allclose(pooled.m / (pooled.n - 1), np.cov(X, rowvar=False), rtol=1e-12)


def test_large_offset_small_spread_stays_accurate(wdbc):
    X, _, groups = wdbc
    Z = 1e6 + X[:, :5] / X[:, :5].std(axis=0)
    np.testing.assert_allclose(_federated(Z, groups), np.corrcoef(Z - 1e6, rowvar=False), atol=1e-9)


def test_pooling_is_associative(wdbc):
    X, _, groups = wdbc
    a, b, c = (site_correlation(X[g]) for g in groups)
    np.testing.assert_allclose(combine_correlation([combine_correlation([a, b]), c]).m,
                               combine_correlation([a, b, c]).m, rtol=1e-12)


def test_mrmr_skips_a_redundant_copy_of_the_top_feature():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(5000, 3))
    X = np.column_stack([z[:, 0], z[:, 0] + 0.05 * rng.normal(size=5000), z[:, 1], z[:, 2]])
    corr = update_correlation(site_correlation(X))
    assert corr[0, 1] > 0.99 and np.abs(corr[0, 2:]).max() < 0.05
    relevance = np.array([0.60, 0.59, 0.30, 0.20])
    assert mrmr(relevance, corr, 1) == [0]
    assert mrmr(relevance, corr, 2) == [0, 2]  # not the copy: 0.59 - 0.99 < 0.30 - 0.0x
    assert mrmr(relevance, corr, 4) == [0, 2, 3, 1]
    # the MID score by hand, third pick: rel_j - (|ρ_j0| + |ρ_j2|) / 2
    score = {j: relevance[j] - (abs(corr[j, 0]) + abs(corr[j, 2])) / 2 for j in (1, 3)}
    assert max(score, key=score.get) == 3


def test_mrmr_ties_go_to_the_lower_index():
    corr = np.eye(3)
    assert mrmr(np.array([0.5, 0.5, 0.5]), corr, 3) == [0, 1, 2]


def test_screen_relevance_is_the_absolute_correlation_with_the_outcome(wdbc):
    X, y, groups = wdbc
    screen = update_logistic_screen(combine_logistic_screen([site_logistic_screen(X[g], y[g]) for g in groups]))
    relevance = relevance_from_statistic(screen.statistic, screen.n)
    reference = np.abs(np.corrcoef(np.column_stack([X, y]), rowvar=False)[-1, :-1])
    assert np.max(np.abs(relevance - reference)) < 1e-12
    selected = mrmr(relevance, _federated(X, groups), 5)
    assert selected[0] == int(np.argmax(reference)) and len(set(selected)) == 5


def test_bad_inputs_are_refused_with_the_reason(wdbc):
    X, _, _ = wdbc
    with pytest.raises(CorrelationInputError, match=r"must be 2-D \(n_samples, n_features\); got shape \(5,\)"):
        site_correlation(X[:5, 0])
    bad = X[:10, :4].copy()
    bad[3, 1] = np.inf
    with pytest.raises(CorrelationInputError, match=r"feature 1 has 1 missing or non-finite value\(s\)"):
        site_correlation(bad)
    with pytest.raises(CorrelationInputError, match=r"different numbers of features: \[3, 4\]"):
        combine_correlation([site_correlation(X[:9, :3]), site_correlation(X[:9, :4])])
    constant = np.column_stack([X[:9, 0], np.ones(9)])
    with pytest.raises(CorrelationInputError, match=r"1 feature\(s\) are constant across all sites "
                                                    r"\(e\.g\. shape_Elongation\)"):
        update_correlation(site_correlation(constant), feature_names=["a", "shape_Elongation"])
    corr = np.eye(3)
    with pytest.raises(CorrelationInputError, match=r"k must be between 1 and the number of features \(3\); got 4"):
        mrmr(np.ones(3), corr, 4)
    with pytest.raises(CorrelationInputError, match=r"correlation has shape \(2, 2\); relevance has 3 features"):
        mrmr(np.ones(3), np.eye(2), 1)
    with pytest.raises(CorrelationInputError, match=r"1 feature\(s\) have non-finite relevance .*e\.g\. glcm_Id"):
        mrmr(np.array([0.1, np.nan, 0.3]), corr, 1, names=["a", "glcm_Id", "c"])
