"""A site lost mid-stage: the study completes without it, and says so — the end-of-run summary, report.html, the
dashboard, and `fedrad local` / `fedrad coordinator run` exit 3 (a site lost mid-fit ended "completed", exit 0,
without a word). Hand-written results: no Flower."""

from __future__ import annotations

import copy
import json

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from fedrad.client.cli import console
from fedrad.server.cli import app
from fedrad.server.dashboard import create_app, read_state
from fedrad.server.report import write_report
from fedrad.server.runlog import RUNLOG, RunLog
from fedrad.server.summary import EXIT_WITHOUT_SITES, exit_status, left_out_lines, print_results, sites_left_out

LOST = "its SuperNode stopped responding mid-round (Flower: node unavailable)"
SITE = {"cases": 30, "events": 10, "quarantined": 0, "repeat_cases": 0, "features_selected": 4, "min_count": 5,
        "batch_counts": {"GE": 30}, "problems": []}
COMPLETE = {
    "run_id": 9, "study": "lost", "status": "completed", "started": "t0", "ended": "t1",
    "stages": {"census": {"status": "done", "rounds": 1, "seconds": 0.5},
               "fit": {"status": "done", "rounds": 12, "seconds": 3.0}},
    "census": {"sites": {"siteA": SITE, "siteB": SITE, "siteC": SITE}, "n_features": 4, "params_hash": "ab" * 32,
               "refused": {"siteZ": "siteZ: privacy guard: fewer cases than min_count=5"}},
    "models": {"rad": {"kind": "cox", "penalty": "none", "rounds": 12, "coefficients": {"f": 0.5},
                       "sites": ["siteA", "siteB", "siteC"], "left_out": {}}},
}


def _lost_mid_fit() -> dict:
    results = copy.deepcopy(COMPLETE)
    results["models"]["rad"].update(sites=["siteA", "siteB"], left_out={"siteC": LOST})
    return results


def test_the_rule_a_completed_study_without_a_site_that_started_a_stage_exits_3():
    assert exit_status(COMPLETE) == 0 and sites_left_out(COMPLETE) == []  # a census refusal is not a loss
    lost = _lost_mid_fit()
    assert EXIT_WITHOUT_SITES == 3 and exit_status(lost) == 3
    assert left_out_lines(lost) == [f"fit (model 'rad'): finished without siteC: {LOST}"]
    assert exit_status({**lost, "status": "failed"}) == 1
    # every stage's record of a site dropped mid-stage
    other = copy.deepcopy(COMPLETE)
    other.update(harmonise={"sites": ["siteA", "siteB"], "left_out": {"siteC": "lost"},
                            "restarts": [{"sites": ["siteA", "siteB", "siteC"], "failed": {"siteC": "lost"}}],
                            "validation": {"sites": [], "failed": {"siteZ": "not connected or refused at the census"}}},
                 select={"left_out": {"siteB": "no reply within 900 s"}},
                 evaluation_settings={"failed": {"siteA": "siteA: privacy guard: refused"}})
    assert [(e["stage"], e["site"]) for e in sites_left_out(other)] == [
        ("harmonise", "siteC"), ("select", "siteB"), ("evaluate", "siteA")]
    # a site harmonise excluded before it started (eligibility), never part of a stage: not a loss
    excluded = copy.deepcopy(COMPLETE)
    excluded["harmonise"] = {"sites": ["siteA", "siteB"], "left_out": {"siteC": "small batch levels"}, "restarts": []}
    assert exit_status(excluded) == 0


def test_the_end_of_run_summary_says_the_model_was_fitted_without_the_site(tmp_path):
    with console.capture() as captured:
        print_results(_lost_mid_fit(), tmp_path)
    text = " ".join(captured.get().split())
    assert "completed without siteC" in text
    assert "finished without site(s) that started a stage" in text and "exit status 3" in text
    assert f"fit (model 'rad'): finished without siteC: {LOST}" in text
    with console.capture() as captured:
        print_results(COMPLETE, tmp_path)
    assert "finished without" not in captured.get()


def test_the_report_says_so(tmp_path):
    text = write_report(tmp_path, _lost_mid_fit()).read_text(encoding="utf-8")
    assert "completed without siteC</title>" in text
    assert "id='left-out'" in text and "finished without siteC" in text
    (tmp_path / "clean").mkdir()
    clean = write_report(tmp_path / "clean", COMPLETE).read_text(encoding="utf-8")
    assert "left-out" not in clean


def _ended_run(run_dir, results: dict, run_id: int = 9) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "study.toml").write_text('[study]\nname = "lost"\nstages = ["census", "fit"]\n', encoding="utf-8")
    log = RunLog(run_dir / RUNLOG, run_id=run_id)
    log.start_run("lost")
    for stage in ("census", "fit"):
        log.start_stage(stage)
        log.end_stage(stage, "done", 1)
    log.end_run("completed")
    log.close()
    (run_dir / "results.json").write_text(json.dumps(results), encoding="utf-8")


def test_the_dashboard_says_so_once_the_run_has_ended(tmp_path):
    _ended_run(tmp_path / "run", _lost_mid_fit())
    assert read_state(tmp_path / "run")["left_out"] == [f"fit (model 'rad'): finished without siteC: {LOST}"]
    page = TestClient(create_app(tmp_path / "run")).get("/fragment").text
    assert 'id="left-out"' in page and "finished without siteC" in page
    _ended_run(tmp_path / "other", _lost_mid_fit(), run_id=10)  # results.json of another run: not this one's
    assert read_state(tmp_path / "other")["left_out"] == []
    _ended_run(tmp_path / "clean", COMPLETE)
    assert 'id="left-out"' not in TestClient(create_app(tmp_path / "clean")).get("/fragment").text


class FakeFederation:
    results: dict = {}

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return None

    def run_study(self, study, out):
        return copy.deepcopy(self.results)


@pytest.mark.parametrize("results, code", [(COMPLETE, 0), (_lost_mid_fit(), 3), ({**COMPLETE, "status": "failed",
                                                                                  "error": "boom"}, 1)])
def test_fedrad_local_exits_3_when_a_stage_finished_without_a_site(tmp_path, monkeypatch, results, code):
    monkeypatch.setattr("fedrad.server.cli.preflight_or_exit", lambda study, sites: None)
    monkeypatch.setattr("fedrad.server.local.LocalFederation", type("Fed", (FakeFederation,), {"results": results}))
    ran = CliRunner().invoke(app, ["local", "--site", "siteA=a", "--site", "siteB=b", "--study", "s.toml",
                                   "--out", str(tmp_path / "run")])
    assert ran.exit_code == code, ran.output


def test_fedrad_coordinator_run_exits_3_when_a_stage_finished_without_a_site(tmp_path, monkeypatch):
    study = tmp_path / "study.toml"
    study.write_text('[study]\nname = "lost"\nstages = ["census"]\n', encoding="utf-8")
    monkeypatch.setattr("fedrad.server.local.submit", lambda *args: _lost_mid_fit())
    ran = CliRunner().invoke(app, ["coordinator", "run", "--study", str(study), "--superlink", "127.0.0.1:1",
                                   "--insecure", "--out", str(tmp_path / "run")])
    assert ran.exit_code == 3, ran.output
    assert "finished without siteC" in " ".join(ran.output.split())
