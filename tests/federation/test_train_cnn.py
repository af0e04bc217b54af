"""Stage `train_cnn` over real Flower processes on small synthetic CT volumes (CPU), and its DL-score and
deep features used by the statistical stages, the package and `fedrad validate`.

Three training sites and one validation site prepared from the synthetic cohort's manifests; a 2D
ResNet-18 trained by FedAvg with DP-SGD at the sites, for the two rounds the ε budget allows (a round is
~45 s with three sites training on 2 cores), then a ridge Cox model on the DL-score and four deep
features, evaluated and packaged. Checks: only
weights (and a count and scalar figures) leave a site in a training round, with exactly the network's
tensor names; the global weights change; every site then holds a DL-score per case that equals the
final network applied to its own images; each round reports the site-local validation loss and
C-index of the global weights; the package carries the network and `fedrad validate` at the
validation site, recomputing DL-score and deep features from its images, reproduces the federated
evaluation of that site.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from opacus.accountants import RDPAccountant

from fedrad.client.cnn_task import build_network, predict
from fedrad.client.extraction import default_params_path
from fedrad.client.ledger import read_ledger
from fedrad.client.prepare import prepare_from_manifest
from fedrad.client.site_cnn import _held_out_figures, network_with, site_cases, validation_figures, validation_ids
from fedrad.client.site_data import DEEP_FEATURES
from fedrad.client.store import open_store
from fedrad.client.synth import generate_cohort
from fedrad.client.validate import validate
from fedrad.common.study import parse_study
from fedrad.server.local import LocalFederation
from fedrad.server.train_cnn import EarlyStopping, initial_weights
from tests.federation.conftest import write_study

SITES = ("siteA", "siteB", "siteC", "siteD")
CNN = {"phases": ["venous"], "dims": 2, "box": [32, 32, 8], "rounds": 3, "batch_size": 6, "validation_fraction": 0.4,
       "privacy": {"noise_multiplier": 1.0, "delta": 1e-3, "epsilon_budget": 6.0}}
STUDY = """
[study]
name = "cnn"
stages = ["census", "train_cnn", "fit", "evaluate", "package"]

[outcome]
horizons = [12]

[features]
include = ["venous__original_firstorder_*"]

[privacy]
min_count = 1   # 8 cases a site: a group of one (a case censored before the horizon) must not stop evaluate

[sites]
validation = ["siteD"]

[evaluate]
bootstrap = 20

[cnn]
phases = ["venous"]
dims = 2
box = [32, 32, 8]
rounds = 3
batch_size = 6
validation_fraction = 0.4

[cnn.privacy]           # DP-SGD; a third round would pass the budget (epsilon 5.42 after two, 7.00 after three)
noise_multiplier = 1.0
delta = 1e-3
epsilon_budget = 6.0

[[models]]
name = "dlr"
features = ["deep__cnn_000[0-3]"]
scores = ["dl_score"]
ridge = 1.0
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cnn")
    generate_cohort(root / "cohort", n_sites=4, n_patients=8, seed=5, phases=("venous",), shape=(48, 48, 24))
    stores = {}
    for site in SITES:
        stores[site] = root / "stores" / site
        prepare_from_manifest(root / "cohort" / site / "manifest.csv", stores[site],
                              params_path=default_params_path("demo"), jobs=1)
    with LocalFederation(root / "flower", stores, echo=print) as fed:
        results = fed.run_study(write_study(root / "study.toml", STUDY), root / "run")
    assert results["status"] == "completed", results.get("error")
    return stores, results, root


def _cnn_settings() -> dict:
    return parse_study({"cnn": CNN}).cnn.model_dump(mode="json")


def test_a_training_round_sends_only_weights(trained):
    stores, results, _ = trained
    names = set(build_network("resnet18", spatial_dims=2, in_channels=1, dp=True).state_dict())
    for site in SITES[:3]:
        store = stores[site]
        entries = [json.loads(line) for line in (store / "egress.jsonl").read_text(encoding="utf-8").splitlines()]
        rounds = [e for e in entries if e["message_type"] == "train.cnn"]
        assert len(rounds) == 2 and all(e["status"] != "refused" for e in rounds)
        for entry in rounds:
            assert {i["name"].removeprefix("arrays.") for i in entry["items"] if i["kind"] == "array"} == names
        assert {"train.cnn", "query.cnn_scores"} <= set(read_ledger(store)["message_type"])
    assert "train.cnn" not in set(read_ledger(stores["siteD"])["message_type"])  # a validation site never trains
    assert [h["round"] for h in results["cnn"]["history"]] == [1, 2]
    assert set(results["cnn"]["history"][0]["loss"]) == set(SITES[:3])


def test_global_weights_change_and_sites_hold_the_dl_score_of_the_final_network(trained):
    stores, results, _ = trained
    final = dict(np.load(results["cnn"]["weights"]))
    start = initial_weights(parse_study({"cnn": CNN}))
    assert any(not np.allclose(final[k], start[k]) for k in start)
    for site, path in stores.items():
        dataset, _ = site_cases(open_store(path), _cnn_settings())
        expected = predict(network_with(_cnn_settings(), final), dataset)
        written = pd.read_parquet(path / "scores.parquet").set_index("patient_id").loc[expected["patient_id"]]
        np.testing.assert_allclose(written["dl_score"].to_numpy(), expected["dl_score"].to_numpy(), atol=1e-5)
        assert len(pd.read_parquet(path / DEEP_FEATURES).columns) == 513
        assert 0 <= results["cnn"]["dl_score_c_index"][site] <= 1
        # Grad-CAM maps stay at the site: three cases' maps on disk, nothing but scalars in the scores reply
        assert len(list((path / "gradcam").glob("*_gradcam.png"))) == 3
        ledger = [json.loads(line) for line in (path / "egress.jsonl").read_text(encoding="utf-8").splitlines()]
        scores_reply = [e for e in ledger if e["message_type"] == "query.cnn_scores"][-1]
        assert all(item["kind"] != "array" for item in scores_reply["items"])


