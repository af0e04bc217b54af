"""The coordinator dashboard (server/dashboard.py): its state from a hand-written run log, exactly, and the
page in headless Chromium while a real local federation runs a study (screenshot taken mid-run).

Chromium is Debian's (/usr/bin/chromium, which `make test` installs when missing), driven by playwright's
Python package; no browser is downloaded.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from fedrad.server.dashboard import DashboardServer, create_app, read_state
from fedrad.server.runlog import RUNLOG, RunLog, read_runlog
from tests.federation.cohort import hospital_rows, write_stores
from tests.federation.conftest import when_stage_runs, write_study

CHROMIUM = "/usr/bin/chromium"
REFUSAL = "siteB: privacy guard: the reply was computed from fewer cases than min_count=25"


class Clock:
    """time.time() for RunLog while a test writes it: 1000.0, then +1 s per call."""

    def __init__(self):
        self.now = 999.0

    def __call__(self):
        self.now += 1.0
        return self.now


def _handmade_run(run_dir: Path, monkeypatch) -> None:
    """A run stopped mid-`fit`: census done (siteA answered, siteB refused by its privacy guard, node 13 offline),
    harmonise skipped, fit round 1 waiting for siteA after three Newton iterations; ε from an earlier CNN stage."""
    run_dir.mkdir()
    (run_dir / "study.toml").write_text('[study]\nname = "handmade"\nstages = ["census", "harmonise", "train_cnn", '
                                        '"fit"]\n[privacy]\nmin_count = 25\n[cnn.privacy]\nepsilon_budget = 8.0\n', encoding="utf-8")
    monkeypatch.setattr("fedrad.server.runlog.time.time", Clock())
    log = RunLog(run_dir / RUNLOG, run_id=7)
    log.start_run("handmade")                                                                  # t = 1000
    log.start_stage("census")                                                                  # 1001
    log.pending("census", 1, "query.census", {"node 11": 11, "node 12": 12}, {"node 11": 100, "node 12": 100})
    log.exchange("census", 1, "node 11", 11, "answered", "", 100, 400, 1.5)
    log.exchange("census", 1, "node 12", 12, "failed", REFUSAL, 100, 60, 1.25)
    log.exchange("census", 1, "node 13", 13, "failed", "offline: its SuperNode is not connected", 0, 0, 0.0)
    log.round("census", 1, "query.census", 1001.5, 3, 1)                                       # ended 1002
    log.rename_site("census", "node 11", "siteA")
    log.end_stage("census", "done", 1)                                                         # 1003
    log.start_stage("harmonise")                                                               # 1004
    log.end_stage("harmonise", "skipped", 0, "reused run 6")                                   # 1005
    for round_no, epsilon in ((1, 0.5), (2, 0.75)):
        log.series("train_cnn", "dp_epsilon", round_no, epsilon, site="siteA")                 # 1006, 1007
    log.start_stage("fit")                                                                     # 1008
    for evaluation, (loglik, step) in enumerate([(-90.0, 0.5), (-85.0, 0.01), (-84.9, 1e-6)], start=1):
        log.series("fit", "loglik", evaluation, loglik, part="cox")
        log.series("fit", "step", evaluation, step, part="cox")
    log.pending("fit", 1, "query.model_summaries", {"siteA": 11}, {"siteA": 2000})
    log.close()
    monkeypatch.undo()


def test_state_of_a_handwritten_run_log_is_exact(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    assert read_state(run_dir)["phase"] == "waiting"  # no directory yet: waiting, not an error
    _handmade_run(run_dir, monkeypatch)
    state = read_state(run_dir, now=1020.0)
    assert state["phase"] == "running" and state["runs"] == 1
    assert state["run"] == {"run_id": "7", "study": "handmade", "status": "running", "started": 1000.0, "ended": None,
                            "seconds": 20.0, "detail": ""}
    assert [(s["stage"], s["status"], s["seconds"], s["rounds"]) for s in state["stages"]] == [
        ("census", "done", 2.0, 1), ("harmonise", "skipped", 1.0, 0), ("fit", "running", 12.0, 0),
        ("train_cnn", "waiting", None, 0)]
    census, fit = state["rounds"]
    assert (census["stage"], census["round"], census["message_type"], census["status"], census["seconds"]) == \
        ("census", 1, "query.census", "done", 0.5)
    assert [(s["site"], s["status"], s["reason"], s["bytes_out"], s["bytes_in"], s["seconds"])
            for s in census["sites"]] == [
        ("siteA", "answered", "", 100, 400, 1.5), ("node 12", "failed", REFUSAL, 100, 60, 1.25),
        ("node 13", "failed", "offline: its SuperNode is not connected", 0, 0, 0.0)]
    assert (census["asked"], census["answered"], census["failed"], census["pending"]) == (3, 1, 2, 0)
    assert (fit["status"], fit["message_type"], fit["pending"]) == ("in progress", "query.model_summaries", 1)
    assert fit["sites"] == [{"site": "siteA", "status": "pending", "bytes_out": 2000, "bytes_in": 0,
                             "reason": "waiting for its reply to query.model_summaries", "seconds": None}]
    assert state["sites"] == [
        {"site": "siteA", "answered": 1, "failed": 0, "pending": 1, "bytes_out": 2100, "bytes_in": 400},
        {"site": "node 12", "answered": 0, "failed": 1, "pending": 0, "bytes_out": 100, "bytes_in": 60},
        {"site": "node 13", "answered": 0, "failed": 1, "pending": 0, "bytes_out": 0, "bytes_in": 0}]
    assert state["newton"] == {"cox": {"loglik": [[1, -90.0], [2, -85.0], [3, -84.9]],
                                       "step": [[1, 0.5], [2, 0.01], [3, 1e-6]]}}
    assert state["privacy"] == {"min_count": 25, "epsilon": {"siteA": 0.75}, "epsilon_budget": 8.0,
                                "refusals": [{"stage": "census", "round": 1, "site": "siteB", "reason": REFUSAL}]}
    assert state["report"]["exists"] is False

    client = TestClient(create_app(run_dir))
    over_http = client.get("/api/state").json()
    assert {k: over_http[k] for k in ("sites", "newton", "privacy", "runs")} == \
        {k: state[k] for k in ("sites", "newton", "privacy", "runs")}
    page = client.get("/")
    assert page.status_code == 200 and 'data-stage="fit" data-status="running"' in page.text
    assert page.text.count('data-series="cox"') == 6  # three log-likelihood and three |Δβ| points
    assert "http://" not in page.text.replace("http://www.w3.org", "")  # nothing loaded from elsewhere
    missing = client.get("/report")
    assert missing.status_code == 404 and "No report yet" in missing.text
    (run_dir / "report.html").write_text("<html><body>the report</body></html>", encoding="utf-8")
    assert client.get("/report").text == "<html><body>the report</body></html>"
    assert 'id="report-link"' in client.get("/fragment").text


def test_a_log_being_created_shows_waiting_not_an_error(tmp_path):
    client = TestClient(create_app(tmp_path))
    sqlite3.connect(tmp_path / RUNLOG).close()  # the file exists, no table yet
    assert client.get("/api/state").json()["phase"] == "waiting"
    (tmp_path / RUNLOG).write_bytes(b"not a database at all, half written")
    state = client.get("/api/state").json()
    assert state["phase"] == "unreadable" and "trying again" in state["message"]
    assert client.get("/").status_code == 200


STUDY = """
[study]
name = "dash"
stages = ["census", "fit"]

