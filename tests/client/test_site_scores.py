"""Score columns at a site: an earlier model's linear predictor, and the deep-learning score hook
(``STORE/scores.parquet``, written by the CNN stage): present, absent, or missing for some cases."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedrad.client.site_fit import SCORES, add_scores
from fedrad.client.store import open_store
from fedrad.common.errors import StoreError
from tests.federation.cohort import hospital_rows, write_stores


@pytest.fixture
def store(tmp_path):
    stores = write_stores(tmp_path, hospital_rows(sizes={"siteA": 12, "siteB": 12}))
    return open_store(stores["siteA"])


def _plan(**extra):
    return {"model": {"name": "nomo"}, **extra}


def test_earlier_models_score_is_their_linear_predictor(store):
    coefficients = {"intercept": 5.0, "table__original_firstorder_F00": 0.5, "age": -0.1}
    table = add_scores(store, store.features, _plan(scores={"rad": coefficients}))
    expected = 0.5 * store.features["table__original_firstorder_F00"] - 0.1 * store.features["age"]
    np.testing.assert_allclose(table["rad"], expected, rtol=1e-15)  # no intercept in a score


def test_dl_score_comes_from_scores_parquet_by_patient_id(store):
    ids = store.features["patient_id"].to_numpy()
    pd.DataFrame({"patient_id": ids[::-1], "dl_score": np.arange(len(ids), dtype=float)}).to_parquet(
        store.path / SCORES)
    table = add_scores(store, store.features, _plan(external_scores=["dl_score"]))
    np.testing.assert_array_equal(table["dl_score"], np.arange(len(ids), dtype=float)[::-1])


def test_missing_dl_scores_are_refused_with_a_count_and_ids_only_in_the_site_log(store):
    with pytest.raises(StoreError, match="neither earlier models nor in this site's scores.parquet"):
        add_scores(store, store.features, _plan(external_scores=["dl_score"]))
    ids = store.features["patient_id"].to_numpy()
    pd.DataFrame({"patient_id": ids[:-2], "dl_score": 1.0}).to_parquet(store.path / SCORES)
    with pytest.raises(StoreError) as info:
        add_scores(store, store.features, _plan(external_scores=["dl_score"]))
    assert "2 case(s) have no ['dl_score'] score" in str(info.value)
    assert ids[-1] not in str(info.value) and ids[-1] in (store.path / "site.log").read_text(encoding="utf-8")
