"""Stage `fit`: each model of the study by federated Newton (or a cross-validated elastic-net path).

Every round is one ``query.model_summaries`` per site carrying the points to evaluate
(unpenalised Newton: one point; elastic net: one per fold and λ still running, all folds and
λ values in the same message). Sites answer with ℓ, ∇ℓ, ∇²ℓ and the held-out score per
point; sums over sites equal the pooled quantities, so the fit equals the pooled fit.
Cox is stratified by site (no event time leaves a site). A site that fails mid-model is
dropped and the model restarts without it while ``min_sites`` remain.
"""

from __future__ import annotations

from functools import partial
from logging import INFO

import numpy as np
from flwr.common.logger import log

from fedrad.common.errors import FedradError
from fedrad.common.logistic import (SeparationError, logistic_null_intercept, logistic_null_loglik,
                                   update_logistic_newton)
from fedrad.common.cox import RiskSetSums, combine_cox_event_times, combine_cox_risk_sets, cox_newton_from_risk_sets
from fedrad.common.messages import COX_EVENT_TIMES, COX_RISK_SETS, MODEL_BASELINE, MODEL_SUMMARIES, record_arrays, request
from fedrad.common.newton import (ConvergenceError, NewtonSummary, NoFiniteEstimateError, RankDeficientError,
                                  fitted_point, run_newton, start_newton, stop_report, update_newton,
                                  wald_table)
from fedrad.common.nomogram import axis_ranges, build_nomogram
from fedrad.common.penalised import Penalty, PathSummary, combine_path_summary, path_choice, run_path
from fedrad.common.study import SELECTED, Features, Model, Study, select_features
from fedrad.server.federation import Federation, StageFailed, StageTraffic
from fedrad.server.shared_rounds import SharedRounds

MAX_NEWTON_ROUNDS = 50
#: a model (or a univariate candidate) that cannot be fitted
_FIT_ERRORS = (RankDeficientError, SeparationError, NoFiniteEstimateError, ConvergenceError)


class _SiteDropped(Exception):
    def __init__(self, failures: dict[str, str]):
        self.failures = failures


def run_fit(fed: Federation, study: Study, census: dict, harmonise: dict | None, select: dict | None = None,
            out_dir=None) -> dict:
    """Fit the study's models; models that do not use each other share round trips (server/shared_rounds.py),
    and a model that uses an earlier one's score or independent factors waits for it."""
    traffic = StageTraffic()
    models: dict[str, dict] = {}
    selected = select["selected"] if select else []
    for wave in independent_waves(study.models):
        fits = {model.name: partial(fit_model, study=study, census=census, harmonise=harmonise, model=model,
                                    selected=selected, fitted=dict(models)) for model in wave}
        if len(wave) > 1:
            log(INFO, "fit: %s fitted together, sharing round trips", ", ".join(fits))
        models.update(SharedRounds(fed, "fit", traffic).run(fits))
        for model in wave:
            if model.nomogram and out_dir is not None:
                from fedrad.server.nomogram_plot import plot_nomogram  # matplotlib only when a nomogram is asked for

                path = plot_nomogram(models[model.name], model.name, study.outcome.horizons, out_dir)
                models[model.name]["nomogram"]["plot"] = str(path)
    return {"models": {m.name: models[m.name] for m in study.models}, "traffic": traffic.summary()}


def independent_waves(models) -> list[list[Model]]:
    """The models in groups that can be fitted together: each after every earlier model it uses
    (a score, or "@model" independent factors), in the study's order within a group."""
    wave_of: dict[str, int] = {}
    for model in models:
        uses = [name for name in model.scores if name in wave_of]
        uses += [entry[1:] for entry in model.clinical if entry.startswith("@") and entry[1:] in wave_of]
        wave_of[model.name] = 1 + max((wave_of[name] for name in uses), default=-1)
    return [[m for m in models if wave_of[m.name] == w] for w in range(max(wave_of.values(), default=-1) + 1)]