[privacy]
min_count = 25             # siteB (24 cases) refuses the census: a privacy event on the page

[[models]]
name = "cox"
kind = "cox"
features = ["table__original_firstorder_F00", "table__original_firstorder_F03"]
"""


def _run_status(run_dir: Path) -> str:
    with sqlite3.connect(f"file:{run_dir / RUNLOG}?mode=ro", uri=True, timeout=10) as db:
        return db.execute("SELECT status FROM runs ORDER BY rowid DESC LIMIT 1").fetchone()[0]


def test_dashboard_follows_a_running_study_in_headless_chromium(tmp_path):
    assert Path(CHROMIUM).exists(), "Debian's chromium is missing: `make test` installs it (apt-get install chromium)"
    from playwright.sync_api import sync_playwright

    from fedrad.server.local import LocalFederation

    stores = write_stores(tmp_path / "stores", hospital_rows())
    study = write_study(tmp_path / "study.toml", STUDY)
    run_dir, shot = tmp_path / "run", tmp_path / "running.png"
    outcome: dict = {}

    def run():
        try:
            outcome["results"] = fed.run_study(study, run_dir)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = exc

    with LocalFederation(tmp_path / "flower", stores, echo=print) as fed, \
            DashboardServer(run_dir, port=0) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(server.url)
        assert page.locator("#phase").inner_text() == "waiting"  # before the run: no log yet, no error
        # round trips take under a second: siteA's SuperNode is frozen while fit round 2 waits for it, so the
        # page can be caught mid-round, then thawed (well inside resend_after_s)
        node = fed.processes["site-siteA"].pid
        frozen = when_stage_runs(run_dir, "fit", 2, lambda: os.kill(node, signal.SIGSTOP))
        runner = threading.Thread(target=run, daemon=True)
        runner.start()
        try:
            # mid-run: Newton going (its first iteration plotted), the next round waiting for the sites' replies
            page.wait_for_selector('#stages tr[data-stage="fit"][data-status="running"]', timeout=240_000)
            page.wait_for_selector('#rounds tr[data-stage="fit"][data-round="2"][data-status="in progress"]',
                                   timeout=120_000)
            page.screenshot(path=shot, full_page=True)
            assert _run_status(run_dir) == "running"  # still running after the screenshot, so during it too
        finally:
            frozen.join(5)
            os.kill(node, signal.SIGCONT)
        runner.join(timeout=600)
        assert "results" in outcome, outcome.get("error")
        results = outcome["results"]
        assert results["status"] == "completed", results.get("error")
        page.wait_for_selector('[data-phase="completed"]', timeout=30_000)
        page.wait_for_selector("#report-link", timeout=30_000)

        png = shot.read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
        for stage in ("census", "fit"):
            row = page.locator(f'#stages tr[data-stage="{stage}"]')
            assert row.get_attribute("data-status") == "done"
            shown = float(row.locator("td.duration").get_attribute("data-seconds"))
            assert row.locator("td.duration").inner_text().endswith(" s")
            assert abs(shown - results["stages"][stage]["seconds"]) < 2.0

        exchanges = read_runlog(run_dir)["exchanges"]
        assert not (exchanges["status"] == "pending").any()
        sums = exchanges.groupby("site")[["bytes_out", "bytes_in"]].sum()
        rows = page.locator("#sites tr[data-site]")
        shown = {rows.nth(i).get_attribute("data-site"): (
                     int(rows.nth(i).locator("td.bytes-out").get_attribute("data-bytes")),
                     int(rows.nth(i).locator("td.bytes-in").get_attribute("data-bytes")))
                 for i in range(rows.count())}
        assert shown == {site: (int(r.bytes_out), int(r.bytes_in)) for site, r in sums.iterrows()}

        model = results["models"]["cox"]
        loglik = page.locator('#newton-loglik circle[data-series="cox"]')
        assert loglik.count() == model["rounds"] == results["stages"]["fit"]["rounds"]  # one round trip each
        assert float(loglik.nth(loglik.count() - 1).get_attribute("data-y")) == pytest.approx(model["loglik"],
                                                                                                rel=1e-12)
        # every evaluation has a log-likelihood; the last (at the returned β, confirming the rule) takes no step
        assert page.locator('#newton-step circle[data-series="cox"]').count() == model["rounds"] - 1

        assert list(results["census"]["refused"]) == ["siteB"]
        assert page.locator('#refusals tr[data-site="siteB"]').count() == 1

        report = page.request.get(server.url + "report")
        assert report.status == 200 and report.text() == (run_dir / "report.html").read_text(encoding="utf-8")
        browser.close()


def test_a_taken_port_is_a_clear_error_and_the_command_is_registered(tmp_path):
    from typer.testing import CliRunner

    from fedrad.server.cli import app  # the `fedrad` command
    from fedrad.server.dashboard import DashboardError

    with DashboardServer(tmp_path, port=0) as first:
        with pytest.raises(DashboardError, match=f"could not listen on 127.0.0.1:{first.port}"):
            DashboardServer(tmp_path, port=first.port).start()
        assert json.loads(TestClient(create_app(tmp_path)).get("/api/state").text)["phase"] == "waiting"
    shown = CliRunner().invoke(app, ["dashboard", "--help"])
    assert shown.exit_code == 0 and "--run-dir" in shown.output
    shown = CliRunner().invoke(app, ["local", "--help"])
    assert shown.exit_code == 0 and "--dashboard-port" in shown.output
