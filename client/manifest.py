"""Site manifest: one row per case, checked before any image is opened.

Columns (README, "Site manifest"): ``patient_id``; one ``image_<phase>`` column per
phase (a NIfTI/NRRD file or a DICOM series folder, relative to the manifest);
``mask`` and optional ``mask_repeat``; ``time`` and ``event``; optional
``scanner``; every other column is clinical. Row problems quarantine the case
(never the whole manifest) and every problem of a row is reported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from fedrad.common import schemas
from fedrad.common.errors import CaseError, ManifestError

#: Cell texts that mean "missing" in hospital exports; they never become values.
MISSING = {"", "na", "n/a", "nan", "null", "none", "missing", "-", "?"}


@dataclass(frozen=True)
class Case:
    """One manifest row resolved to absolute paths."""

    patient_id: str
    images: dict[str, Path]  # phase -> path
    mask: Path
    mask_repeat: Path | None
    row: dict  # time, event, scanner and clinical values as read


@dataclass
class ManifestCheck:
    """Outcome of checking a manifest: usable cases, row problems, ignored columns."""

    cases: list[Case]
    problems: list[CaseError]
    phases: list[str]
    clinical: list[str]
    notices: list[str] = field(default_factory=list)


def read_manifest(path: Path) -> pd.DataFrame:
    """Read the manifest CSV with every cell as text, so nothing is coerced silently."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"manifest '{path}' not found")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except Exception as exc:  # pandas raises several types for malformed CSV
        raise ManifestError(f"manifest '{path}' cannot be read as CSV: {exc}") from exc
    frame.columns = [c.strip() for c in frame.columns]
    if frame.empty:
        raise ManifestError(f"manifest '{path}' has a header but no cases")
    for required in (schemas.ID, schemas.MASK, schemas.TIME, schemas.EVENT):
        if required not in frame.columns:
            raise ManifestError(f"manifest '{path}' has no '{required}' column (columns: {', '.join(frame.columns)})")
    return frame


def check_manifest(
    frame: pd.DataFrame,
    base_dir: Path,
    *,
    phases: list[str] | None = None,
    required_clinical: list[str] = (),
) -> ManifestCheck:
    """Validate every row; return usable cases and one `CaseError` per problem.

    Parameters
    ----------
    frame : DataFrame, shape = (n_cases, n_columns)
        The manifest as text (`read_manifest`).
    base_dir : Path
        Relative paths in the manifest are resolved against this folder.
    phases : list of str, optional
        Phases to extract. Image columns for other phases are reported and left out;
        a listed phase with no column is an error. Default: every ``image_*`` column.
    required_clinical : list of str
        Clinical columns that must be filled for every case.
    """
    image_cols = {schemas.phase_of(c): c for c in frame.columns if schemas.phase_of(c)}
    if not image_cols:
        raise ManifestError("manifest has no image column; name them image_<phase>, e.g. image_venous")
    notices = []
    if phases is None:
        phases = list(image_cols)
    else:
        missing = [p for p in phases if p not in image_cols]
        if missing:
            raise ManifestError(
                f"phase(s) {', '.join(missing)} requested but the manifest has no column "
                f"{', '.join(schemas.image_column(p) for p in missing)}"
            )
        for phase, column in image_cols.items():
            if phase not in phases:
                notices.append(
                    f"unknown phase column '{column}': phase '{phase}' is not among the phases "
                    f"of this run ({', '.join(phases)}); column not extracted"
                )
    clinical = [
        c for c in frame.columns if c not in schemas.RESERVED and schemas.phase_of(c) is None
    ]
    absent = [c for c in required_clinical if c not in frame.columns]
    if absent:
        raise ManifestError(f"required clinical column(s) {', '.join(absent)} not in the manifest")

    problems: list[CaseError] = []
    cases: list[Case] = []
    for pid, raw, row_problems in iter_rows(frame, required_clinical):
        if not raw[schemas.MASK].strip():
            row_problems.append(CaseError(pid, schemas.MASK, "mask path is empty"))
        for phase in phases:
            if not raw[image_cols[phase]].strip():
                row_problems.append(CaseError(pid, image_cols[phase], "image path is empty"))
        if row_problems:
            problems.extend(row_problems)
            continue
        cases.append(_resolve(raw, pid, phases, image_cols, clinical, base_dir))
    return ManifestCheck(cases=cases, problems=problems, phases=phases, clinical=clinical, notices=notices)


