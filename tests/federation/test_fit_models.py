"""Stage `fit` over real Flower processes: Cox and logistic models equal the pooled references.

Three sites' stores from `prepare --table`; references on the pooled rows: lifelines
``CoxPHFitter(strata=["site"])`` (stratified by site, Efron), scikit-learn
``LogisticRegression(C=inf)``, and the in-process ``FederatedCoxnetCV`` (itself checked against
scikit-survival's Coxnet in tests/common/test_penalised.py) for the cross-validated LASSO path.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter
from sklearn.linear_model import LogisticRegression
from sksurv.linear_model import CoxPHSurvivalAnalysis
from sksurv.util import Surv

from fedrad.common.correlation import mrmr, relevance_from_statistic
from fedrad.common.cox import FederatedCoxnetCV
from fedrad.common.screen import combine_cox_screen, site_cox_screen, update_cox_screen
from fedrad.server.local import LocalFederation
from tests.federation.cohort import hospital_rows, write_stores
from tests.federation.conftest import write_study

COX = ["original_firstorder_F00", "original_firstorder_F03", "original_firstorder_F07"]

STUDY = """
[study]
name = "models"
stages = ["census", "select", "fit"]

[select]
features = ["table__original_firstorder_F0*"]
fdr = 1.0                  # these features carry no signal by construction: keep all, let mRMR pick
max_features = 3

[[models]]
name = "selected_cox"
kind = "cox"
features = ["@select"]

[[models]]
name = "rad_cox"
kind = "cox"
features = ["table__original_firstorder_F00", "table__original_firstorder_F03", "table__original_firstorder_F07"]
clinical = ["age"]

[[models]]
name = "rad_cox_unstratified"
kind = "cox"
features = ["table__original_firstorder_F00", "table__original_firstorder_F03", "table__original_firstorder_F07"]
clinical = ["age"]
share_event_times = true

[[models]]
name = "clin_logit"
kind = "logistic"
features = ["table__original_firstorder_F01"]
clinical = ["age"]

