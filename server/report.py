"""The study report: one self-contained HTML file (plots embedded as PNG) from results.json.

Written for `fedrad local` / `fedrad demo` (``RUN_DIR/report.html``) and `fedrad validate`
(``OUT/report.html``). Everything in it is what the coordinator holds — counts, pooled
sums, coefficients and per-site metrics — never a patient row.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

REPORT = "report.html"
GROUP_LABELS = {"pooled": "training sites (pooled)", "pooled_validation": "validation sites (pooled)"}

STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; }
h1 { border-bottom: 2px solid #345; } h2 { margin-top: 2em; border-bottom: 1px solid #aaa; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.88em; }
th, td { border: 1px solid #ccc; padding: 3px 7px; text-align: right; } th { background: #eef2f5; }
td:first-child, th:first-child { text-align: left; }
.note { color: #555; font-size: 0.9em; } img { max-width: 100%; }
.ok { color: #1a7f37; } .missing { color: #b35900; }
"""


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return f'<img src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _image_file(path) -> str:
    path = Path(path)
    if not path.is_file():
        return ""
    return f'<img src="data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()}">'


def _table(frame: pd.DataFrame) -> str:
    return frame.to_html(index=False, border=0, na_rep="-", float_format=lambda v: f"{v:.3g}", escape=True)


def _fmt(value, digits=3) -> str:
    return "-" if value is None or (isinstance(value, float) and not np.isfinite(value)) else f"{value:.{digits}f}"


def cohort_section(results: dict) -> str:
    census = results.get("census")
    if not census:
        return ""
    rows = [{"site": name, "cases": info["cases"], "events": info["events"], "quarantined": info["quarantined"],
             "repeat cases": info["repeat_cases"], "batch levels": ", ".join(info["batch_counts"]),
             "role": "validation" if name in results.get("evaluation_settings", {}).get("validation_sites", [])
             else "training"} for name, info in census["sites"].items()]
    refused = "".join(f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in census.get("refused", {}).items())
    return (f"<h2>Cohort</h2>{_table(pd.DataFrame(rows))}<p class='note'>{census['n_features']} features at every "
            f"site; extraction settings hash {census['params_hash'][:12]}.</p>"
            + (f"<p>Refused at the census:</p><ul>{refused}</ul>" if refused else ""))


def harmonisation_section(results: dict, run_dir: Path) -> str:
    h = results.get("harmonise")
    if not h:
        return ""
    parts = [f"<h2>Harmonisation</h2><p>Federated ComBat by <b>{html.escape(h['batch'])}</b> over "
             f"{len(h['sites'])} training site(s), {h['n_features']} features; settings "
             f"{html.escape(str(h['settings']))}.</p>"]
    npz = run_dir / "reference" / "harmonisation.npz"
    if npz.is_file():
        arrays = np.load(npz)
        levels = h["design"]["batch_levels"]
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
        axes[0].boxplot(list(arrays["gamma_hat"]), tick_labels=levels)
        axes[0].axhline(0, color="grey", lw=0.8)
        axes[0].set_title("location shift per batch (γ̂, pooled-SD units), before")
        axes[1].boxplot(list(arrays["delta_hat"]), tick_labels=levels)
        axes[1].axhline(1, color="grey", lw=0.8)
        axes[1].set_title("scale factor per batch (δ̂), before")
        for ax in axes:
            ax.tick_params(axis="x", rotation=30)
        parts.append(_png(fig))
        parts.append("<p class='note'>Each box is one batch level's effect across all features, as estimated "
                     "from the training sites' pooled sums; after ComBat every batch has location 0 and scale 1 "
                     "(the adjusted rows stay at the sites).</p>")
    validation = h.get("validation", {})
    if validation.get("sites"):
        parts.append(f"<p>Validation site(s) harmonised to this reference at the site: "
                     f"{html.escape(', '.join(validation['sites']))}.</p>")
    return "".join(parts)


def selection_section(results: dict) -> str:
    select = results.get("select")
    if not select:
        return ""
    rows = [{"step": "candidates", "features": select.get("candidates")},
            {"step": "ICC filter", "features": select.get("icc", {}).get("kept")},
            {"step": "univariate screen (FDR)", "features": select.get("screen", {}).get("kept")},
            {"step": "mRMR", "features": select.get("mrmr", {}).get("kept")}]
    return (f"<h2>Feature selection</h2>{_table(pd.DataFrame(rows))}<p>Selected: "
            f"{html.escape(', '.join(select.get('selected', [])))}</p>")


