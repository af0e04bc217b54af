"""Stage `evaluate`: every fitted model at every site, training and validation.

Round trips: (1) ``query.evaluate_thresholds`` at the training sites — counts of cases and
events at or above each risk threshold, from which the cut-off (Youden's J, or the study's)
and the calibration bin edges (training risk deciles, at the threshold grid's resolution)
are fixed; (2) ``query.evaluate_metrics`` at all sites — per-site metrics and the sums the
pooled ones come from; (3+) ``query.evaluate_calibration`` — the calibration intercept and
slope by federated Newton, training and validation sites pooled separately, all models in
the same messages.

Pooled figures are exact where sums allow: Harrell's C and the AUC from within-site pair
counts (site-stratified: a pair of patients from two sites is never formed), confusion
counts, calibration bins, Hosmer–Lemeshow, net benefit, the calibration slope, and the
Kaplan–Meier tables (on a coarse grid, cells with fewer than min_count at risk suppressed at
each site). Time-dependent AUC and Brier scores need every row and are per site; their
"pooled" entries are case-weighted means of the sites' values.
"""

from __future__ import annotations

import copy

from logging import INFO

import numpy as np
from flwr.common.logger import log
from scipy import stats

from fedrad.common.calibration import CalibrationSums, calibration_table, hosmer_lemeshow, in_the_large
from fedrad.common.decision import DecisionCounts, net_benefit
from fedrad.common.discrimination import PairCounts, combine_pair_counts
from fedrad.common.errors import FedradError
from fedrad.common.evaluation import (binary_metrics, clean, delong_pair_tests, logrank_p, roc_points, scalars,
                               site_metrics)
from fedrad.common.logistic import update_logistic_newton
from fedrad.common.messages import EVALUATE_CALIBRATION, EVALUATE_METRICS, EVALUATE_THRESHOLDS, record_arrays, request
from fedrad.common.newton import NewtonSummary, combine_newton, run_newton, start_newton
from fedrad.common.study import Study
from fedrad.common.survival_curves import RiskTable, combine_risk_tables, kaplan_meier
from fedrad.server.shared_rounds import SharedRounds
from fedrad.server.federation import Federation, StageFailed, StageTraffic
from fedrad.server.fit import data_mode, study_sites

THRESHOLDS = np.round(np.arange(0.005, 1.0, 0.005), 3)
DCA_THRESHOLDS = np.round(np.arange(0.01, 1.0, 0.01), 2)
#: round trips of the calibration-slope Newton fits (all models and site groups share each)
CALIBRATION_ROUNDS = 25
NOT_COMPUTED = ("pairs of patients from two different sites (cross-site concordance) and exact pooled "
                "time-dependent AUC / Brier scores, which need patient-level rows in one place")


def evaluation_horizon(study: Study) -> float:
    return study.evaluate.horizon or (study.outcome.horizons[0] if study.outcome.horizons else 0.0)


def model_entries(study: Study, models: dict) -> list[dict]:
    """What a site needs to score each model: columns, coefficients, score sources, baseline hazard."""
    horizon = evaluation_horizon(study)
    entries = []
    for spec in study.models:
        fitted = models[spec.name]
        if not fitted.get("columns"):
            log(INFO, "evaluate: model '%s' has no columns (nothing passed its screen); not evaluated", spec.name)
            continue
        names = (["intercept"] if spec.kind == "logistic" else []) + fitted["columns"]
        entry = {"name": spec.name, "kind": spec.kind, "columns": fitted["columns"],
                 "beta": [fitted["coefficients"][c] for c in names],
                 "scores": fitted["score_sources"]["scores"], "external_scores": fitted["score_sources"]["external_scores"],
                 "binary_outcome": spec.binary_outcome or study.outcome.event}
        if spec.kind == "cox":
            baseline = fitted.get("baseline")
            pooled = dict(zip(baseline["horizons"], baseline["cumhaz"]["pooled"])) if baseline else {}
            if pooled.get(horizon) is None:
                raise StageFailed(f"evaluate: model '{spec.name}' has no pooled baseline hazard at the evaluation "
                                  f"horizon {horizon:g} (add it to [outcome] horizons)")
            entry.update(cumhaz=[pooled.get(h) or np.nan for h in study.outcome.horizons],
                         cumhaz_horizon=pooled[horizon])
        entries.append(entry)
    return entries