def data_mode(harmonise: dict | None) -> str:
    """Which rows models see: z-scored harmonised, harmonised, or (no harmonise stage) the original features."""
    if not harmonise:
        return "features"
    return "standardised" if harmonise.get("settings", {}).get("zscore") else "harmonised"


def study_sites(census: dict, harmonise: dict | None, fed: Federation, study: Study) -> list[str]:
    """Training sites: those harmonised when the study harmonised, else those the census accepted;
    never a validation site."""
    sites = harmonise["sites"] if harmonise else list(census["sites"])
    return [s for s in sites if s in fed.sites and s not in study.sites.validation]


def model_plan(study: Study, census: dict, harmonise: dict | None, model: Model, cv_folds: int,
               selected: list[str], fitted: dict[str, dict] | None = None) -> dict:
    fitted = fitted or {}
    globs = tuple(g for g in model.features if g != SELECTED)
    features = list(selected) if SELECTED in model.features else []
    features += [f for f in select_features(census["features"], Features(include=globs)) if f not in features] \
        if globs else []
    if model.features and not features:
        raise StageFailed(f"fit: model '{model.name}': no feature matches {list(model.features)}")
    clinical = []
    for entry in model.clinical:  # "@model": the independent factors that model found
        for column in (fitted[entry[1:]]["independent"] if entry.startswith("@") else [entry]):
            if column not in clinical and column not in features:
                clinical.append(column)
    scores, external = {}, []
    for name in model.scores:
        if name in fitted:  # an earlier model's linear predictor, computed at each site from its coefficients
            scores.update(fitted[name]["score_sources"]["scores"])
            external += [e for e in fitted[name]["score_sources"]["external_scores"] if e not in external]
            scores[name] = {c: b for c, b in fitted[name]["coefficients"].items() if c != "intercept"}
        elif name not in external:
            external.append(name)
    return {
        "study": study.model_dump(mode="json"), "model": model.model_dump(mode="json"),
        "columns": features + clinical + list(model.scores),
        "scores": scores, "external_scores": external,
        "data": data_mode(harmonise),
        "reference": harmonise["reference"] if harmonise else "",
        "deep_features_id": census.get("deep_features_id", ""),
        "time": study.outcome.time, "event": study.outcome.event,
        "binary_outcome": model.binary_outcome or study.outcome.event, "cv_folds": cv_folds,
    }


def fit_model(fed: Federation, *, study: Study, census: dict, harmonise: dict | None, model: Model,
              selected: list[str], fitted: dict[str, dict]) -> dict:
    sites = study_sites(census, harmonise, fed, study)
    left_out: dict[str, str] = {}
    while True:
        if len(sites) < study.federation.min_sites:
            raise StageFailed(f"fit: model '{model.name}': {len(sites)} site(s) left, the study needs min_sites="
                              f"{study.federation.min_sites}; " + "; ".join(f"{s}: {r}" for s, r in left_out.items()))
        model_traffic = StageTraffic()  # this model's share: the round trips it took part in
        try:
            plan = model_plan(study, census, harmonise, model,
                              model.cv_folds if model.penalty == "elasticnet" else 0, selected, fitted)
            result = _fit_once(fed, plan, model, sites, model_traffic)
            result.update(_after_fit(fed, plan, model, result, sites, study.outcome.horizons, model_traffic))
            result["score_sources"] = {"scores": plan["scores"], "external_scores": plan["external_scores"]}
            result.setdefault("columns", plan["columns"])
            break
        except _SiteDropped as dropped:
            left_out.update(dropped.failures)
            sites = [s for s in sites if s not in dropped.failures]
            log(INFO, "fit: model '%s': restarting without %s", model.name, ", ".join(dropped.failures))
    result.update(sites=sites, left_out=left_out, rounds=model_traffic.rounds,
                  seconds=round(model_traffic.seconds, 2), bytes_up_per_site=dict(model_traffic.bytes_in),
                  bytes_down_per_site=dict(model_traffic.bytes_out))
    log(INFO, "fit: model '%s' (%s, %s): %d round trip(s), converged=%s", model.name, model.kind, model.penalty,
        result["rounds"], result["converged"])
    return result


