"""The site's feature store: what `prepare` writes and every later stage reads.

Layout of ``STORE/``::

    features.parquet         one row per accepted case: patient_id, time, event, [scanner],
                             [mask_source], clinical columns, then '<phase>__<feature>' columns
    auto_masks/              masks `prepare --segment` drew for cases without one (mask_source
                             "automatic"; "manual" = the manifest's own mask)
    features_repeat.parquet  same feature columns from the repeat masks (ICC), if any
    quarantine.csv           patient_id, field, reason: every case left out, and why
    params.yaml              the pyradiomics settings used (its hash is in store.json)
    store.json               what the columns are, counts, versions, hashes
    cache/                   one JSON per extracted case, keyed by a content hash (resume)
    .prepare.lock            the pid of the `prepare` run writing the store (flock-ed while it runs)
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fedrad.common import schemas
from fedrad.common.errors import CaseError, StoreError

FORMAT = 1
FEATURES = "features.parquet"
REPEAT = "features_repeat.parquet"
QUARANTINE = "quarantine.csv"
PARAMS = "params.yaml"
META = "store.json"
CACHE = "cache"
AUTO_MASKS = "auto_masks"
LOCK = ".prepare.lock"
#: store column saying where a case's mask came from: "manual" (the manifest) or "automatic" (`prepare --segment`)
MASK_SOURCE = "mask_source"


@dataclass(frozen=True)
class FeatureStore:
    """A store opened for reading."""

    path: Path
    meta: dict
    features: pd.DataFrame
    repeat: pd.DataFrame | None
    quarantine: pd.DataFrame

    @property
    def feature_columns(self) -> list[str]:
        return list(self.meta["columns"]["features"])

    @property
    def clinical_columns(self) -> list[str]:
        return list(self.meta["columns"]["clinical"])

    @property
    def params_hash(self) -> str | None:
        return self.meta.get("params_hash")


def open_store(path: Path) -> FeatureStore:
    path = Path(path)
    meta_path = path / META
    if not meta_path.is_file():
        raise StoreError(f"'{path}' is not a fedrad feature store (no {META}); run `fedrad prepare` first")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise StoreError(f"store '{path}' has format {meta.get('format')}, this fedrad reads format {FORMAT}")
    features = pd.read_parquet(path / FEATURES)
    repeat = pd.read_parquet(path / REPEAT) if (path / REPEAT).is_file() else None
    quarantine = pd.read_csv(path / QUARANTINE, dtype=str, keep_default_na=False)
    if len(features) != meta["n_cases"]:
        raise StoreError(f"store '{path}': {FEATURES} has {len(features)} rows, {META} says {meta['n_cases']}")
    return FeatureStore(path=path, meta=meta, features=features, repeat=repeat, quarantine=quarantine)


def write_store(
    path: Path,
    *,
    rows: list[dict],
    repeat_rows: list[dict],
    problems: list[CaseError],
    columns: dict,
    meta: dict,
    params_text: str | None,
) -> dict:
    """Write the store's tables and metadata; return the metadata written.

    ``columns`` gives the roles: ``scanner`` (str or None), ``mask_source`` (str or None: rows
    carry "manual"/"automatic"), ``clinical`` and ``features`` (lists). Rows keep manifest
    order. Files are replaced atomically so a reader never sees a half-written store.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    order = [schemas.ID, schemas.TIME, schemas.EVENT]
    if columns.get("scanner"):
        order.append(schemas.SCANNER)
    if columns.get("mask_source"):
        order.append(MASK_SOURCE)
    order += list(columns["clinical"]) + list(columns["features"])
    table = pd.DataFrame(rows, columns=order)
    table[schemas.EVENT] = table[schemas.EVENT].astype("int8")
    for column in columns["clinical"]:  # a text value makes the whole column text (parquet needs one type)
        if table[column].map(lambda v: isinstance(v, str)).any():
            table[column] = table[column].map(lambda v: None if v is None or v != v else str(v))
        else:
            table[column] = table[column].astype(float)
    _atomic(path / FEATURES, lambda p: table.to_parquet(p, index=False))
    if repeat_rows:
        repeat = pd.DataFrame(repeat_rows, columns=[schemas.ID] + list(columns["features"]))
        _atomic(path / REPEAT, lambda p: repeat.to_parquet(p, index=False))
    elif (path / REPEAT).exists():
        (path / REPEAT).unlink()
    quarantine = pd.DataFrame(
        [(p.patient_id, p.field, p.reason) for p in problems], columns=[schemas.ID, "field", "reason"]
    )
    _atomic(path / QUARANTINE, lambda p: quarantine.to_csv(p, index=False))
    if params_text is not None:
        _atomic(path / PARAMS, lambda p: Path(p).write_text(params_text, encoding="utf-8"))
    elif (path / PARAMS).exists():  # the settings of the features this replaces, not of these
        (path / PARAMS).unlink()
    meta = dict(meta)
    meta.update(
        format=FORMAT,
        n_cases=len(table),
        n_events=int(table[schemas.EVENT].sum()),
        n_quarantined=int(quarantine[schemas.ID].nunique()),
        columns={"id": schemas.ID, "time": schemas.TIME, "event": schemas.EVENT, **columns},
        features_sha256=_sha256(path / FEATURES),
    )
    _atomic(path / META, lambda p: Path(p).write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8"))
    return meta


@contextmanager
def writing(path: Path, source: Path, *, kind: str = "manifest", overwrite: bool = False):
    """Hold the store's lock for one `prepare` run, once the store may be written from ``source``.

    ``kind`` is "manifest" or "table". Refused with a `StoreError`, before any case is read: a folder
    that cannot be written, a store another run is writing, and (unless ``overwrite``) a store built
    from another manifest or table, which the run would replace without a word.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        handle = open(path / LOCK, "a+", encoding="utf-8")
    except OSError as exc:
        raise _unwritable(path, exc) from exc
    with handle:
        _lock(handle, path)
        if not overwrite:
            _check_source(path, kind, Path(source).resolve())
        for folder in (path, path / CACHE):
            if folder.is_dir():  # a missing cache/ is made in a folder just found writable
                _check_writable(folder)
        yield


def _lock(handle, path: Path) -> None:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        raise StoreError(f"another `fedrad prepare` (pid {holder}) is writing the store '{path}'; wait for it "
                         "to finish, or give another --out") from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()


def _check_source(path: Path, kind: str, source: Path) -> None:
    if not (path / META).is_file():
        return
    meta = _read_meta(path)
    if meta is None:
        raise StoreError(f"'{path}' holds a store whose {META} cannot be read; give --overwrite to replace it, "
                         "or another --out")
    held_kind = "table" if meta.get("source") == "table" else "manifest"
    held = meta.get("table") if held_kind == "table" else meta.get("source_manifest") or meta.get("manifest")
    if (held_kind, str(held)) != (kind, str(source)):
        raise StoreError(f"'{path}' holds a store built from {held_kind} {held}, not from this run's {kind} "
                         f"{source}; give --overwrite to replace it, or another --out")


def _check_writable(folder: Path) -> None:
    """Without this a read-only --out fails with a traceback after the first case is extracted."""
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as exc:
        raise _unwritable(folder, exc) from exc


def _unwritable(folder: Path, exc: OSError) -> StoreError:
    return StoreError(f"cannot write to '{folder}' ({exc.strerror or exc}); give an --out folder you can write to")


def recorded_features_sha256(path: Path) -> str | None:
    """The features hash store.json recorded, or None where there is no readable store."""
    return (_read_meta(Path(path)) or {}).get("features_sha256")


def _read_meta(path: Path) -> dict | None:
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) else None


def cache_get(store: Path, key: str) -> dict | None:
    item = Path(store) / CACHE / f"{key}.json"
    if item.is_file():
        try:
            return json.loads(item.read_text(encoding="utf-8"))
        except json.JSONDecodeError:  # a crash mid-write; redo the case
            return None
    return None


def cache_put(store: Path, key: str, result: dict) -> None:
    folder = Path(store) / CACHE
    folder.mkdir(parents=True, exist_ok=True)
    _atomic(folder / f"{key}.json", lambda p: Path(p).write_text(json.dumps(result), encoding="utf-8"))


def _atomic(target: Path, write) -> None:
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, target)


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
