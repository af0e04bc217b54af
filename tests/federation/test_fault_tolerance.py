"""Failures between hospitals, on real processes: a SuperNode killed mid-stage (and coming back),
a SuperLink restarted mid-study, a store that changes between stages, a site that hangs.

Each test runs its own SuperLink and SuperNodes (server/local.py) and breaks one of them while a
study runs in a thread; the results are checked against the pooled references, not just for
"completed".
"""

from __future__ import annotations

import os
import signal
import sqlite3
import threading
import time

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter

from fedrad.client.ledger import read_ledger
from fedrad.client.table_import import prepare_from_table
from fedrad.server.local import FederationError, LocalFederation
from fedrad.server.runlog import RUNLOG, RunLog, read_runlog
from tests.conftest import TEST_DATA
from tests.federation.cohort import hospital_rows, write_stores
from tests.federation.conftest import write_study

COX = ["original_firstorder_F00", "original_firstorder_F03", "original_firstorder_F07"]

STUDY = """
[study]
name = "faults"
stages = ["census", "select", "fit"]

[federation]
min_sites = 2

[select]
features = ["table__original_firstorder_F0*"]
fdr = 1.0
max_features = 3

[[models]]
name = "rad_cox"
kind = "cox"
features = ["table__original_firstorder_F00", "table__original_firstorder_F03", "table__original_firstorder_F07"]
clinical = ["age"]
"""

SILENT_SITE_TIMEOUT_S = 45  # well above a busy 2-core machine's round trip (~8-12 s), or the census times out too


@pytest.fixture()
def cohort(tmp_path):
    table = hospital_rows()
    return table, write_stores(tmp_path / "stores", table)


def _stratified_cox(table: pd.DataFrame) -> np.ndarray:
    frame = table[COX + ["age", "time", "event", "site"]]
    ref = CoxPHFitter().fit(frame, "time", "event", strata=["site"], fit_options={"precision": 1e-12,
                                                                                  "r_precision": 1e-14})
    return ref.params_.to_numpy()


def _coefficients(model: dict) -> np.ndarray:
    return np.array([model["coefficients"][f"table__{c}"] for c in COX] + [model["coefficients"]["age"]])


def _query(run_dir, sql: str) -> int:
    path = run_dir / "runlog.sqlite"
    if not path.exists():
        return 0
    try:
        with sqlite3.connect(path, timeout=5) as db:
            return db.execute(sql).fetchone()[0]
    except sqlite3.OperationalError:  # tables not created yet
        return 0


