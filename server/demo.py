"""`make demo`: the embedded synthetic default, end to end on one machine.

Synthesise a multi-centre cohort, prepare every site's feature store with the fast demo
extraction settings, then run the study on a local federation (a real Flower SuperLink
and one SuperNode per site): census, then ComBat by scanner model preserving age and sex,
then pooled z-scoring, then the models: an elastic-net Rad-score, a clinical model
(univariate screen, then multivariable) and a nomogram of both. The demo may look into every store to show the scanner effect
before and after (a real coordinator never can).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table
from sksurv.metrics import concordance_index_censored

from fedrad.client.extraction import default_params_path
from fedrad.client.metrics_table import CONSOLE, metrics_table, study_sites
from fedrad.client.prepare import prepare_from_manifest
from fedrad.client.synth import generate_cohort
from fedrad.client.cli import table_of
from fedrad.server.summary import print_results
from fedrad.server.local import LocalFederation


def run_demo(out: Path, *, n_sites: int, n_patients: int, seed: int, jobs: int | None, full_params: bool,
             console: Console) -> pd.DataFrame:
    out = Path(out)
    started = time.perf_counter()
    console.rule("1. synthetic cohort")
    truth = generate_cohort(out / "cohort", n_sites=n_sites, n_patients=n_patients, seed=seed, show_progress=True)
    params = default_params_path("default" if full_params else "demo")
    console.print(f"{len(truth)} patients at {n_sites} sites; extraction settings: {params.name}")

    rows = []
    for site in sorted(truth["site"].unique()):
        console.rule(f"2. prepare {site}")
        report = prepare_from_manifest(out / "cohort" / site / "manifest.csv", out / "stores" / site,
                                       params_path=params, jobs=jobs)
        site_truth = truth[truth["site"] == site]
        store = pd.read_parquet(out / "stores" / site / "features.parquet")
        true_c = concordance_index_censored(store["event"].astype(bool), store["time"],
                                            site_truth.set_index("patient_id").loc[store["patient_id"],
                                                                                   "linear_predictor"])[0]
        rows.append({
            "site": site,
            "cases": report.n_cases,
            "events": report.n_events,
            "quarantined": report.n_quarantined,
            "features": report.n_features,
            "scanners": " + ".join(sorted(store["scanner"].unique())),
            "median_t": round(float(store["time"].median()), 1),
            "C(true)": round(float(true_c), 3),
            "prep_s": round(report.wall_seconds, 1),
        })
    summary = pd.DataFrame(rows)
    summary.to_csv(out / "summary.csv", index=False)
    table = Table(*summary.columns, title="fedrad demo: sites")
    for row in summary.itertuples(index=False):
        table.add_row(*(str(v) for v in row))
    console.print(table)
    console.print("median_t: median follow-up (months); C(true): Harrell's C of the true linear predictor "
                  "(the best a model can do); prep_s: extraction seconds")
    console.print(f"stores in {out / 'stores'}; summary in {out / 'summary.csv'}")

    console.rule("3. federated study on a local federation (census, harmonise, fit, evaluate, package)")
    study = out / "study.toml"
    validation = [summary["site"].iloc[-1]] if n_sites >= 3 else []
    study.write_text(demo_study(validation), encoding="utf-8")
    stores = {site: out / "stores" / site for site in summary["site"]}
    with LocalFederation(out / "federation", stores,
                         echo=lambda line: console.print(line, markup=False, highlight=False)) as fed:
        results = fed.run_study(study, out / "study")
    print_results(results, out / "study")
    if results["status"] == "completed":
        effects = scanner_effect(stores, results["harmonise"]["sites"])
        effects.to_csv(out / "scanner_effect.csv", index=False)
        console.print(table_of(effects.round(3), "scanner effect: share of each feature's variance explained by "
                                                 "the scanner model (eta squared), all sites pooled"))
        plot_scanner_effect(stores, results["harmonise"]["sites"], effects["features"].iloc[1],
                            out / "scanner_effect.png")
        console.print(f"plot: {out / 'scanner_effect.png'}")
        for name, model in results.get("models", {}).items():
            if "selection" in model:
                console.print(table_of(univariate_table(model), f"model '{name}': univariate screen"))
            console.print(table_of(model_table(model), model_title(name, model)))
            if "nomogram" in model:
                console.print(f"nomogram: {model['nomogram']['plot']}")
    if results.get("evaluation"):
        table = evaluation_table(results)
        table.to_csv(out / "evaluation.csv", index=False)
        console.print(table_of(table, "evaluation: every model at every site (validation site last; 'pooled' = the "
                                      "training sites, site-stratified)"))
        console.print(f"evaluation table: {out / 'evaluation.csv'}; all figures in {out / 'study' / 'results.json'}")
    if results["status"] == "completed":
        from fedrad.server.report import write_report

        report = write_report(out / "study", results, extra_images=[out / "scanner_effect.png"])
        console.print(f"report: {report}")
    if results.get("package") and validation:
        validate_package(Path(results["package"]), stores[validation[0]], out / "validation", console)
    console.print(f"wall time {time.perf_counter() - started:.0f} s")
    return summary


def validate_package(package: Path, store: Path, out: Path, console: Console) -> None:
    """What a new hospital does with the signed package: `fedrad validate --trust` with the public key the
    package stage wrote beside it (here the held-out site's own store; its figures equal the federated ones)."""
    from fedrad.client.validate import metrics_table as validation_table, validate
    from fedrad.server.package import trust_file

    trust = trust_file(package)
    console.rule("4. a new hospital validates the signed package offline")
    console.print(f"fedrad validate --package {package} --trust {trust} --store {store} --out {out}", markup=False,
                  highlight=False)
    report = validate(package, store, out, trust)
    console.print(table_of(validation_table(report), f"validation of the package on {store.name}'s store, "
                                                     f"signature checked (key {report['signed_by']})"))
    console.print(f"predictions and metrics: {out}")


def demo_study(validation: list[str]) -> str:
    """The demo's study file; ``validation`` sites are held out of every fit and evaluated."""
    stages = '["census", "harmonise", "fit", "evaluate", "package"]'
    return DEMO_STUDY.replace("@STAGES@", stages).replace("@VALIDATION@", json.dumps(validation))


def evaluation_table(results: dict) -> pd.DataFrame:
    """C-index (95% CI), AUC at the evaluation horizon and calibration slope per model and site."""
    settings = results["evaluation_settings"]
    return metrics_table(results["evaluation"], study_sites(settings), ("site", "role", *CONSOLE),
                         models=list(results["models"]), training=settings["training_sites"])


DEMO_STUDY = """\
[study]
name = "demo-sarcoma"
stages = @STAGES@

[sites]
validation = @VALIDATION@      # held out of harmonisation fitting, selection and training; metrics only

[evaluate]
bootstrap = 200

[features]
include = ["*__original_*"]
exclude = ["arterial__original_shape_*", "delayed__original_shape_*"]   # shape is the same in every phase

[harmonise]
batch = "scanner"
categorical = ["sex"]
continuous = ["age"]

[outcome]
horizons = [24, 60]         # months: survival at 2 and 5 years (Cox baseline, nomogram)

[privacy]
min_count = 5

[federation]
min_sites = 2

[[models]]                  # the Rad-score: elastic-net Cox on harmonised venous features, CV folds local to sites
name = "rad_score"
kind = "cox"
features = ["venous__original_firstorder_*", "venous__original_shape_*"]
penalty = "elasticnet"
l1_ratio = 0.9              # a little ridge: some of these features are exact linear combinations of others
cv_folds = 5
n_alphas = 20
rule = "1se"
ties = "breslow"

[[models]]                  # the clinical model: each factor alone, then those with p < 0.05 together
name = "clinical"
kind = "cox"
clinical = ["age", "size_cm", "grade", "ki67"]
selection = "univariate"

[[models]]                  # the nomogram: Rad-score + the clinical model's independent factors
name = "nomogram"
kind = "cox"
scores = ["rad_score"]
clinical = ["@clinical"]
nomogram = true
"""


def _pooled(stores: dict[str, Path], sites: list[str], name: str) -> pd.DataFrame:
    return pd.concat([pd.read_parquet(stores[s] / name) for s in sites], ignore_index=True)


def _eta_squared(values: pd.DataFrame, groups: pd.Series) -> pd.Series:
    """Between-group share of variance, per column."""
    grand = values.mean()
    between = sum(len(g) * (g.mean() - grand) ** 2 for _, g in values.groupby(groups))
    return between / ((values - grand) ** 2).sum()


def scanner_effect(stores: dict[str, Path], sites: list[str]) -> pd.DataFrame:
    before, after = _pooled(stores, sites, "features.parquet"), _pooled(stores, sites, "harmonised.parquet")
    features = [c for c in after.columns if c in json.loads((stores[sites[0]] / "harmonised.json").read_text(encoding="utf-8"))[
        "features"]]
    eta_before = _eta_squared(before[features], before["scanner"])
    eta_after = _eta_squared(after[features], after["scanner"])
    rows = [{"features": f"median of {len(features)}", "before": eta_before.median(), "after": eta_after.median()}]
    for name in eta_before.sort_values(ascending=False).index[:5]:
        rows.append({"features": name, "before": eta_before[name], "after": eta_after[name]})
    return pd.DataFrame(rows)


def plot_scanner_effect(stores: dict[str, Path], sites: list[str], feature: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before, after = _pooled(stores, sites, "features.parquet"), _pooled(stores, sites, "harmonised.parquet")
    scanners = sorted(before["scanner"].unique())
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, frame, title in ((axes[0], before, "before ComBat"), (axes[1], after, "after federated ComBat")):
        ax.boxplot([frame.loc[frame["scanner"] == s, feature] for s in scanners], tick_labels=scanners)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
    axes[0].set_ylabel(feature)
    fig.suptitle("The feature most affected by scanner model, by scanner (age and sex preserved)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def univariate_table(model: dict) -> pd.DataFrame:
    table = pd.DataFrame(model["selection"]["univariate"])
    table["enters"] = table["covariate"].isin(model["selection"]["entered"]).map({True: "yes", False: ""})
    return table[[c for c in ("covariate", "HR", "HR lower 95%", "HR upper 95%", "p", "enters", "error")
                  if c in table]].round(4)


def model_table(model: dict) -> pd.DataFrame:
    if model["penalty"] == "none" and not model["table"]:
        return pd.DataFrame({"note": ["no candidate passed the univariate screen"]})
    if model["penalty"] == "none":
        table = pd.DataFrame(model["table"])
        return table[["covariate", "coef", "HR", "HR lower 95%", "HR upper 95%", "p"]].round(4)
    chosen = {k: v for k, v in model["coefficients"].items() if v != 0}
    return pd.DataFrame({"feature": list(chosen), "coef": [round(v, 4) for v in chosen.values()]})


def model_title(name: str, model: dict) -> str:
    if model["penalty"] == "none":
        how = "multivariable " if "selection" in model else ""
        independent = f", independent factors: {', '.join(model['independent']) or 'none'}" \
            if "independent" in model else ""
        return (f"model '{name}': {how}Cox stratified by site, {model.get('n', 0)} cases, {model.get('events', 0)} "
                f"events, {model['rounds']} round trips{independent}")
    return (f"model '{name}': elastic-net Cox (l1_ratio {model['l1_ratio']}), {len(model['selected'])} of {len(model['coefficients'])} features at "
            f"lambda={model['alpha']:.4g} ({model['rule']} rule, {model['cv_folds']}-fold CV local to sites), "
            f"{model['rounds']} round trips")
