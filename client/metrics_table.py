"""The metrics table: each model's figures at each site, as text, and the one number formatter.

One builder for every place that shows the `evaluate` stage's figures: the demo's console
table and ``evaluation.csv`` (server/demo.py), `fedrad validate`'s console table
(client/validate.py) and the tables of both report.html files (client/report.py,
server/report.py). What differs between them is a parameter: which columns, which sites
(or pooled groups) in which order, how a group is labelled, and columns that set a figure
of another group beside each row (the study's pooled C at a validating hospital).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence

import pandas as pd

#: how the report names the pooled groups of the evaluation
GROUP_LABELS = {"pooled": "training sites (pooled)", "pooled_validation": "validation sites (pooled)"}
#: a site's evaluation entries that are not models
NOT_MODELS = ("role", "sites", "delong")


def fmt(value, digits: int = 3) -> str:
    """``value`` with ``digits`` decimals; "-" for a figure that is missing (None) or not finite."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def _interval(ci) -> str:
    low, high = ci or (None, None)
    return f"{fmt(low)}-{fmt(high)}"


def _with_interval(value, ci) -> str:
    return f"{fmt(value)} ({_interval(ci)})"


#: every column a metrics table can have, as the cell it shows from one model's figures at one site
COLUMNS: dict[str, Callable[[dict], object]] = {
    "n": lambda m: m.get("n"),
    "cases": lambda m: m.get("n"),
    "C-index": lambda m: fmt(m.get("c_index")),
    "95% CI": lambda m: _interval(m.get("c_index_ci")),
    "C-index (95% CI)": lambda m: _with_interval(m.get("c_index"), m.get("c_index_ci")),
    "AUC": lambda m: fmt(m.get("auc")),
    "AUC (95% CI)": lambda m: _with_interval(m.get("auc"), m.get("auc_ci")),
    "cal. slope": lambda m: fmt(m.get("calibration_slope")),
    "sens": lambda m: fmt(m.get("sensitivity")),
    "spec": lambda m: fmt(m.get("specificity")),
    "HL p": lambda m: fmt(m.get("hl_p")),
    "log-rank p": lambda m: fmt(m.get("logrank_p"), 4),
}
#: the consoles' columns (the demo adds site and role in front)
CONSOLE = ("C-index", "95% CI", "AUC", "cal. slope", "sens", "spec")
#: report.html's columns
REPORT = ("site", "role", "n", "C-index (95% CI)", "AUC (95% CI)", "sens", "spec", "cal. slope", "HL p",
          "log-rank p")


def model_names(entry: Mapping) -> list[str]:
    """The models of one site's (or group's) evaluation entry."""
    return [k for k in entry if k not in NOT_MODELS]


def study_sites(settings: Mapping, *, pooled_validation: bool = False) -> list[str]:
    """Rows' order: the training sites, their pooled figures, the validation sites (and theirs pooled)."""
    return [*settings.get("training_sites", []), "pooled", *settings.get("validation_sites", []),
            *(["pooled_validation"] if pooled_validation else [])]


def metrics_table(evaluation: Mapping[str, Mapping], sites: Sequence[str], columns: Sequence[str], *,
                  models: Sequence[str] | None = None, training: Collection[str] = (),
                  labels: Mapping[str, str] | None = None,
                  beside: Mapping[str, tuple[str, str]] | None = None) -> pd.DataFrame:
    """One row per model and site, model by model and the sites in ``sites``' order, where the site has figures.

    ``evaluation`` is ``{site or group: {model: figures}}`` (results.json's "evaluation"). A row starts with
    "model", then ``columns``: names of :data:`COLUMNS`, or "site" (``labels`` renames a group) and "role"
    ("training" for "pooled" and the ``training`` sites, else "validation"). ``models`` defaults to the first
    entry's. ``beside`` adds columns ``{name: (group, key)}``: that figure of the same model in another group.
    """
    if models is None:
        models = model_names(next(iter(evaluation.values()), {}))
    labels = labels or {}
    rows = []
    for model in models:
        for site in sites:
            m = evaluation.get(site, {}).get(model)
            if not m or not isinstance(m, dict):
                continue
            row = {"model": model}
            for column in columns:
                if column == "site":
                    row[column] = labels.get(site, site)
                elif column == "role":
                    row[column] = "training" if site == "pooled" or site in training else "validation"
                else:
                    row[column] = COLUMNS[column](m)
            for column, (group, key) in (beside or {}).items():
                row[column] = fmt(evaluation.get(group, {}).get(model, {}).get(key))
            rows.append(row)
    return pd.DataFrame(rows)
