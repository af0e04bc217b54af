"""Reading a site's store into the arrays a stage needs, and writing what stays at the site.

Outputs that stay at the site (``STORE/``)::

    harmonised.parquet    ComBat-adjusted features: same ids and columns as features.parquet
    standardised.parquet  the same, z-scored with the pooled mean and SD
    harmonised.json       the reference both were made with (id, features, batch, z-scale)
    deep_features.parquet the CNN's penultimate layer per case (``deep__cnn_*``), and
    deep_features.json    the id of the network that made them
    site.log              what the site's staff need to fix (with patient ids: it never leaves)
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from fedrad.client.store import FEATURES, _atomic
from fedrad.common import schemas
from fedrad.common.errors import StoreError
from fedrad.common.combat import DesignSpec, design_matrix
from fedrad.common.study import SITE_BATCH, Harmonise

HARMONISED = "harmonised.parquet"
STANDARDISED = "standardised.parquet"
HARMONISED_META = "harmonised.json"
SITE_LOG = "site.log"
DEEP_FEATURES = "deep_features.parquet"
DEEP_FEATURES_META = "deep_features.json"
#: What the study stages made from features.parquet and its cases: stale once `prepare` writes other features.
#: Not here: census/ (the store guard compares its hash), dp_accountant.json (privacy spent stays spent),
#: site.log and the ledger.
DERIVED = (HARMONISED, STANDARDISED, HARMONISED_META, DEEP_FEATURES, DEEP_FEATURES_META)
#: STORE/scores.parquet (`site_fit.SCORES`) may also hold scores the site supplied itself, per case; only the
#: network's column is made from the features.
SCORES, DERIVED_SCORE_COLUMNS = "scores.parquet", ("dl_score",)


def remove_derived(store_path: Path) -> list[str]:
    """Delete what the store holds that was made from its features (the `DERIVED` files, the DL-score column of
    scores.parquet, which keeps the site's own scores); return what went, for the prepare report."""
    store_path = Path(store_path)
    removed = [name for name in DERIVED if (store_path / name).is_file()]
    for name in removed:
        (store_path / name).unlink()
    scores_path = store_path / SCORES
    if scores_path.is_file():
        scores = pd.read_parquet(scores_path)
        made = [c for c in DERIVED_SCORE_COLUMNS if c in scores.columns]
        if made:
            kept = scores.drop(columns=made)
            if set(kept.columns) <= {schemas.ID}:
                scores_path.unlink()
            else:
                _atomic(scores_path, lambda path: kept.to_parquet(path, index=False))
            removed.append(f"{SCORES} ({', '.join(made)})")
    return removed


def site_log(store_path: Path, text: str) -> None:
    with open(Path(store_path) / SITE_LOG, "a", encoding="utf-8") as fh:
        fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {text}\n")


def batch_labels(table: pd.DataFrame, batch: str, site: str) -> tuple[pd.Series | None, str | None]:
    """Each case's batch label (the site's own name when batching by site), or a problem."""
    if batch == SITE_BATCH:
        return pd.Series([site] * len(table), index=table.index), None
    if batch not in table.columns:
        return None, f"batch column '{batch}' is not a column of the store"
    labels = table[batch]
    if labels.isna().any():
        return None, f"batch column '{batch}' is empty for some cases (listed in the site log)"
    return labels.astype(str), None


def design_spec(plan: dict) -> DesignSpec:
    design = plan["design"]
    return DesignSpec(batch_levels=tuple(design["batch_levels"]),
                      categorical={k: tuple(v) for k, v in design["categorical"].items()},
                      continuous=tuple(design["continuous"]))


def harmonise_columns(table: pd.DataFrame, plan: dict, harmonise: Harmonise, site: str):
    """(batch labels, covariates, y, spec) of this site's rows, checked: what ComBat reads."""
    features = plan["features"]
    absent = [c for c in features if c not in table.columns]
    if absent:
        raise StoreError(f"the store lacks {len(absent)} feature column(s) the study uses, e.g. {absent[:3]}")
    labels, problem = batch_labels(table, harmonise.batch, site)
    if problem:
        raise StoreError(problem)
    covariates = {name: table[name].to_numpy() for name in (*harmonise.categorical, *harmonise.continuous)}
    y = table[features].to_numpy(dtype=np.float64)
    if not np.all(np.isfinite(y)):
        raise StoreError("feature values include NaN/inf")
    return labels.astype(str).to_numpy(), covariates, y, design_spec(plan)


def harmonise_inputs(table: pd.DataFrame, plan: dict, harmonise: Harmonise, site: str):
    """(ids, y, X, spec) for ComBat: features, design matrix in the study's global levels."""
    labels, covariates, y, spec = harmonise_columns(table, plan, harmonise, site)
    X = design_matrix(labels, covariates, spec)
    return table[schemas.ID].astype(str).to_numpy(), y, X, spec


def write_feature_table(store_path: Path, name: str, table: pd.DataFrame, features: list[str], values) -> None:
    """A copy of features.parquet with ``features`` replaced by ``values`` (same ids, same columns)."""
    out = table.copy()
    out[features] = values
    _atomic(Path(store_path) / name, lambda p: out.to_parquet(p, index=False))


def write_harmonised_meta(store_path: Path, meta: dict) -> None:
    _atomic(Path(store_path) / HARMONISED_META, lambda p: Path(p).write_text(json.dumps(meta, indent=2), encoding="utf-8"))


def read_harmonised_meta(store_path: Path) -> dict:
    return json.loads((Path(store_path) / HARMONISED_META).read_text(encoding="utf-8"))


__all__ = ["HARMONISED", "STANDARDISED", "HARMONISED_META", "SITE_LOG", "FEATURES", "DERIVED", "remove_derived",
           "site_log", "batch_labels",
           "design_spec", "harmonise_inputs", "write_feature_table", "write_harmonised_meta", "read_harmonised_meta"]


def write_deep_features(store_path: Path, table: pd.DataFrame, weights_id: str) -> None:
    _atomic(Path(store_path) / DEEP_FEATURES, lambda p: table.to_parquet(p, index=False))
    _atomic(Path(store_path) / DEEP_FEATURES_META, lambda p: Path(p).write_text(json.dumps({"weights_id": weights_id}), encoding="utf-8"))


def with_deep_features(store_path: Path, table: pd.DataFrame, weights_id: str | None) -> pd.DataFrame:
    """``table`` with the CNN's deep features of its cases joined on; ``weights_id`` (when given) must be the
    network of the study that asks, so features of an older network are never mixed in."""
    path, meta = Path(store_path) / DEEP_FEATURES, Path(store_path) / DEEP_FEATURES_META
    if not path.is_file():
        raise StoreError("this site has no deep features (run the train_cnn stage first)")
    held = json.loads(meta.read_text(encoding="utf-8")).get("weights_id") if meta.is_file() else None
    if weights_id and held != weights_id:
        raise StoreError("this site's deep features come from another network than the study's CNN "
                         f"({(held or 'unknown')[:12]} vs {weights_id[:12]}); rerun the train_cnn stage")
    deep = pd.read_parquet(path)
    deep[schemas.ID] = deep[schemas.ID].astype(str)
    merged = table.assign(**{schemas.ID: table[schemas.ID].astype(str)}).merge(deep, on=schemas.ID, how="left")
    lacking = merged[[c for c in deep.columns if c != schemas.ID]].isna().any(axis=1)
    if lacking.any():
        site_log(store_path, "deep features missing for: " + ", ".join(merged.loc[lacking, schemas.ID]))
        raise StoreError(f"{int(lacking.sum())} case(s) have no deep features (ids in site.log); rerun train_cnn")
    return merged