def _evaluator(fed: Federation, sites: list[str], plan: dict, name: str, traffic: StageTraffic):
    """``evaluate(points, also=None)``: the summed summaries at ``points``; with ``also`` (a message type and
    its requests per site) that request travels in the same round trip and its replies come back too."""
    def combined(parts) -> dict[tuple[int, int], PathSummary]:
        return {(f, u): combine_path_summary([PathSummary(
                    train=NewtonSummary(loglik=float(p["loglik"][f, u]), grad=p["grad"][f, u], hess=p["hess"][f, u],
                                        n=int(p["n_train"][f]), events=int(p["events"][f])),
                    heldout=float(p["heldout"][f, u])) for p in parts])
                for f in range(parts[0]["loglik"].shape[0]) for u in range(parts[0]["loglik"].shape[1])}

    def evaluate(points: np.ndarray, also=None):
        summaries = (MODEL_SUMMARIES, {s: request(plan, points=points) for s in sites})
        if also is None:
            return combined(_ask_together(fed, sites, traffic, [summaries])[0])
        parts, extra = _ask_together(fed, sites, traffic, [summaries, also])
        return combined(parts), extra
    return evaluate


def _baseline_request(plan: dict, model: Model, columns: list[str], sites: list[str]):
    """``beta -> (MODEL_BASELINE, requests)``: what :func:`_after_fit` asks at the fitted β, so that the last
    Newton round (the evaluation at the returned β) can carry it; None when the model needs no baseline."""
    horizons = plan["study"]["outcome"]["horizons"]
    if not columns or model.share_event_times or not ((model.kind == "cox" and horizons) or model.nomogram):
        return None
    final = dict(plan, columns=columns, subsets=None)
    return lambda beta: (MODEL_BASELINE, {s: request(final, beta=beta, horizons=np.asarray(horizons, float))
                                          for s in sites})


def _ask_all(fed, sites, traffic, message_type, plan, **arrays) -> list[dict]:
    """Every site's reply arrays, in the order of ``sites``."""
    return _ask_together(fed, sites, traffic, [(message_type, {s: request(plan, **arrays) for s in sites})])[0]


def _ask_together(fed, sites, traffic, asks: list[tuple[str, dict]]) -> list[list[dict]]:
    """``[(message type, request per site)]`` in one round trip (server/shared_rounds.py): per ask, every
    site's reply arrays in the order of ``sites``; a site that fails any of them is dropped."""
    targets = {s: fed.sites[s] for s in sites}
    outcomes = fed.ask_many([(message_type, requests, targets) for message_type, requests in asks], traffic)
    failures = {s: reason for outcome in outcomes for s, reason in outcome.failures.items()}
    if failures:
        raise _SiteDropped(failures)
    return [[record_arrays(outcome.replies[s]["arrays"]) for s in sites] for outcome in outcomes]


def _risk_set_evaluator(fed, sites, plan, model: Model, traffic):
    """Unstratified exact Cox: one round for the union of event times, then risk-set sums per round."""
    grid = combine_cox_event_times([part["times"] for part in _ask_all(fed, sites, traffic, COX_EVENT_TIMES, plan)])
    log(INFO, "fit: model '%s': %d distinct event times shared by %d sites", model.name, len(grid), len(sites))

    def evaluate(points: np.ndarray) -> dict[tuple[int, int], PathSummary]:
        beta = points[0, 0]
        sums, n = _pooled_risk_sets(fed, sites, plan, beta, grid, traffic)
        return {(0, 0): PathSummary(train=cox_newton_from_risk_sets(sums, beta, ties=model.ties, n=n))}
    return evaluate


def _pooled_risk_sets(fed, sites, plan, beta, grid, traffic) -> tuple[RiskSetSums, int]:
    parts = _ask_all(fed, sites, traffic, COX_RISK_SETS, plan, beta=beta, grid=grid)
    fields = ("d", "x_events", "s0", "s1", "s2", "s0_tied", "s1_tied", "s2_tied")
    sums = combine_cox_risk_sets([RiskSetSums(times=grid, **{f: p[f] for f in fields}) for p in parts])
    return sums, int(sum(p["n"][0] for p in parts))


