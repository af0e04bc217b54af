"""Federated models over a real local federation vs the pooled reference in one process.

GBSG2 (686 patients, scikit-survival) split at random into 6 sites, one SuperNode each.
Models: Cox stratified by site, Cox unstratified (shared event times), logistic regression
(recurrence yes/no), and a LASSO Cox path with 5-fold site-local CV over 20 λ values. For
each: round trips, mean bytes a site sent per round, federated wall time, the pooled fit's
wall time here (lifelines / scikit-learn / in-process path), their ratio, and the largest
coefficient difference. Usage:

    .venv/bin/python bench/models.py [--sites 6]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lifelines import CoxPHFitter  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sksurv.datasets import load_gbsg2  # noqa: E402

from fedrad.client.table_import import prepare_from_table  # noqa: E402
from fedrad.common.cox import FederatedCoxnetCV  # noqa: E402
from fedrad.server.local import LocalFederation  # noqa: E402

COLUMNS = ["age", "estrec", "pnodes", "progrec", "tsize"]
FEATURES = "[" + ", ".join(f'"table__{c}"' for c in COLUMNS) + "]"
STUDY = f"""
[study]
name = "bench-models"
stages = ["census", "fit"]
[[models]]
name = "cox_stratified"
features = {FEATURES}
[[models]]
name = "cox_unstratified"
features = {FEATURES}
share_event_times = true
[[models]]
name = "logistic"
kind = "logistic"
features = {FEATURES}
[[models]]
name = "lasso_cox_cv"
features = {FEATURES}
penalty = "elasticnet"
cv_folds = 5
n_alphas = 20
rule = "min"
ties = "breslow"
"""


def pooled_references(frame: pd.DataFrame, models: dict) -> dict:
    tight = {"precision": 1e-12, "r_precision": 1e-14}
    data = frame[COLUMNS + ["time", "event"]]
    out = {}
    start = time.perf_counter()
    ref = CoxPHFitter().fit(frame[COLUMNS + ["time", "event", "site"]], "time", "event", strata=["site"],
                            fit_options=tight)
    out["cox_stratified"] = (time.perf_counter() - start, ref.params_.to_numpy())
    start = time.perf_counter()
    ref = CoxPHFitter().fit(data, "time", "event", fit_options=tight)
    out["cox_unstratified"] = (time.perf_counter() - start, ref.params_.to_numpy())
    start = time.perf_counter()
    ref = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000, solver="newton-cg").fit(frame[COLUMNS],
                                                                                          frame["event"])
    out["logistic"] = (time.perf_counter() - start, np.r_[ref.intercept_, ref.coef_[0]])
    start = time.perf_counter()
    from sksurv.util import Surv

    y = Surv.from_arrays(frame["event"].astype(bool), frame["time"])
    ref = FederatedCoxnetCV(alphas=models["lasso_cox_cv"]["alphas"], cv=5, rule="min", ties="breslow").fit(
        frame[COLUMNS], y, site=frame["site"].to_numpy())
    out["lasso_cox_cv"] = (time.perf_counter() - start, ref.coef_)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=6)
    args = parser.parse_args()
    X, y = load_gbsg2()
    frame = X[COLUMNS].astype(float)
    frame = (frame - frame.mean()) / frame.std()
    frame = frame.assign(time=y["time"], event=y["cens"].astype(int),
                         site=np.random.default_rng(0).choice([f"site{i + 1}" for i in range(args.sites)],
                                                              size=len(frame)),
                         patient_id=[f"G{i:04d}" for i in range(len(frame))])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        stores = {}
        for site, rows in frame.groupby("site"):
            rows.drop(columns="site").to_csv(tmp / f"{site}.csv", index=False)
            stores[site] = tmp / "stores" / site
            prepare_from_table(tmp / f"{site}.csv", stores[site])
        (tmp / "study.toml").write_text(STUDY, encoding="utf-8")
        with LocalFederation(tmp / "fed", stores, echo=lambda line: None, allow_event_times=True) as fed:
            results = fed.run_study(tmp / "study.toml", tmp / "run")
    if results["status"] != "completed":
        raise SystemExit(f"study failed: {results.get('error')}")
    references = pooled_references(frame, results["models"])
    rows = []
    for name, model in results["models"].items():
        pooled_s, reference = references[name]
        names = (["intercept"] if name == "logistic" else []) + [f"table__{c}" for c in COLUMNS]
        coef = np.array([model["coefficients"][n] for n in names])
        rows.append({
            "model": name, "round_trips": model["rounds"],
            "bytes_up_per_site_per_round": int(np.mean(list(model["bytes_up_per_site"].values())) / model["rounds"]),
            "federated_s": model["seconds"], "pooled_s": round(pooled_s, 3),
            "ratio": round(model["seconds"] / pooled_s), "max_abs_coef_diff": float(np.abs(coef - reference).max()),
        })
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(pd.DataFrame(rows).to_string(index=False))
    print(f"{args.sites} sites, {len(frame)} patients; ratio = federated wall time / pooled fit in this process "
          "(same run); LASSO row: chosen-λ coefficients vs the in-process path with the same folds")


if __name__ == "__main__":
    main()