def run_evaluate(fed: Federation, study: Study, census: dict, harmonise: dict | None, models: dict) -> dict:
    traffic = StageTraffic()
    training = study_sites(census, harmonise, fed, study)
    if harmonise:
        validation = [s for s in harmonise.get("validation", {}).get("sites", []) if s in fed.sites]
    else:
        validation = [s for s in study.sites.validation if s in census["sites"] and s in fed.sites]
    entries = model_entries(study, models)
    if not entries:
        raise StageFailed("evaluate: no fitted model to evaluate")
    horizons = list(study.outcome.horizons)
    km_end = max(horizons) if horizons else 1.0
    plan = {"study": study.model_dump(mode="json"), "data": data_mode(harmonise),
            "reference": harmonise["reference"] if harmonise else "", "time": study.outcome.time,
            "deep_features_id": census.get("deep_features_id", ""),
            "event": study.outcome.event, "horizon": evaluation_horizon(study), "horizons": horizons,
            "thresholds": THRESHOLDS.tolist(), "dca_thresholds": DCA_THRESHOLDS.tolist(),
            "km_grid": np.linspace(km_end / study.evaluate.km_points, km_end, study.evaluate.km_points).tolist(),
            "bootstrap": study.evaluate.bootstrap, "seed": study.evaluate.seed, "models": entries,
            "delong_groups": _delong_groups(entries)}

    failures: dict[str, str] = {}
    expected = {"pooled": list(training), "pooled_validation": list(validation)}

    def thresholds_then_metrics(view) -> dict[str, dict]:
        counts = _ask(view, StageTraffic(), training, EVALUATE_THRESHOLDS, plan, failures)
        if len(counts) < study.federation.min_sites:
            raise StageFailed(f"evaluate: {len(counts)} training site(s) answered, the study needs "
                              f"min_sites={study.federation.min_sites}")
        for entry in entries:
            entry["cutoff"], entry["edges"] = _cutoff_and_edges(entry["name"], list(counts.values()), study)
        return _ask(view, StageTraffic(), training + validation, EVALUATE_METRICS, plan, failures)

    # the calibration slopes need only the models' risks: their Newton rounds share the metrics' round trips
    calibration_plan = copy.deepcopy(plan)
    calibration_failures: dict[str, str] = {}
    together = SharedRounds(fed, "evaluate", traffic).run({
        "metrics": thresholds_then_metrics,
        "calibration": lambda view: _calibration_slopes(view, StageTraffic(), calibration_plan, expected,
                                                        calibration_failures)})
    parts = together["metrics"]
    evaluation = {site: site_metrics(plan, part, site in validation) for site, part in parts.items()}
    groups = {"pooled": [s for s in training if s in parts], "pooled_validation": [s for s in validation if s in parts]}
    slopes = together["calibration"]
    if groups != expected or calibration_failures:  # a site missed a round: the slopes over the sites that answered
        slopes = _calibration_slopes(fed, traffic, plan, groups, failures)
    for label, sites in groups.items():
        if sites:
            evaluation[label] = _pooled_metrics(plan, [parts[s] for s in sites], sites, slopes[label])
    log(INFO, "evaluate: %d model(s) at %d training and %d validation site(s)", len(entries), len(groups["pooled"]),
        len(groups["pooled_validation"]))
    settings = {"horizon": plan["horizon"], "horizons": horizons, "cutoffs": {e["name"]: e["cutoff"] for e in entries},
                "training_sites": groups["pooled"], "validation_sites": groups["pooled_validation"],
                "km_grid": plan["km_grid"], "failed": failures,
                "scoring": {k: v for k, v in plan.items() if k != "study"},
                "not_computed": NOT_COMPUTED}
    return {"evaluation": evaluation, "settings": settings, "traffic": traffic.summary()}


def _ask(fed, traffic, sites, message_type, plan, failures: dict, per_site_arrays=None) -> dict[str, dict]:
    """Replies of the sites that answered; the others are named in ``failures`` (the stage goes on)."""
    per_site_arrays = per_site_arrays or {}
    outcome = fed.ask("evaluate", traffic.rounds + 1, message_type,
                      {s: request(plan, **per_site_arrays.get(s, {})) for s in sites},
                      {s: fed.sites[s] for s in sites}, traffic)
    for site, reason in outcome.failures.items():
        log(INFO, "evaluate: %s left out: %s", site, reason)
    failures.update(outcome.failures)
    return {s: record_arrays(c["arrays"]) for s, c in outcome.replies.items()}


def _delong_groups(entries) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for e in entries:
        key = "cox" if e["kind"] == "cox" else f"logistic_{e['binary_outcome']}"
        groups.setdefault(key, []).append(e["name"])
    return {k: v for k, v in groups.items() if len(v) > 1}