def models_section(results: dict) -> str:
    models = results.get("models")
    if not models:
        return ""
    parts = ["<h2>Models</h2>"]
    for name, model in models.items():
        kind = "Cox (stratified by site)" if model["kind"] == "cox" else "logistic"
        parts.append(f"<h3>{html.escape(name)}: {kind}, {model.get('rounds', '?')} round trips</h3>")
        if model.get("selection"):
            uni = pd.DataFrame(model["selection"]["univariate"])
            keep = [c for c in uni.columns if c in ("covariate", "HR", "OR", "HR lower 95%", "HR upper 95%",
                                                    "OR lower 95%", "OR upper 95%", "p", "error")]
            parts.append("<p>Univariate screen:</p>" + _table(uni[keep]))
            parts.append(f"<p>Independent factors (multivariable p &lt; {model['selection']['multivariable_p']}): "
                         f"{html.escape(', '.join(model.get('independent', [])) or 'none')}</p>")
        if model.get("table"):
            parts.append(_table(pd.DataFrame(model["table"])))
        elif model.get("coefficients"):
            chosen = {k: v for k, v in model["coefficients"].items() if v}
            parts.append(f"<p>Elastic net, λ = {_fmt(model.get('alpha'), 4)} ({model.get('rule')} rule): "
                         f"{len(chosen)} non-zero coefficient(s).</p>"
                         + _table(pd.DataFrame({"feature": list(chosen), "coef": list(chosen.values())})))
        if model.get("nomogram", {}).get("plot"):
            parts.append(_image_file(model["nomogram"]["plot"]))
    return "".join(parts)


def metrics_table(evaluation: dict, settings: dict) -> pd.DataFrame:
    sites = settings.get("training_sites", []) + ["pooled"] + settings.get("validation_sites", []) \
        + (["pooled_validation"] if "pooled_validation" in evaluation else [])
    models = [k for k in next(iter(evaluation.values())) if k not in ("role", "sites", "delong")]
    rows = []
    for model in models:
        for site in sites:
            m = evaluation.get(site, {}).get(model)
            if not m:
                continue
            ci = m.get("c_index_ci") or [None, None]
            auc_ci = m.get("auc_ci") or [None, None]
            rows.append({"model": model, "site": GROUP_LABELS.get(site, site),
                         "role": "validation" if "validation" in site or site in settings.get("validation_sites", [])
                         else "training", "n": m.get("n"), "C-index (95% CI)":
                         f"{_fmt(m.get('c_index'))} ({_fmt(ci[0])}-{_fmt(ci[1])})",
                         "AUC (95% CI)": f"{_fmt(m.get('auc'))} ({_fmt(auc_ci[0])}-{_fmt(auc_ci[1])})",
                         "sens": _fmt(m.get("sensitivity")), "spec": _fmt(m.get("specificity")),
                         "cal. slope": _fmt(m.get("calibration_slope")), "HL p": _fmt(m.get("hl_p")),
                         "log-rank p": _fmt(m.get("logrank_p"), 4)})
    return pd.DataFrame(rows)


