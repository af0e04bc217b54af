"""report.html's parts, and `fedrad validate`'s report (``OUT/report.html``).

Every report page is a Jinja2 template (``templates/``, autoescaped: a site, feature or model
name is text, whatever it holds). What is markup from the start is made here from our own
numbers and images, and only that is marked safe: tables (pandas escapes their cells) and
plots (matplotlib PNGs, base64-embedded, so the file is self-contained). The coordinator's
study report (server/report.py) extends the same page and reuses these parts.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import jinja2
import pandas as pd
from markupsafe import Markup

from fedrad.client.metrics_table import GROUP_LABELS, REPORT as REPORT_COLUMNS, fmt, metrics_table, study_sites

REPORT = "report.html"
TEMPLATES = Path(__file__).with_name("templates")
#: the key of this hospital's own figures in the validation report's table
_HERE = "validation"


def template_environment(*folders: Path) -> jinja2.Environment:
    """Templates from ``folders``, then the client's (the report page and its macros), autoescaped.

    None renders as nothing, and an undefined name is an error rather than an empty string.
    """
    return jinja2.Environment(loader=jinja2.FileSystemLoader([*map(str, folders), str(TEMPLATES)]),
                              autoescape=True, trim_blocks=True, lstrip_blocks=True,
                              undefined=jinja2.StrictUndefined, finalize=lambda value: "" if value is None else value)


_TEMPLATES = template_environment()


def pyplot():
    """matplotlib's pyplot on the Agg backend, imported on first use (a page without plots needs none of it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _img(data: bytes) -> Markup:
    return Markup('<img src="data:image/png;base64,{}">').format(base64.b64encode(data).decode())


def png(fig) -> Markup:
    """A matplotlib figure as an embedded PNG (the figure is closed)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return _img(buffer.getvalue())


def image_file(path) -> Markup | None:
    """A PNG file as an embedded image; None when there is no such file."""
    path = Path(path)
    return _img(path.read_bytes()) if path.is_file() else None


def table(frame: pd.DataFrame) -> Markup:
    """A data frame as an HTML table; pandas escapes every header and cell."""
    return Markup(frame.to_html(index=False, border=0, na_rep="-", float_format=lambda v: f"{v:.3g}", escape=True))


def metrics_html(evaluation: dict, settings: dict) -> Markup:
    """The report's metrics table: every model at every site and pooled group of ``evaluation``."""
    sites = study_sites(settings, pooled_validation="pooled_validation" in evaluation)
    return table(metrics_table(evaluation, sites, REPORT_COLUMNS, training=settings.get("training_sites", []),
                               labels=GROUP_LABELS))


def curves(evaluation: dict, model: str) -> dict | None:
    """ROC, calibration, decision curve and Kaplan-Meier of ``model`` for the pooled groups of ``evaluation``:
    ``{"image": the four plots, "note": the log-rank p values}`` for the template's ``figure`` macro."""
    groups = [g for g in ("pooled", "pooled_validation") if model in evaluation.get(g, {})]
    if not groups:
        return None
    import numpy as np

    plt = pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    roc, cal, dca, km = axes
    for group in groups:
        m = evaluation[group][model]
        label = GROUP_LABELS[group]
        if m.get("roc"):
            roc.plot(m["roc"]["fpr"], m["roc"]["tpr"], label=f"{label}, AUC {fmt(m.get('auc'))}")
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
    tops = [np.nanmax(np.asarray(evaluation[g][model]["decision_curve"][line], dtype=float))
            for line in ("treat_all", "model") for g in groups if evaluation[g][model].get("decision_curve")]
    dca.set_ylim(-0.05, (max(tops) if tops else 0.5) * 1.15 + 0.01)
    km.set(title="Kaplan-Meier by risk group (training cut-off)", xlabel="time", ylabel="survival", ylim=(0, 1.02))
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6.5)
    p = {g: evaluation[g][model].get("logrank_p") for g in groups}
    note = "; ".join(f"log-rank p ({GROUP_LABELS[g]}) = {fmt(v, 4)}" for g, v in p.items() if v is not None)
    return {"image": png(fig), "note": note}


def write_validation_report(out: Path, report: dict) -> Path:
    """`fedrad validate`'s report: this hospital's figures beside the study's pooled ones."""
    metrics = report["metrics"]
    evaluation = {_HERE: metrics, **report["study_metrics"]}
    figures = [(model, curves({"pooled_validation": {model: m}}, model)) for model, m in metrics.items()
               if isinstance(m, dict)]
    page = _TEMPLATES.get_template("validation_report.html").render(
        study=report["study"], package=report["package"], store=report["store"],
        table=metrics_html(evaluation, {"training_sites": [], "validation_sites": [_HERE]}), figures=figures)
    path = Path(out) / REPORT
    path.write_text(page, encoding="utf-8")
    return path
