"""`fedrad prepare --table`: a site's ready-made feature table becomes a feature store.

Consortia often have features already. The table gets the same row checks as a
manifest (ids, time, event, required clinical values) plus a check that every
feature value is a finite number; a bad case is quarantined, never dropped silently.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from fedrad.client import extraction, store
from fedrad.client.manifest import iter_rows, outcome_values
from fedrad.client.prepare import PrepareReport, write_features
from fedrad.common import schemas
from fedrad.common.errors import CaseError, ManifestError


def prepare_from_table(
    table: Path,
    out: Path,
    *,
    id_col: str = schemas.ID,
    time_col: str = schemas.TIME,
    event_col: str = schemas.EVENT,
    scanner_col: str | None = None,
    clinical_cols: list[str] = (),
    required_clinical: list[str] = (),
    params_path: Path | None = None,
    phase: str = "table",
    overwrite: bool = False,
) -> PrepareReport:
    """Build a store from a CSV or parquet table with one row per case.

    Every column that is not the id, time, event, scanner or a clinical column is a
    feature. Feature names without ``'<phase>__'`` get ``phase`` as prefix so stores
    from tables and from images name columns the same way. ``params_path`` records the
    pyradiomics settings the table was extracted with (its hash is compared across sites). A store
    built from another table or a manifest is only replaced with ``overwrite``.
    """
    frame = _read_table(Path(table))
    with store.writing(out, Path(table), kind="table", overwrite=overwrite):
        return _import(frame, Path(table), Path(out), id_col=id_col, time_col=time_col, event_col=event_col,
                       scanner_col=scanner_col, clinical_cols=clinical_cols, required_clinical=required_clinical,
                       params_path=params_path, phase=phase)


def _import(frame: pd.DataFrame, table: Path, out: Path, *, id_col, time_col, event_col, scanner_col,
            clinical_cols, required_clinical, params_path, phase) -> PrepareReport:
    started = datetime.now(timezone.utc)
    if frame.empty:
        raise ManifestError(f"table '{table}' has a header but no cases")
    roles = {id_col: schemas.ID, time_col: schemas.TIME, event_col: schemas.EVENT}
    if scanner_col:
        roles[scanner_col] = schemas.SCANNER
    missing = [c for c in [*roles, *clinical_cols, *required_clinical] if c not in frame.columns]
    if missing:
        raise ManifestError(f"table '{table}' has no column {', '.join(missing)} (columns: {', '.join(frame.columns)})")
    feature_source = [c for c in frame.columns if c not in roles and c not in clinical_cols]
    if not feature_source:
        raise ManifestError(f"table '{table}' has no feature columns besides id, outcome and clinical columns")
    text = frame.rename(columns=roles)
    numeric = {c: pd.to_numeric(text[c].str.strip(), errors="coerce") for c in feature_source}
    for column, values in numeric.items():
        if values.isna().all():
            raise ManifestError(
                f"table column '{column}' holds no numbers (e.g. '{text[column].iloc[0]}'); "
                "declare it with --clinical-cols if it is clinical"
            )
    names = {c: c if schemas.is_feature_column(c) else schemas.feature_column(phase, c) for c in feature_source}

    rows, problems = [], []
    for pid, raw, row_problems in iter_rows(text, required_clinical):
        for column in feature_source:
            value = numeric[column][raw.name]
            if not np.isfinite(value):
                row_problems.append(CaseError(pid, column, f"feature value '{raw[column]}' is not a finite number"))
        if row_problems:
            problems.extend(row_problems)
            continue
        features = {names[c]: float(numeric[c][raw.name]) for c in feature_source}
        rows.append({schemas.ID: pid, **outcome_values(raw, list(clinical_cols)), **features})

    phash = params_text = None
    if params_path is not None:
        params, params_text = extraction.load_params(params_path)
        phash = extraction.params_hash(params)
    meta, removed = write_features(
        out,
        rows=rows,
        repeat_rows=[],
        problems=problems,
        columns={"scanner": schemas.SCANNER if scanner_col else None, "clinical": list(clinical_cols),
                 "features": list(names.values())},
        meta={"source": "table", "table": str(Path(table).resolve()), "params_hash": phash,
              "phases": sorted({n.split(schemas.FEATURE_SEP)[0] for n in names.values()}),
              "notices": [], "created": started.isoformat(timespec="seconds")},
        params_text=params_text,
    )
    return PrepareReport(
        store=Path(out), n_cases=meta["n_cases"], n_events=meta["n_events"], n_quarantined=meta["n_quarantined"],
        n_features=len(names), n_cached=0, problems=problems, notices=[],
        wall_seconds=(datetime.now(timezone.utc) - started).total_seconds(), info=removed,
    )


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise ManifestError(f"table '{path}' not found")
    try:
        if path.suffix in (".parquet", ".pq"):
            return pd.read_parquet(path).astype(str).replace({"nan": "", "None": ""})
        return pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except Exception as exc:
        raise ManifestError(f"table '{path}' cannot be read: {exc}") from exc
