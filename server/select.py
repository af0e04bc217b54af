"""Stage `select`: reproducibility, univariate screens and mRMR, in one round trip.

Each site sends, for the candidate features, its ICC sums (cases with a repeat
delineation), the score and information of every one-feature Cox (stratified by site) or
logistic model at β = 0, and its centred cross-products. The coordinator keeps features with
ICC ≥ ``icc_threshold`` (skipped, and said so, when no site has enough repeat cases), then
those whose Benjamini-Hochberg q ≤ ``fdr`` among the survivors, then ``max_features`` by mRMR
on the pooled correlation matrix with relevance √(χ²/n). Models name the result with
``features = ["@select"]``.
"""

from __future__ import annotations

from logging import INFO

import numpy as np
from flwr.common.logger import log

from fedrad.common.correlation import CrossProducts, combine_correlation, mrmr, relevance_from_statistic, update_correlation
from fedrad.common.icc import IccSums, combine_icc, update_icc
from fedrad.common.messages import SELECT_SUMS, record_arrays, request
from fedrad.common.screen import (CoxScreenSums, LogisticScreenSums, bh_fdr, combine_cox_screen, combine_logistic_screen,
                           update_cox_screen, update_logistic_screen)
from fedrad.common.study import Features, Study, select_features
from fedrad.server.federation import Federation, StageFailed, StageTraffic
from fedrad.server.fit import data_mode, study_sites


def run_select(fed: Federation, study: Study, census: dict, harmonise: dict | None) -> dict:
    s = study.select
    traffic = StageTraffic()
    candidates = select_features(census["features"], Features(include=s.features, exclude=s.exclude))
    if not candidates:
        raise StageFailed(f"select: no feature matches {list(s.features)}")
    sites = study_sites(census, harmonise, fed, study)
    plan = {
        "study": study.model_dump(mode="json"), "features": candidates, "outcome": s.outcome, "ties": "efron",
        "time": study.outcome.time, "event": study.outcome.event,
        "binary_outcome": s.binary_outcome or study.outcome.event,
        "data": data_mode(harmonise),
        "reference": harmonise["reference"] if harmonise else "",
        "deep_features_id": census.get("deep_features_id", ""),
    }
    outcome = fed.ask("select", 1, SELECT_SUMS, {site: request(plan) for site in sites},
                      {site: fed.sites[site] for site in sites}, traffic)
    if len(outcome.replies) < study.federation.min_sites:
        raise StageFailed(f"select: {len(outcome.replies)} site(s) answered, the study needs min_sites="
                          f"{study.federation.min_sites}; " + "; ".join(f"{k}: {v}" for k, v in outcome.failures.items()))
    parts = {site: (record_arrays(c["arrays"]), c["counts"]) for site, c in outcome.replies.items()}

    keep = np.arange(len(candidates))
    icc_parts = [IccSums(n=int(c["icc_n"]), rater_mean=a["icc_rater_mean"], ss_cases=a["icc_ss_cases"],
                         ss_error=a["icc_ss_error"]) for a, c in parts.values() if int(c["icc_n"]) > 0]
    icc = None
    if icc_parts:
        icc = update_icc(combine_icc(icc_parts), s.icc_kind, feature_names=candidates)
        keep = keep[icc[keep] >= s.icc_threshold]
    after_icc = len(keep)

    if s.outcome == "logistic":
        screen = update_logistic_screen(combine_logistic_screen([
            LogisticScreenSums(n=int(c["screen_n"]), events=int(c["screen_events"]), mean=a["screen_mean"],
                               m2=a["screen_m2"], sxy=a["screen_sxy"]) for a, c in parts.values()]))
        relevance_n = screen.n
    else:
        screen = update_cox_screen(combine_cox_screen([
            CoxScreenSums(score=a["screen_score"], information=a["screen_information"], n=int(c["screen_n"]),
                          events=int(c["screen_events"])) for a, c in parts.values()]))
        relevance_n = screen.events
    q = np.full(len(candidates), np.nan)
    if len(keep):
        q[keep] = bh_fdr(screen.p_value[keep])
        keep = keep[q[keep] <= s.fdr]
    after_screen = len(keep)

    correlation = update_correlation(combine_correlation([
        CrossProducts(n=int(c["n"]), mean=a["corr_mean"], m=a["corr_m"]) for a, c in parts.values()]))
    chosen: list[int] = []
    if len(keep):
        relevance = relevance_from_statistic(screen.statistic[keep], relevance_n)
        picked = mrmr(relevance, correlation[np.ix_(keep, keep)], min(s.max_features, len(keep)),
                      names=[candidates[i] for i in keep])
        chosen = [int(keep[i]) for i in picked]
    if not chosen:
        raise StageFailed(f"select: no feature survived (ICC ≥ {s.icc_threshold}: {after_icc}, "
                          f"q ≤ {s.fdr}: {after_screen}); relax the thresholds")
    table = [{"feature": f, "icc": None if icc is None else float(icc[i]), "chi2": float(screen.statistic[i]),
              "p": float(screen.p_value[i]), "q": None if np.isnan(q[i]) else float(q[i]),
              "selected": i in chosen} for i, f in enumerate(candidates)]
    result = {
        "candidates": len(candidates),
        "icc": {"used": icc is not None, "kind": s.icc_kind, "threshold": s.icc_threshold, "kept": after_icc,
                "repeat_cases": sum(p.n for p in icc_parts)},
        "screen": {"model": s.outcome, "fdr": s.fdr, "kept": after_screen},
        "mrmr": {"max_features": s.max_features, "kept": len(chosen)},
        "selected": [candidates[i] for i in chosen],
        "table": table, "sites": list(parts), "left_out": outcome.failures, "traffic": traffic.summary(),
    }
    log(INFO, "select: %d candidates -> ICC %d -> screen %d -> mRMR %d", len(candidates), after_icc, after_screen,
        len(chosen))
    return result
