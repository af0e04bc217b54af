"""Synthetic multi-centre sarcoma CT cohort with a known ground truth.

Each patient gets a body-like CT crop (air, subcutaneous fat, muscle, a
retroperitoneal-like soft-tissue tumour with an irregular border, textured
heterogeneity, an optional necrotic core and phase-dependent enhancement), a
tumour mask, sometimes a second (perturbed) delineation, clinical variables and
a Weibull survival time whose hazard depends on tumour size, texture
heterogeneity, necrosis, grade, Ki-67 and age. Sites differ the way hospitals
do: scanner gain/offset, noise, blur, voxel spacing, slice thickness, case mix
and follow-up; one site runs two scanner models and one model is shared by two
sites. Everything is drawn from one seed, so a cohort is reproducible.

The voxel grid is a crop around the tumour: tumour extent in the image is scaled
to the clinical size (``size_cm``) so image features carry the size signal
without needing a full abdominal field of view.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk
from rich.progress import Progress
from scipy import ndimage

from fedrad.common import schemas

PHASES = ("arterial", "venous", "delayed")
#: Tumour enhancement over native HU per phase, scaled by the patient's vascularity.
ENHANCEMENT = {"native": 0.0, "arterial": 45.0, "venous": 30.0, "delayed": 15.0}
#: True log-hazard coefficients on standardised latent variables (see `truth.csv`).
BETA = {"size": 0.55, "heterogeneity": 0.70, "necrosis": 0.60, "grade": 0.45, "ki67": 0.25, "age": 0.15}
WEIBULL_SHAPE = 1.3
WEIBULL_SCALE_MONTHS = 60.0
HORIZON_MONTHS = 24.0

SCANNERS = {
    # model: (gain, offset HU, noise SD HU, blur sigma mm)
    "Siemens-Force": (1.00, 0.0, 8.0, 0.4),
    "GE-Revolution": (0.93, 12.0, 12.0, 0.7),
    "Philips-iCT": (1.08, -15.0, 16.0, 0.9),
    "Canon-Aquilion": (0.97, 6.0, 20.0, 1.1),
}


@dataclass(frozen=True)
class SiteProfile:
    """How one synthetic hospital acquires and which patients it sees."""

    name: str
    scanners: tuple[str, ...]
    inplane_mm: float
    slice_mm: float
    size_shift_cm: float  # case mix: referral centres see larger tumours
    follow_up_months: float  # administrative censoring


def site_profiles(n_sites: int, rng: np.random.Generator) -> list[SiteProfile]:
    """Site 1 has two scanner models; the first scanner model also serves the last site."""
    models = list(SCANNERS)
    profiles = []
    for i in range(n_sites):
        scanners = (models[i % len(models)],)
        if i == 0 and n_sites > 1:
            scanners = (models[0], models[n_sites % len(models) or len(models) - 1])
        if i == n_sites - 1 and n_sites > 2:
            scanners = (models[0],)
        profiles.append(
            SiteProfile(
                name=f"site{chr(ord('A') + i)}",
                scanners=scanners,
                inplane_mm=float(np.clip(0.7 + 0.3 * i / max(n_sites - 1, 1) + rng.normal(0, 0.02), 0.7, 1.0)),
                slice_mm=float((2.5, 5.0, 3.0, 4.0)[i % 4]),
                size_shift_cm=float(rng.normal(0.0, 1.5)),
                follow_up_months=float(rng.uniform(48, 96)),
            )
        )
    return profiles


def generate_cohort(
    out: Path,
    *,
    n_sites: int = 3,
    n_patients: int = 60,
    seed: int = 0,
    phases: tuple[str, ...] = PHASES,
    shape: tuple[int, int, int] = (64, 64, 32),
    repeat_fraction: float = 0.25,
    show_progress: bool = False,
) -> pd.DataFrame:
    """Write ``out/<site>/manifest.csv`` + images per site and ``out/truth.csv``.

    Parameters
    ----------
    shape : (nx, ny, nz)
        Voxel grid of each volume.
    repeat_fraction : float
        Share of patients with a second, perturbed delineation (``mask_repeat``).

    Returns
    -------
    truth : DataFrame, one row per patient
        True latent variables, linear predictor and site effects.
    """
    for phase in phases:
        if phase not in ENHANCEMENT:
            raise ValueError(f"unknown phase '{phase}'; choose from {', '.join(ENHANCEMENT)}")
    out = Path(out)
    rng = np.random.default_rng(seed)
    profiles = site_profiles(n_sites, rng)
    truth_rows = []
    with Progress(disable=not show_progress) as progress:
        task = progress.add_task("synthesising", total=n_sites * n_patients)
        for profile in profiles:
            site_dir = out / profile.name
            (site_dir / "images").mkdir(parents=True, exist_ok=True)
            rows = []
            for j in range(n_patients):
                pid = f"{profile.name}-{j + 1:03d}"
                patient_rng = np.random.default_rng([seed, len(truth_rows)])
                row, truth = _patient(pid, profile, patient_rng, phases, shape, repeat_fraction, site_dir)
                rows.append(row)
                truth_rows.append(truth)
                progress.advance(task)
            pd.DataFrame(rows).to_csv(site_dir / "manifest.csv", index=False)
    truth = pd.DataFrame(truth_rows)
    truth.to_csv(out / "truth.csv", index=False)
    return truth


def _patient(pid, profile: SiteProfile, rng, phases, shape, repeat_fraction, site_dir: Path):
    scanner = str(rng.choice(profile.scanners))
    gain, offset, noise_sd, blur_mm = SCANNERS[scanner]
    # clinical and latent variables
    size_cm = float(np.clip(rng.lognormal(np.log(12.0), 0.45) + profile.size_shift_cm, 3.0, 35.0))
    grade = int(rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3]))
    ki67 = float(np.clip(rng.normal(8 + 9 * (grade - 1), 6), 1, 80))
    heterogeneity = float(np.clip(rng.beta(2, 2) + 0.15 * (grade - 2), 0, 1))
    necrosis = int(rng.random() < {1: 0.15, 2: 0.35, 3: 0.6}[grade])
    age = float(np.clip(rng.normal(58, 12), 18, 90))
    sex = str(rng.choice(["F", "M"]))
    vascularity = float(rng.uniform(0.6, 1.4))

    latent = {
        "size": (np.log(size_cm) - np.log(12.0)) / 0.45,
        "heterogeneity": (heterogeneity - 0.5) / 0.22,
        "necrosis": necrosis - 0.35,
        "grade": grade - 2.0,
        "ki67": (ki67 - 17) / 10,
        "age": (age - 58) / 12,
    }
    lp = float(sum(BETA[k] * latent[k] for k in BETA))
    # Weibull proportional hazards: S(t) = exp(-(t/scale)^k * exp(lp))
    u = rng.random()
    event_time = WEIBULL_SCALE_MONTHS * (-np.log(u) / np.exp(lp)) ** (1 / WEIBULL_SHAPE)
    dropout = rng.exponential(150.0)
    censor = min(profile.follow_up_months * rng.uniform(0.5, 1.0), dropout)
    time = float(min(event_time, censor))
    event = int(event_time <= censor)
    if event and time <= HORIZON_MONTHS:
        by_horizon = 1
    elif time > HORIZON_MONTHS:
        by_horizon = 0
    else:
        by_horizon = None  # censored before the horizon: unknown

    spacing = (profile.inplane_mm, profile.inplane_mm, profile.slice_mm)
    tissue, tumour, core = _anatomy(rng, shape, spacing, size_cm)
    texture = _smooth_noise(rng, shape, spacing, 2.0)
    paths = {}
    for phase in phases:
        hu = tissue.copy()
        enhancement = ENHANCEMENT[phase] * vascularity
        tumour_hu = 38.0 + enhancement + (10 + 45 * heterogeneity) * texture
        hu[tumour] = tumour_hu[tumour]
        if necrosis:
            hu[core] = 15.0 + 4.0 * texture[core]
        hu = ndimage.gaussian_filter(hu, sigma=[blur_mm / s for s in spacing[::-1]])
        hu = gain * hu + offset + rng.normal(0.0, noise_sd, size=hu.shape)
        image = _to_image(np.round(hu).astype(np.int16), spacing)
        paths[schemas.image_column(phase)] = f"images/{pid}_{phase}.nii.gz"
        sitk.WriteImage(image, str(site_dir / paths[schemas.image_column(phase)]), useCompression=True)
    mask_path = f"images/{pid}_mask.nii.gz"
    sitk.WriteImage(_to_image(tumour.astype(np.uint8), spacing), str(site_dir / mask_path), useCompression=True)
    repeat_path = ""
    if rng.random() < repeat_fraction:
        repeat_path = f"images/{pid}_mask_repeat.nii.gz"
        repeat = _redelineate(rng, tumour, spacing)
        sitk.WriteImage(_to_image(repeat.astype(np.uint8), spacing), str(site_dir / repeat_path), useCompression=True)

    row = {
        schemas.ID: pid,
        **paths,
        schemas.MASK: mask_path,
        schemas.MASK_REPEAT: repeat_path,
        schemas.SCANNER: scanner,
        "age": round(age, 1),
        "sex": sex,
        "size_cm": round(size_cm, 1),
        "size_gt_10cm": int(size_cm > 10),
        "grade": grade,
        "ki67": round(ki67, 1),
        schemas.TIME: round(time, 2),
        schemas.EVENT: event,
        f"event_by_{int(HORIZON_MONTHS)}m": "" if by_horizon is None else by_horizon,
    }
    truth = {
        schemas.ID: pid,
        "site": profile.name,
        schemas.SCANNER: scanner,
        "linear_predictor": lp,
        **{f"latent_{k}": float(v) for k, v in latent.items()},
        "size_cm": size_cm,
        "heterogeneity": heterogeneity,
        "necrosis": necrosis,
        "vascularity": vascularity,
        "event_time": float(event_time),
        "censor_time": float(censor),
        "gain": gain,
        "offset_hu": offset,
        "noise_sd_hu": noise_sd,
        "blur_mm": blur_mm,
        "inplane_mm": profile.inplane_mm,
        "slice_mm": profile.slice_mm,
        "follow_up_months": profile.follow_up_months,
    }
    return row, truth


def _grid_mm(shape, spacing):
    """Physical coordinates (mm) from the volume centre, arrays in (z, y, x) order."""
    nx, ny, nz = shape
    z, y, x = np.meshgrid(
        (np.arange(nz) - nz / 2) * spacing[2],
        (np.arange(ny) - ny / 2) * spacing[1],
        (np.arange(nx) - nx / 2) * spacing[0],
        indexing="ij",
    )
    return z, y, x


def _anatomy(rng, shape, spacing, size_cm):
    """Air / fat / muscle background and an irregular tumour (+ necrotic core) mask."""
    z, y, x = _grid_mm(shape, spacing)
    half_x = shape[0] * spacing[0] / 2
    half_y = shape[1] * spacing[1] / 2
    body = (x / (0.98 * half_x)) ** 2 + (y / (0.9 * half_y)) ** 2
    tissue = np.full(z.shape, -1000.0)
    tissue[body < 1.0] = -100.0  # subcutaneous fat
    tissue[body < 0.75] = 45.0  # muscle / organs
    tissue[(body < 0.75) & (_smooth_noise(rng, shape, spacing, 4.0) > 1.2)] = -90.0  # fat islands
    # tumour: ellipsoid scaled to the clinical size, border warped by smooth noise
    fov = min(half_x, half_y)
    radius = fov * np.clip(0.25 + 0.018 * size_cm, 0.3, 0.72)
    axes = radius * rng.uniform(0.8, 1.2, size=3)
    centre = rng.normal(0, 0.05 * fov, size=3)
    dist = np.sqrt(((x - centre[0]) / axes[0]) ** 2 + ((y - centre[1]) / axes[1]) ** 2
                   + ((z - centre[2]) / axes[2]) ** 2)
    warp = _smooth_noise(rng, shape, spacing, radius / 2.5)
    tumour = dist < 1.0 + 0.18 * warp
    core = tumour & (dist < rng.uniform(0.35, 0.55) + 0.08 * warp)
    return tissue, tumour, core


def _smooth_noise(rng, shape, spacing, scale_mm):
    """Gaussian random field with unit SD and correlation length ``scale_mm``."""
    nx, ny, nz = shape
    field = ndimage.gaussian_filter(rng.normal(size=(nz, ny, nx)), sigma=[scale_mm / s for s in spacing[::-1]])
    return (field - field.mean()) / (field.std() + 1e-12)


def _redelineate(rng, mask, spacing):
    """A second reader's mask: the border moved in or out by about one voxel, unevenly."""
    grown = ndimage.binary_dilation(mask)
    shrunk = ndimage.binary_erosion(mask)
    choice = _smooth_noise(rng, mask.shape[::-1], spacing, 6.0)
    repeat = np.where(choice > 0.5, grown, np.where(choice < -0.5, shrunk, mask))
    return repeat


def _to_image(array, spacing) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetOrigin((0.0, 0.0, 0.0))
    return image
