"""`fedrad prepare --table` builds the same kind of store from a ready feature table."""

from __future__ import annotations

import pandas as pd
from typer.testing import CliRunner

from fedrad.client.cli import EXIT_QUARANTINED
from fedrad.server.cli import app  # the `fedrad` command
from fedrad.client.store import open_store
from tests.conftest import TEST_DATA


def _table(path):
    rows = [
        {"pid": f"T{i}", "T": 3.0 + i, "E": i % 2, "scan": "GE", "age": 50 + i, "histology": "LPS",
         "original_firstorder_Mean": 10.0 * i, "venous__original_shape_MeshVolume": 100.0 + i}
        for i in range(6)
    ]
    rows[2]["original_firstorder_Mean"] = "n/a"
    rows[4]["pid"] = "T0"  # duplicate id
    rows[5]["E"] = "yes"
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_table_becomes_store_with_quarantine(tmp_path):
    table = _table(tmp_path / "features.csv")
    result = CliRunner().invoke(app, [
        "prepare", "--table", str(table), "--out", str(tmp_path / "store"), "--id-col", "pid", "--time-col", "T",
        "--event-col", "E", "--scanner-col", "scan", "--clinical-cols", "age,histology",
        "--params", str(TEST_DATA / "pyradiomics_baseline.yaml"),
    ])
    assert result.exit_code == EXIT_QUARANTINED, result.output
    store = open_store(tmp_path / "store")
    assert store.features["patient_id"].tolist() == ["T1", "T3"]
    assert store.feature_columns == ["table__original_firstorder_Mean", "venous__original_shape_MeshVolume"]
    assert store.clinical_columns == ["age", "histology"]
    assert store.features["scanner"].tolist() == ["GE", "GE"]
    assert store.features["table__original_firstorder_Mean"].tolist() == [10.0, 30.0]
    assert store.meta["source"] == "table" and len(store.params_hash) == 64
    reasons = {(r.patient_id, r.field): r.reason for r in store.quarantine.itertuples()}
    assert reasons[("T2", "original_firstorder_Mean")] == "feature value 'n/a' is not a finite number"
    assert reasons[("T0", "patient_id")].startswith("duplicate patient_id (CSV rows 2, 6)")
    assert reasons[("T5", "event")] == "event is 'yes'; must be 0 (censored) or 1 (event)"


def test_text_column_not_declared_clinical_is_refused(tmp_path):
    table = _table(tmp_path / "features.csv")
    result = CliRunner().invoke(app, ["prepare", "--table", str(table), "--out", str(tmp_path / "store"),
                                      "--id-col", "pid", "--time-col", "T", "--event-col", "E",
                                      "--clinical-cols", "age"])
    assert result.exit_code == 2
    assert "table column 'scan' holds no numbers (e.g. 'GE'); declare it with --clinical-cols" in result.output
