"""One site's evaluation figures from the arrays its `evaluate` reply carries.

Shared by the coordinator (every site of a federated study) and `fedrad validate` (a new
hospital, offline), so both report a site the same way.
"""

from __future__ import annotations

import numpy as np

from fedrad.common.messages import EVALUATION_SCALARS
from fedrad.common.survival_curves import RiskTable, kaplan_meier, logrank_test

__all__ = ["site_metrics", "binary_metrics", "logrank_p", "clean", "scalars", "nan_to_none", "roc_points",
           "calibration_points", "delong_pair_tests", "site_delong_tests"]


def scalars(part: dict, name: str) -> dict:
    return dict(zip(EVALUATION_SCALARS, part[f"{name}__scalars"].tolist()))


def nan_to_none(value):
    return None if value is None or (isinstance(value, float) and not np.isfinite(value)) else value


def binary_metrics(confusion) -> dict:
    tp, fp, fn, tn = (float(v) for v in confusion)
    ratio = lambda a, b: a / b if b else None  # noqa: E731
    return {"sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp),
            "accuracy": ratio(tp + tn, tp + fp + fn + tn), "ppv": ratio(tp, tp + fp), "npv": ratio(tn, tn + fn),
            "confusion": {"tp": tp, "fp": fp, "fn": fn, "tn": tn}}


def site_metrics(plan: dict, part: dict, is_validation: bool) -> dict:
    out = {"role": "validation" if is_validation else "training"}
    for entry in plan["models"]:
        name = entry["name"]
        s = scalars(part, name)
        metrics = {
            "n": int(s["n"]), "events": int(s["events"]), "c_index": s["c_index"],
            "c_index_ci": [s["c_index_lo"], s["c_index_hi"]], "uno_c": s["uno_c"],
            "uno_c_ci": [s["uno_c_lo"], s["uno_c_hi"]],
            "auc": s["auc"], "auc_ci": [s["auc_lo"], s["auc_hi"]],
            "auc_td": dict(zip(map(str, plan["horizons"]), part[f"{name}__td_auc"].tolist())),
            "brier": dict(zip(map(str, plan["horizons"]), part[f"{name}__brier"].tolist())),
            "ibs": s["ibs"], "brier_binary": s["brier_binary"],
            "calibration_intercept": s["calibration_intercept"], "calibration_slope": s["calibration_slope"],
            "hl_statistic": s["hl_statistic"], "hl_p": s["hl_p"],
            "cutoff": entry["cutoff"], "n_binary": int(s["n_binary"]), "left_out_binary": int(s["left_out"]),
            **binary_metrics(part[f"{name}__confusion"]),
        }
        metrics["roc"] = roc_points(part[f"{name}__decision"], s["n_binary"], s["events_binary"])
        metrics["calibration_curve"] = calibration_points(part[f"{name}__calibration"])
        if entry["kind"] == "cox":
            table = RiskTable(np.asarray(plan["km_grid"]), part[f"{name}__km_at_risk"], part[f"{name}__km_events"])
            metrics["logrank_p"] = logrank_p(table)
            metrics["kaplan_meier"] = kaplan_meier(table).to_dict(orient="list")
        out[name] = clean(metrics)
    out["delong"] = site_delong_tests(plan, part)
    return out


def site_delong_tests(plan: dict, part: dict) -> list[dict]:
    """DeLong's test of every pair of models scored on the same rows at this site."""
    tests = []
    for group, names in plan.get("delong_groups", {}).items():
        if f"delong__{group}__cov" in part:
            tests += delong_pair_tests(names, part[f"delong__{group}__auc"], part[f"delong__{group}__cov"])
    return tests


def delong_pair_tests(names: list[str], auc, cov) -> list[dict]:
    """z and two-sided p of AUC(a) − AUC(b) for every pair, from the AUCs and their DeLong covariance."""
    from scipy import stats

    tests = []
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            var = cov[a, a] + cov[b, b] - 2 * cov[a, b]
            z = (auc[a] - auc[b]) / np.sqrt(var) if var > 0 else np.nan
            tests.append(clean({"models": [names[a], names[b]], "auc": [float(auc[a]), float(auc[b])],
                                "z": float(z), "p": float(2 * stats.norm.sf(abs(z))) if np.isfinite(z) else np.nan}))
    return tests

def roc_points(decision, n: float, events: float) -> dict | None:
    """ROC curve from true/false positives at the decision-curve thresholds (rows of ``decision``)."""
    if not events or n <= events:
        return None
    tpr = np.r_[1.0, np.asarray(decision[0], float) / events, 0.0]
    fpr = np.r_[1.0, np.asarray(decision[1], float) / (n - events), 0.0]
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist()}


def calibration_points(calibration) -> dict:
    """Mean predicted and observed risk per non-empty (unsuppressed) bin: rows n, Σy, Σp, Σp(1−p)."""
    n, observed, expected = (np.asarray(calibration[i], float) for i in range(3))
    keep = n > 0
    return {"n": n[keep].tolist(), "predicted": (expected[keep] / n[keep]).tolist(),
            "observed": (observed[keep] / n[keep]).tolist()}


def logrank_p(table: RiskTable):
    if (table.events.sum(axis=1) == 0).any() or (table.at_risk[:, 0] == 0).any():
        return None
    try:
        return logrank_test(table)[2]
    except np.linalg.LinAlgError:
        return None


def clean(obj):
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [clean(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return nan_to_none(float(obj))
    return obj
