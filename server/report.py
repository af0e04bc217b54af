"""The study report: one self-contained HTML file (plots embedded as PNG) from results.json.

Written for `fedrad local` / `fedrad demo` (``RUN_DIR/report.html``). `fedrad validate`'s
report (``OUT/report.html``) is the hospital's own, client/report.py; this one extends the same
page and reuses its tables, plots and metrics table. Everything in it is what the coordinator
holds — counts, pooled sums, coefficients and per-site metrics — never a patient row.

The page is templates/study_report.html (autoescaped); each ``*_section`` function returns what
its part of the page shows, or None when the study has no such part.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fedrad.client.metrics_table import fmt
from fedrad.client.report import (REPORT, curves, image_file, metrics_html, png, pyplot, table,
                                  template_environment)
from fedrad.server.summary import left_out_lines, status_phrase

__all__ = ["REPORT", "write_report"]

_TEMPLATES = template_environment(Path(__file__).with_name("templates"))


def cohort_section(results: dict) -> dict | None:
    census = results.get("census")
    if not census:
        return None
    validation = results.get("evaluation_settings", {}).get("validation_sites", [])
    rows = [{"site": name, "cases": info["cases"], "events": info["events"], "quarantined": info["quarantined"],
             "repeat cases": info["repeat_cases"], "batch levels": ", ".join(info["batch_counts"]),
             "min_count": info.get("min_count", ""),  # the site's effective minimum (its own may be higher)
             "role": "validation" if name in validation else "training"} for name, info in census["sites"].items()]
    return {"table": table(pd.DataFrame(rows)), "n_features": census["n_features"],
            "params_hash": census["params_hash"][:12], "refused": list(census.get("refused", {}).items())}


def harmonisation_section(results: dict, run_dir: Path) -> dict | None:
    h = results.get("harmonise")
    if not h:
        return None
    image = None
    npz = run_dir / "reference" / "harmonisation.npz"
    if npz.is_file():
        arrays = np.load(npz)
        levels = h["design"]["batch_levels"]
        fig, axes = pyplot().subplots(1, 2, figsize=(10, 3.4))
        axes[0].boxplot(list(arrays["gamma_hat"]), tick_labels=levels)
        axes[0].axhline(0, color="grey", lw=0.8)
        axes[0].set_title("location shift per batch (γ̂, pooled-SD units), before")
        axes[1].boxplot(list(arrays["delta_hat"]), tick_labels=levels)
        axes[1].axhline(1, color="grey", lw=0.8)
        axes[1].set_title("scale factor per batch (δ̂), before")
        for ax in axes:
            ax.tick_params(axis="x", rotation=30)
        image = png(fig)
    return {"batch": h["batch"], "n_sites": len(h["sites"]), "n_features": h["n_features"],
            "settings": str(h["settings"]), "image": image,
            "validation_sites": ", ".join(h.get("validation", {}).get("sites", []))}


def selection_section(results: dict) -> dict | None:
    select = results.get("select")
    if not select:
        return None
    rows = [{"step": "candidates", "features": select.get("candidates")},
            {"step": "ICC filter", "features": select.get("icc", {}).get("kept")},
            {"step": "univariate screen (FDR)", "features": select.get("screen", {}).get("kept")},
            {"step": "mRMR", "features": select.get("mrmr", {}).get("kept")}]
    return {"table": table(pd.DataFrame(rows)), "selected": ", ".join(select.get("selected", []))}


def _stop_line(stop: dict | None) -> str:
    """How the Newton fit ended, as a statistician reads it: converged by which rule, or not."""
    if not stop:
        return ""
    def g(value):
        return "-" if value is None else f"{value:.2g}"
    figures = (f"{stop['iterations']} iteration(s), last max|Δβ| {g(stop['max_step'])}, "
               f"max|gradient| {g(stop['grad_norm'])} at the reported β")
    if not stop["converged"]:
        return f"NOT converged: stopped at the {stop['rule'].removeprefix('limit: ')} limit ({figures})"
    rule = "Newton decrement < 1e-10" if stop["rule"] == "decrement" else "largest step < 1e-10"
    return f"Converged ({rule}; {figures})"


def _model(name: str, model: dict) -> dict:
    out = {"name": name, "kind": "Cox (stratified by site)" if model["kind"] == "cox" else "logistic",
           "rounds": model.get("rounds", "?"), "univariate": None, "table": None, "elastic_net": None,
           "nomogram": image_file(model["nomogram"]["plot"]) if model.get("nomogram", {}).get("plot") else None}
    if model.get("selection"):
        uni = pd.DataFrame(model["selection"]["univariate"])
        keep = [c for c in uni.columns if c in ("covariate", "HR", "OR", "HR lower 95%", "HR upper 95%",
                                                "OR lower 95%", "OR upper 95%", "p", "error")]
        out["univariate"] = {"table": table(uni[keep]), "p": model["selection"]["multivariable_p"],
                             "independent": ", ".join(model.get("independent", [])) or "none"}
    if model.get("table"):
        out["table"] = table(pd.DataFrame(model["table"]))
        out["stop"] = _stop_line(model.get("stop"))
    elif model.get("coefficients"):
        chosen = {k: v for k, v in model["coefficients"].items() if v}
        out["elastic_net"] = {"alpha": fmt(model.get("alpha"), 4), "rule": model.get("rule"), "n": len(chosen),
                              "table": table(pd.DataFrame({"feature": list(chosen), "coef": list(chosen.values())}))}
    return out


def models_section(results: dict) -> list[dict] | None:
    models = results.get("models")
    return [_model(name, model) for name, model in models.items()] if models else None


def _td_auc(evaluation: dict, model: str, settings: dict):
    validation = settings.get("validation_sites", [])
    sites = settings.get("training_sites", []) + validation
    rows = [(s, evaluation[s][model].get("auc_td") or {}) for s in sites if model in evaluation.get(s, {})]
    rows = [(s, v) for s, v in rows if any(x is not None for x in v.values())]
    if not rows:
        return None
    fig, ax = pyplot().subplots(figsize=(5.5, 3.4))
    for site, values in rows:
        times = [float(t) for t, v in values.items() if v is not None]
        ax.plot(times, [v for v in values.values() if v is not None], "o-",
                label=f"{site} ({'validation' if site in validation else 'training'})")
    ax.axhline(0.5, color="grey", lw=0.8)
    ax.set(title="time-dependent AUC (cumulative/dynamic), per site", xlabel="time", ylabel="AUC(t)")
    ax.legend(fontsize=7)
    return png(fig)


def segmentation_section(results: dict) -> dict | None:
    """Held-out Dice per site and round (round r measures the model after r − 1 rounds), and the final Dice."""
    seg = results.get("segmentation")
    if not seg or not seg.get("history"):
        return None
    rows = [{"round": h["round"], **{f"{s} Dice": h["dice"].get(s) for s in seg["sites"]},
             "mean Dice (case-weighted)": h.get("mean_dice")} for h in seg["history"]]
    rows.append({"round": "final", **{f"{s} Dice": seg["final_dice"].get(s) for s in seg["sites"]},
                 "mean Dice (case-weighted)": seg.get("final_mean_dice")})
    return {"network": seg["network"], "strategy": seg["strategy"], "model": str(seg.get("model", "")),
            "table": table(pd.DataFrame(rows))}


def cnn_section(results: dict) -> dict | None:
    """Per-round training loss and the validation loss / C-index of the global network at each site."""
    cnn = results.get("cnn")
    if not cnn or not cnn.get("history"):
        return None
    history = cnn["history"]
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for site in cnn["sites"]:
        rounds = [h["round"] for h in history if site in h["loss"]]
        for ax, key in zip(axes, ("loss", "val_loss", "val_c_index")):
            values = [h[key].get(site) for h in history if site in h["loss"]]
            ax.plot(rounds, [np.nan if v is None else v for v in values], marker="o", label=site)
    for ax, title in zip(axes, ("local training loss (after the round)", "validation loss of the global model",
                                "validation C-index of the global model")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    rows = [{"round": h["round"], **{f"{s} loss": h["loss"].get(s) for s in cnn["sites"]},
             **{f"{s} val C": h["val_c_index"].get(s) for s in cnn["sites"]}, "val loss (weighted)": h["val_loss_mean"]}
            for h in history]
    scores = pd.DataFrame([{"site": s, "DL-score C-index (all the site's cases)": c}
                           for s, c in cnn["dl_score_c_index"].items()])
    stop = cnn.get("early_stopping", {})
    stopped = (f"stopped early at round {stop['stopped_at_round']}, kept the weights after round "
               f"{stop['kept_weights_after_round']}" if stop.get("stopped_at_round") else "all rounds run")
    privacy = cnn.get("privacy") or {}
    return {"architecture": cnn["architecture"], "dims": cnn["dims"], "strategy": cnn["strategy"],
            "rounds": len(history), "stopped": stopped, "delta": privacy.get("delta"),
            "epsilon": ", ".join(f"{k} {v:.2f}" for k, v in privacy.get("epsilon", {}).items()),
            "image": png(fig), "table": table(pd.DataFrame(rows)), "scores": table(scores)}


def evaluation_section(results: dict) -> dict | None:
    evaluation, settings = results.get("evaluation"), results.get("evaluation_settings", {})
    if not evaluation:
        return None
    models = [k for k in evaluation.get("pooled", {}) if k not in ("sites", "delong")]
    tests = evaluation.get("pooled", {}).get("delong", []) + evaluation.get("pooled_validation", {}).get("delong", [])
    return {"horizon": settings.get("horizon"), "cutoffs": str(settings.get("cutoffs")),
            "table": metrics_html(evaluation, settings),
            "models": [(model, curves(evaluation, model), _td_auc(evaluation, model, settings)) for model in models],
            "delong": table(pd.DataFrame(tests)) if tests else None, "not_computed": settings.get("not_computed", "")}


def tripod_section(results: dict) -> list[tuple[str, bool, str]]:
    """Which TRIPOD-AI items this study reports, and where."""
    ev = results.get("evaluation", {})
    return [
        ("Source of data, participants per site", "census" in results, "Cohort"),
        ("Outcome definition and prediction horizons", bool(results.get("evaluation_settings")), "Performance"),
        ("Sample size: cases and events per site", "census" in results, "Cohort"),
        ("Missing data / excluded cases", "census" in results, "Cohort (quarantined)"),
        ("Predictor handling: harmonisation across scanners", "harmonise" in results, "Harmonisation"),
        ("Predictor selection", "select" in results or any(m.get("selection") for m in results.get("models", {})
                                                           .values()), "Feature selection / Models"),
        ("Model specification: coefficients with CI", "models" in results, "Models"),
        ("Model presentation: nomogram", any(m.get("nomogram") for m in results.get("models", {}).values()),
         "Models"),
        ("Discrimination with CI", bool(ev), "Performance"),
        ("Calibration (plot, slope, in the large)", bool(ev), "Performance"),
        ("Clinical utility (decision curve)", bool(ev), "Performance"),
        ("External validation on held-out sites", bool(ev.get("pooled_validation")), "Performance"),
        ("Privacy: no patient-level data left any site", True, "egress ledgers at each site"),
    ]


def write_report(run_dir: Path, results: dict, *, extra_images: list[Path] = ()) -> Path:
    run_dir = Path(run_dir)
    stages = pd.DataFrame([{"stage": k, **v} for k, v in results.get("stages", {}).items()])
    page = _TEMPLATES.get_template("study_report.html").render(
        title=f"fedrad study '{results.get('study', '')}' — {status_phrase(results)}",
        error=results.get("error"), left_out=left_out_lines(results), run_id=results.get("run_id"),
        started=results.get("started"),
        ended=results.get("ended", ""), stages=table(stages) if len(stages) else None,
        cohort=cohort_section(results), harmonisation=harmonisation_section(results, run_dir),
        extra_images=[image for p in extra_images if (image := image_file(p))], selection=selection_section(results),
        segmentation=segmentation_section(results), cnn=cnn_section(results), models=models_section(results),
        evaluation=evaluation_section(results), tripod=tripod_section(results))
    path = run_dir / REPORT
    path.write_text(page, encoding="utf-8")
    return path
