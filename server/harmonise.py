"""Stage `harmonise`: exact distributed ComBat, then pooled z-scoring.

Round trips (each one message per site):

1. ``query.combat_moments``   sites send XᵀX, Xᵀy, n per batch -> pooled location fit
2. ``query.combat_residuals`` sites send Σ(y-Xβ)², per-batch Σr, Σr² -> variance, EB estimates
3. ``query.combat_adjust``    sites adjust their rows (kept in the store) and send z-score moments
4. ``query.zscore_apply``     sites z-score with the pooled mean/SD (skipped when zscore = false)
5. ``query.combat_validate``  validation sites harmonise themselves to the finished reference
                              (their own batch effects, estimated locally; they send nothing back
                              but a count) — only when the study names validation sites, and in
                              the same round trip as 4 (server/shared_rounds.py)

ComBat itself takes 3. A site that fails mid-stage is dropped and the stage restarts
without it (a pooled fit that includes a site which then vanished would not equal ComBat
on the sites that remain); the stage fails once fewer than ``min_sites`` are left.
"""

from __future__ import annotations

import hashlib
import json
from logging import INFO
from pathlib import Path

import numpy as np
from flwr.common.logger import log

from fedrad.common.combat import (CombatMoments, CombatResiduals, DesignSpec, combine_combat_moments,
                           combine_combat_residuals, estimates_to_arrays, update_combat_estimates, update_combat_fit)
from fedrad.common.messages import (COMBAT_ADJUST, COMBAT_MOMENTS, COMBAT_RESIDUALS, COMBAT_VALIDATE, ZSCORE_APPLY,
                             record_arrays, request)
from fedrad.common.study import SITE_BATCH, Study
from fedrad.common.zscore import ZMoments, combine_zscore_moments, update_zscore
from fedrad.server.federation import Federation, StageFailed, StageTraffic
from fedrad.server.shared_rounds import SharedRounds

REFERENCE_NPZ = "harmonisation.npz"
REFERENCE_JSON = "harmonisation.json"


class _SiteDropped(Exception):
    def __init__(self, failures: dict[str, str]):
        self.failures = failures


def eligible_sites(census: dict, study: Study) -> tuple[list[str], dict[str, str]]:
    """Sites that can take part, and why the others cannot (from their census)."""
    sites, excluded = [], {}
    for name, info in census["sites"].items():
        if name in study.sites.validation:
            continue  # harmonised to the reference afterwards, never part of the fit
        if info["problems"]:
            excluded[name] = "; ".join(info["problems"])
        elif info["small_batch_levels"]:
            excluded[name] = (f"batch level(s) {', '.join(info['small_batch_levels'])} of '{study.harmonise.batch}' "
                              f"have fewer than min_count={study.privacy.min_count} cases here; merge them with a "
                              "similar level or harmonise by site")
        else:
            sites.append(name)
    return sites, excluded


def design_for(census: dict, sites: list[str], study: Study) -> dict:
    levels = sorted({lv for s in sites for lv in census["sites"][s]["batch_counts"]})
    categorical = {c: sorted({lv for s in sites for lv in census["sites"][s]["categorical_levels"].get(c, [])})
                   for c in study.harmonise.categorical}
    return {"batch_levels": levels, "categorical": categorical, "continuous": list(study.harmonise.continuous)}


def run_harmonise(fed: Federation, study: Study, census: dict, reference_dir: Path) -> dict:
    traffic = StageTraffic()
    sites, excluded = eligible_sites(census, study)
    attempts = []
    while True:
        if len(sites) < study.federation.min_sites:
            raise StageFailed(f"harmonise: {len(sites)} site(s) left, the study needs min_sites="
                              f"{study.federation.min_sites}; left out: "
                              + "; ".join(f"{n}: {r}" for n, r in excluded.items()))
        try:
            result = _harmonise_once(fed, study, census, sites, traffic, reference_dir)
            break
        except _SiteDropped as dropped:
            attempts.append({"sites": list(sites), "failed": dropped.failures})
            excluded.update(dropped.failures)
            sites = [s for s in sites if s not in dropped.failures]
            log(INFO, "harmonise: restarting without %s", ", ".join(dropped.failures))
    result.update(sites=sites, left_out=excluded, restarts=attempts, traffic=traffic.summary(),
                  round_trips=traffic.rounds)
    return result


def _harmonise_validation_sites(fed, study, census, traffic, result) -> dict:
    """Each validation site adjusts its own rows to the reference; a failure is recorded, not fatal."""
    sites = [s for s in study.sites.validation if s in census["sites"] and s in fed.sites]
    missing = {s: "not connected or refused at the census" for s in study.sites.validation if s not in sites}
    if not sites:
        return {"sites": [], "failed": missing}
    arrays = dict(np.load(Path(result["reference_dir"]) / REFERENCE_NPZ))
    plan = {"study": study.model_dump(mode="json"), "features": census["features"], "design": result["design"],
            "reference": result["reference"]}
    outcome = fed.ask("harmonise", traffic.rounds + 1, COMBAT_VALIDATE, {s: request(plan, **arrays) for s in sites},
                      {s: fed.sites[s] for s in sites}, traffic)
    done = {s: dict(c["counts"]) if "counts" in c else {} for s, c in outcome.replies.items()}
    log(INFO, "harmonise: %d validation site(s) harmonised to the reference", len(done))
    return {"sites": sorted(done), "failed": {**missing, **outcome.failures}}