def _wait_for(run_dir, sql: str, at_least: int, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while _query(run_dir, sql) < at_least:
        assert time.monotonic() < deadline, f"the run never reached: {sql}"
        time.sleep(0.05)


def _in_thread(fed: LocalFederation, study, run_dir) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def run():
        try:
            outcome["results"] = fed.run_study(study, run_dir)
        except FederationError as exc:
            outcome["error"] = exc

    runner = threading.Thread(target=run)
    runner.start()
    return runner, outcome


def test_site_killed_mid_stage_is_named_and_rejoins_the_next_stage(tmp_path, cohort):
    table, stores = cohort
    study = write_study(tmp_path / "study.toml", STUDY)
    run_dir = tmp_path / "run"
    with LocalFederation(tmp_path / "flower", stores, echo=print) as fed:
        runner, outcome = _in_thread(fed, study, run_dir)
        _wait_for(run_dir, "SELECT COUNT(*) FROM stages WHERE stage='select'", 1)
        fed.stop_site("siteC", signal.SIGKILL)  # a crash: Flower notices by the missing heartbeat
        fed.processes["site-siteC"].wait()
        fed.start_site("siteC")  # back at once, under a new node id; the select round still waits for the old one
        runner.join(timeout=600)
    results = outcome["results"]
    assert results["status"] == "completed", results.get("error")
    # select finished with the two sites that answered, naming the lost one and Flower's reason
    assert sorted(results["select"]["sites"]) == ["siteA", "siteB"]
    assert list(results["select"]["left_out"]) == ["siteC"]
    assert "stopped responding" in results["select"]["left_out"]["siteC"]
    # ... and siteC took part in fit again, whose model is the pooled one over all three sites
    assert [(r["stage"], r["site"]) for r in results["rejoined"]] == [("fit", "siteC")]
    model = results["models"]["rad_cox"]
    assert sorted(model["sites"]) == ["siteA", "siteB", "siteC"] and not model["left_out"]
    np.testing.assert_allclose(_coefficients(model), _stratified_cox(table), rtol=1e-6)
    exchanges = read_runlog(run_dir)["exchanges"]
    failed = exchanges.query("status != 'answered'")
    assert failed[["stage", "site"]].values.tolist() == [["select", "siteC"]]
    assert (exchanges.query("stage == 'fit'").groupby("site").size() > 0).all()
    assert set(exchanges.query("stage == 'fit'")["site"]) == {"siteA", "siteB", "siteC"}


def test_superlink_restart_mid_study_resumes_from_the_last_finished_stage(tmp_path, cohort):
    table, stores = cohort
    study = write_study(tmp_path / "study.toml", STUDY)
    run_dir = tmp_path / "run"
    with LocalFederation(tmp_path / "flower", stores, echo=print) as fed:
        runner, outcome = _in_thread(fed, study, run_dir)
        _wait_for(run_dir, "SELECT COUNT(*) FROM rounds WHERE stage='fit'", 2)  # Newton under way
        fed.restart_superlink(signal.SIGKILL)  # same port, same SQLite state
        runner.join(timeout=300)
        assert not runner.is_alive()
        first = outcome.get("results") or {}
        assert first.get("status") != "completed"  # the interrupted run did not pretend to finish
        resumed = fed.run_study(study, run_dir)
    assert resumed["status"] == "completed", resumed.get("error")
    stages = resumed["stages"]
    assert stages["census"]["status"] == "done"
    assert stages["select"]["status"].startswith("skipped: finished in run ")
    assert stages["fit"]["status"] == "done"
    log = read_runlog(run_dir)
    runs = log["runs"].sort_values("started")
    assert runs["status"].tolist() == ["interrupted", "completed"]
    interrupted = log["stages"].query("run_id == @runs.run_id.iloc[0]").set_index("stage")["status"]
    assert interrupted.to_dict() == {"census": "done", "select": "done", "fit": "interrupted"}
    # the reused select is the first run's, and the resumed fit is the pooled model over all sites
    assert resumed["select"]["selected"] == _saved_select(run_dir)["selected"]
    model = resumed["models"]["rad_cox"]
    np.testing.assert_allclose(_coefficients(model), _stratified_cox(table), rtol=1e-6)
    assert sorted(model["sites"]) == ["siteA", "siteB", "siteC"]


def _saved_select(run_dir) -> dict:
    import json

    with sqlite3.connect(run_dir / "runlog.sqlite") as db:
        return json.loads(db.execute("SELECT result FROM stage_results WHERE stage='select'").fetchone()[0])


def test_changed_store_is_refused_and_a_silent_site_times_out(tmp_path, cohort):
    table, stores = cohort
    study = write_study(tmp_path / "study.toml", STUDY.replace(
        'stages = ["census", "select", "fit"]', 'stages = ["census", "select"]').replace(
        "min_sites = 2", f"min_sites = 1\nround_timeout_s = {SILENT_SITE_TIMEOUT_S}"))
    run_dir = tmp_path / "run"
    with LocalFederation(tmp_path / "flower", stores, echo=print) as fed:
        runner, outcome = _in_thread(fed, study, run_dir)
        _wait_for(run_dir, "SELECT COUNT(*) FROM stages WHERE stage='census' AND status='done'", 1)
        _reprepare_without_one_case(table, stores["siteA"], tmp_path)  # siteA re-runs `fedrad prepare`
        stalled = _stall_store(stores["siteB"])  # siteB hangs: no reply, no error, its SuperNode still heartbeats
        try:
            runner.join(timeout=300)
        finally:
            _release(stalled)
    results = outcome["results"]
    assert results["status"] == "completed", results.get("error")
    left_out = results["select"]["left_out"]
    assert left_out["siteB"] == f"no reply within {SILENT_SITE_TIMEOUT_S} s"
    assert left_out["siteA"].startswith("siteA: its feature store changed since this run's census (30 → 29 rows")
    assert results["select"]["sites"] == ["siteC"]
    rounds = read_runlog(run_dir)["rounds"].query("stage == 'select'")
    assert len(rounds) == 1 and rounds["answered"].iloc[0] == 1
    ledger = read_ledger(stores["siteA"])
    refusal = ledger.query("stage == 'select'")
    assert refusal["status"].tolist() == ["refused"] and "changed since this run's census" in refusal["reason"].iloc[0]


def _stall_store(store) -> str:
    """Put siteB's features.parquet behind a FIFO nobody writes, as on a stalled network mount: the
    site's ClientApp blocks reading it while its SuperNode stays connected and heartbeats, so Flower
    reports nothing and only the coordinator's round timeout can end the wait."""
    features = os.path.join(store, "features.parquet")
    os.replace(features, features + ".kept")
    os.mkfifo(features)
    return features


def _release(fifo: str) -> None:
    """Let the blocked reader go (it reads end-of-file), so no process outlives the test."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:  # no reader left
        pass


def test_a_run_that_never_recorded_its_end_is_closed_by_the_next(tmp_path):
    """The ServerApp of a run can die with its SuperLink before it writes anything: the next run in
    the same directory marks it interrupted (stage and pending replies too)."""
    first = RunLog(tmp_path / RUNLOG, run_id=1)
    first.start_run("faults")
    first.start_stage("census")
    first.end_stage("census", "done", 1)
    first.start_stage("fit")
    first.pending("fit", 1, "query.model_summaries", {"siteA": 11}, {"siteA": 100})
    first.close()
    RunLog(tmp_path / RUNLOG, run_id=2).start_run("faults")
    log = read_runlog(tmp_path)
    assert log["runs"].set_index("run_id")["status"].to_dict() == {"1": "interrupted", "2": "running"}
    assert log["runs"].set_index("run_id")["detail"]["1"] == "no end was recorded; run 2 started in this run directory"
    assert log["stages"].set_index("stage")["status"].to_dict() == {"census": "done", "fit": "interrupted"}
    exchange = log["exchanges"].iloc[0]
    assert exchange["status"] == "failed" and exchange["reason"].startswith("no reply before the run ended")


def _reprepare_without_one_case(table: pd.DataFrame, store, tmp_path) -> None:
    rows = table[table["site"] == "siteA"].iloc[1:].drop(columns="site")
    csv = tmp_path / "siteA-again.csv"
    rows.to_csv(csv, index=False)
    prepare_from_table(csv, store, scanner_col="scanner", clinical_cols=["age", "sex"],
                       params_path=TEST_DATA / "pyradiomics_baseline.yaml", overwrite=True)  # another table