def _fit_once(fed, plan: dict, model: Model, sites, traffic) -> dict:
    logistic = model.kind == "logistic"
    names = (["intercept"] if logistic else []) + plan["columns"]
    try:
        if model.selection == "univariate":
            return _univariate_then_multivariable(fed, sites, plan, model, traffic)
        evaluate = _evaluator(fed, sites, plan, model.name, traffic)
        if model.share_event_times:
            evaluate = _risk_set_evaluator(fed, sites, plan, model, traffic)
        if model.penalty == "none":
            return _newton(evaluate, names, model, logistic, record=_newton_series(fed, model),
                           last=_baseline_request(plan, model, plan["columns"], sites))
        return _elastic_net(evaluate, names, model, logistic, plan["cv_folds"])
    except _FIT_ERRORS as exc:
        raise StageFailed(f"fit: model '{model.name}': {exc}") from None


def _univariate_then_multivariable(fed, sites, plan: dict, model: Model, traffic) -> dict:
    """The published studies' clinical model: each candidate alone (all candidates' Newton fits share
    every round trip), then one multivariable fit of those with univariate Wald p < ``univariate_p``;
    the columns with multivariable p < ``multivariable_p`` are the model's independent factors."""
    logistic = model.kind == "logistic"
    lead = [0] if logistic else []
    candidates = plan["columns"]
    subsets = [lead + [len(lead) + j] for j in range(len(candidates))]
    evaluate = _evaluator(fed, sites, dict(plan, subsets=subsets), model.name, traffic)

    def evaluate_all(states, active):  # every candidate's point in each round trip
        totals = evaluate(np.stack([s.beta for s in states.values()])[None])
        return {j: totals[(0, j)].train for j in active}

    def step(j, state, total):
        return _newton_step(state, total, (["intercept"] if logistic else []) + [candidates[j]], model, logistic)

    states, errors = run_newton(evaluate_all, {j: start_newton(len(lead) + 1) for j in range(len(candidates))}, step,
                                max_iter=MAX_NEWTON_ROUNDS, failures=_FIT_ERRORS,
                                message=lambda j, *_: f"fit: model '{model.name}': Newton for candidate "
                                                      f"'{candidates[j]}' did not converge in {MAX_NEWTON_ROUNDS} "
                                                      "iterations")
    dropped = {candidates[j]: str(exc) for j, exc in errors.items()}
    univariate = []
    for j, column in enumerate(candidates):
        if column in dropped:
            univariate.append({"covariate": column, "error": dropped[column]})
            continue
        if not states[j].converged:  # its p-value would be that of an unfinished fit
            univariate.append({"covariate": column, "error": f"Newton did not converge ({states[j].stop})"})
            continue
        names = (["intercept"] if logistic else []) + [column]
        beta, summary = fitted_point(states[j])
        row = wald_table(beta, summary.hess, names, exp_name="OR" if logistic else "HR").iloc[-1]
        univariate.append({"covariate": column, **row.to_dict(), "stop": stop_report(states[j])})
    entered = [r["covariate"] for r in univariate if "error" not in r and r["p"] < model.univariate_p]
    log(INFO, "fit: model '%s': %d of %d candidate(s) pass the univariate screen (p < %g): %s", model.name,
        len(entered), len(candidates), model.univariate_p, ", ".join(entered) or "none")
    selection = {"univariate": univariate, "entered": entered, "univariate_p": model.univariate_p,
                 "multivariable_p": model.multivariable_p}
    if not entered:
        return {"kind": model.kind, "penalty": "none", "converged": True, "coefficients": {}, "table": [],
                "independent": [], "columns": [], "selection": selection, "loglik": None}
    keep = [candidates.index(c) for c in entered]
    subset = lead + [len(lead) + j for j in keep]
    names = (["intercept"] if logistic else []) + entered
    result = _newton(_evaluator(fed, sites, dict(plan, subsets=[subset]), model.name, traffic), names, model,
                     logistic, record=_newton_series(fed, model), last=_baseline_request(plan, model, entered, sites))
    result["independent"] = [r["covariate"] for r in result["table"]
                             if r["covariate"] != "intercept" and r["p"] < model.multivariable_p]
    result["columns"] = entered
    result["selection"] = selection
    return result


