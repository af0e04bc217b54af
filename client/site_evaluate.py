"""Evaluation at a site: the site half of `server/evaluate.py`.

Every model is scored on this site's rows (training or validation site alike): the linear
predictor from the coordinator's coefficients, the predicted risk of the binary endpoint
(logistic: the probability; Cox: 1 − S(h|x) at the evaluation horizon from the pooled
baseline hazard), and from those only aggregates: pair counts, per-site metrics with
bootstrap intervals, confusion counts at the training cut-off, calibration bin sums,
decision-curve counts and Kaplan–Meier tables of the risk groups on a coarse time grid
(cells with fewer than min_count at risk are suppressed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from flwr.app import RecordDict

from fedrad.client.privacy import Disclosure, two_valued
from fedrad.client.site_data import site_log
from fedrad.client.site_fit import model_inputs
from fedrad.client.store import FeatureStore
from fedrad.common.calibration import hosmer_lemeshow, site_calibration_sums, slope_design
from fedrad.common.decision import site_decision_counts
from fedrad.common.discrimination import delong_auc, site_auc_counts, site_concordance_counts
from fedrad.common.logistic import site_logistic_newton
from fedrad.common.messages import EVALUATION_SCALARS, arrays_record
from fedrad.common.newton import ConvergenceError, RankDeficientError, newton_fit
from fedrad.common.survival_curves import risk_groups, site_risk_table

SITE_SCALARS = EVALUATION_SCALARS


@dataclass
class Scored:
    """One model's predictions at this site."""

    ids: np.ndarray
    lp: np.ndarray
    time: np.ndarray | None      # Cox only
    event: np.ndarray | None
    risk: np.ndarray             # predicted risk of the binary endpoint (known rows only)
    y: np.ndarray                # binary endpoint (known rows only)
    known: np.ndarray            # rows whose binary endpoint is known
    left_out: int                # rows without the endpoint


def score_model(store: FeatureStore, plan: dict, site: str, model: dict) -> Scored:
    sub = {"model": {"name": model["name"], "kind": model["kind"]}, "columns": model["columns"],
           "scores": model["scores"], "external_scores": model["external_scores"], "data": plan["data"],
           "reference": plan["reference"], "time": plan["time"], "event": plan["event"],
           "binary_outcome": model["binary_outcome"], "deep_features_id": plan.get("deep_features_id")}
    ids, X, outcome, left_out = model_inputs(store, sub, site)
    beta = np.asarray(model["beta"], dtype=float)
    lp = X @ beta
    if model["kind"] == "logistic":
        y = outcome[0].astype(bool)
        return Scored(ids, lp, None, None, 1 / (1 + np.exp(-lp)), y, np.ones(len(ids), bool), left_out)
    time, event = outcome
    horizon = plan["horizon"]
    known = (time >= horizon) | event
    risk = 1 - np.exp(-model["cumhaz_horizon"] * np.exp(lp))
    y = event & (time <= horizon)
    return Scored(ids, lp, time, event, risk[known], y[known], known, int((~known).sum()))


def thresholds_reply(store: FeatureStore, plan: dict, site: str) -> tuple[RecordDict, Disclosure]:
    """Counts of cases and events at or above each risk threshold: the training cut-off and the
    calibration bin edges are chosen from their sums."""
    thresholds = np.asarray(plan["thresholds"], dtype=float)
    arrays, n_cases, ids = {}, 0, set()
    for model in plan["models"]:
        s = score_model(store, plan, site, model)
        above = s.risk[None, :] >= thresholds[:, None]
        arrays[f"{model['name']}__n_ge"] = above.sum(axis=1)
        arrays[f"{model['name']}__events_ge"] = (above & s.y).sum(axis=1)
        arrays[f"{model['name']}__n"] = np.array([len(s.y), s.y.sum()])
        n_cases = max(n_cases, len(s.ids))
        ids |= set(s.ids)
    return (RecordDict({"arrays": arrays_record(**arrays)}),
            Disclosure(n_cases=n_cases, identifiers=frozenset(ids), shared_axes=frozenset({len(thresholds)})))


def _bootstrap(plan, n, statistic):
    from fedrad.common.survival_metrics import bootstrap_ci

    if not plan["bootstrap"]:
        return float("nan"), float("nan")
    return bootstrap_ci(statistic, n, n_boot=plan["bootstrap"], seed=plan["seed"])


def _site_calibration(y, risk) -> tuple[float, float]:
    design = slope_design(risk)
    try:
        fit = newton_fit(lambda b: site_logistic_newton(design, y.astype(float), b), 2)
    except (RankDeficientError, ConvergenceError):
        return float("nan"), float("nan")
    return float(fit.beta[0]), float(fit.beta[1])