def _cutoff_and_edges(name: str, parts: list[dict], study: Study) -> tuple[float, list[float]]:
    n_ge = sum(p[f"{name}__n_ge"] for p in parts)
    events_ge = sum(p[f"{name}__events_ge"] for p in parts)
    n, events = sum(p[f"{name}__n"] for p in parts)
    if study.evaluate.cutoff == "youden":
        sensitivity = events_ge / events if events else np.zeros_like(n_ge)
        specificity = 1 - (n_ge - events_ge) / (n - events) if n > events else np.zeros_like(n_ge)
        cutoff = float(THRESHOLDS[int(np.argmax(sensitivity + specificity - 1))])
    else:
        cutoff = float(study.evaluate.cutoff)
    share_above = n_ge / n
    inner = sorted({float(THRESHOLDS[np.argmax(share_above <= 1 - q)]) for q in np.arange(0.1, 0.95, 0.1)
                    if (share_above <= 1 - q).any()})
    return cutoff, inner  # interior edges: bins are (-inf, e1], (e1, e2], ..., (ek, inf)


def _pooled_metrics(plan: dict, parts: list[dict], sites: list[str], slopes: dict) -> dict:
    out = {"sites": sites}
    for entry in plan["models"]:
        name = entry["name"]
        per_site = [scalars(p, name) for p in parts]
        pairs = combine_pair_counts([PairCounts(*p[f"{name}__pairs"]) for p in parts])
        binary = [PairCounts(*p[f"{name}__binary_pairs"]) for p in parts]
        auc_pairs = combine_pair_counts(binary)
        weights = np.array([b.pairs for b in binary]) / max(auc_pairs.pairs, 1)
        auc_var = float(np.nansum(weights ** 2 * np.array([s["auc_var"] for s in per_site])))
        q = stats.norm.ppf(0.975)
        cal = np.sum([p[f"{name}__calibration"] for p in parts], axis=0)
        sums = CalibrationSums(np.r_[-np.inf, entry["edges"], np.inf], cal[0], cal[1], cal[2], cal[3])
        dca = np.sum([p[f"{name}__decision"] for p in parts], axis=0)
        n_binary = sum(s["n_binary"] for s in per_site)
        events_binary = sum(s["events_binary"] for s in per_site)
        curve = net_benefit(DecisionCounts(np.asarray(plan["dca_thresholds"]), dca[0], dca[1], n_binary, events_binary))
        hl_stat, hl_df, hl_p = hosmer_lemeshow(sums) if (sums.n > 0).sum() > 2 else (np.nan, 0, np.nan)
        n = np.array([s["n"] for s in per_site])
        metrics = {
            "n": int(n.sum()), "events": int(sum(s["events"] for s in per_site)),
            "c_index": pairs.c, "c_index_pairs": pairs.pairs,
            "c_index_ci": _pooled_ci(pairs.c, [PairCounts(*p[f"{name}__pairs"]).pairs for p in parts], per_site),
            "auc": auc_pairs.c, "auc_ci": [auc_pairs.c - q * np.sqrt(auc_var), auc_pairs.c + q * np.sqrt(auc_var)],
            "auc_td": {str(h): _weighted([p[f"{name}__td_auc"][i] for p in parts], n)
                       for i, h in enumerate(plan["horizons"])},
            "brier": {str(h): _weighted([p[f"{name}__brier"][i] for p in parts], n)
                      for i, h in enumerate(plan["horizons"])},
            "calibration_intercept": slopes.get(name, (np.nan, np.nan))[0],
            "calibration_slope": slopes.get(name, (np.nan, np.nan))[1],
            "calibration_in_the_large": _in_the_large(per_site),
            "calibration_curve": calibration_table(sums).to_dict(orient="list"),
            "hl_statistic": hl_stat, "hl_df": hl_df, "hl_p": hl_p,
            "cutoff": entry["cutoff"], "n_binary": int(n_binary),
            "decision_curve": curve.to_dict(orient="list"),
            "roc": roc_points(dca, n_binary, events_binary),
            **binary_metrics(np.sum([p[f"{name}__confusion"] for p in parts], axis=0)),
        }
        if entry["kind"] == "cox":
            table = combine_risk_tables([RiskTable(np.asarray(plan["km_grid"]), p[f"{name}__km_at_risk"],
                                                   p[f"{name}__km_events"]) for p in parts])
            metrics["kaplan_meier"] = kaplan_meier(table).to_dict(orient="list")
            metrics["logrank_p"] = logrank_p(table)
        out[name] = clean(metrics)
    out["delong"] = _pooled_delong(plan, parts)
    return out