def _curves(evaluation: dict, model: str, settings: dict) -> str:
    groups = [g for g in ("pooled", "pooled_validation") if model in evaluation.get(g, {})]
    if not groups:
        return ""
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    roc, cal, dca, km = axes
    for group in groups:
        m = evaluation[group][model]
        label = GROUP_LABELS[group]
        if m.get("roc"):
            roc.plot(m["roc"]["fpr"], m["roc"]["tpr"], label=f"{label}, AUC {_fmt(m.get('auc'))}")
        curve = m.get("calibration_curve") or {}
        if curve.get("predicted"):
            cal.plot(curve["predicted"], curve["observed"], "o-", label=label)
        nb = m.get("decision_curve")
        if nb:
            dca.plot(nb["threshold"], nb["model"], label=f"model, {label}")
            dca.plot(nb["threshold"], nb["treat_all"], ":", label=f"treat all, {label}")
        if m.get("kaplan_meier"):
            frame = pd.DataFrame(m["kaplan_meier"])
            for g, rows in frame.groupby("group"):
                rows = rows[rows["at_risk"] > 0]
                km.step(np.r_[0, rows["time"]], np.r_[1, rows["survival"]], where="post",
                        label=f"{'high' if g else 'low'} risk, {label}")
    roc.plot([0, 1], [0, 1], color="grey", lw=0.8)
    roc.set(title="ROC (binary endpoint)", xlabel="1 - specificity", ylabel="sensitivity")
    cal.plot([0, 1], [0, 1], color="grey", lw=0.8)
    cal.set(title="calibration (training risk deciles)", xlabel="predicted risk", ylabel="observed rate")
    dca.axhline(0, color="grey", lw=0.8, label="treat none")
    dca.set(title="decision curve", xlabel="threshold probability", ylabel="net benefit", xlim=(0, 0.8))
    tops = [np.nanmax(np.asarray(evaluation[g][model]["decision_curve"]["treat_all"], dtype=float))
            for g in groups if evaluation[g][model].get("decision_curve")]
    tops += [np.nanmax(np.asarray(evaluation[g][model]["decision_curve"]["model"], dtype=float))
             for g in groups if evaluation[g][model].get("decision_curve")]
    dca.set_ylim(-0.05, (max(tops) if tops else 0.5) * 1.15 + 0.01)
    km.set(title="Kaplan-Meier by risk group (training cut-off)", xlabel="time", ylabel="survival", ylim=(0, 1.02))
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6.5)
    p = {g: evaluation[g][model].get("logrank_p") for g in groups}
    note = "; ".join(f"log-rank p ({GROUP_LABELS[g]}) = {_fmt(v, 4)}" for g, v in p.items() if v is not None)
    return _png(fig) + (f"<p class='note'>{note}</p>" if note else "")


def _td_auc(evaluation: dict, model: str, settings: dict) -> str:
    sites = settings.get("training_sites", []) + settings.get("validation_sites", [])
    rows = [(s, evaluation[s][model].get("auc_td") or {}) for s in sites if model in evaluation.get(s, {})]
    rows = [(s, v) for s, v in rows if any(x is not None for x in v.values())]
    if not rows:
        return ""
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for site, values in rows:
        times = [float(t) for t, v in values.items() if v is not None]
        ax.plot(times, [v for v in values.values() if v is not None], "o-",
                label=f"{site} ({'validation' if site in settings.get('validation_sites', []) else 'training'})")
    ax.axhline(0.5, color="grey", lw=0.8)
    ax.set(title="time-dependent AUC (cumulative/dynamic), per site", xlabel="time", ylabel="AUC(t)")
    ax.legend(fontsize=7)
    return _png(fig)


def segmentation_section(results: dict) -> str:
    """Held-out Dice per site and round (round r measures the model after r − 1 rounds), and the final Dice."""
    seg = results.get("segmentation")
    if not seg or not seg.get("history"):
        return ""
    rows = [{"round": h["round"], **{f"{s} Dice": h["dice"].get(s) for s in seg["sites"]},
             "mean Dice (case-weighted)": h.get("mean_dice")} for h in seg["history"]]
    rows.append({"round": "final", **{f"{s} Dice": seg["final_dice"].get(s) for s in seg["sites"]},
                 "mean Dice (case-weighted)": seg.get("final_mean_dice")})
    return (f"<h2>Segmentation: {html.escape(seg['network'])}, {seg['strategy']}</h2>"
            f"<p class='note'>Dice on each site's held-out delineated cases; the model is "
            f"{html.escape(str(seg.get('model', '')))} (for <code>fedrad prepare --segment</code>).</p>"
            f"{_table(pd.DataFrame(rows))}")


def cnn_section(results: dict) -> str:
    """Per-round training loss and the validation loss / C-index of the global network at each site."""
    cnn = results.get("cnn")
    if not cnn or not cnn.get("history"):
        return ""
    history = cnn["history"]
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
    dp = (f"<p>DP-SGD: ε spent per site (δ = {privacy.get('delta')}): "
          f"{html.escape(', '.join(f'{k} {v:.2f}' for k, v in privacy.get('epsilon', {}).items()))}</p>"
          if privacy.get("epsilon") else "")
    return (f"<h2>Deep learning: {html.escape(cnn['architecture'])} {cnn['dims']}D, {cnn['strategy']}</h2>"
            f"<p class='note'>{len(history)} round(s); {stopped}. Validation figures are the global model's on "
            f"each site's held-out cases (withheld below the minimum count).</p>{dp}"
            f"{_png(fig)}{_table(pd.DataFrame(rows))}{_table(scores)}")


