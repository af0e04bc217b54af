"""Names are text in every HTML page fedrad writes: a site, feature or model name holding markup is shown, escaped,
never run. The study report and `fedrad validate`'s report (report.html), and the dashboard's page and live
fragment (from a hand-written run log: no Flower)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from fedrad.client.report import write_validation_report
from fedrad.server.dashboard import create_app
from fedrad.server.report import write_report
from fedrad.server.runlog import RUNLOG, RunLog

HOSTILE = "<script>alert(1)</script>"
ESCAPED = "&lt;script&gt;alert(1)&lt;/script&gt;"
SITE, FEATURE = f"site{HOSTILE}", f"table__original_firstorder_{HOSTILE}"


def _metrics(n: int) -> dict:
    return {"n": n, "events": n // 3, "c_index": 0.7, "c_index_ci": [0.6, 0.8], "auc": 0.72, "auc_ci": [0.6, 0.84],
            "sensitivity": 0.6, "specificity": 0.7, "calibration_slope": 0.9, "hl_p": 0.4, "logrank_p": 0.02,
            "auc_td": {"24": 0.7}, "roc": {"fpr": [0.0, 0.3, 1.0], "tpr": [0.0, 0.7, 1.0]}}


def _assert_escaped(text: str, at_least: int = 1) -> None:
    assert HOSTILE not in text
    assert "<script>alert" not in text
    assert text.count(ESCAPED) >= at_least


def test_the_study_report_escapes_site_and_feature_names(tmp_path):
    results = {
        "study": "escaping", "status": "completed", "run_id": "1", "started": "t0", "ended": "t1",
        "census": {"n_features": 1, "params_hash": "0123456789abcdef", "refused": {SITE: "privacy guard"},
                   "sites": {SITE: {"cases": 30, "events": 10, "quarantined": 0, "repeat_cases": 0,
                                    "batch_counts": {"GE": 30}}}},
        "harmonise": {"batch": "scanner", "sites": [SITE], "n_features": 1, "settings": {"eb": True},
                      "design": {"batch_levels": ["GE"]}, "validation": {"sites": [SITE]}},
        "select": {"candidates": 1, "selected": [FEATURE]},
        "models": {"rad": {"kind": "cox", "rounds": 3, "alpha": 0.1, "rule": "1se", "coefficients": {FEATURE: 0.5}}},
        "evaluation_settings": {"training_sites": [SITE], "validation_sites": [], "horizon": 24, "cutoffs": {},
                                "not_computed": ""},
        "evaluation": {SITE: {"role": "training", "rad": _metrics(30)},
                       "pooled": {"sites": [SITE], "rad": _metrics(30)}},
    }
    text = write_report(tmp_path, results).read_text(encoding="utf-8")
    # the census table and its refusals, harmonisation, the selection, the coefficients, the metrics table
    _assert_escaped(text, at_least=6)
    assert f"<li>site{ESCAPED}: privacy guard</li>" in text
    assert f"Selected: table__original_firstorder_{ESCAPED}" in text
    assert "data:image/png;base64," in text  # the trusted parts are still markup


def test_the_validation_report_escapes_names(tmp_path):
    report = {"study": HOSTILE, "package": f"/packages/{HOSTILE}", "store": f"/stores/{SITE}",
              "metrics": {"role": "validation", HOSTILE: _metrics(20)},
              "study_metrics": {"pooled": {"sites": ["a", "b"], HOSTILE: _metrics(60)}}}
    text = write_validation_report(tmp_path, report).read_text(encoding="utf-8")
    _assert_escaped(text, at_least=4)  # heading, package and store line, the metrics table, the model's plots
    assert f"<h1>Validation of '{ESCAPED}' at this site</h1>" in text
    assert "data:image/png;base64," in text


@pytest.fixture()
def hostile_run(tmp_path):
    """A run log whose site, refusal and model are named with markup."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "study.toml").write_text('[study]\nname = "escaping"\nstages = ["census", "fit"]\n', encoding="utf-8")
    log = RunLog(run_dir / RUNLOG, run_id=3)
    log.start_run(HOSTILE)
    log.start_stage("census")
    log.pending("census", 1, "query.census", {SITE: 11}, {SITE: 100})
    log.exchange("census", 1, SITE, 11, "failed", f"{SITE}: offline {HOSTILE}", 100, 0, 1.0)
    log.round("census", 1, "query.census", 1.0, 1, 0)
    log.end_stage("census", "failed", 1, HOSTILE)
    log.start_stage("fit")
    for evaluation, (loglik, step) in enumerate([(-90.0, 0.5), (-85.0, 0.01)], start=1):
        log.series("fit", "loglik", evaluation, loglik, part=HOSTILE)
        log.series("fit", "step", evaluation, step, part=HOSTILE)
    log.close()
    return run_dir


def test_the_dashboard_page_and_fragment_escape_names(hostile_run):
    client = TestClient(create_app(hostile_run))
    page, fragment = client.get("/"), client.get("/fragment")
    assert page.status_code == fragment.status_code == 200
    for text in (page.text, fragment.text):
        # study, site (sites table, round cell), the refusal, the stage detail, the Newton charts' series
        _assert_escaped(text, at_least=8)
        assert f'data-site="site{ESCAPED}"' in text
        assert f'data-series="{ESCAPED}"' in text  # a chart's points, labelled by the model
    assert page.text.count("<script>") == 1  # the page's own polling script, nothing else
