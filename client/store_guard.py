"""A site answers every stage of a run from the store its census described, or not at all.

A study's stages are answered minutes or hours apart. If a site re-runs `fedrad prepare`, or
someone edits ``features.parquet`` in between, the later stages would mix two versions of the
site's data with the census counts, the harmonisation and the model fitted so far. So the
census writes down what it saw (``STORE/census/<run id>.json``: the hash and row count of
``features.parquet``), and every later message of the same run checks the store against it
and is refused, with both versions named, when it changed. The record lives on disk, not in
Flower's ``context.state``, because a SuperNode that restarts mid-study loses that state.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pyarrow.parquet as pq

from fedrad.client.store import FEATURES
from fedrad.common.errors import FedradError

CENSUS_DIR = "census"


class StoreChanged(FedradError):
    """The store differs from what this run's census saw."""


def features_sha256(store: Path) -> str:
    """sha256 of the store's features.parquet as it is on disk now (not the hash store.json recorded)."""
    digest = hashlib.sha256()
    with open(Path(store) / FEATURES, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _rows(store: Path) -> int:
    return pq.ParquetFile(Path(store) / FEATURES).metadata.num_rows


def _record_path(store: Path, run_id: int) -> Path:
    return Path(store) / CENSUS_DIR / f"run-{int(run_id)}.json"


def remember_census(store: Path, run_id: int) -> str:
    """Write what this run's census saw; return the hash (the census reports it to the coordinator)."""
    seen = {"features_sha256": features_sha256(store), "rows": _rows(store), "at": time.time()}
    path = _record_path(store, run_id)
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(seen), encoding="utf-8")
    return seen["features_sha256"]


def check_unchanged(store: Path, run_id: int) -> None:
    """Refuse when the store is not the one this run's census saw. Without a record (the site never
    answered this run's census) there is nothing to check against; the coordinator roll-calls a
    late or restarted site, and compares the store hash it reports, before it takes part."""
    path = _record_path(store, run_id)
    if not path.is_file():
        return
    seen = json.loads(path.read_text(encoding="utf-8"))
    now = features_sha256(store)
    if now != seen["features_sha256"]:
        raise StoreChanged(
            f"its feature store changed since this run's census ({seen['rows']} → {_rows(store)} rows, "
            f"{FEATURES} {seen['features_sha256'][:12]} → {now[:12]}); answering would mix two versions of the "
            "site's data. Restore the store, or run the study again (its census takes the new store)")