def iter_rows(frame: pd.DataFrame, required_clinical=()):
    """Yield (patient_id, row, problems) with the checks every case source shares.

    ``frame`` holds text cells under the canonical column names (`fedrad.common.schemas`).
    Checked: empty or duplicate patient_id, time, event, required clinical values.
    """
    ids = frame[schemas.ID].str.strip()
    duplicated = ids[ids.duplicated(keep=False) & (ids != "")]
    duplicate_rows = {pid: [str(i + 2) for i in duplicated.index[duplicated == pid]] for pid in set(duplicated)}
    for index, raw in frame.iterrows():
        pid = ids[index] or f"<row {index + 2}>"
        problems = []
        if not ids[index]:
            problems.append(CaseError(pid, schemas.ID, "patient_id is empty"))
        if pid in duplicate_rows:
            problems.append(
                CaseError(pid, schemas.ID, f"duplicate patient_id (CSV rows {', '.join(duplicate_rows[pid])})")
            )
        problems += _outcome_problems(raw, pid, required_clinical)
        yield pid, raw, problems


def _outcome_problems(raw: pd.Series, pid: str, required_clinical) -> list[CaseError]:
    problems = []
    time_text = raw[schemas.TIME].strip()
    if not time_text:
        problems.append(CaseError(pid, schemas.TIME, "time is missing"))
    else:
        time = pd.to_numeric(time_text, errors="coerce")
        if np.isnan(time):
            problems.append(CaseError(pid, schemas.TIME, f"time '{time_text}' is not a number"))
        elif not np.isfinite(time):
            problems.append(CaseError(pid, schemas.TIME, f"time is {time_text}; must be finite"))
        elif time < 0:
            problems.append(CaseError(pid, schemas.TIME, f"time is {time_text}; must be >= 0"))
    event_text = raw[schemas.EVENT].strip()
    if event_text not in ("0", "1", "0.0", "1.0"):
        shown = f"'{event_text}'" if event_text else "missing"
        problems.append(CaseError(pid, schemas.EVENT, f"event is {shown}; must be 0 (censored) or 1 (event)"))
    for column in required_clinical:
        if str(raw[column]).strip().lower() in MISSING:
            problems.append(CaseError(pid, column, f"required clinical value '{column}' is missing"))
    return problems


def _resolve(raw, pid, phases, image_cols, clinical, base_dir: Path) -> Case:
    def path(text: str) -> Path:
        p = Path(text.strip())
        return p if p.is_absolute() else (base_dir / p)

    repeat = raw.get(schemas.MASK_REPEAT, "")
    return Case(
        patient_id=pid,
        images={phase: path(raw[image_cols[phase]]) for phase in phases},
        mask=path(raw[schemas.MASK]),
        mask_repeat=path(repeat) if repeat and repeat.strip() else None,
        row=outcome_values(raw, clinical),
    )


def outcome_values(raw: pd.Series, clinical: list[str]) -> dict:
    """Typed time, event, scanner and clinical values of a row that passed `iter_rows`."""
    row = {schemas.TIME: float(raw[schemas.TIME]), schemas.EVENT: int(float(raw[schemas.EVENT]))}
    if schemas.SCANNER in raw.index:
        row[schemas.SCANNER] = raw[schemas.SCANNER].strip() or None
    for column in clinical:
        row[column] = _clinical_value(raw[column])
    return row


def _clinical_value(text: str):
    """Numbers become floats, blanks and NA markers become None, anything else stays text."""
    text = str(text).strip()
    if text.lower() in MISSING:
        return None
    number = pd.to_numeric(text, errors="coerce")
    return text if np.isnan(number) else float(number)
