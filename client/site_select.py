"""Feature-selection sums at a site: the site half of `server/select.py`, in one message.

Reproducibility (ICC) uses the original features of cases with a repeat delineation
(features.parquet vs features_repeat.parquet); the univariate screens and the correlation
matrix use the rows the models will see (standardised when the study harmonised).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from flwr.app import MetricRecord, RecordDict

from fedrad.client.privacy import Disclosure, two_valued
from fedrad.client.site_fit import model_table
from fedrad.client.store import FeatureStore
from fedrad.common import schemas
from fedrad.common.correlation import site_correlation
from fedrad.common.errors import StoreError
from fedrad.common.icc import site_icc
from fedrad.common.messages import arrays_record
from fedrad.common.screen import site_cox_screen, site_logistic_screen


def select_sums_reply(store: FeatureStore, plan: dict, min_count: int) -> tuple[RecordDict, Disclosure]:
    features = plan["features"]
    table = model_table(store, plan)
    absent = [c for c in features if c not in table.columns]
    if absent:
        raise StoreError(f"select: the store lacks {len(absent)} candidate feature(s), e.g. {absent[:3]}")
    X = table[features].to_numpy(dtype=float)
    # a two-valued candidate (a 0/1 column) splits the cases: its screen and correlation sums count and sum
    # over each part. The screens are univariate and the correlation matrix a Gram matrix (rows determined only
    # up to a rotation), so the design-width rule of the fit does not apply to the candidates here.
    labels = [f"column '{c}'" for c in features]
    values = two_valued(labels, X)
    if plan["outcome"] == "logistic":
        y = pd.to_numeric(table[plan["binary_outcome"]], errors="coerce")
        keep = y.notna().to_numpy()
        groups = {"cases without the outcome": int((~keep).sum())}
        if not keep.all():  # the logistic screen covers the cases with the outcome only
            values.update(two_valued([f"{label} (cases with the outcome)" for label in labels], X[keep]))
        screen = site_logistic_screen(X[keep], y[keep].to_numpy(dtype=float))
        screen_arrays = dict(screen_mean=screen.mean, screen_sxy=screen.sxy, screen_m2=screen.m2)
    else:
        screen = site_cox_screen(X, table[plan["time"]].to_numpy(dtype=float),
                                 table[plan["event"]].to_numpy(dtype=bool), ties=plan["ties"])
        screen_arrays = dict(screen_score=screen.score, screen_information=screen.information)
        groups = {}
    cross = site_correlation(X)
    arrays = dict(screen_arrays, corr_mean=cross.mean, corr_m=cross.m)
    counts = {"n": len(table), "screen_n": int(screen.n), "screen_events": int(screen.events), "icc_n": 0}
    repeats = _repeat_measurements(store, features)
    # ICC sums cover the repeat cases; with the site totals they also give the other cases' sums by
    # difference, so both groups must reach min_count (else the site sends no ICC sums at all).
    others = len(table) - (0 if repeats is None else len(repeats))
    if repeats is not None and len(repeats) >= min_count and (others == 0 or others >= min_count):
        icc = site_icc(repeats)
        arrays.update(icc_rater_mean=icc.rater_mean, icc_ss_cases=icc.ss_cases, icc_ss_error=icc.ss_error)
        counts["icc_n"] = icc.n
        groups["cases with a repeat delineation"] = icc.n
        groups["cases without a repeat delineation"] = len(table) - icc.n
    ids = frozenset(table[schemas.ID].astype(str))
    return (RecordDict({"arrays": arrays_record(**arrays), "counts": MetricRecord(counts)}),
            Disclosure(n_cases=len(table), groups=groups, identifiers=ids, shared_axes=frozenset({len(features)}),
                       values=values))


def _repeat_measurements(store: FeatureStore, features: list[str]) -> np.ndarray | None:
    """(n_cases, 2, n_features) original features, first and repeat delineation, or None without repeats."""
    if store.repeat is None or not all(c in store.repeat.columns for c in features):
        return None
    first = store.features.set_index(schemas.ID)
    repeat = store.repeat.set_index(schemas.ID)
    both = [pid for pid in repeat.index if pid in first.index]
    if not both:
        return None
    pairs = np.stack([first.loc[both, features].to_numpy(float), repeat.loc[both, features].to_numpy(float)], axis=1)
    return pairs[np.isfinite(pairs).all(axis=(1, 2))]  # complete repeat cases only