def _newton_step(state, total, names, model: Model, logistic: bool):
    if logistic:
        return update_logistic_newton(state, total, ridge=model.ridge, names=names)
    return update_newton(state, total, ridge=model.ridge, names=names)


def _newton_series(fed: Federation, model: Model):
    """Write each Newton evaluation to the run log as it happens (the dashboard's convergence plot):
    round = evaluation number within this fit (1, 2, ...), log-likelihood and the largest |Δβ| (none when
    the step was halved)."""
    def record(evaluation: int, entry: dict) -> None:
        fed.runlog.series("fit", "loglik", evaluation, entry["loglik"], part=model.name)
        if not isinstance(entry["step"], str):
            fed.runlog.series("fit", "step", evaluation, entry["step"], part=model.name)
    return record


def _newton(evaluate, names, model: Model, logistic: bool, record=None, last=None) -> dict:
    """One Newton fit; ``last(beta)`` (see :func:`_baseline_request`) travels with the evaluation at the
    returned β, its replies kept in ``result["_last"]`` for :func:`_after_fit`."""
    def step(_, state, total):
        return _newton_step(state, total, names, model, logistic)

    kept = {}

    def evaluate_all(states, active):
        beta = states[0].beta
        if states[0].converged and last is not None:  # the confirming evaluation, at the returned β
            totals, kept["parts"] = evaluate(beta[None, None, :], also=last(beta))
        else:
            totals = evaluate(beta[None, None, :])
        return {0: totals[(0, 0)].train}

    states, _ = run_newton(evaluate_all, {0: start_newton(len(names))}, step, max_iter=MAX_NEWTON_ROUNDS,
                           on_step=None if record is None else lambda _, state: record(len(state.history),
                                                                                        state.history[-1]),
                           message=lambda *_: f"fit: model '{model.name}': Newton did not converge in "
                                              f"{MAX_NEWTON_ROUNDS} iterations", stacklevel=3)
    state = states[0]
    beta, summary = fitted_point(state)  # the returned β and the sums evaluated there
    table = wald_table(beta, summary.hess, names, exp_name="OR" if logistic else "HR")
    penalised = beta[1:] if logistic else beta  # the intercept is never penalised
    loglik = float(summary.loglik) + 0.5 * model.ridge * float(penalised @ penalised)
    null = float(state.loglik_null)
    if logistic:  # the intercept-only model (statsmodels' llnull), not β = 0
        null = logistic_null_loglik(summary.n, summary.events)
    return {
        "kind": model.kind, "penalty": "none", "converged": bool(state.converged), "stop": stop_report(state),
        "coefficients": dict(zip(names, map(float, beta))),
        "table": table.reset_index().to_dict(orient="records"),
        "loglik": loglik, "loglik_null": null,
        "n": int(summary.n), "events": int(summary.events),
        **({"_last": kept["parts"]} if "parts" in kept else {}),
    }


def _elastic_net(evaluate, names, model: Model, logistic: bool, cv: int) -> dict:
    p = len(names)
    factors = np.ones(p)
    beta0 = np.zeros(p)
    if logistic:  # start at the intercept-only fit so that λ_max is exact
        factors[0] = 0.0
        full = evaluate(np.zeros((cv + 1, 1, p)))[(cv, 0)].train
        if full.events in (0, full.n):
            raise FedradError(f"model '{model.name}': the outcome is constant across sites")
        beta0[0] = logistic_null_intercept(full.n, full.events)
    state = run_path(evaluate, cv + 1, Penalty(model.l1_ratio, factors), beta0, n_lambdas=model.n_alphas,
                     min_ratio=model.alpha_min_ratio)
    chosen, _, mean, se = path_choice(state, model.rule)
    coef = state.best_beta[-1, chosen]
    return {
        "kind": model.kind, "penalty": "elasticnet", "converged": True, "l1_ratio": model.l1_ratio,
        "rule": model.rule, "alpha": float(state.lambdas[chosen]),
        "coefficients": dict(zip(names, map(float, coef))),
        "selected": [n for n, c in zip(names, coef) if c != 0 and n != "intercept"],
        "alphas": state.lambdas.tolist(), "cv_mean": mean.tolist(), "cv_se": se.tolist(),
        "coef_path": state.best_beta[-1].tolist(), "cv_folds": cv,
    }