def _pooled_ci(c: float, pairs: list[float], per_site: list[dict]) -> list[float] | None:
    """Normal-approximation 95% CI of the site-stratified C: Var = Σ w_s² SE_s², w_s the site's share of
    usable pairs, SE_s from the site's bootstrap interval ((high − low) / 2·1.96); sites are independent."""
    se = np.array([(s["c_index_hi"] - s["c_index_lo"]) / (2 * stats.norm.ppf(0.975)) for s in per_site])
    w = np.asarray(pairs, dtype=float) / max(sum(pairs), 1)
    if not np.all(np.isfinite(se)):
        return None
    half = stats.norm.ppf(0.975) * float(np.sqrt(np.sum(w ** 2 * se ** 2)))
    return [c - half, c + half]


def _in_the_large(per_site: list[dict]) -> dict | None:
    """From whole-site totals (Σy, Σp, n), not the bins: a suppressed small bin does not bias it."""
    n = sum(s["n_binary"] for s in per_site)
    if not n:
        return None
    return in_the_large(n, sum(s["events_binary"] for s in per_site), sum(s["sum_risk"] for s in per_site))


def _weighted(values, n):
    values = np.asarray(values, dtype=float)
    ok = np.isfinite(values)
    return float(np.sum(values[ok] * n[ok]) / np.sum(n[ok])) if ok.any() else None


def _pooled_delong(plan: dict, parts: list[dict]) -> list[dict]:
    """Site-stratified AUCs of models on the same rows and DeLong's test of each pair:
    AUC = Σ w_s AUC_s, Cov = Σ w_s² Cov_s, w_s the site's share of case-control pairs."""
    tests = []
    for group, names in plan["delong_groups"].items():
        usable = [p for p in parts if f"delong__{group}__cov" in p]
        if not usable:
            continue
        pairs = np.array([PairCounts(*p[f"{names[0]}__binary_pairs"]).pairs for p in usable])
        w = pairs / pairs.sum()
        auc = sum(wi * p[f"delong__{group}__auc"] for wi, p in zip(w, usable))
        cov = sum(wi ** 2 * p[f"delong__{group}__cov"] for wi, p in zip(w, usable))
        tests += delong_pair_tests(names, auc, cov)
    return tests


def _calibration_slopes(fed, traffic, plan, groups, failures) -> dict[str, dict[str, tuple[float, float]]]:
    """Newton for y ~ a + b·logit(risk), every model and both site groups in the same round trips."""
    names = [e["name"] for e in plan["models"]]
    labels = [label for label, sites in groups.items() if sites]

    def evaluate(states, active):
        arrays = {site: {"points": np.array([states[(label, i)].beta for i in range(len(names))])}
                  for label in labels for site in groups[label]}
        replies = _ask(fed, traffic, list(arrays), EVALUATE_CALIBRATION, plan, failures, arrays)
        totals = {}
        for label, i in active:
            site_parts = [replies[s] for s in groups[label] if s in replies]
            totals[(label, i)] = combine_newton([NewtonSummary(float(p["loglik"][i]), p["grad"][i], p["hess"][i],
                                                               int(p["counts"][i][0]), int(p["counts"][i][1]))
                                                 for p in site_parts])
        return totals

    def step(key, state, total):
        return update_logistic_newton(state, total, names=["intercept", "slope"])

    states, errors = run_newton(
        # from (0, 1), a calibrated model's line: the same maximum (the log-likelihood is concave), fewer rounds
        evaluate, {(label, i): start_newton(2, np.array([0.0, 1.0])) for label in labels for i in range(len(names))},
        step,
        max_iter=None, max_rounds=CALIBRATION_ROUNDS, failures=(FedradError, np.linalg.LinAlgError),
        message=lambda key, *_: f"evaluate: calibration slope of '{names[key[1]]}' ({key[0]}): Newton did not "
                                f"converge in {CALIBRATION_ROUNDS} rounds")
    results = {label: {} for label in groups}
    for (label, i), exc in errors.items():  # separated or degenerate: reported
        results[label][names[i]] = (np.nan, np.nan)
        log(INFO, "evaluate: calibration slope of '%s' (%s): %s", names[i], label, exc)
    for (label, i), s in states.items():
        results[label].setdefault(names[i], (float(s.beta[0]), float(s.beta[1])) if s.converged else (np.nan, np.nan))
    return results
