"""`fedrad prepare --segment MODEL`: a mask for every manifest row that has none.

The federated segmentation model (`server/train_seg.py`) segments the row's image of the
model's phase; the mask is written to ``STORE/auto_masks/`` on exactly the image's grid and
the row then goes through `prepare` like any other (the same checks, the same extraction).
The store marks those cases ``mask_source = "automatic"`` so nobody mistakes them for a
radiologist's delineation, and the segmentation stage never trains on them.

A mask is redone only when the image or the model changed (``auto_masks/<case>.json`` holds
the key). A case the model cannot segment (unreadable image, nothing found) is quarantined
with the reason, like any other bad case.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fedrad.client import imaging
from fedrad.client.store import AUTO_MASKS
from fedrad.common import schemas
from fedrad.common.errors import CaseError, ManifestError

__all__ = ["AutoMasks", "segment_missing", "MANIFEST_USED"]

#: the manifest as `prepare --segment` used it (automatic mask paths filled in, every path absolute)
MANIFEST_USED = "manifest_used.csv"
AUTO_VERSION = 1


@dataclass
class AutoMasks:
    """What `segment_missing` did: the manifest to use, which cases got an automatic mask, who failed."""

    frame: pd.DataFrame
    automatic: set[str]
    problems: list[CaseError]
    model: dict  # path, weights_sha256, phase: recorded in store.json
    reused: int = 0


def mask_file(store: Path, patient_id: str) -> Path:
    """``STORE/auto_masks/<id>.nii.gz``; an id that is not a safe file name gets a hash suffix, never a path."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", patient_id).lstrip(".") or "case"
    if safe != patient_id:
        safe += "-" + hashlib.sha256(patient_id.encode()).hexdigest()[:8]
    return Path(store) / AUTO_MASKS / f"{safe}.nii.gz"


def _absolute(text: str, base: Path) -> str:
    text = str(text).strip()
    if not text:
        return ""
    path = Path(text)
    return str(path if path.is_absolute() else (base / path))


def segment_missing(frame: pd.DataFrame, base_dir: Path, store: Path, model_path: Path, *,
                    progress=None) -> AutoMasks:
    """Segment the rows of ``frame`` (the manifest as text) whose mask cell is empty.

    Returns the manifest with those cells pointing at the automatic masks and every path made
    absolute (written as ``STORE/manifest_used.csv`` by the caller, so later stages find the
    images and masks), plus the ids marked automatic and the cases that failed (left out of
    the returned frame, so each is quarantined once, with the segmentation's reason).
    """
    from fedrad.client.segmentation import read_model, segment_image, segmenter_with

    weights, meta = read_model(model_path)
    settings = meta["settings"]
    column = schemas.image_column(settings["phase"])
    if column not in frame.columns:
        raise ManifestError(f"the segmentation model segments phase '{settings['phase']}' but the manifest has no "
                            f"column '{column}'")
    frame = frame.copy()
    base_dir = Path(base_dir)
    for name in frame.columns:
        if schemas.phase_of(name) or name in (schemas.MASK, schemas.MASK_REPEAT):
            frame[name] = frame[name].map(lambda cell: _absolute(cell, base_dir))
    ids = frame[schemas.ID].astype(str).str.strip()
    todo = [i for i in frame.index
            if not str(frame.at[i, schemas.MASK]).strip() and ids[i] and (ids == ids[i]).sum() == 1
            and str(frame.at[i, column]).strip()]  # id problems and a missing image: check_manifest reports them
    model_info = {"path": str(Path(model_path).resolve()), "weights_sha256": meta["weights_sha256"],
                  "phase": settings["phase"], "study": meta.get("study")}
    result = AutoMasks(frame=frame, automatic=set(), problems=[], model=model_info)
    if not todo:
        return result
    net = segmenter_with(settings, weights)
    task = progress.add_task("segmenting", total=len(todo), quarantined=0) if progress is not None else None
    failed = []
    for index in todo:
        pid, image = ids[index], Path(str(frame.at[index, column]))
        out = mask_file(store, pid)
        try:
            key = _key(image, pid, column, meta)
            voxels = _cached(out, key)
            if voxels is None:
                voxels = segment_image(net, image, out, settings, patient_id=pid, field=column)
                _remember(out, key, voxels)
            else:
                result.reused += 1
            if voxels == 0:
                raise CaseError(pid, schemas.MASK, f"automatic segmentation of {column} found no tumour "
                                                    "(delineate this case by hand)")
        except CaseError as exc:
            result.problems.append(exc)
            failed.append(index)
        except Exception as exc:  # noqa: BLE001 - only this case is lost, and it is named
            result.problems.append(CaseError(pid, schemas.MASK, f"automatic segmentation failed: "
                                                                f"{type(exc).__name__}: {exc}"))
            failed.append(index)
        else:
            frame.at[index, schemas.MASK] = str(out)
            result.automatic.add(pid)
        if task is not None:
            progress.update(task, advance=1, quarantined=len(failed))
    result.frame = frame.drop(index=failed)
    return result


def _key(image: Path, pid: str, column: str, meta: dict) -> str:
    """What an automatic mask depends on: the image bytes and the model (weights and settings)."""
    if not image.exists():
        raise CaseError(pid, column, f"file not found: {image}")
    parts = {"v": AUTO_VERSION, "image": imaging.file_digest(image), "weights": meta["weights_sha256"],
             "settings": meta["settings"]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _cached(out: Path, key: str) -> int | None:
    note = out.with_suffix("").with_suffix(".json")
    if not (out.is_file() and note.is_file()):
        return None
    try:
        record = json.loads(note.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return None
    return int(record["voxels"]) if record.get("key") == key else None


def _remember(out: Path, key: str, voxels: int) -> None:
    out.with_suffix("").with_suffix(".json").write_text(json.dumps({"key": key, "voxels": voxels}), encoding="utf-8")
