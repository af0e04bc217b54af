"""Signatures and nomogram over real Flower processes on real data (GBSG2, 686 patients, 3 sites).

A Rad-score (Cox on the "feature" columns), a clinical model chosen the published way
(each candidate alone, then one multivariable fit of those with p < 0.05; its p < 0.05
columns are the independent factors) and the nomogram model (Rad-score + independent
factors), all stratified by site; and a logistic model screening the same candidates plus the
Rad-score, drawn as a nomogram of the probability of recurrence. References: lifelines ``CoxPHFitter(strata=["site"])`` on
the pooled rows for every Cox fit, scikit-learn ``LogisticRegression(C=inf)`` (Wald p from
the inverse information computed here with numpy) for the logistic ones, scikit-survival's ``BreslowEstimator`` for each site's
baseline cumulative hazard at the horizons.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sksurv.datasets import load_gbsg2
from sksurv.linear_model.coxph import BreslowEstimator

from fedrad.client.table_import import prepare_from_table
from fedrad.server.local import LocalFederation
from fedrad.server.nomogram_plot import nomogram_from_dict
from tests.conftest import TEST_DATA
from tests.federation.conftest import write_study

RAD = ["pnodes", "progrec", "tsize", "estrec"]
CANDIDATES = ["age", "menostat", "tgrade", "horTh"]
HORIZONS = [1095.0, 1825.0]
TIGHT = {"precision": 1e-12, "r_precision": 1e-14}

STUDY = f"""
[study]
name = "signatures"
stages = ["census", "fit"]

[outcome]
horizons = {HORIZONS}

[[models]]
name = "rad_score"
features = {json.dumps([f"table__{c}" for c in RAD])}

[[models]]
name = "clinical"
clinical = {json.dumps(CANDIDATES)}
selection = "univariate"

[[models]]
name = "nomogram"
scores = ["rad_score"]
clinical = ["@clinical"]
nomogram = true

