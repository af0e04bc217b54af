"""Reading CT/MR volumes and masks with SimpleITK, and the checks a case must pass.

Every check raises `CaseError` naming the case, the manifest field and the numbers,
because a site fixing its data needs to know which file and by how much.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from fedrad.common.errors import CaseError

#: Geometry tolerances (mm for spacing/origin, unitless for direction cosines).
SPACING_TOL = 1e-4
ORIGIN_TOL = 1e-3
DIRECTION_TOL = 1e-4
#: A DICOM slice gap may differ from the series' median gap by this fraction (a missing slice doubles it).
SLICE_GAP_TOL = 0.1
#: Labels named in a message about a mask; a CT given as its own mask has hundreds.
LABELS_SHOWN = 5
#: Reason of every file whose bytes end early or fail their checksum (tests and sites match on it).
TRUNCATED = "file is truncated or corrupt"
GZIP_MAGIC = b"\x1f\x8b"  # the first two bytes of every gzip stream
#: Bytes read to find a NIfTI header or the end of an NRRD header.
HEADER_BYTES = 1 << 16
NRRD_TYPE_BYTES = {
    **dict.fromkeys(("signed char", "int8", "int8_t", "uchar", "unsigned char", "uint8", "uint8_t"), 1),
    **dict.fromkeys(("short", "short int", "signed short", "signed short int", "int16", "int16_t", "ushort",
                     "unsigned short", "unsigned short int", "uint16", "uint16_t"), 2),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t", "uint", "unsigned int", "uint32", "uint32_t",
                     "float"), 4),
    **dict.fromkeys(("longlong", "long long", "long long int", "signed long long", "signed long long int",
                     "int64", "int64_t", "ulonglong", "unsigned long long", "unsigned long long int", "uint64",
                     "uint64_t", "double"), 8),
}


def read_image(path: Path, patient_id: str, field: str) -> sitk.Image:
    """Read a NIfTI/NRRD file or a DICOM series folder, refusing what ITK would quietly patch up.

    ITK zero-fills a file that ends early and stacks a series with a missing slice at the average
    spacing, so the file's bytes and the series' slice positions are checked before it reads them.
    """
    path = Path(path)
    if not path.exists():
        raise CaseError(patient_id, field, f"file not found: {path}")
    try:
        if path.is_dir():
            reader = sitk.ImageSeriesReader()
            reader.SetFileNames(_series_files(path, patient_id, field))
            image = reader.Execute()
        else:
            check_complete(path, patient_id, field)
            image = sitk.ReadImage(str(path))
    except CaseError:
        raise
    except RuntimeError as exc:
        first_line = str(exc).strip().splitlines()[-1] if str(exc).strip() else "unknown error"
        raise CaseError(patient_id, field, f"cannot read {path}: {first_line}") from exc
    if image.GetDimension() > 3:  # pyradiomics takes one volume; its own error on 4-D is a cut-off ITK message
        raise CaseError(patient_id, field, f"{image.GetDimension()}-D images are not supported: pick a volume "
                                           f"({path.name} has size {image.GetSize()})")
    return image


def check_complete(path: Path, patient_id: str, field: str) -> None:
    """Refuse a NIfTI or NRRD file whose gzip stream fails its end-of-stream, CRC or length check, or that
    holds fewer voxel bytes than its header's sizes need. Other files are left to ITK."""
    try:
        problem = _file_problem(Path(path))
    except EOFError:
        problem = "its gzip stream ends early (cut off?)"
    except (gzip.BadGzipFile, zlib.error) as exc:
        problem = f"its gzip stream fails its check ({exc})"
    if problem:
        raise CaseError(patient_id, field, f"{TRUNCATED}: {Path(path).name}: {problem}")


def _file_problem(path: Path) -> str | None:
    with open(path, "rb") as handle:
        start = handle.read(HEADER_BYTES)
        if start[:2] == GZIP_MAGIC:  # .nii.gz: the whole file is one gzip stream
            handle.seek(0)
            start, size = _gzip_read(handle)
        elif start.startswith(b"NRRD"):
            return _nrrd_problem(handle, start, path.stat().st_size)
        else:
            size = path.stat().st_size
    return _short_data(_nifti_bytes(start), size)


def _gzip_read(handle) -> tuple[bytes, int]:
    """(first bytes, total length) of a gzip stream read to its end, which is when gzip checks CRC and length."""
    with gzip.GzipFile(fileobj=handle, mode="rb") as stream:
        start = stream.read(HEADER_BYTES)
        size = len(start)
        for block in iter(lambda: stream.read(1 << 20), b""):
            size += len(block)
    return start, size


def _short_data(need: int | None, held: int) -> str | None:
    if need is None or held >= need:
        return None
    return f"its header needs {need:,} bytes, the file holds {held:,} (it was cut off?)"


