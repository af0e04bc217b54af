"""Reading CT/MR volumes and masks with SimpleITK, and the checks a case must pass.

Every check raises `CaseError` naming the case, the manifest field and the numbers,
because a site fixing its data needs to know which file and by how much.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from fedrad.common.errors import CaseError

#: Geometry tolerances (mm for spacing/origin, unitless for direction cosines).
SPACING_TOL = 1e-4
ORIGIN_TOL = 1e-3
DIRECTION_TOL = 1e-4


def read_image(path: Path, patient_id: str, field: str) -> sitk.Image:
    """Read a NIfTI/NRRD file or a DICOM series folder."""
    path = Path(path)
    if not path.exists():
        raise CaseError(patient_id, field, f"file not found: {path}")
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            names = reader.GetGDCMSeriesFileNames(str(path))
            if not names:
                raise CaseError(patient_id, field, f"folder {path} holds no DICOM series")
            reader.SetFileNames(names)
            return reader.Execute()
        return sitk.ReadImage(str(path))
    except CaseError:
        raise
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown error"
        raise CaseError(patient_id, field, f"cannot read {path}: {first_line}") from exc


def check_finite(image: sitk.Image, patient_id: str, field: str) -> None:
    values = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(values.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(values)))
        if bad:
            raise CaseError(patient_id, field, f"image has {bad} NaN/inf voxels")


def check_same_grid(image: sitk.Image, mask: sitk.Image, patient_id: str, field: str, mask_field: str) -> None:
    """Image and mask must share size, spacing, origin and direction."""
    if image.GetSize() != mask.GetSize():
        raise CaseError(patient_id, mask_field, f"size {mask.GetSize()} differs from {field} size {image.GetSize()}")
    checks = (
        ("spacing", image.GetSpacing(), mask.GetSpacing(), SPACING_TOL),
        ("origin", image.GetOrigin(), mask.GetOrigin(), ORIGIN_TOL),
        ("direction", image.GetDirection(), mask.GetDirection(), DIRECTION_TOL),
    )
    for name, want, got, tol in checks:
        gap = float(np.max(np.abs(np.subtract(want, got))))
        if gap > tol:
            raise CaseError(
                patient_id, mask_field,
                f"{name} {_fmt(got)} differs from {field} {name} {_fmt(want)} (by {gap:.3g} > {tol:g})",
            )


def check_mask(mask: sitk.Image, patient_id: str, field: str, *, label: int | None, min_voxels: int) -> int:
    """Check a label map and return the label to extract.

    ``label=None`` means "the mask's only label": a mask with several labels is then
    refused, since guessing which structure is the tumour is a clinical decision.
    """
    values = sitk.GetArrayViewFromImage(mask)
    if np.issubdtype(values.dtype, np.floating) and not np.all(np.isfinite(values)):
        raise CaseError(patient_id, field, "mask has NaN/inf voxels")
    labels, counts = np.unique(values[values != 0], return_counts=True)
    if labels.size == 0:
        raise CaseError(patient_id, field, "mask is empty (no non-zero voxels)")
    present = ", ".join(_label_text(v) for v in labels)
    if label is None:
        if labels.size > 1:
            raise CaseError(patient_id, field, f"mask has several labels ({present}); choose one with --label")
        label = int(labels[0])
    if label not in labels:
        raise CaseError(patient_id, field, f"mask has no voxels with label {label} (labels present: {present})")
    count = int(counts[labels == label][0])
    if count < min_voxels:
        raise CaseError(
            patient_id, field, f"mask has {count} voxels with label {label}; at least {min_voxels} required"
        )
    return label


def file_digest(path: Path) -> str:
    """Content hash of a file or of every file in a DICOM folder (sorted by name)."""
    digest = hashlib.sha256()
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for item in files:
        digest.update(item.name.encode())
        with open(item, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _label_text(value) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
