"""A federation under stress: a site below the minimum, a resumed study, and the ledger/run log
agreeing on every message. Real SuperLink and SuperNodes. (Sites and the SuperLink dying
mid-study: test_fault_tolerance.py.)"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from fedrad.server.cli import app  # the `fedrad` command
from fedrad.client.ledger import read_ledger
from fedrad.server.local import LocalFederation
from fedrad.server.runlog import read_runlog
from tests.federation.cohort import hospital_rows, write_stores
from tests.federation.conftest import aligned, read_site_outputs, write_study
from tests.oracles import neurocombat

FEATURES = [f"original_firstorder_F{j:02d}" for j in range(12)]
STORE_FEATURES = [f"table__{f}" for f in FEATURES]


@pytest.fixture()
def cohort(tmp_path):
    table = hospital_rows()
    return table, write_stores(tmp_path / "stores", table)


def _pooled_by_site(table, sites):
    rows = table[table["site"].isin(sites)]
    return rows, neurocombat(rows[FEATURES].to_numpy(), pd.DataFrame({"batch": rows["site"].to_numpy()}))


def test_site_below_min_count_is_refused_and_the_rest_stay_exact(tmp_path, cohort):
    table, stores = cohort  # siteB has 24 cases
    study = write_study(tmp_path / "study.toml", '[privacy]\nmin_count = 25\n')
    with LocalFederation(tmp_path / "flower", stores, echo=print) as fed:
        results = fed.run_study(study, tmp_path / "run")
    assert results["status"] == "completed", results.get("error")
    refusal = results["census"]["refused"]
    assert list(refusal) == ["siteB"]
    reason = refusal["siteB"]
    assert reason.startswith("siteB: privacy guard: ") and "fewer cases than min_count=25" in reason
    assert "24" not in reason  # a count below the minimum is not disclosed
    assert results["harmonise"]["sites"] == ["siteA", "siteC"]
    rows, expected = _pooled_by_site(table, ["siteA", "siteC"])
    got = aligned(read_site_outputs(stores, "harmonised.parquet", ["siteA", "siteC"]), rows["patient_id"],
                  STORE_FEATURES)
    assert np.abs(got - expected).max() <= 1e-8
    ledger_b = read_ledger(stores["siteB"])
    assert ledger_b["status"].tolist() == ["refused"] and "min_count" in ledger_b["reason"][0]
    assert not (stores["siteB"] / "harmonised.parquet").exists()


def test_resume_skips_finished_stages_and_ledger_matches_run_log(tmp_path, cohort):
    table, stores = cohort
    study = write_study(tmp_path / "study.toml", '[harmonise]\nbatch = "scanner"\n')
    out = tmp_path / "run"
    args = ["local", "--study", str(study), "--out", str(out)]
    for site, store in stores.items():
        args += ["--site", f"{site}={store}"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    reference = json.loads((stores["siteA"] / "harmonised.json").read_text(encoding="utf-8"))["reference"]
    second = CliRunner().invoke(app, args)
    assert second.exit_code == 0, second.output
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    assert results["stages"]["harmonise"]["status"].startswith("skipped")
    assert results["harmonise"]["reference"] == reference
    log = read_runlog(out)
    assert len(log["runs"]) == 2
    rounds = log["rounds"].groupby("run_id")["round"].size()
    assert sorted(rounds.tolist()) == [1, 5]  # the rerun only took the census roll call
    # every message a site sent is on its ledger, and nothing else is
    for site, store in stores.items():
        ledger = read_ledger(store)
        sent = log["exchanges"].query("site == @site and status == 'answered'")
        assert len(ledger) == len(sent) == 6
        assert ledger["bytes"].sum() == sent["bytes_in"].sum()
        assert set(ledger["stage"]) == {"census", "harmonise"}
    status = CliRunner().invoke(app, ["status", str(out)])
    assert status.exit_code == 0 and "query.combat_residuals" in status.output and "skipped" in status.output
    shown = CliRunner().invoke(app, ["ledger", str(stores["siteB"])])
    assert shown.exit_code == 0 and "6 message(s)" in shown.output