def _after_fit(fed, plan: dict, model: Model, result: dict, sites, horizons, traffic) -> dict:
    """One more round trip when the study needs it: Cox baseline hazard at the horizons (per site stratum,
    or exact pooled with shared event times) and pooled column moments for the nomogram axes."""
    columns = result.get("columns", plan["columns"])
    needs_baseline = model.kind == "cox" and horizons
    if not columns or not (needs_baseline or model.nomogram):
        result.pop("_last", None)
        return {}
    final = dict(plan, columns=columns, subsets=None)
    names = (["intercept"] if model.kind == "logistic" else []) + columns
    beta = np.array([result["coefficients"][c] for c in names])
    parts = result.pop("_last", None)  # asked with the last Newton round, at this β
    if parts is None:
        parts = _ask_all(fed, sites, traffic, MODEL_BASELINE, final, beta=beta, horizons=np.asarray(horizons, float))
    out = {}
    if needs_baseline:
        per_site = {s: [None if np.isnan(v) else float(v) for v in p["cumhaz"]] for s, p in zip(sites, parts)}
        if model.share_event_times:
            grid = combine_cox_event_times([p["times"] for p in _ask_all(fed, sites, traffic, COX_EVENT_TIMES, final)])
            sums, _ = _pooled_risk_sets(fed, sites, final, beta, grid, traffic)
            cumhaz = np.cumsum(sums.d / sums.s0)
            pooled = [float(cumhaz[grid <= t][-1]) if (grid <= t).any() else 0.0 for t in horizons]
            how = "one baseline for all sites (shared event times), Breslow"
        else:
            pooled = _average_cumhaz(parts, len(horizons))
            how = ("Breslow per site stratum; 'pooled' averages the sites' cumulative hazards weighted by cases "
                   "(sites that withheld a horizon, fewer than min_count at risk, are left out of it)")
        out["baseline"] = {"horizons": list(horizons), "cumhaz": {"pooled": pooled, **per_site},
                           "baseline_survival": [None if h is None else float(np.exp(-h)) for h in pooled],
                           "method": how}
    if model.nomogram:
        n = sum(float(p["n"][0]) for p in parts)
        ranges = axis_ranges(n, sum(p["col_sum"] for p in parts), sum(p["col_sumsq"] for p in parts),
                             np.all([p["col_binary"] > 0 for p in parts], axis=0),
                             np.all([p["col_integer"] > 0 for p in parts], axis=0),
                             np.all([p["col_nonnegative"] > 0 for p in parts], axis=0))
        coefficients = {c: result["coefficients"][c] for c in columns}
        nomogram = build_nomogram(coefficients, dict(zip(columns, ranges)),
                                  intercept=result["coefficients"].get("intercept", 0.0))
        out["nomogram"] = {**nomogram.to_dict(), "kind": model.kind,
                           "cumhaz": out.get("baseline", {}).get("cumhaz", {}).get("pooled")}
    return out


def _average_cumhaz(parts: list[dict], n_horizons: int) -> list[float | None]:
    pooled = []
    for h in range(n_horizons):
        pairs = [(float(p["n"][0]), p["cumhaz"][h]) for p in parts if not np.isnan(p["cumhaz"][h])]
        pooled.append(sum(n * c for n, c in pairs) / sum(n for n, _ in pairs) if pairs else None)
    return pooled