def test_each_round_reports_the_validation_figures_of_the_global_weights(trained):
    """Round 2's figures at a site are the round-1 global model on that site's held-out cases."""
    stores, results, root = trained
    history = results["cnn"]["history"]
    # the round-1 global weights are not kept; round 1's figures (initial weights) are recomputed instead
    start = initial_weights(parse_study({"cnn": CNN}))
    reported = 0
    for site in SITES[:3]:
        store = open_store(stores[site])
        held = validation_ids(sorted(store.features["patient_id"].astype(str)), _cnn_settings())
        assert len(held) == 3 and history[0]["val_cases"][site] == 3 and history[0]["cases"][site] == 5
        figure = history[0]["val_c_index"][site]
        if figure is None:  # withheld: fewer than min_count held-out cases, or no event among them
            continue
        dataset, manifest = site_cases(store, _cnn_settings(), part="validation")
        expected = validation_figures(network_with(_cnn_settings(), start), dataset, "cox")
        assert figure == pytest.approx(expected["val_c_index"], abs=1e-12)
        assert history[0]["val_loss"][site] == pytest.approx(expected["val_loss"], rel=1e-5)
        reported += 1
    assert reported >= 1
    assert history[1]["val_loss_mean"] is not None


def test_privacy_is_accounted_per_site_and_the_budget_stops_training(trained):
    """Each site trains 5 cases in one batch (q = 1, one step a round); its ε after each round must be
    Opacus' RDP accountant stepped that many times, and it is in the site's ledger."""
    stores, results, _ = trained
    privacy = results["cnn"]["privacy"]
    assert privacy["guarantee"] == "batch-coupled (Cox)"
    assert "another round would take" in privacy["budget_stop"] and results["cnn"]["rounds_run"] == 2
    for site in SITES[:3]:
        expected = []
        accountant = RDPAccountant()
        for _ in range(2):
            accountant.step(noise_multiplier=1.0, sample_rate=1.0)
            expected.append(accountant.get_epsilon(delta=1e-3))
        ledger = [json.loads(line) for line in (stores[site] / "egress.jsonl").read_text(encoding="utf-8").splitlines()]
        spent = [e["dp_epsilon"] for e in ledger if e["message_type"] == "train.cnn"]
        np.testing.assert_allclose(spent, expected, rtol=1e-12)
        assert privacy["epsilon"][site] == pytest.approx(expected[-1], rel=1e-12)
        assert [h["dp_epsilon"][site] for h in results["cnn"]["history"]] == pytest.approx(expected, rel=1e-12)


def test_validation_figures_are_withheld_below_the_minimum_count(trained):
    stores, _, _ = trained
    store = open_store(stores["siteA"])
    net = network_with(_cnn_settings(), initial_weights(parse_study({"cnn": CNN})))
    figures, groups = _held_out_figures(store, _cnn_settings(), net, min_count=4)  # 3 held-out cases
    assert figures["val_n"] == 3 and np.isnan(figures["val_loss"]) and np.isnan(figures["val_c_index"])
    assert groups == {}
    assert "validation figures withheld (3 case(s)" in (stores["siteA"] / "site.log").read_text(encoding="utf-8")


def test_early_stopping_keeps_the_best_global_weights():
    stopping = EarlyStopping(patience=2)
    losses = [1.0, 0.8, 0.9, 0.85]  # round r reports the weights after r - 1 rounds
    stops = [stopping.update(r, loss, {"w": np.array([r - 1.0])}) for r, loss in enumerate(losses, start=1)]
    assert stops == [False, False, False, True]
    assert stopping.best_round == 1 and stopping.best_weights["w"][0] == 1.0
    assert not EarlyStopping(patience=0).update(1, 1.0, {})


def test_deep_features_and_the_dl_score_enter_a_model_and_the_package_scores_a_new_site(trained):
    stores, results, root = trained
    model = results["models"]["dlr"]
    assert model["columns"] == [f"deep__cnn_000{j}" for j in range(4)] + ["dl_score"]
    assert all(np.isfinite(v) for v in model["coefficients"].values())
    federated = results["evaluation"]["siteD"]["dlr"]
    assert federated["n"] == 8
    package = root / "run" / "package"
    manifest = json.loads((package / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["cnn"]["weights_id"] == results["cnn"]["weights_id"] and (package / "cnn_weights.npz").is_file()
    # a new hospital: siteD's store without anything the federation wrote into it
    fresh = root / "fresh_siteD"
    prepare_from_manifest(root / "cohort" / "siteD" / "manifest.csv", fresh, params_path=default_params_path("demo"),
                          jobs=1)
    report = validate(package, fresh, root / "validate_out", root / "run" / "package-signing.pub")
    assert report["metrics"]["dlr"]["c_index"] == pytest.approx(federated["c_index"], abs=1e-9)
    assert not (fresh / "scores.parquet").exists()  # the hospital's store is never written
