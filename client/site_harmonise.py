"""ComBat and z-scoring at a site: the site half of `server/harmonise.py`, round by round.

Each function answers one message type with aggregates (a Disclosure says what they were
computed from) and leaves the adjusted rows in the store.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
from flwr.app import MetricRecord, RecordDict

from fedrad.client.privacy import Disclosure, two_valued
from fedrad.client.site_data import (HARMONISED, STANDARDISED, harmonise_columns, harmonise_inputs, read_harmonised_meta,
                              site_log, write_feature_table, write_harmonised_meta)
from fedrad.client.store import FeatureStore
from fedrad.common import schemas
from fedrad.common.errors import StoreError
from fedrad.common.combat import (CombatFit, design_matrix, estimates_from_arrays, site_combat_adjust, site_combat_moments,
                           site_combat_new_batch, site_combat_residuals)
from fedrad.common.messages import arrays_record
from fedrad.common.study import Study
from fedrad.common.zscore import ZScale, site_zscore_apply, site_zscore_moments


def _features_axis(disclosure: Disclosure, y) -> Disclosure:
    return replace(disclosure, shared_axes=disclosure.shared_axes | {y.shape[1]})


def _disclosure(ids, X, spec) -> Disclosure:
    """Groups the sums are taken over: each batch level, each level of each categorical covariate (a one-case
    level would make its row of Xᵀy that patient's features) and each value of a two-valued continuous
    covariate (a 0/1 column given as continuous is a binary covariate all the same). The design is the columns
    not all zero here (another site's batch levels add nothing): Xᵀ X and Xᵀ y of a design with p ≥ n − min_count
    columns are refused like a model's Newton terms."""
    counts = X[:, : spec.n_batch].sum(axis=0)
    groups = {f"batch '{lv}'": int(c) for lv, c in zip(spec.batch_levels, counts)}
    column = spec.n_batch
    for name, levels in spec.categorical.items():
        dummies = X[:, column: column + len(levels) - 1]
        groups[f"covariate '{name}' level '{levels[0]}'"] = int(len(X) - dummies.sum())
        groups.update({f"covariate '{name}' level '{lv}'": int(c) for lv, c in zip(levels[1:], dummies.sum(axis=0))})
        column += len(levels) - 1
    values = two_valued([f"column '{name}'" for name in spec.continuous], X[:, column:])
    used = int(np.any(X != 0, axis=0).sum())
    return Disclosure(n_cases=len(ids), identifiers=frozenset(ids), groups=groups,
                      shared_axes=frozenset({X.shape[1], spec.n_batch}), values=values,
                      designs={"ComBat design (batch and covariates)": (used, len(X))})


def moments_reply(store: FeatureStore, plan: dict, study: Study, site: str) -> tuple[RecordDict, Disclosure]:
    ids, y, X, spec = harmonise_inputs(store.features, plan, study.harmonise, site)
    m = site_combat_moments(y, X, spec)
    return (RecordDict({"arrays": arrays_record(xtx=m.xtx, xty=m.xty, n_batch=m.n_batch)}),
            _features_axis(_disclosure(ids, X, spec), y))


def residuals_reply(store: FeatureStore, plan: dict, study: Study, site: str, arrays: dict) -> tuple[RecordDict, Disclosure]:
    ids, y, X, spec = harmonise_inputs(store.features, plan, study.harmonise, site)
    fit = CombatFit(beta=arrays["beta"], grand_mean=arrays["grand_mean"], n_batch=arrays["n_batch"], spec=spec)
    r = site_combat_residuals(y, X, fit)
    content = RecordDict({"arrays": arrays_record(ss_resid=r.ss_resid, sum_r=r.sum_r, sum_r2=r.sum_r2,
                                                  n_batch=r.n_batch)})
    return content, _features_axis(_disclosure(ids, X, spec), y)


def adjust_reply(store: FeatureStore, plan: dict, study: Study, site: str, arrays: dict, run_id: int) -> tuple[RecordDict, Disclosure]:
    """Adjust this site's rows, keep them in the store, and return their z-score moments."""
    ids, y, X, spec = harmonise_inputs(store.features, plan, study.harmonise, site)
    adjusted = site_combat_adjust(y, X, estimates_from_arrays(arrays, spec))
    write_feature_table(store.path, HARMONISED, store.features, plan["features"], adjusted)
    write_harmonised_meta(store.path, {
        "reference": plan["reference"], "run": run_id, "batch": study.harmonise.batch,
        "features": plan["features"], "zscored": False,
    })
    z = site_zscore_moments(adjusted)
    content = RecordDict({"arrays": arrays_record(mean=z.mean, m2=z.m2), "counts": MetricRecord({"n": z.n})})
    return content, _features_axis(_disclosure(ids, X, spec), y)


def zscore_reply(store: FeatureStore, plan: dict, arrays: dict, run_id: int) -> tuple[RecordDict, Disclosure]:
    """z-score the harmonised rows with the pooled mean/SD; reply with an acknowledgement only."""
    meta = read_harmonised_meta(store.path)
    if meta.get("reference") != plan["combat_reference"]:
        raise StoreError("this site's harmonised.parquet comes from another ComBat fit; rerun the harmonise stage")
    table = pd.read_parquet(store.path / HARMONISED)
    features = plan["features"]
    scale = ZScale(mean=arrays["mean"], sd=arrays["sd"])
    write_feature_table(store.path, STANDARDISED, table, features,
                        site_zscore_apply(table[features].to_numpy(np.float64), scale))
    meta.update(reference=plan["reference"], run=run_id, zscored=True)
    write_harmonised_meta(store.path, meta)
    ids = table[schemas.ID].astype(str)
    return RecordDict({"counts": MetricRecord({"n": len(table)})}), Disclosure(n_cases=len(table),
                                                                               identifiers=frozenset(ids))


def validate_reply(store: FeatureStore, plan: dict, study: Study, site: str, arrays: dict, run_id: int) -> tuple[RecordDict, Disclosure]:
    """A validation site harmonises itself to the training reference and sends back counts only.

    A batch level the training sites had (a shared scanner model) uses the reference's γ*, δ*;
    a level they never had (batch = site, or a new scanner) gets its own γ*, δ* estimated here
    against the reference's grand mean, pooled variance and covariate effects
    (:func:`fedrad.common.combat.site_combat_new_batch`). Then the reference z-scores apply.
    """
    table = store.features
    features = plan["features"]
    harmonise = study.harmonise
    labels, covariates, y, spec = harmonise_columns(table, plan, harmonise, site)
    placeholder = np.full(len(table), spec.batch_levels[0])  # only the covariate columns are used
    covariate_design = design_matrix(placeholder, covariates, spec)[:, spec.n_batch:]
    estimates = estimates_from_arrays(arrays, spec)
    adjusted = np.empty_like(y)
    known, new = [], []
    for level in sorted(set(labels)):
        rows = labels == level
        if level in spec.batch_levels:
            design = design_matrix(labels[rows], {k: v[rows] for k, v in covariates.items()}, spec)
            adjusted[rows] = site_combat_adjust(y[rows], design, estimates)
            known.append(level)
        else:
            adjusted[rows], _ = site_combat_new_batch(
                y[rows], covariate_design[rows], estimates, eb=harmonise.eb, parametric=harmonise.parametric,
                mean_only=harmonise.mean_only, level=level)
            new.append(level)
    write_feature_table(store.path, HARMONISED, table, features, adjusted)
    if harmonise.zscore:
        write_feature_table(store.path, STANDARDISED, table, features,
                            site_zscore_apply(adjusted, ZScale(mean=arrays["z_mean"], sd=arrays["z_sd"])))
    write_harmonised_meta(store.path, {"reference": plan["reference"], "run": run_id, "batch": harmonise.batch,
                                       "features": features, "zscored": bool(harmonise.zscore),
                                       "role": "validation", "known_levels": known, "new_levels": new})
    site_log(store.path, f"harmonised to reference {plan['reference'][:12]} as a validation site: "
             f"{len(known)} batch level(s) from the reference, {len(new)} estimated here ({', '.join(new)})")
    counts = MetricRecord({"n": len(table), "known_levels": len(known), "new_levels": len(new)})
    return RecordDict({"counts": counts}), Disclosure(n_cases=len(table), identifiers=frozenset(table[schemas.ID].astype(str)))
