"""Shared fixtures: paths to ../shared data, tiny hand-made cases, a small synthetic cohort."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
TEST_DATA = ROOT / "tests" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = SHARED / "data"
    assert path.is_dir(), f"../shared/data not found at {path}"
    return path


def write_volume(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 2.0), origin=(0.0, 0.0, 0.0), direction=None):
    """Write a (z, y, x) array as NIfTI with the given geometry."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    if direction is not None:
        image.SetDirection(direction)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path


def tumour_case(folder: Path, pid: str, *, seed: int = 0, shape=(12, 24, 24), radius=6.0, phases=("venous",)):
    """A small textured 'tumour' volume per phase and its mask; returns manifest cells."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape)
    centre = np.array(shape) / 2
    dist = np.sqrt(((z - centre[0]) * 2) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2)
    mask = (dist < radius).astype(np.uint8)
    cells = {"patient_id": pid}
    for phase in phases:
        values = 40 + 30 * mask + rng.normal(0, 15, size=shape)
        cells[f"image_{phase}"] = str(write_volume(folder / f"{pid}_{phase}.nii.gz", values.astype(np.int16)))
    cells["mask"] = str(write_volume(folder / f"{pid}_mask.nii.gz", mask))
    return cells


def write_manifest(path: Path, rows: list[dict]) -> Path:
    import pandas as pd

    pd.DataFrame(rows).to_csv(path, index=False)
    return path


GBSG2_COLUMNS = ["age", "estrec", "pnodes", "progrec", "tsize"]


@pytest.fixture(scope="session")
def gbsg2():
    """GBSG2 (686 patients, 299 recurrences; shipped with scikit-survival): the five numeric covariates
    standardised, the survival outcome, and four random pseudo-sites (seed 0)."""
    from sksurv.datasets import load_gbsg2

    X, y = load_gbsg2()
    Xn = X[GBSG2_COLUMNS].astype(float)
    Xn = (Xn - Xn.mean()) / Xn.std()
    site = np.random.default_rng(0).choice(["A", "B", "C", "D"], size=len(Xn))
    return Xn, y, site