[[models]]
name = "rad_lasso"
kind = "cox"
features = ["table__original_firstorder_F0*"]
penalty = "elasticnet"
cv_folds = 3
n_alphas = 8
rule = "min"
ties = "breslow"
"""


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    table = hospital_rows()
    stores = write_stores(root / "stores", table)
    with LocalFederation(root / "flower", stores, echo=print, allow_event_times=True) as fed:
        results = fed.run_study(write_study(root / "study.toml", STUDY), root / "run")
    assert results["status"] == "completed", results.get("error")
    return table, results["models"], results["select"], (stores, results["stages"]["fit"]["rounds"])


def test_stratified_cox_equals_lifelines(fitted):
    table, models, *_ = fitted
    frame = table[COX + ["age", "time", "event", "site"]]
    ref = CoxPHFitter().fit(frame, "time", "event", strata=["site"],
                            fit_options={"precision": 1e-12, "r_precision": 1e-14})
    got = models["rad_cox"]
    coef = np.array([got["coefficients"][f"table__{c}"] for c in COX] + [got["coefficients"]["age"]])
    np.testing.assert_allclose(coef, ref.params_.to_numpy(), rtol=1e-6)
    se = pd.DataFrame(got["table"]).set_index("covariate")["se"].to_numpy()
    np.testing.assert_allclose(se, ref.standard_errors_.to_numpy(), rtol=1e-6)
    assert got["loglik"] == pytest.approx(ref.log_likelihood_, rel=1e-10)
    assert got["converged"] and got["rounds"] <= 10
    assert set(got["bytes_up_per_site"]) == {"siteA", "siteB", "siteC"}


def test_unstratified_cox_with_shared_event_times_equals_sksurv(fitted):
    """Reference: scikit-survival (Efron, tol 1e-14). On these raw-scale features lifelines stops with a
    gradient of 2.6e-5 (its coefficients then differ by 1.1e-6 relative); sksurv and fedrad reach ~1e-11."""
    table, models, *_ = fitted
    y = Surv.from_arrays(table["event"].astype(bool), table["time"])
    ref = CoxPHSurvivalAnalysis(ties="efron", tol=1e-14, n_iter=1000).fit(table[COX + ["age"]], y)
    got = models["rad_cox_unstratified"]
    coef = np.array([got["coefficients"][f"table__{c}"] for c in COX] + [got["coefficients"]["age"]])
    np.testing.assert_allclose(coef, ref.coef_, rtol=1e-6)
    lifelines = CoxPHFitter().fit(table[COX + ["age", "time", "event"]], "time", "event")
    assert got["loglik"] == pytest.approx(lifelines.log_likelihood_, rel=1e-9)


def test_logistic_equals_sklearn(fitted):
    table, models, *_ = fitted
    X = table[["original_firstorder_F01", "age"]].to_numpy()
    ref = LogisticRegression(C=np.inf, tol=1e-12, max_iter=100_000, solver="newton-cg").fit(X, table["event"])
    got = models["clin_logit"]["coefficients"]
    np.testing.assert_allclose([got["table__original_firstorder_F01"], got["age"]], ref.coef_[0], rtol=1e-6)
    assert got["intercept"] == pytest.approx(ref.intercept_[0], rel=1e-6)


def test_lasso_path_with_site_local_cv_equals_in_process_reference(fitted):
    table, models, *_ = fitted
    got = models["rad_lasso"]
    columns = [c for c in table.columns if c.startswith("original_firstorder_F0")]
    y = Surv.from_arrays(table["event"].astype(bool), table["time"])
    ref = FederatedCoxnetCV(alphas=got["alphas"], cv=3, rule="min", ties="breslow").fit(
        table[columns], y, site=table["site"].to_numpy())
    np.testing.assert_allclose(got["coef_path"], ref.coef_path_, atol=1e-8)
    np.testing.assert_allclose(got["cv_mean"], ref.cv_mean_, rtol=1e-8)
    assert got["alpha"] == ref.alpha_
    assert got["rounds"] <= 12  # 3 folds x 8 λ values, all in the same messages


def test_select_equals_pooled_screen_correlation_and_mrmr(fitted):
    table, models, select, _ = fitted
    columns = [f"original_firstorder_F0{j}" for j in range(10)]
    groups = [table[table["site"] == s] for s in ("siteA", "siteB", "siteC")]
    screen = update_cox_screen(combine_cox_screen([
        site_cox_screen(g[columns].to_numpy(), g["time"].to_numpy(), g["event"].to_numpy().astype(bool)) for g in groups]))
    correlation = np.corrcoef(table[columns].to_numpy(), rowvar=False)
    expected = mrmr(relevance_from_statistic(screen.statistic, screen.events), correlation, 3)
    assert select["selected"] == [f"table__{columns[i]}" for i in expected]
    assert select["icc"]["used"] is False and select["screen"]["kept"] == 10 and select["mrmr"]["kept"] == 3
    assert select["traffic"]["rounds"] == 1
    ref = CoxPHFitter().fit(table[[columns[i] for i in expected] + ["time", "event", "site"]], "time", "event",
                            strata=["site"], fit_options={"precision": 1e-12, "r_precision": 1e-14})
    got = models["selected_cox"]["coefficients"]
    np.testing.assert_allclose([got[f"table__{columns[i]}"] for i in expected], ref.params_.to_numpy(), rtol=1e-6)


def test_independent_models_share_every_round_trip_and_each_part_is_ledgered(fitted):
    """The five models use none of each other, so they are fitted together (server/shared_rounds.py): the
    stage takes as many round trips as its longest model, each site answering every part on its own."""
    from fedrad.client.ledger import read_ledger

    _, models, _, (stores, stage_rounds) = fitted
    rounds = {name: m["rounds"] for name, m in models.items()}
    assert len(rounds) == 5 and stage_rounds == max(rounds.values()) < sum(rounds.values())
    fit = read_ledger(stores["siteA"]).query("stage == 'fit'")
    assert (fit["status"] == "sent").all() and len(fit) == sum(rounds.values())  # one ledger line per part
    assert set(fit["message_type"]) == {"query.model_summaries", "query.cox_event_times", "query.cox_risk_sets"}
