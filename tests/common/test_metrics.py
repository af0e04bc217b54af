"""Evaluation metrics from site sums equal the references on the pooled rows (GBSG2).

References: scikit-survival ``concordance_index_censored`` (Harrell's C), scikit-learn
``roc_auc_score`` and ``LogisticRegression`` (AUC; calibration intercept and slope),
lifelines ``KaplanMeierFitter``, ``logrank_test`` and ``multivariate_logrank_test``;
DeLong's variance against a direct transcription of the 1988 paper's U-statistic
components, and Hanley & McNeil's (1982) published CT rating example.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from lifelines import KaplanMeierFitter
from lifelines.statistics import logrank_test as lifelines_logrank, multivariate_logrank_test
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sksurv.metrics import concordance_index_censored

from fedrad.common.calibration import (calibration_in_the_large, combine_calibration_sums, decile_edges, hosmer_lemeshow,
                                site_calibration_sums, slope_design)
from fedrad.common.decision import combine_decision_counts, net_benefit, site_decision_counts
from fedrad.common.discrimination import (combine_pair_counts, delong_auc, delong_test, site_auc_counts,
                                   site_concordance_counts)
from fedrad.common.logistic import site_logistic_newton
from fedrad.common.newton import combine_newton, newton_fit
from fedrad.common.survival_curves import combine_risk_tables, kaplan_meier, logrank_test, risk_groups, site_risk_table


@pytest.fixture(scope="module")
def scored(gbsg2):
    Xn, y, site = gbsg2
    risk = Xn.to_numpy() @ np.array([0.1, -0.2, 0.5, -0.4, 0.2])
    frame = pd.DataFrame({"time": y["time"], "event": y["cens"], "risk": risk, "site": site,
                          "other": Xn["pnodes"].to_numpy()})
    frame["p"] = 1 / (1 + np.exp(-(risk - 0.3)))
    return frame


def test_site_stratified_harrell_c_is_the_sum_of_sksurv_pair_counts(scored):
    parts, expected = [], np.zeros(3)
    for _, g in scored.groupby("site"):
        counts = site_concordance_counts(g["time"], g["event"], g["risk"])
        ref = concordance_index_censored(g["event"].to_numpy(), g["time"].to_numpy(), g["risk"].to_numpy())
        assert counts.c == pytest.approx(ref[0], abs=1e-15)
        assert (counts.concordant, counts.discordant, counts.tied) == (ref[1], ref[2], ref[3])
        parts.append(counts)
        expected += ref[1:4]
    pooled = combine_pair_counts(parts)
    assert pooled.c == pytest.approx((expected[0] + 0.5 * expected[2]) / expected.sum(), abs=1e-15)
    whole = concordance_index_censored(scored["event"].to_numpy(), scored["time"].to_numpy(), scored["risk"].to_numpy())
    assert pooled.pairs < whole[1] + whole[2] + whole[3]  # cross-site pairs are never formed


def test_auc_pair_counts_and_delong_auc_equal_sklearn(scored):
    y, score = scored["event"].to_numpy(), scored["risk"].round(1).to_numpy()  # rounded: ties
    assert site_auc_counts(y, score).c == pytest.approx(roc_auc_score(y, score), abs=1e-14)
    assert delong_auc(y, score).auc[0] == pytest.approx(roc_auc_score(y, score), abs=1e-14)


def _delong_by_definition(y, scores):
    """DeLong et al. (1988), eqs. for V10, V01 and S10, S01, written out over all case-control pairs."""
    y = y.astype(bool)
    comps10, comps01 = [], []
    for s in scores:
        x, z = s[y], s[~y]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
        comps10.append(psi.mean(axis=1))
        comps01.append(psi.mean(axis=0))
    m, n = y.sum(), (~y).sum()
    v10, v01 = np.array(comps10), np.array(comps01)
    s10 = (v10 - v10.mean(1, keepdims=True)) @ (v10 - v10.mean(1, keepdims=True)).T / (m - 1)
    s01 = (v01 - v01.mean(1, keepdims=True)) @ (v01 - v01.mean(1, keepdims=True)).T / (n - 1)
    return s10 / m + s01 / n


def test_delong_covariance_and_test_equal_the_papers_definitions(scored):
    y = scored["event"].to_numpy()
    a, b = scored["risk"].round(1).to_numpy(), scored["other"].round(1).to_numpy()
    got = delong_auc(y, a, b)
    np.testing.assert_allclose(got.cov, _delong_by_definition(y, [a, b]), rtol=1e-12)
    z, p = delong_test(y, a, b)
    cov = got.cov
    assert z == pytest.approx((got.auc[0] - got.auc[1]) / np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]), rel=1e-12)
    assert 0 < p < 1
    low, high = got.ci()[0]
    assert low < got.auc[0] < high


def test_hanley_mcneil_published_example():
    """Hanley & McNeil (1982), Radiology 143:29, Table 1: CT ratings 1-5 of 58 normal and 51 abnormal
    cases; published area 0.893 (the Wilcoxon statistic)."""
    normal, abnormal = [33, 6, 6, 11, 2], [3, 2, 2, 11, 33]
    ratings = np.r_[np.repeat(np.arange(1, 6), normal), np.repeat(np.arange(1, 6), abnormal)]
    y = np.r_[np.zeros(sum(normal)), np.ones(sum(abnormal))]
    got = delong_auc(y, ratings)
    assert round(float(got.auc[0]), 3) == 0.893
    # the published SE 0.032 is Hanley-McNeil's exponential approximation; DeLong's nonparametric one is 0.0307
    assert np.sqrt(got.cov[0, 0]) == pytest.approx(0.0307, abs=5e-5)


def test_calibration_sums_slope_and_hl(scored):
    edges = decile_edges(scored["p"])
    parts = [site_calibration_sums(g["event"], g["p"], edges) for _, g in scored.groupby("site")]
    pooled = combine_calibration_sums(parts)
    direct = site_calibration_sums(scored["event"], scored["p"], edges)
    np.testing.assert_allclose(pooled.observed, direct.observed)
    assert pooled.n.sum() == len(scored)
    y, p = scored["event"].to_numpy().astype(float), scored["p"].to_numpy()
    groups = pd.qcut(p, 10, labels=False)
    o = pd.Series(y).groupby(groups).sum().to_numpy()
    e = pd.Series(p).groupby(groups).sum().to_numpy()
    n = pd.Series(p).groupby(groups).size().to_numpy()
    statistic, df, _ = hosmer_lemeshow(pooled)
    assert statistic == pytest.approx(np.sum((o - e) ** 2 / (e * (1 - e / n))), rel=1e-12) and df == 8
    citl = calibration_in_the_large(pooled)
    assert citl["difference"] == pytest.approx(y.mean() - p.mean(), abs=1e-15)
    sites = [g.index.to_numpy() for _, g in scored.groupby("site")]
    design = slope_design(p)
    fit = newton_fit(lambda b: combine_newton([site_logistic_newton(design[r], y[r], b) for r in sites]), 2)
    ref = LogisticRegression(C=np.inf, tol=1e-12, solver="newton-cg", max_iter=10_000).fit(design[:, 1:], y)
    np.testing.assert_allclose(fit.beta, [ref.intercept_[0], ref.coef_[0, 0]], rtol=1e-7)


def test_net_benefit_from_summed_counts(scored):
    thresholds = np.array([0.1, 0.3, 0.5])
    parts = [site_decision_counts(g["event"], g["p"], thresholds) for _, g in scored.groupby("site")]
    curve = net_benefit(combine_decision_counts(parts))
    y, p, n = scored["event"].to_numpy(), scored["p"].to_numpy(), len(scored)
    for row in curve.itertuples():
        tp, fp = np.sum((p >= row.threshold) & y), np.sum((p >= row.threshold) & ~y)
        assert row.model == pytest.approx(tp / n - fp / n * row.threshold / (1 - row.threshold), abs=1e-15)
        assert row.treat_all == pytest.approx(y.mean() - (1 - y.mean()) * row.threshold / (1 - row.threshold))


@pytest.mark.parametrize("cutoffs", [[0.0], [-0.3, 0.3]])
def test_kaplan_meier_and_logrank_from_site_tables_equal_lifelines(scored, cutoffs):
    groups = risk_groups(scored["risk"], cutoffs)
    grid = np.unique(scored["time"][scored["event"]])
    tables = [site_risk_table(g["time"], g["event"], groups[g.index], grid, len(cutoffs) + 1)
              for _, g in scored.groupby("site")]
    table = combine_risk_tables(tables)
    curves = kaplan_meier(table)
    for g in range(len(cutoffs) + 1):
        mine = groups == g
        ref = KaplanMeierFitter().fit(scored["time"][mine], scored["event"][mine])
        got = curves[curves["group"] == g].set_index("time")["survival"]
        np.testing.assert_allclose(got.to_numpy(), ref.survival_function_at_times(got.index).to_numpy(), atol=1e-14)
    statistic, df, p = logrank_test(table)
    if len(cutoffs) == 1:
        ref = lifelines_logrank(scored["time"][groups == 0], scored["time"][groups == 1],
                                scored["event"][groups == 0], scored["event"][groups == 1])
    else:
        ref = multivariate_logrank_test(scored["time"], groups, scored["event"])
    assert statistic == pytest.approx(ref.test_statistic, rel=1e-10) and df == len(cutoffs)
    assert p == pytest.approx(ref.p_value, rel=1e-8)


def test_coarse_grid_rounds_event_times_up():
    time = np.array([1.0, 2.0, 2.5, 3.0, 4.0])
    event = np.array([1, 0, 1, 1, 0], bool)
    table = site_risk_table(time, event, np.zeros(5, int), [2.0, 4.0], 1)
    # (−∞, 2]: one event (t=1), 5 at risk; (2, 4]: events at 2.5 and 3 moved to 4, at risk = 1 (t=4) + 2
    np.testing.assert_array_equal(table.events, [[1, 2]])
    np.testing.assert_array_equal(table.at_risk, [[5, 3]])


def test_site_survival_metrics_and_bootstrap_intervals(scored):
    from sksurv.metrics import brier_score, concordance_index_ipcw, cumulative_dynamic_auc, integrated_brier_score
    from sksurv.util import Surv

    from fedrad.common.survival_metrics import bootstrap_ci, brier_scores, harrell_c, time_dependent_auc, uno_c

    site = scored[scored["site"] == "A"].reset_index(drop=True)
    t, e, r = site["time"].to_numpy(), site["event"].to_numpy(), site["risk"].to_numpy()
    y = Surv.from_arrays(e, t)
    assert uno_c(t, e, r, tau=1500) == concordance_index_ipcw(y, y, r, tau=1500)[0]
    auc, mean = time_dependent_auc(t, e, r, [500, 1000, 1500])
    ref_auc, ref_mean = cumulative_dynamic_auc(y, y, r, [500, 1000, 1500])
    np.testing.assert_array_equal(auc, ref_auc)
    assert mean == ref_mean
    times = np.array([500.0, 1000.0, 1500.0])
    survival = np.exp(-np.outer(np.exp(r), times / 3000))
    scores, ibs = brier_scores(t, e, survival, times)
    np.testing.assert_array_equal(scores, brier_score(y, y, survival, times)[1])
    assert ibs == integrated_brier_score(y, y, survival, times)
    c = harrell_c(t, e, r)
    low, high = bootstrap_ci(lambda rows: harrell_c(t[rows], e[rows], r[rows]), len(t), n_boot=100, seed=1)
    assert low < c < high and high - low < 0.2
    assert (low, high) == bootstrap_ci(lambda rows: harrell_c(t[rows], e[rows], r[rows]), len(t), n_boot=100, seed=1)
