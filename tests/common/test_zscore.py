"""Federated z-scoring equals scikit-learn's StandardScaler on the pooled rows."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.preprocessing import StandardScaler

from fedrad.common.zscore import combine_zscore_moments, site_zscore_apply, site_zscore_moments, update_zscore


def _sites(offset, spread, seed=0):
    rng = np.random.default_rng(seed)
    return [offset + rng.normal(loc * spread, spread, size=(n, 4)) for loc, n in ((0.0, 7), (2.0, 11), (-1.0, 5))]


def _fit(sites):
    return update_zscore(combine_zscore_moments([site_zscore_moments(y) for y in sites]))


def test_pooled_scaling_equals_standard_scaler():
    sites = _sites(offset=1000.0, spread=15.0)  # HU-like feature values
    scale = _fit(sites)
    pooled = np.vstack(sites)
    reference = StandardScaler().fit(pooled)
    np.testing.assert_allclose(scale.mean, reference.mean_, rtol=1e-14)
    np.testing.assert_allclose(scale.sd, reference.scale_, rtol=1e-12)
    np.testing.assert_allclose(np.vstack([site_zscore_apply(y, scale) for y in sites]),
                               reference.transform(pooled), atol=1e-10)


def test_large_offset_small_spread_stays_accurate():
    """Offset 1e8 x spread: Σy² - n·mean² loses everything, the pooled update keeps ~1e-8."""
    sites = _sites(offset=1e6, spread=0.01)
    pooled = np.vstack(sites)
    naive = np.sqrt((pooled**2).mean(axis=0) - pooled.mean(axis=0) ** 2)
    assert np.abs(naive / pooled.std(axis=0) - 1).max() > 0.1
    np.testing.assert_allclose(_fit(sites).sd, StandardScaler().fit(pooled).scale_, rtol=1e-8)


def test_constant_feature_is_refused_by_name():
    y = np.column_stack([np.arange(6.0), np.full(6, 3.0)])
    with pytest.raises(ValueError, match=r"1 feature\(s\) are constant across all sites \(e\.g\. glcm_Id\)"):
        update_zscore(combine_zscore_moments([site_zscore_moments(y[:3]), site_zscore_moments(y[3:])]),
                      feature_names=["firstorder_Mean", "glcm_Id"])


def test_site_without_rows_is_refused():
    with pytest.raises(ValueError, match="no rows to summarise"):
        site_zscore_moments(np.empty((0, 3)))
