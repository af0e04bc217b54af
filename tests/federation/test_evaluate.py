"""Stage `evaluate`, a validation site and the model package over real Flower processes.

Four hospitals; siteD is a validation site: it is harmonised to the training reference
(its own batch effects estimated locally), never appears in a fitting message, and
returns metrics only. References: scikit-survival's ``concordance_index_censored`` per
site (and the sum of its pair counts for the pooled, site-stratified C), scikit-learn's
``roc_auc_score``, lifelines' ``KaplanMeierFitter`` for the risk groups, and
``fedrad.common.combat.site_combat_new_batch`` (itself checked against neuroCombat) for the
validation site's harmonised rows. `fedrad validate` on the validation site's own store,
offline, must reproduce what the federated evaluation reported for that site.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from sksurv.metrics import concordance_index_censored

from fedrad.client.ledger import read_ledger
from fedrad.client.table_import import prepare_from_table
from fedrad.client.validate import validate
from fedrad.common.package import PackageError
from fedrad.common.combat import DesignSpec, design_matrix, estimates_from_arrays, site_combat_new_batch
from fedrad.server.local import LocalFederation
from tests.conftest import TEST_DATA
from tests.federation.cohort import hospital_rows, write_stores
from tests.federation.conftest import write_study

SIZES = {"siteA": 40, "siteB": 36, "siteC": 44, "siteD": 30}
FEATURES = [f"table__original_firstorder_F{j:02d}" for j in range(4)]

STUDY = f"""
[study]
name = "evaluate"
stages = ["census", "harmonise", "fit", "evaluate", "package"]

[outcome]
horizons = [20, 40]

[features]
include = {json.dumps(FEATURES)}

[sites]
validation = ["siteD"]

[evaluate]
bootstrap = 50
km_points = 6

[[models]]
name = "rad"
features = {json.dumps(FEATURES)}

[[models]]
name = "rad_logit"
kind = "logistic"
features = {json.dumps(FEATURES[:2])}
clinical = ["age"]
"""


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    table = hospital_rows(seed=7, sizes=SIZES)
    stores = write_stores(root / "stores", table)
    with LocalFederation(root / "flower", stores, echo=print) as fed:
        results = fed.run_study(write_study(root / "study.toml", STUDY), root / "run")
    assert results["status"] == "completed", results.get("error")
    return table, stores, results, root / "run"


def _trust(run):
    """The public half of the key the run's package stage signed with (one per run directory), beside the package."""
    return run / "package-signing.pub"


def _scored(stores, site, results, model):
    rows = pd.read_parquet(stores[site] / "standardised.parquet")
    coefficients = results["models"][model]["coefficients"]
    lp = coefficients.get("intercept", 0.0) + sum(rows[c] * b for c, b in coefficients.items() if c != "intercept")
    return rows, lp.to_numpy()


def test_validation_site_takes_no_part_in_fitting(evaluated):
    _, stores, results, _ = evaluated
    assert results["harmonise"]["sites"] == ["siteA", "siteB", "siteC"]
    assert results["harmonise"]["validation"]["sites"] == ["siteD"]
    assert "siteD" not in results["models"]["rad"]["sites"]
    stages = read_ledger(stores["siteD"])[["stage", "message_type"]]
    assert set(stages["message_type"]) == {"query.census", "query.combat_validate", "query.evaluate_metrics",
                                           "query.evaluate_calibration"}
    assert results["evaluation"]["siteD"]["role"] == "validation"


def test_validation_site_is_harmonised_to_the_reference(evaluated):
    _, stores, results, run = evaluated
    reference = json.loads((run / "reference" / "harmonisation.json").read_text(encoding="utf-8"))
    arrays = dict(np.load(run / "reference" / "harmonisation.npz"))
    design = reference["design"]
    spec = DesignSpec(tuple(design["batch_levels"]), {k: tuple(v) for k, v in design["categorical"].items()},
                      tuple(design["continuous"]))
    rows = pd.read_parquet(stores["siteD"] / "features.parquet")
    expected, _ = site_combat_new_batch(rows[FEATURES].to_numpy(), design_matrix(
        np.full(len(rows), spec.batch_levels[0]), {}, spec)[:, spec.n_batch:], estimates_from_arrays(arrays, spec))
    got = pd.read_parquet(stores["siteD"] / "harmonised.parquet")[FEATURES].to_numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    z = pd.read_parquet(stores["siteD"] / "standardised.parquet")[FEATURES].to_numpy()
    np.testing.assert_allclose(z, (expected - arrays["z_mean"]) / arrays["z_sd"], rtol=1e-12, atol=1e-12)


def test_site_and_pooled_c_index_equal_sksurv(evaluated):
    _, stores, results, _ = evaluated
    evaluation = results["evaluation"]
    counts = np.zeros(3)
    for site in SIZES:
        rows, lp = _scored(stores, site, results, "rad")
        ref = concordance_index_censored(rows["event"].astype(bool).to_numpy(), rows["time"].to_numpy(), lp)
        assert evaluation[site]["rad"]["c_index"] == pytest.approx(ref[0], abs=1e-12)
        low, high = evaluation[site]["rad"]["c_index_ci"]
        assert low <= ref[0] <= high
        if site != "siteD":
            counts += ref[1:4]
    pooled = evaluation["pooled"]["rad"]
    assert pooled["c_index"] == pytest.approx((counts[0] + 0.5 * counts[2]) / counts.sum(), abs=1e-12)
    assert evaluation["pooled_validation"]["sites"] == ["siteD"]


