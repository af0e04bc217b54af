"""Census at a site: counts, feature availability and settings, never a patient row.

Batch levels with fewer than ``min_count`` cases are named but their counts withheld, so
the coordinator can say which scanner is too rare here without learning how rare.
"""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import ConfigRecord, MetricRecord, RecordDict

from fedrad import common
from fedrad.client.privacy import Disclosure
from fedrad.client.site_data import HARMONISED_META, batch_labels, site_log
from fedrad.client.store import FeatureStore, PARAMS
from fedrad.client.store_guard import features_sha256
from fedrad.common import schemas
from fedrad.common.errors import StoreError
from fedrad.common.study import Study, select_features


def census_reply(store: FeatureStore, study: Study, site: str, min_count: int) -> tuple[RecordDict, Disclosure]:
    table = store.features
    ids = frozenset(table[schemas.ID].astype(str))
    n = len(table)
    for role, column in (("outcome time", study.outcome.time), ("outcome event", study.outcome.event)):
        if column not in table.columns:
            raise StoreError(f"the store has no column '{column}' ({role} in the study)")
        if table[column].dtype.kind not in "biuf":
            raise StoreError(f"column '{column}' ({role} in the study) is not numeric at this site")
    features = select_features(store.feature_columns, study.features)
    problems = []
    levels, counts, small = [], [], []
    if "harmonise" in study.study.stages:
        batch, batch_problem = batch_labels(table, study.harmonise.batch, site)
        if batch_problem:
            problems.append(batch_problem)
            if study.harmonise.batch in table.columns:
                empty = table.loc[table[study.harmonise.batch].isna(), schemas.ID].astype(str).tolist()
                site_log(store.path, f"batch column '{study.harmonise.batch}' is empty for: {', '.join(empty)}")
        else:
            for level, size in sorted(batch.value_counts().items()):
                (levels if size >= min_count else small).append(str(level))
                if size >= min_count:
                    counts.append(int(size))
        problems += _covariate_problems(table, study, store.path)
    category_levels = {}
    for name in study.harmonise.categorical if "harmonise" in study.study.stages else ():
        if name in table.columns:
            sizes = table[name].dropna().astype(str).value_counts()
            category_levels[name] = sorted(str(v) for v in sizes.index[sizes >= min_count])
            if (sizes < min_count).any():  # level names withheld: a rare value can identify a patient
                problems.append(f"covariate '{name}' has level(s) with fewer than min_count={min_count} cases "
                                "here; merge rare levels or leave the covariate out")
                site_log(store.path, f"covariate '{name}' small levels: {sizes[sizes < min_count].to_dict()}")
    site_record = ConfigRecord({
        "name": site,
        "fedrad_version": common.__version__,
        "params_hash": store.params_hash or "",
        "params_yaml": _params_text(store.path),
        "features": features,
        "batch_levels": levels,
        "small_batch_levels": small,
        "problems": problems,
        "harmonised_reference": _harmonised_reference(store.path),
        "store_sha256": features_sha256(store.path),  # as on disk now: the later stages check against it
    })
    for name, names in category_levels.items():
        site_record[f"levels:{name}"] = names
    counts_record = MetricRecord({
        "cases": n,
        "events": int(table[study.outcome.event].sum()) if study.outcome.event in table.columns else 0,
        "quarantined": int(store.meta.get("n_quarantined", 0)),
        "repeat_cases": 0 if store.repeat is None else int(store.repeat[schemas.ID].nunique()),
        "features_in_store": len(store.feature_columns),
        "batch_counts": counts,
        "min_count": min_count,  # effective: the larger of the study's and this site's own (--min-count)
    })
    for problem in problems:
        site_log(store.path, f"census: {problem}")
    disclosure = Disclosure(n_cases=n, groups={f"batch '{lv}'": c for lv, c in zip(levels, counts)}, identifiers=ids)
    return RecordDict({"site": site_record, "counts": counts_record}), disclosure


def _covariate_problems(table, study: Study, store_path: Path) -> list[str]:
    problems = []
    for name in study.harmonise.categorical + study.harmonise.continuous:
        if name not in table.columns:
            problems.append(f"covariate '{name}' is not a column of the store")
            continue
        missing = table.loc[table[name].isna(), schemas.ID].astype(str).tolist()
        if missing:
            site_log(store_path, f"covariate '{name}' is missing for: {', '.join(missing)}")
            problems.append(f"covariate '{name}' is missing for some cases (listed in the site log)")
    for name in study.harmonise.continuous:
        if name in table.columns and table[name].dtype.kind not in "biuf":
            problems.append(f"continuous covariate '{name}' is not numeric at this site")
    return problems


def _params_text(store_path: Path) -> str:
    """The extraction settings (pyradiomics YAML): the model package hands them to new sites."""
    path = Path(store_path) / PARAMS
    return path.read_text(encoding="utf-8") if path.is_file() else ""


def _harmonised_reference(store_path: Path) -> str:
    meta = Path(store_path) / HARMONISED_META
    if not meta.is_file():
        return ""
    try:
        return str(json.loads(meta.read_text(encoding="utf-8")).get("reference", ""))
    except json.JSONDecodeError:
        return ""
