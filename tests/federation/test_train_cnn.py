"""Stage `train_cnn` over real Flower processes on small synthetic CT volumes (CPU).

Three sites prepared from the synthetic cohort's manifests; a 2D ResNet-18 trained by FedAvg
for one round (a round is ~45 s with three sites training on 2 cores). Checks: only weights (and a count and a loss) leave a site in a training
round, with exactly the network's tensor names; the global weights change; every site then
holds a DL-score per case that equals the final network applied to its own images.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from client.cnn_task import build_network, predict
from client.extraction import default_params_path
from client.ledger import read_ledger
from client.prepare import prepare_from_manifest
from client.site_cnn import DEEP_FEATURES, network_with, site_cases
from client.store import open_store
from client.synth import generate_cohort
from common.study import parse_study
from server.local import LocalFederation
from server.train_cnn import initial_weights
from tests.federation.conftest import write_study

STUDY = """
[study]
name = "cnn"
stages = ["census", "train_cnn"]

[features]
include = ["venous__original_firstorder_*"]

[cnn]
phases = ["venous"]
dims = 2
box = [32, 32, 8]
rounds = 1
batch_size = 6
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cnn")
    generate_cohort(root / "cohort", n_sites=3, n_patients=8, seed=5, phases=("venous",), shape=(48, 48, 24))
    stores = {}
    for site in ("siteA", "siteB", "siteC"):
        stores[site] = root / "stores" / site
        prepare_from_manifest(root / "cohort" / site / "manifest.csv", stores[site],
                              params_path=default_params_path("demo"), jobs=1)
    with LocalFederation(root / "flower", stores, echo=print) as fed:
        results = fed.run_study(write_study(root / "study.toml", STUDY), root / "run")
    assert results["status"] == "completed", results.get("error")
    return stores, results


def test_a_training_round_sends_only_weights(trained):
    stores, results = trained
    names = set(build_network("resnet18", spatial_dims=2, in_channels=1).state_dict())
    for store in stores.values():
        entries = [json.loads(line) for line in (store / "egress.jsonl").read_text().splitlines()]
        rounds = [e for e in entries if e["message_type"] == "train.cnn"]
        assert len(rounds) == 1 and all(e["status"] != "refused" for e in rounds)
        for entry in rounds:
            assert {i["name"].removeprefix("arrays.") for i in entry["items"] if i["kind"] == "array"} == names
        assert set(read_ledger(store)["message_type"]) == {"query.census", "train.cnn", "query.cnn_scores"}
    assert [h["round"] for h in results["cnn"]["history"]] == [1]
    assert set(results["cnn"]["history"][0]["loss"]) == set(stores)


def test_global_weights_change_and_sites_hold_the_dl_score_of_the_final_network(trained):
    stores, results = trained
    final = dict(np.load(results["cnn"]["weights"]))
    start = initial_weights(parse_study({"cnn": {"phases": ["venous"], "dims": 2, "box": [32, 32, 8]}}))
    assert any(not np.allclose(final[k], start[k]) for k in start)
    for site, path in stores.items():
        store = open_store(path)
        cnn = {"phases": ["venous"], "dims": 2, "box": [32, 32, 8], "spacing": [1.0, 1.0, 3.0],
               "window": [-200.0, 300.0]}
        dataset, _ = site_cases(store, cnn)
        expected = predict(network_with({**cnn, "architecture": "resnet18"}, final), dataset)
        written = pd.read_parquet(path / "scores.parquet").set_index("patient_id").loc[expected["patient_id"]]
        np.testing.assert_allclose(written["dl_score"].to_numpy(), expected["dl_score"].to_numpy(), atol=1e-5)
        assert len(pd.read_parquet(path / DEEP_FEATURES).columns) == 513
        assert 0 <= results["cnn"]["dl_score_c_index"][site] <= 1