[[models]]                   # binary endpoint: every candidate and the Rad-score screened, then together
name = "logistic_nomogram"
kind = "logistic"
clinical = {json.dumps(CANDIDATES)}
scores = ["rad_score"]
selection = "univariate"
nomogram = true
"""


def gbsg2_table() -> pd.DataFrame:
    X, y = load_gbsg2()
    table = pd.DataFrame({
        "patient_id": [f"P{i:04d}" for i in range(len(X))], "time": y["time"], "event": y["cens"].astype(int),
        "age": X["age"], "menostat": (X["menostat"] == "Post").astype(float),
        "tgrade": X["tgrade"].map({"I": 1.0, "II": 2.0, "III": 3.0}).astype(float),
        "horTh": (X["horTh"] == "yes").astype(float), **{c: X[c] for c in RAD}})
    table["site"] = np.random.default_rng(1).choice(["north", "centre", "south"], size=len(table))
    return table


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    root = tmp_path_factory.mktemp("signatures")
    table = gbsg2_table()
    stores = {}
    for site, rows in table.groupby("site", sort=False):
        csv = root / f"{site}.csv"
        rows.drop(columns="site").to_csv(csv, index=False)
        stores[site] = root / "stores" / site
        prepare_from_table(csv, stores[site], clinical_cols=CANDIDATES, params_path=TEST_DATA / "pyradiomics_baseline.yaml")
    with LocalFederation(root / "flower", stores, echo=print) as fed:
        results = fed.run_study(write_study(root / "study.toml", STUDY), root / "run")
    assert results["status"] == "completed", results.get("error")
    return table, results["models"], root / "run"


def stratified(table, columns) -> CoxPHFitter:
    return CoxPHFitter().fit(table[columns + ["time", "event", "site"]], "time", "event", strata=["site"],
                             fit_options=TIGHT)


def test_univariate_screen_equals_one_lifelines_fit_per_candidate(signed):
    table, models, _ = signed
    univariate = {r["covariate"]: r for r in models["clinical"]["selection"]["univariate"]}
    for column in CANDIDATES:
        ref = stratified(table, [column])
        assert univariate[column]["coef"] == pytest.approx(ref.params_[column], rel=1e-6)
        assert univariate[column]["p"] == pytest.approx(ref.summary.loc[column, "p"], rel=1e-5)
    expected = [c for c in CANDIDATES if stratified(table, [c]).summary.loc[c, "p"] < 0.05]
    assert models["clinical"]["selection"]["entered"] == expected
    assert "tgrade" in expected and "horTh" in expected  # GBSG2's known prognostic factors


def test_multivariable_fit_and_independent_factors_equal_lifelines(signed):
    table, models, _ = signed
    clinical = models["clinical"]
    entered = clinical["selection"]["entered"]
    ref = stratified(table, entered)
    np.testing.assert_allclose([clinical["coefficients"][c] for c in entered], ref.params_[entered], rtol=1e-6)
    assert clinical["independent"] == [c for c in entered if ref.summary.loc[c, "p"] < 0.05]
    assert clinical["loglik"] == pytest.approx(ref.log_likelihood_, rel=1e-10)


def test_nomogram_model_uses_the_rad_score_and_independent_factors(signed):
    table, models, _ = signed
    rad = models["rad_score"]["coefficients"]
    np.testing.assert_allclose([rad[f"table__{c}"] for c in RAD], stratified(table, RAD).params_[RAD], rtol=1e-6)
    frame = _with_rad_score(table, models)
    columns = models["clinical"]["independent"] + ["rad_score"]
    ref = stratified(frame, columns)
    got = models["nomogram"]
    np.testing.assert_allclose([got["coefficients"][c] for c in columns], ref.params_[columns], rtol=1e-6)
    hr = pd.DataFrame(got["table"]).set_index("covariate")
    np.testing.assert_allclose(hr.loc[columns, "HR lower 95%"], ref.summary.loc[columns, "exp(coef) lower 95%"],
                               rtol=1e-5)


def test_baseline_hazard_per_site_equals_sksurv_breslow(signed):
    table, models, _ = signed
    got = models["nomogram"]
    columns = list(got["coefficients"])
    frame = _with_rad_score(table, models)
    beta = np.array([got["coefficients"][c] for c in columns])
    sizes = table["site"].value_counts()
    for site, rows in frame.groupby("site"):
        lp = rows[columns].to_numpy() @ beta
        breslow = BreslowEstimator().fit(lp, rows["event"].to_numpy().astype(bool), rows["time"].to_numpy())
        np.testing.assert_allclose(got["baseline"]["cumhaz"][site], breslow.cum_baseline_hazard_(HORIZONS),
                                   rtol=1e-9)
    pooled = sum(sizes[s] * np.array(got["baseline"]["cumhaz"][s]) for s in sizes.index) / sizes.sum()
    np.testing.assert_allclose(got["baseline"]["cumhaz"]["pooled"], pooled, rtol=1e-12)


def test_nomogram_points_reproduce_the_linear_predictor_and_plot_exists(signed):
    table, models, run = signed
    got = models["nomogram"]
    nomogram = nomogram_from_dict(got["nomogram"])
    frame = _with_rad_score(table, models)
    total = nomogram.total_points({a.name: frame[a.name].to_numpy() for a in nomogram.axes})
    lp = frame[list(got["coefficients"])].to_numpy() @ np.array(list(got["coefficients"].values()))
    np.testing.assert_allclose(nomogram.linear_predictor(total), lp, atol=1e-10)
    rad_axis = next(a for a in nomogram.axes if a.name == "rad_score")
    sd = frame["rad_score"].std()
    assert rad_axis.high - rad_axis.low == pytest.approx(4 * sd, rel=1e-9)  # mean ± 2 SD from pooled sums
    assert Path(got["nomogram"]["plot"]).is_file() and Path(got["nomogram"]["plot"]).parent == run


def _with_rad_score(table, models):
    rad = models["rad_score"]["coefficients"]
    return table.assign(rad_score=table[RAD].to_numpy() @ np.array([rad[f"table__{c}"] for c in RAD]))


def logistic_reference(frame, columns):
    """sklearn's unpenalised fit, and Wald p-values from the inverse of XᵀWX at its coefficients."""
    X, y = frame[columns].to_numpy(), frame["event"].to_numpy()
    fit = LogisticRegression(C=np.inf, tol=1e-12, max_iter=100_000, solver="newton-cg").fit(X, y)
    design = np.column_stack([np.ones(len(X)), X])
    beta = np.r_[fit.intercept_, fit.coef_[0]]
    prob = 1 / (1 + np.exp(-design @ beta))
    se = np.sqrt(np.diag(np.linalg.inv(design.T @ (design * (prob * (1 - prob))[:, None]))))
    return beta, 2 * stats.norm.sf(np.abs(beta / se))


def test_logistic_screen_multivariable_fit_and_nomogram_equal_sklearn(signed):
    table, models, _ = signed
    frame = _with_rad_score(table, models)
    got = models["logistic_nomogram"]
    univariate = {r["covariate"]: r for r in got["selection"]["univariate"]}
    candidates = CANDIDATES + ["rad_score"]
    entered = []
    for column in candidates:
        beta, p = logistic_reference(frame, [column])
        assert univariate[column]["coef"] == pytest.approx(beta[1], rel=1e-6)
        assert univariate[column]["p"] == pytest.approx(p[1], rel=1e-5)
        entered += [column] if p[1] < 0.05 else []
    assert got["selection"]["entered"] == entered and "rad_score" in entered
    beta, p = logistic_reference(frame, entered)
    np.testing.assert_allclose([got["coefficients"][c] for c in ["intercept"] + entered], beta, rtol=1e-6)
    assert got["independent"] == [c for c, q in zip(entered, p[1:]) if q < 0.05]
    nomogram = nomogram_from_dict(got["nomogram"])
    total = nomogram.total_points({a.name: frame[a.name].to_numpy() for a in nomogram.axes})
    np.testing.assert_allclose(nomogram.linear_predictor(total), beta[0] + frame[entered].to_numpy() @ beta[1:],
                               atol=1e-8)
    assert Path(got["nomogram"]["plot"]).is_file()