def _nifti_bytes(start: bytes) -> int | None:
    """Size a single-file NIfTI-1/2 (.nii) must have: vox_offset + voxels x bytes per voxel; None if not one."""
    for order in "<>":
        if len(start) >= 348 and struct.unpack_from(order + "i", start)[0] == 348 and start[344:347] == b"n+1":
            dims, bitpix = struct.unpack_from(order + "8h", start, 40), struct.unpack_from(order + "h", start, 72)[0]
            offset = struct.unpack_from(order + "f", start, 108)[0]
        elif len(start) >= 540 and struct.unpack_from(order + "i", start)[0] == 540 and start[4:7] == b"n+2":
            dims, bitpix = struct.unpack_from(order + "8q", start, 16), struct.unpack_from(order + "h", start, 14)[0]
            offset = struct.unpack_from(order + "q", start, 168)[0]
        else:
            continue
        sizes = dims[1:1 + dims[0]] if 1 <= dims[0] <= 7 else ()
        if not sizes or min(sizes) < 1 or bitpix < 1 or not math.isfinite(offset):
            return None  # a header ITK will refuse on its own
        return int(offset) + math.prod(sizes) * bitpix // 8
    return None


def _nrrd_problem(handle, start: bytes, size: int) -> str | None:
    """Voxel bytes of an attached raw or gzip NRRD payload against ``sizes`` x the type's size."""
    end = start.find(b"\n\n")
    if end < 0:
        return None
    fields = {}
    for line in start[:end].decode("latin-1").splitlines()[1:]:
        key, colon, value = line.partition(":")
        if colon and not line.startswith("#") and not value.startswith("="):  # "key:=value" is free text
            fields[key.strip().lower().replace(" ", "")] = value.strip()
    encoding, width = fields.get("encoding", "").lower(), NRRD_TYPE_BYTES.get(fields.get("type", "").lower())
    try:
        need = math.prod(int(v) for v in fields["sizes"].split()) * width
    except (KeyError, TypeError, ValueError):
        return None
    if fields.keys() & {"datafile", "lineskip", "byteskip"} or size < end + 2:  # detached or offset data: ITK's
        return None
    if encoding in ("gzip", "gz"):
        handle.seek(end + 2)
        return _short_data(need, _gzip_read(handle)[1])
    return _short_data(need, size - end - 2) if encoding == "raw" else None


def _series_files(folder: Path, patient_id: str, field: str) -> list[str]:
    names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))
    if not names:
        raise CaseError(patient_id, field, f"folder {folder} holds no DICOM series")
    check_slice_gaps(names, patient_id, field)
    return list(names)


def check_slice_gaps(names: list[str], patient_id: str, field: str) -> None:
    """Every gap between neighbouring slices must match the series' median gap: ITK only logs a warning
    and reads a series with a missing slice at the average spacing, shifting every voxel after it."""
    if len(names) < 3:
        return
    positions = np.sort([_slice_position(name) for name in names])
    gaps = np.diff(positions)
    typical = float(np.median(gaps))
    uneven = np.flatnonzero(np.abs(gaps - typical) > max(SLICE_GAP_TOL * typical, SPACING_TOL))
    if uneven.size:
        i = int(uneven[0])
        raise CaseError(
            patient_id, field,
            f"DICOM series has uneven slice spacing: a gap of {gaps[i]:.4g} mm between the slices at "
            f"{positions[i]:.4g} and {positions[i + 1]:.4g} mm, {typical:.4g} mm elsewhere "
            f"({uneven.size} uneven gap(s) in {len(names)} slices); is a slice missing?",
        )


def _slice_position(name: str) -> float:
    """A slice's position along the slice normal (from its ImagePositionPatient and orientation)."""
    reader = sitk.ImageFileReader()
    reader.SetFileName(name)
    reader.ReadImageInformation()
    direction = reader.GetDirection()
    return float(np.dot(reader.GetOrigin(), direction[2::3]))


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
    if np.issubdtype(values.dtype, np.floating):
        _check_integer_labels(values, patient_id, field)
    labels, counts = np.unique(values[values != 0], return_counts=True)
    if labels.size == 0:
        raise CaseError(patient_id, field, "mask is empty (no non-zero voxels)")
    present = _labels_text(labels)
    if label is None:
        if labels.size > LABELS_SHOWN:
            raise CaseError(patient_id, field, f"mask has {present}: is it an image rather than a label map? "
                                               "If not, choose one label with --label")
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


def _check_integer_labels(values: np.ndarray, patient_id: str, field: str) -> None:
    """A float mask is fine if it holds whole numbers; a probability map or an image is not a label map."""
    if not np.all(np.isfinite(values)):
        raise CaseError(patient_id, field, "mask has NaN/inf voxels")
    fractional = values[values != np.round(values)]
    if fractional.size:
        raise CaseError(patient_id, field, f"mask is not a label image (non-integer values, e.g. {fractional[0]:g}, "
                                           f"in {fractional.size} voxels); save the segmentation as integer labels")


def _labels_text(labels: np.ndarray) -> str:
    """All labels, or their count and the first few: a CT given as a mask has hundreds."""
    shown = ", ".join(_label_text(v) for v in labels[:LABELS_SHOWN])
    return shown if labels.size <= LABELS_SHOWN else f"{labels.size} labels (the first {LABELS_SHOWN}: {shown})"


def _label_text(value) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
