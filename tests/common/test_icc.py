"""Federated ICC(3,1) and ICC(2,1) equal the pooled two-way ANOVA, however the cases are split.

Reference: an independent pooled computation below (pandas, long table, the textbook sums of
squares as pingouin's ``intraclass_corr`` forms them), the worked example of Shrout & Fleiss (1979,
Table 2).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedrad.common.icc import IccInputError, combine_icc, icc_anova, site_icc, update_icc

#: Shrout & Fleiss (1979), Table 2: 6 targets (rows) rated by 4 judges (columns).
SHROUT_FLEISS = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]],
                         dtype=float)


def _long(x: np.ndarray) -> pd.DataFrame:
    """(n_cases, k, n_features) -> long table: case, rater, feature, value."""
    n, k, p = x.shape
    case, rater, feature = np.meshgrid(np.arange(n), np.arange(k), np.arange(p), indexing="ij")
    return pd.DataFrame({"case": case.ravel(), "rater": rater.ravel(), "feature": feature.ravel(),
                         "value": x.ravel()})


def pooled_icc(x: np.ndarray) -> dict[str, np.ndarray]:
    """Textbook two-way ANOVA per feature on the pooled long table: SST, SSR, SSC, SSE = SST - SSR - SSC."""
    out = {"3,1": [], "2,1": []}
    for _, df in _long(x).groupby("feature"):
        n, k = df["case"].nunique(), df["rater"].nunique()
        grand = df["value"].mean()
        sst = ((df["value"] - grand) ** 2).sum()
        ssr = k * ((df.groupby("case")["value"].mean() - grand) ** 2).sum()
        ssc = n * ((df.groupby("rater")["value"].mean() - grand) ** 2).sum()
        sse = sst - ssr - ssc
        msr, msc, mse = ssr / (n - 1), ssc / (k - 1), sse / ((n - 1) * (k - 1))
        out["3,1"].append((msr - mse) / (msr + (k - 1) * mse))
        out["2,1"].append((msr - mse) / (msr + (k - 1) * mse + k * (msc - mse) / n))
    return {kind: np.array(v) for kind, v in out.items()}


def federated_icc(x: np.ndarray, splits, kind: str) -> np.ndarray:
    parts = [site_icc(x[rows]) for rows in np.split(np.arange(len(x)), splits)]
    return update_icc(combine_icc(parts), kind)


def repeat_features(n=60, k=2, p=8, seed=0, offset=0.0):
    """Cases with a true value per feature, a systematic shift per measurement, and noise of varying size."""
    rng = np.random.default_rng(seed)
    truth = rng.normal(0, 1, size=(n, 1, p)) * rng.uniform(0.5, 3, size=p)
    shift = rng.normal(0, 0.5, size=(1, k, p))
    noise = rng.normal(0, 1, size=(n, k, p)) * np.linspace(0.05, 4, p)
    return offset + truth + shift + noise


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("kind", ["3,1", "2,1"])
def test_three_sites_equal_pooled_textbook_anova(kind, k):
    x = repeat_features(k=k)
    reference = pooled_icc(x)[kind]
    one_site = federated_icc(x, [], kind)
    three_sites = federated_icc(x, [13, 40], kind)  # 13, 27 and 20 cases
    assert np.max(np.abs(one_site - reference)) < 1e-12
    assert np.max(np.abs(three_sites - reference)) < 1e-12
    assert reference.min() < 0.5 < reference.max()  # the noise levels span poor to excellent agreement


def test_pooling_is_associative():
    x = repeat_features(k=3)
    a, b, c = (site_icc(x[rows]) for rows in np.split(np.arange(len(x)), [7, 31]))
    flat, nested = combine_icc([a, b, c]), combine_icc([combine_icc([a, b]), c])
    for field in ("rater_mean", "ss_cases", "ss_error"):
        np.testing.assert_allclose(getattr(nested, field), getattr(flat, field), rtol=1e-13)


def test_large_offset_small_spread_stays_accurate():
    """HU-like features: an offset 1e6 times the spread leaves the pooled ICC intact."""
    x = repeat_features(offset=1e6)
    centred = x - 1e6  # the same data, exactly representable shift removed before the reference
    for kind in ("3,1", "2,1"):
        np.testing.assert_allclose(federated_icc(x, [13, 40], kind), pooled_icc(centred)[kind], atol=1e-8)


def test_shrout_fleiss_worked_example():
    """Table 2 of Shrout & Fleiss (1979) reports ICC(2,1) = .29 and ICC(3,1) = .71."""
    x = SHROUT_FLEISS[:, :, None]
    total = combine_icc([site_icc(x[:2]), site_icc(x[2:])])
    anova = icc_anova(total)
    # Shrout & Fleiss, Table 3: BMS = 11.24, JMS = 32.49, EMS = 1.02.
    np.testing.assert_allclose([anova.msr[0], anova.msc[0], anova.mse[0]], [11.24, 32.49, 1.02], atol=0.005)
    assert round(float(update_icc(total, "2,1")[0]), 2) == 0.29
    assert round(float(update_icc(total, "3,1")[0]), 2) == 0.71


def test_perfect_agreement_is_one_and_a_shift_only_hurts_absolute_agreement():
    rng = np.random.default_rng(1)
    truth = rng.normal(size=(30, 1, 3))
    same = np.repeat(truth, 2, axis=1)
    shifted = same + np.array([0.0, 0.7])[None, :, None]
    for kind in ("3,1", "2,1"):
        np.testing.assert_allclose(federated_icc(same, [10], kind), 1.0, rtol=1e-14)
    np.testing.assert_allclose(federated_icc(shifted, [10], "3,1"), 1.0, rtol=1e-14)
    assert np.all(federated_icc(shifted, [10], "2,1") < 0.9)


def test_pure_noise_is_about_zero():
    x = np.random.default_rng(2).normal(size=(4000, 2, 5))
    for kind in ("3,1", "2,1"):
        assert np.max(np.abs(federated_icc(x, [1000, 2500], kind))) < 0.06



def test_bad_inputs_are_refused_with_the_reason():
    with pytest.raises(IccInputError, match=r"must be 3-D \(n_cases, k, n_features\); got shape \(4, 2\)"):
        site_icc(np.zeros((4, 2)))
    with pytest.raises(IccInputError, match="needs k >= 2 measurements per case; got k=1"):
        site_icc(np.zeros((4, 1, 3)))
    x = repeat_features(n=5, p=3)
    x[3, 1, 2] = np.nan
    with pytest.raises(IccInputError, match=r"1 missing or non-finite value\(s\) \(first: case 3, measurement 1, "
                                            r"feature 2\)"):
        site_icc(x)
    with pytest.raises(IccInputError, match=r"different \(k, n_features\) shapes: \[\(2, 3\), \(3, 3\)\]"):
        combine_icc([site_icc(repeat_features(n=5, k=2, p=3)), site_icc(repeat_features(n=5, k=3, p=3))])
    with pytest.raises(IccInputError, match="kind must be one of"):
        update_icc(site_icc(repeat_features(n=5, p=3)), "1,1")
    with pytest.raises(IccInputError, match="at least 2 cases over all sites; got n=1"):
        update_icc(site_icc(repeat_features(n=1, p=3)))
    constant = np.concatenate([repeat_features(n=6, p=1), np.full((6, 2, 1), 4.0)], axis=2)
    with pytest.raises(IccInputError, match=r"1 feature\(s\) vary neither between nor within cases "
                                            r"\(e\.g\. shape_Sphericity\)"):
        update_icc(site_icc(constant), feature_names=["firstorder_Mean", "shape_Sphericity"])