def _survival_scalars(s: Scored, plan: dict, model: dict, out: dict) -> dict:
    from fedrad.common.survival_metrics import brier_scores, harrell_c, time_dependent_auc, uno_c

    horizons = np.asarray(plan["horizons"], dtype=float)
    scalars = {"c_index": harrell_c(s.time, s.event, s.lp)}
    scalars["c_index_lo"], scalars["c_index_hi"] = _bootstrap(
        plan, len(s.lp), lambda rows: harrell_c(s.time[rows], s.event[rows], s.lp[rows]))
    tau = float(horizons.max())
    try:
        scalars["uno_c"] = uno_c(s.time, s.event, s.lp, tau=tau)
        scalars["uno_c_lo"], scalars["uno_c_hi"] = _bootstrap(
            plan, len(s.lp), lambda rows: uno_c(s.time[rows], s.event[rows], s.lp[rows], tau=tau))
    except ValueError:
        scalars["uno_c"] = float("nan")
    usable = horizons[(horizons > s.time.min()) & (horizons < s.time.max())]
    auc_td = np.full(len(horizons), np.nan)
    brier = np.full(len(horizons), np.nan)
    if len(usable):
        index = np.isin(horizons, usable)
        try:
            auc_td[index] = time_dependent_auc(s.time, s.event, s.lp, usable)[0]
        except ValueError:
            pass
        survival = np.exp(-np.outer(np.exp(s.lp), np.asarray(model["cumhaz"], dtype=float)[index]))
        try:
            brier[index], ibs = brier_scores(s.time, s.event, survival, usable)
            scalars["ibs"] = np.nan if ibs is None else ibs
        except ValueError:
            pass
    out["td_auc"], out["brier"] = auc_td, brier
    return scalars


def _km_tables(s: Scored, plan: dict, cutoff: float, min_count: int, model: dict) -> tuple[np.ndarray, np.ndarray, int]:
    grid = np.asarray(plan["km_grid"], dtype=float)
    if model["kind"] == "cox":
        time, event = s.time, s.event
        risk = 1 - np.exp(-model["cumhaz_horizon"] * np.exp(s.lp))
    else:
        return np.zeros((2, len(grid))), np.zeros((2, len(grid))), 0
    table = site_risk_table(time, event, risk_groups(risk, [cutoff]), grid, 2)
    small = (table.at_risk > 0) & (table.at_risk < min_count)
    at_risk, events = table.at_risk.copy(), table.events.copy()
    at_risk[small], events[small] = 0, 0
    return at_risk, events, int(small.sum())