def test_logistic_auc_and_confusion_at_the_training_cutoff(evaluated):
    _, stores, results, _ = evaluated
    cutoff = results["evaluation_settings"]["cutoffs"]["rad_logit"]
    tp = 0
    for site in SIZES:
        rows, lp = _scored(stores, site, results, "rad_logit")
        y, p = rows["event"].to_numpy().astype(bool), 1 / (1 + np.exp(-lp))
        got = results["evaluation"][site]["rad_logit"]
        assert got["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
        assert got["confusion"]["tp"] == np.sum((p >= cutoff) & y)
        tp += np.sum((p >= cutoff) & y) if site != "siteD" else 0
    assert results["evaluation"]["pooled"]["rad_logit"]["confusion"]["tp"] == tp
    assert 0 < cutoff < 1


def test_calibration_slope_and_km_risk_groups(evaluated):
    _, _, results, _ = evaluated
    # a logistic model's maximum-likelihood fit is calibrated on its own training rows: intercept 0, slope 1
    training = results["evaluation"]["pooled"]["rad_logit"]
    assert training["calibration_slope"] == pytest.approx(1.0, abs=1e-8)
    assert training["calibration_intercept"] == pytest.approx(0.0, abs=1e-8)
    assert training["calibration_in_the_large"]["difference"] == pytest.approx(0.0, abs=1e-10)
    pooled = results["evaluation"]["pooled"]["rad"]
    assert np.isfinite(pooled["calibration_slope"])
    km = pd.DataFrame(pooled["kaplan_meier"])
    assert set(km["group"]) == {0, 1} and (km["survival"].between(0, 1)).all()
    assert pooled["logrank_p"] is None or 0 <= pooled["logrank_p"] <= 1
    assert results["evaluation_settings"]["not_computed"]


def test_offline_validation_reproduces_the_federated_figures(evaluated, tmp_path):
    table, stores, results, run = evaluated
    report = validate(run / "package", stores["siteD"], tmp_path / "out", _trust(run))
    federated = results["evaluation"]["siteD"]
    for model in ("rad", "rad_logit"):
        for key in ("c_index", "c_index_ci", "auc", "auc_ci", "calibration_slope", "sensitivity", "specificity",
                    "brier_binary"):
            assert report["metrics"][model][key] == pytest.approx(federated[model][key], rel=1e-9, abs=1e-12), key
    predictions = pd.read_csv(tmp_path / "out" / "predictions.csv")
    rows, lp = _scored(stores, "siteD", results, "rad")
    got = predictions[predictions["model"] == "rad"].set_index("patient_id").loc[rows["patient_id"], "linear_predictor"]
    np.testing.assert_allclose(got.to_numpy(), lp, rtol=1e-10)
    assert not (stores["siteD"] / "validation-out").exists()


def _site_d_store(tmp_path, table, *, drop=(), params=TEST_DATA / "pyradiomics_baseline.yaml"):
    rows = table[table["site"] == "siteD"].drop(columns=["site", *drop])
    tmp_path.mkdir(parents=True, exist_ok=True)
    csv = tmp_path / "siteD.csv"
    rows.to_csv(csv, index=False)
    prepare_from_table(csv, tmp_path / "store", scanner_col="scanner", clinical_cols=["age", "sex"], params_path=params)
    return tmp_path / "store"


def test_validate_refuses_other_extraction_settings_and_missing_features(evaluated, tmp_path):
    table, _, _, run = evaluated
    other = tmp_path / "other.yaml"
    other.write_text((TEST_DATA / "pyradiomics_baseline.yaml").read_text(encoding="utf-8").replace("binWidth: 25", "binWidth: 5"), encoding="utf-8")
    with pytest.raises(PackageError, match="extracted with other pyradiomics settings"):
        validate(run / "package", _site_d_store(tmp_path / "a", table, params=other), tmp_path / "out", _trust(run))
    with pytest.raises(PackageError, match="lacks 1 feature.*table__original_firstorder_F03"):
        validate(run / "package", _site_d_store(tmp_path / "b", table, drop=["original_firstorder_F03"]),
                 tmp_path / "out", _trust(run))


def test_report_is_one_self_contained_html_file(evaluated, tmp_path):
    from fedrad.client.report import write_validation_report

    _, stores, results, run = evaluated
    text = (run / "report.html").read_text(encoding="utf-8")
    for section in ("Cohort", "Harmonisation", "Models", "Performance", "TRIPOD-AI checklist", "siteD",
                    "validation sites (pooled)"):
        assert section in text, section
    assert text.count("data:image/png;base64,") >= 3
    assert "src=\"http" not in text and "<link" not in text  # nothing fetched from elsewhere
    report = validate(run / "package", stores["siteD"], tmp_path / "out", _trust(run))
    page = write_validation_report(tmp_path / "out", report).read_text(encoding="utf-8")
    assert "rad_logit" in page and "data:image/png;base64," in page
