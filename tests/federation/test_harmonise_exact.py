"""Federated ComBat over real Flower processes equals pooled neuroCombat (issue 3, cases a-d).

One SuperLink and three SuperNodes serve every study in this module; each test submits a
study with `flwr run` and compares what the sites wrote to their stores with neuroCombat on
the pooled rows, then checks the z-scoring against the pooled population mean and SD.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedrad.server.local import LocalFederation
from tests.federation.cohort import hospital_rows, write_stores
from tests.federation.conftest import aligned, read_site_outputs, write_study
from tests.oracles import neurocombat

FEATURES = [f"original_firstorder_F{j:02d}" for j in range(12)]
STORE_FEATURES = [f"table__{f}" for f in FEATURES]


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("federation")
    table = hospital_rows()
    stores = write_stores(root / "stores", table)
    with LocalFederation(root / "flower", stores, echo=print) as fed:
        yield fed, table, stores, root


CASES = {
    # name: (study [harmonise] lines, neuroCombat batch column, categorical, continuous, eb modes)
    "a_site_batch": ('batch = "site"', "site", [], [], dict(eb=True, parametric=True, mean_only=False)),
    "b_c_shared_scanner_covariates": ('batch = "scanner"\ncategorical = ["sex"]\ncontinuous = ["age"]', "scanner",
                                      ["sex"], ["age"], dict(eb=True, parametric=True, mean_only=False)),
    "d_nonparametric": ('batch = "scanner"\ncategorical = ["sex"]\ncontinuous = ["age"]\nparametric = false',
                        "scanner", ["sex"], ["age"], dict(eb=True, parametric=False, mean_only=False)),
    "d_mean_only": ('batch = "scanner"\ncategorical = ["sex"]\ncontinuous = ["age"]\nmean_only = true', "scanner",
                    ["sex"], ["age"], dict(eb=True, parametric=True, mean_only=True)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_federated_combat_equals_pooled_neurocombat(federation, case):
    fed, table, stores, root = federation
    harmonise, batch_col, categorical, continuous, modes = CASES[case]
    study = write_study(root / f"{case}.toml", f'[study]\nname = "{case}"\n[harmonise]\n{harmonise}\n')
    results = fed.run_study(study, root / case)
    assert results["status"] == "completed", results.get("error")

    covars = pd.DataFrame({"batch": table[batch_col].to_numpy(), "sex": table["sex"].to_numpy(),
                           "age": table["age"].to_numpy()})
    expected = neurocombat(table[FEATURES].to_numpy(), covars, categorical=categorical, continuous=continuous, **modes)
    harmonised = read_site_outputs(stores, "harmonised.parquet")
    got = aligned(harmonised, table["patient_id"], STORE_FEATURES)
    assert np.abs(got - expected).max() <= 1e-8
    assert list(harmonised.columns) == list(pd.read_parquet(stores["siteA"] / "features.parquet").columns)

    standardised = aligned(read_site_outputs(stores, "standardised.parquet"), table["patient_id"], STORE_FEATURES)
    z_expected = (expected - expected.mean(axis=0)) / expected.std(axis=0)
    assert np.abs(standardised - z_expected).max() <= 1e-10

    h = results["harmonise"]
    assert h["batches"] == table[batch_col].value_counts().sort_index().to_dict()
    assert h["round_trips"] == 4 and results["stages"]["harmonise"]["rounds"] == 4  # 3 ComBat + 1 z-score
    assert set(h["traffic"]["bytes_from_site"]) == {"siteA", "siteB", "siteC"}
    reference = np.load(root / case / "reference" / "harmonisation.npz")
    assert reference["gamma_star"].shape == (len(h["batches"]), len(FEATURES))
    assert {"grand_mean", "var_pooled", "z_mean", "z_sd"} <= set(reference.files)