def metrics_reply(store: FeatureStore, plan: dict, site: str, min_count: int) -> tuple[RecordDict, Disclosure]:
    arrays, n_cases, ids, groups = {}, 0, set(), {}
    scored = {}
    for model in plan["models"]:
        name = model["name"]
        s = scored[name] = score_model(store, plan, site, model)
        n_cases = max(n_cases, len(s.ids))
        ids |= set(s.ids)
        out = {"td_auc": np.full(len(plan["horizons"]), np.nan), "brier": np.full(len(plan["horizons"]), np.nan)}
        scalars = dict.fromkeys(SITE_SCALARS, float("nan"))
        scalars.update(n=len(s.ids), events=float(s.event.sum()) if s.event is not None else float(s.y.sum()),
                       n_binary=len(s.y), events_binary=float(s.y.sum()), left_out=s.left_out,
                       sum_risk=float(s.risk.sum()))
        if model["kind"] == "cox":
            scalars.update(_survival_scalars(s, plan, model, out))
            arrays[f"{name}__pairs"] = _pairs(site_concordance_counts(s.time, s.event, s.lp))
        both = 0 < s.y.sum() < len(s.y)
        if both:
            d = delong_auc(s.y, s.risk)
            scalars.update(auc=float(d.auc[0]), auc_var=float(d.cov[0, 0]))
            scalars["auc_lo"], scalars["auc_hi"] = d.ci()[0]
            scalars["calibration_intercept"], scalars["calibration_slope"] = _site_calibration(s.y, s.risk)
        if model["kind"] == "logistic":
            scalars["c_index"], scalars["c_index_lo"], scalars["c_index_hi"] = (
                scalars["auc"], scalars["auc_lo"], scalars["auc_hi"])
            arrays[f"{name}__pairs"] = _pairs(site_auc_counts(s.y, s.risk))
        arrays[f"{name}__binary_pairs"] = _pairs(site_auc_counts(s.y, s.risk))
        scalars["brier_binary"] = float(np.mean((s.risk - s.y) ** 2)) if len(s.y) else np.nan
        cutoff = float(model["cutoff"])
        predicted = s.risk >= cutoff
        arrays[f"{name}__confusion"] = np.array([np.sum(predicted & s.y), np.sum(predicted & ~s.y),
                                                 np.sum(~predicted & s.y), np.sum(~predicted & ~s.y)], dtype=float)
        cal = site_calibration_sums(s.y, s.risk, np.r_[-np.inf, np.asarray(model["edges"], dtype=float), np.inf])
        small = (cal.n > 0) & (cal.n < min_count)
        cal_arrays = np.array([cal.n, cal.observed, cal.expected, cal.variance])
        cal_arrays[:, small] = 0  # a bin of a few cases would show their outcomes
        arrays[f"{name}__calibration"] = cal_arrays
        if (cal.n[cal.n > 0] >= min_count).all() and (cal.n > 0).sum() > 2:
            scalars["hl_statistic"], _, scalars["hl_p"] = hosmer_lemeshow(cal)
        dca = site_decision_counts(s.y, s.risk, np.asarray(plan["dca_thresholds"], dtype=float))
        arrays[f"{name}__decision"] = np.array([dca.true_positive, dca.false_positive])
        at_risk, events, suppressed = _km_tables(s, plan, cutoff, min_count, model)
        arrays[f"{name}__km_at_risk"], arrays[f"{name}__km_events"] = at_risk, events
        arrays[f"{name}__td_auc"], arrays[f"{name}__brier"] = out["td_auc"], out["brier"]
        arrays[f"{name}__scalars"] = np.array([scalars[k] for k in SITE_SCALARS], dtype=float)
        groups[f"model '{name}': cases without the binary endpoint"] = s.left_out
        if suppressed or small.any():
            site_log(store.path, f"evaluate: model '{name}': {suppressed} Kaplan-Meier cell(s) and "
                     f"{int(small.sum())} calibration bin(s) with fewer than {min_count} cases suppressed")
    arrays.update(_delong_pairs(plan, scored))
    widths = {len(plan["horizons"]), len(plan["dca_thresholds"]), len(plan["km_grid"]), len(SITE_SCALARS)}
    widths |= {len(m["edges"]) + 1 for m in plan["models"]}
    return (RecordDict({"arrays": arrays_record(**arrays)}),
            Disclosure(n_cases=n_cases, identifiers=frozenset(ids), groups=groups, shared_axes=frozenset(widths)))


def _pairs(counts) -> np.ndarray:
    return np.array([counts.concordant, counts.discordant, counts.tied], dtype=float)


def _delong_pairs(plan: dict, scored: dict[str, Scored]) -> dict[str, np.ndarray]:
    """DeLong covariance of the AUCs of models scored on the same binary endpoint rows (same kind
    and outcome), so a pooled DeLong test can be formed from the sites' matrices."""
    out = {}
    for group, names in plan["delong_groups"].items():
        first = scored[names[0]]
        if not 0 < first.y.sum() < len(first.y):
            continue
        d = delong_auc(first.y, *[scored[n].risk for n in names])
        out[f"delong__{group}__auc"] = d.auc
        out[f"delong__{group}__cov"] = d.cov
    return out


def calibration_newton_reply(store: FeatureStore, plan: dict, site: str,
                             arrays: dict) -> tuple[RecordDict, Disclosure]:
    """ℓ, ∇ℓ, ∇²ℓ of the calibration model y ~ a + b·logit(risk) at the coordinator's (a, b) per model."""
    points = arrays["points"]  # (M, 2)
    loglik, grad, hess, counts = [], [], [], []
    ids, values, designs = set(), {}, {}
    for model, beta in zip(plan["models"], points):
        s = score_model(store, plan, site, model)
        ids |= set(s.ids)
        design = slope_design(s.risk)
        # the design is (1, logit risk) over the rows with the binary endpoint; a risk taking two values (a model
        # of one 0/1 column) splits them in two, like a binary model column
        values.update(two_valued([f"model '{model['name']}' calibration column 'logit(risk)'"], design[:, 1:]))
        designs[f"model '{model['name']}' calibration"] = (design.shape[1], len(design))
        summary = site_logistic_newton(design, s.y.astype(float), beta)
        loglik.append(summary.loglik)
        grad.append(summary.grad)
        hess.append(summary.hess)
        counts.append([summary.n, summary.events])
    content = RecordDict({"arrays": arrays_record(loglik=np.array(loglik), grad=np.array(grad), hess=np.array(hess),
                                                  counts=np.array(counts, dtype=float))})
    return content, Disclosure(n_cases=len(ids), identifiers=frozenset(ids),
                               shared_axes=frozenset({len(points), 2}), values=values, designs=designs)