def _ask(fed, traffic, round_no, message_type, sites, plan, **arrays):
    targets = {s: fed.sites[s] for s in sites}
    outcome = fed.ask("harmonise", round_no, message_type, {s: request(plan, **arrays) for s in sites}, targets,
                      traffic)
    if outcome.failures:
        raise _SiteDropped(outcome.failures)
    return {s: record_arrays(c["arrays"]) if "arrays" in c else {} for s, c in outcome.replies.items()}, outcome


def _harmonise_once(fed, study, census, sites, traffic, reference_dir) -> dict:
    h = study.harmonise
    design = design_for(census, sites, study)
    spec = DesignSpec(batch_levels=tuple(design["batch_levels"]),
                      categorical={k: tuple(v) for k, v in design["categorical"].items()},
                      continuous=tuple(design["continuous"]))
    features = census["features"]
    plan = {"study": study.model_dump(mode="json"), "features": features, "design": design}

    moments, _ = _ask(fed, traffic, 1, COMBAT_MOMENTS, sites, plan)
    total = combine_combat_moments([CombatMoments(m["xtx"], m["xty"], m["n_batch"]) for m in moments.values()])
    try:
        fit = update_combat_fit(total, spec)
    except ValueError as exc:
        raise StageFailed(f"harmonise: {exc}") from None

    fit_arrays = {"beta": fit.beta, "grand_mean": fit.grand_mean, "n_batch": fit.n_batch}
    residuals, _ = _ask(fed, traffic, 2, COMBAT_RESIDUALS, sites, plan, **fit_arrays)
    total_r = combine_combat_residuals([CombatResiduals(r["ss_resid"], r["sum_r"], r["sum_r2"], r["n_batch"])
                                        for r in residuals.values()])
    try:
        estimates = update_combat_estimates(fit, total_r, eb=h.eb, parametric=h.parametric, mean_only=h.mean_only,
                                            feature_names=features)
    except ValueError as exc:
        raise StageFailed(f"harmonise: {exc}") from None
    reference_arrays = estimates_to_arrays(estimates)
    combat_reference = _digest(reference_arrays, design, features)

    zparts, adjusted = _ask(fed, traffic, 3, COMBAT_ADJUST, sites, {**plan, "reference": combat_reference},
                     **reference_arrays)
    result = {
        "batch": h.batch,
        "batches": {lv: int(n) for lv, n in zip(spec.batch_levels, fit.n_batch)},
        "design": design,
        "settings": h.model_dump(mode="json"),
        "n_features": len(features),
        "eb_iterations": dict(zip(spec.batch_levels, estimates.eb_iterations)) if estimates.eb_iterations else {},
    }
    reference = combat_reference
    zscore_request = None
    if h.zscore:
        z = combine_zscore_moments([ZMoments(int(adjusted.replies[s]["counts"]["n"]), p["mean"], p["m2"])
                                    for s, p in zparts.items()])
        try:
            scale = update_zscore(z, feature_names=features)
        except ValueError as exc:
            raise StageFailed(f"harmonise: z-scoring: {exc}") from None
        reference_arrays.update(z_mean=scale.mean, z_sd=scale.sd)
        reference = _digest(reference_arrays, design, features)
        zscore_request = {**plan, "combat_reference": combat_reference, "reference": reference}, \
            {"mean": scale.mean, "sd": scale.sd}
    result["reference"] = reference
    result["reference_dir"] = str(reference_dir)
    _save_reference(reference_dir, reference, reference_arrays, design, features, h.model_dump(mode="json"))
    log(INFO, "harmonise: %d batch level(s) over %d site(s), %d features; reference %s", len(spec.batch_levels),
        len(sites), len(features), reference[:12])
    # the training sites z-score and the validation sites harmonise themselves in the same round trip
    last = {"validation": lambda view: _harmonise_validation_sites(view, study, census, StageTraffic(), result)}
    if zscore_request:
        last["zscore"] = lambda view: _ask(view, StageTraffic(), 4, ZSCORE_APPLY, sites, zscore_request[0],
                                           **zscore_request[1])
    result["validation"] = SharedRounds(fed, "harmonise", traffic).run(last)["validation"]
    return result


def _digest(arrays: dict[str, np.ndarray], design: dict, features: list[str]) -> str:
    """Content id of a fitted reference: sites record it, resume compares it."""
    h = hashlib.sha256(json.dumps([design, features], sort_keys=True).encode())
    for name in sorted(arrays):
        h.update(name.encode())
        h.update(np.ascontiguousarray(arrays[name], dtype=np.float64).tobytes())
    return h.hexdigest()


def _save_reference(folder: Path, reference: str, arrays: dict, design: dict, features: list[str],
                    settings: dict) -> None:
    """The fitted reference a new validation site needs to harmonise its own cases offline."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / REFERENCE_NPZ, **arrays)
    (folder / REFERENCE_JSON).write_text(json.dumps({
        "reference": reference, "arrays": REFERENCE_NPZ, "features": features, "design": design,
        "settings": settings, "batch_is_site": settings["batch"] == SITE_BATCH,
        "conventions": "neuroCombat 0.2.12: design = [batch one-hot | categorical (drop first) | continuous]; "
                       "var_pooled divides by n; z_mean/z_sd are the pooled mean and population SD of the "
                       "harmonised features",
    }, indent=2), encoding="utf-8")