def evaluation_section(results: dict) -> str:
    evaluation, settings = results.get("evaluation"), results.get("evaluation_settings", {})
    if not evaluation:
        return ""
    parts = ["<h2>Performance</h2>",
             f"<p>Binary endpoint of Cox models: event by t = {settings.get('horizon')}; cut-offs fixed on the "
             f"training sites: {html.escape(str(settings.get('cutoffs')))}. C-index and AUC pooled from pair counts "
             "within sites (site-stratified); confidence intervals per site by bootstrap (C) and DeLong (AUC).</p>",
             _table(metrics_table(evaluation, settings))]
    models = [k for k in evaluation.get("pooled", {}) if k not in ("sites", "delong")]
    for model in models:
        parts.append(f"<h3>{html.escape(model)}</h3>")
        parts.append(_curves(evaluation, model, settings))
        parts.append(_td_auc(evaluation, model, settings))
    tests = evaluation.get("pooled", {}).get("delong", []) + evaluation.get("pooled_validation", {}).get("delong", [])
    if tests:
        parts.append("<p>DeLong tests (site-stratified AUCs):</p>" + _table(pd.DataFrame(tests)))
    parts.append(f"<p class='note'>Not computed: {html.escape(settings.get('not_computed', ''))}.</p>")
    return "".join(parts)


def tripod_section(results: dict) -> str:
    """Which TRIPOD-AI items this study reports, and where."""
    ev = results.get("evaluation", {})
    items = [
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
    rows = "".join(f"<tr><td>{html.escape(item)}</td><td class='{'ok' if done else 'missing'}'>"
                   f"{'reported' if done else 'not in this study'}</td><td>{html.escape(where)}</td></tr>"
                   for item, done, where in items)
    return f"<h2>TRIPOD-AI checklist</h2><table><tr><th>item</th><th>status</th><th>where</th></tr>{rows}</table>"


def write_report(run_dir: Path, results: dict, *, extra_images: list[Path] = ()) -> Path:
    run_dir = Path(run_dir)
    title = f"fedrad study '{results.get('study', '')}' — {results.get('status', '')}"
    stages = pd.DataFrame([{"stage": k, **v} for k, v in results.get("stages", {}).items()])
    body = [f"<h1>{html.escape(title)}</h1>",
            f"<p class='note'>run {results.get('run_id')}, started {results.get('started')}, ended "
            f"{results.get('ended', '')}</p>", _table(stages) if len(stages) else "",
            cohort_section(results), harmonisation_section(results, run_dir),
            "".join(_image_file(p) for p in extra_images), selection_section(results),
            segmentation_section(results), cnn_section(results), models_section(results), evaluation_section(results), tripod_section(results)]
    if results.get("error"):
        body.insert(1, f"<p class='missing'>error: {html.escape(results['error'])}</p>")
    path = run_dir / REPORT
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                    f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>", encoding="utf-8")
    return path


def write_validation_report(out: Path, report: dict) -> Path:
    """`fedrad validate`'s report: this hospital's figures beside the study's pooled ones."""
    metrics = report["metrics"]
    evaluation = {"validation": metrics, **{k: v for k, v in report["study_metrics"].items()}}
    settings = {"validation_sites": ["validation"], "training_sites": []}
    body = [f"<h1>Validation of '{html.escape(report['study'])}' at this site</h1>",
            f"<p class='note'>package {html.escape(report['package'])}; store {html.escape(report['store'])}</p>",
            _table(metrics_table(evaluation, settings))]
    for model, m in metrics.items():
        if not isinstance(m, dict):
            continue
        body.append(f"<h3>{html.escape(model)}</h3>")
        body.append(_curves({"pooled_validation": {model: m}}, model, settings))
    path = Path(out) / REPORT
    path.write_text(f"<!doctype html><html><head><meta charset='utf-8'><title>validation</title>"
                    f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>", encoding="utf-8")
    return path
