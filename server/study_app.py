"""The Flower ServerApp: one study = one Flower run, its stages in order.

Run config (written by `fedrad local` / `fedrad coordinator run`): ``run-dir`` (holds
``study.toml``; receives ``results.json``, ``runlog.sqlite``, ``reference/``) and
``expected-sites`` (sites to wait for; 0 = the study's setting).

Resume: harmonise, select, fit and evaluate keep their result in the run log with the key
of their inputs (study settings + census fingerprint + earlier stages' results). Re-running
the same study in the same run directory (after a crash, a SuperLink restart, a stopped run)
re-does the census (the roll call) and skips every such stage whose key is unchanged, that
finished with every site, and (harmonise) whose outputs the sites still hold.

Sites coming and going: a site lost mid-stage is named and the stage goes on without it
while ``min_sites`` allow; before each later stage, SuperNodes that came back under a new
node id are roll-called and take part again if they bring the store the census saw. A site
whose store changed since the census refuses every later message (client/store_guard.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import traceback
from logging import ERROR, INFO, WARNING
from pathlib import Path

from flwr.app import Context
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedrad.client.warm_runtime import short_object_backoff
from fedrad.common.errors import FedradError
from fedrad.common.study import Study, load_study
from fedrad.server.census import roll_call, run_census
from fedrad.server.federation import Federation, StageFailed
from fedrad.server.evaluate import run_evaluate
from fedrad.server.fit import run_fit
from fedrad.server.select import run_select
from fedrad.server.harmonise import eligible_sites, run_harmonise
from fedrad.server.runlog import RunLog

RESULTS = "results.json"
STUDY = "study.toml"
REFERENCE_DIR = "reference"

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    short_object_backoff()  # the sites' replies are pulled within ~20 ms of arriving, not after Flower's 1-3 s
    run_dir = Path(str(context.run_config["run-dir"]))
    results = {"run_id": int(context.run_id), "status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "stages": {}}
    runlog = RunLog(run_dir / "runlog.sqlite", run_id=context.run_id)
    try:
        study = load_study(run_dir / STUDY)
        results["study"] = study.study.name
        runlog.start_run(study.study.name)
        fed = Federation(grid, runlog, timeout_s=study.federation.round_timeout_s,
                         resend_after_s=study.federation.resend_after_s)
        expected = int(context.run_config.get("expected-sites", 0)) or study.federation.expected_sites \
            or study.federation.min_sites
        nodes = fed.wait_for_nodes(expected, study.federation.wait_for_sites_s)
        log(INFO, "%d site(s) connected (expected %d)", len(nodes), expected)
        run_study(fed, study, run_dir, results)
        results["status"] = "completed"
        runlog.end_run("completed")
    except (FedradError, StageFailed) as exc:
        results.update(status="failed", error=str(exc))
        runlog.end_run("failed", str(exc))
        runlog.end_running_stages("failed", str(exc))
        log(ERROR, "study failed: %s", exc)
    except Exception as exc:  # a bug: record it, then let Flower mark the run failed
        results.update(status="failed", error=f"internal error: {exc!r}", traceback=traceback.format_exc())
        runlog.end_run("failed", repr(exc))
        runlog.end_running_stages("failed", repr(exc))
        raise
    except BaseException as exc:  # stopped (Ctrl-C, `flwr stop`): say so rather than leave "running"
        results.update(status="interrupted", error=f"the run was stopped ({type(exc).__name__})")
        runlog.end_run("interrupted", type(exc).__name__)
        runlog.end_running_stages("interrupted", type(exc).__name__)
        raise
    finally:
        results["ended"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        partial = run_dir / f".{RESULTS}.partial"  # `fedrad local` waits for the file: never let it see half
        partial.write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
        os.replace(partial, run_dir / RESULTS)
        runlog.close()
        _report(run_dir, results)


def _report(run_dir: Path, results: dict) -> None:
    """report.html beside results.json; a failure to draw it is logged, never fatal to the study."""
    try:
        from fedrad.server.report import write_report

        log(INFO, "report: %s", write_report(run_dir, results))
    except Exception as exc:  # noqa: BLE001 - the numbers are in results.json whatever happens here
        log(ERROR, "report.html could not be written: %r", exc)


#: stages whose whole result is kept at the coordinator, so a rerun with unchanged inputs reuses it
#: (harmonise has its own rule: the sites must still hold its output)
REUSABLE = ("select", "fit", "evaluate")


def run_study(fed: Federation, study: Study, run_dir: Path, results: dict) -> None:
    runlog = fed.runlog
    census = _stage(runlog, results, "census", lambda: run_census(fed, study))
    results["census"] = census

    def stage(name: str, body) -> dict:
        _bring_back_lost_sites(fed, study, census, results, name)
        if name not in REUSABLE:
            return _stage(runlog, results, name, body)
        return _reusable_stage(fed, results, name, body, _input_key(study, census, results))

    if "train_seg" in study.study.stages:
        from fedrad.server.train_seg import run_train_seg

        results["segmentation"] = stage("train_seg", lambda: run_train_seg(fed, study, census, run_dir))
    if "harmonise" in study.study.stages:
        _bring_back_lost_sites(fed, study, census, results, "harmonise")
        key = study.section_hash("features", "harmonise", "privacy") + census["fingerprint"]
        previous = runlog.load_result("harmonise")
        if previous and _still_valid(previous, key, census, study):
            results["harmonise"] = previous[2]
            _mark_reused(runlog, results, "harmonise", previous[1])
        else:
            harmonise = _stage(runlog, results, "harmonise",
                               lambda: run_harmonise(fed, study, census, run_dir / REFERENCE_DIR))
            results["harmonise"] = harmonise
            runlog.save_result("harmonise", key, harmonise)
            for level, iterations in harmonise["eb_iterations"].items():
                runlog.figure("harmonise", f"EB iterations, batch '{level}'", iterations)
    if "train_cnn" in study.study.stages:
        from fedrad.server.train_cnn import run_train_cnn

        results["cnn"] = stage("train_cnn", lambda: run_train_cnn(fed, study, census, results.get("harmonise"),
                                                                  run_dir))
        # the later stages may use the CNN's deep features as candidates beside the radiomics features
        census = {**census, "features": list(census["features"]) + results["cnn"]["deep_features"],
                  "deep_features_id": results["cnn"]["weights_id"]}
    if "select" in study.study.stages:
        results["select"] = stage("select", lambda: run_select(fed, study, census, results.get("harmonise")))
    if "fit" in study.study.stages:
        fit = stage("fit", lambda: run_fit(fed, study, census, results.get("harmonise"), results.get("select"),
                                           out_dir=run_dir))
        results["models"] = fit["models"]
        for name, model in fit["models"].items():
            runlog.figure("fit", f"rounds, model '{name}'", model["rounds"])
    if "evaluate" in study.study.stages:
        evaluation = stage("evaluate", lambda: run_evaluate(fed, study, census, results.get("harmonise"),
                                                            results["models"]))
        results["evaluation"] = evaluation["evaluation"]
        results["evaluation_settings"] = evaluation["settings"]
    if "package" in study.study.stages:
        from fedrad.server.package import write_package

        results["package"] = str(write_package(run_dir, results, study))
        log(INFO, "package: %s", results["package"])


def _bring_back_lost_sites(fed: Federation, study: Study, census: dict, results: dict, before: str) -> None:
    """A site whose SuperNode restarted (new node id) takes part again from the next stage on."""
    for site, event in roll_call(fed, study, census, before=before).items():
        results.setdefault("rejoined", []).append({"stage": before, "site": site, "event": event})


def _input_key(study: Study, census: dict, results: dict) -> str:
    """What a coordinator-side stage's result depends on: the study (less how the federation is run
    and which stages are listed), the census fingerprint (sites, counts, store hashes) and the
    results of the stages before it."""
    settings = study.model_dump(mode="json")
    settings.pop("federation")
    settings["study"].pop("stages")
    upstream = {k: results.get(k) for k in ("harmonise", "cnn", "select", "models")}
    text = json.dumps([settings, census["fingerprint"], census.get("deep_features_id", ""), upstream],
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _complete(name: str, output: dict) -> bool:
    """A stage that went on without a site is redone next time, when that site may be back."""
    if name == "select":
        return not output.get("left_out")
    if name == "fit":
        return not any(model.get("left_out") for model in output["models"].values())
    return not output["settings"].get("failed")


def _reusable_stage(fed: Federation, results: dict, name: str, body, key: str) -> dict:
    previous = fed.runlog.load_result(name)
    if previous and previous[0] == key:
        _mark_reused(fed.runlog, results, name, previous[1])
        return previous[2]
    output = _stage(fed.runlog, results, name, body)
    if _complete(name, output):
        try:
            fed.runlog.save_result(name, key, output)
        except (TypeError, ValueError) as exc:  # not plain JSON: the stage is simply not reusable
            log(WARNING, "%s: result not kept for reuse (%s)", name, exc)
    return output


def _mark_reused(runlog: RunLog, results: dict, name: str, run_id: str) -> None:
    results["stages"][name] = {"status": f"skipped: finished in run {run_id}, inputs unchanged",
                               "rounds": 0, "seconds": 0.0}
    runlog.start_stage(name)
    runlog.end_stage(name, "skipped", 0, f"reused run {run_id}")
    log(INFO, "%s: skipped (finished in run %s with the same inputs)", name, run_id)


def _stage(runlog: RunLog, results: dict, name: str, body) -> dict:
    started = time.time()
    runlog.start_stage(name)
    try:
        output = body()
    except Exception as exc:
        runlog.end_stage(name, "failed", 0, str(exc))
        results["stages"][name] = {"status": "failed", "error": str(exc), "seconds": round(time.time() - started, 2)}
        raise
    rounds = output.get("traffic", {}).get("rounds", 0)
    seconds = round(time.time() - started, 2)
    results["stages"][name] = {"status": "done", "rounds": rounds, "seconds": seconds}
    runlog.end_stage(name, "done", rounds)
    runlog.figure(name, "seconds", seconds)
    log(INFO, "%s: done in %d round trip(s), %.1f s", name, rounds, seconds)
    return output


def _still_valid(previous: tuple[str, str, dict], key: str, census: dict, study: Study) -> bool:
    """A finished harmonise can be reused if its inputs are unchanged, the same sites are
    eligible now, and each of them still holds its output (a site may have re-prepared)."""
    input_key, _, result = previous
    eligible, _ = eligible_sites(census, study)
    return (input_key == key and sorted(eligible) == sorted(result["sites"])
            and all(census["sites"][s].get("harmonised_reference") == result["reference"] for s in result["sites"]))
