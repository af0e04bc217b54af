"""pyradiomics feature extraction for one case, every phase, with a time split.

The case is read once, checked (`fedrad.client.imaging`), then for each phase pyradiomics'
own ``loadImage`` (normalise, resample, crop) runs, followed by ``execute`` on the
pre-processed pair with pre-processing switched off. That is exactly what
``RadiomicsFeatureExtractor.execute`` does in one call, split so that the read /
resample / extract times can be reported (bench/extraction.py).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from importlib import resources
from pathlib import Path

import numpy as np
import radiomics
import yaml
from radiomics import featureextractor

from fedrad.client import imaging
from fedrad.client.manifest import Case
from fedrad.common import schemas
from fedrad.common.errors import CaseError, ParamsError

radiomics.logger.setLevel(logging.ERROR)

#: Bumped when the way features are computed, or the cases checked, changes, so cached cases are redone
#: (2: truncated files and DICOM series with a missing slice are refused; version 1 read them zero-filled).
EXTRACTION_VERSION = 2


def default_params_path(name: str = "default") -> Path:
    """Path of a shipped parameter file: ``default`` (full) or ``demo`` (fast)."""
    return Path(str(resources.files("fedrad.client") / "params" / f"{name}.yaml"))


def load_params(path: Path | None) -> tuple[dict, str]:
    """Read a pyradiomics parameter YAML; return (settings, text)."""
    path = Path(path) if path else default_params_path()
    if not path.is_file():
        raise ParamsError(f"params file '{path}' not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ParamsError(f"params file {path} is not a text YAML file (byte {exc.start} is not UTF-8 text)") from exc
    try:
        params = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ParamsError(f"params file '{path}' is not valid YAML: {exc}") from exc
    if not isinstance(params, dict):
        raise ParamsError(f"params file '{path}' is not a pyradiomics parameter mapping")
    try:  # validates against pyradiomics' schema
        featureextractor.RadiomicsFeatureExtractor(copy.deepcopy(params))
    except Exception as exc:
        raise ParamsError(f"params file '{path}' is refused by pyradiomics: {exc}") from exc
    return params, text


def params_hash(params: dict) -> str:
    """Hash of the settings' meaning (not of comments or key order): sites compare it."""
    canonical = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


_extractors: dict[str, tuple] = {}


def _extractors_for(params: dict):
    key = params_hash(params)
    if key not in _extractors:
        preprocess = featureextractor.RadiomicsFeatureExtractor(copy.deepcopy(params))
        preprocess.settings["additionalInfo"] = False
        compute = featureextractor.RadiomicsFeatureExtractor(copy.deepcopy(params))
        compute.settings.update(
            additionalInfo=False, normalize=False, resampledPixelSpacing=None, preCrop=False
        )
        _extractors[key] = (preprocess, compute)
    return _extractors[key]


def extract_case(case: Case, params: dict, *, label: int | None, min_voxels: int) -> dict:
    """Check and extract one case.

    Returns
    -------
    dict with ``features`` ({'<phase>__<feature>': float}), ``repeat`` (same, from the
    repeat mask, or None), ``label`` and ``timings`` (seconds for read, resample, extract).
    Raises `CaseError` for anything wrong with the case's data.
    """
    pid = case.patient_id
    timings = {"read": 0.0, "resample": 0.0, "extract": 0.0}
    start = time.perf_counter()
    mask = imaging.read_image(case.mask, pid, schemas.MASK)
    label = imaging.check_mask(mask, pid, schemas.MASK, label=label, min_voxels=min_voxels)
    repeat = None
    if case.mask_repeat is not None:
        repeat = imaging.read_image(case.mask_repeat, pid, schemas.MASK_REPEAT)
        imaging.check_mask(repeat, pid, schemas.MASK_REPEAT, label=label, min_voxels=min_voxels)
    images = {}
    for phase, path in case.images.items():
        field = schemas.image_column(phase)
        image = imaging.read_image(path, pid, field)
        imaging.check_finite(image, pid, field)
        imaging.check_same_grid(image, mask, pid, field, schemas.MASK)
        if repeat is not None:
            imaging.check_same_grid(image, repeat, pid, field, schemas.MASK_REPEAT)
        images[phase] = image
    timings["read"] = time.perf_counter() - start

    features = {}
    repeat_features = {} if repeat is not None else None
    for phase, image in images.items():
        features.update(_phase_features(image, mask, phase, params, label, pid, schemas.MASK, timings))
        if repeat is not None:
            repeat_features.update(
                _phase_features(image, repeat, phase, params, label, pid, schemas.MASK_REPEAT, timings)
            )
    for values, field in ((features, schemas.MASK), (repeat_features or {}, schemas.MASK_REPEAT)):
        bad = [name for name, value in values.items() if not np.isfinite(value)]
        if bad:
            raise CaseError(pid, field, f"pyradiomics returned {len(bad)} NaN/inf feature(s), e.g. {bad[0]}; "
                                        "the region is probably too small or flat")
    return {"features": features, "repeat": repeat_features, "label": label, "timings": timings}


def _phase_features(image, mask, phase, params, label, pid, mask_field, timings) -> dict:
    preprocess, compute = _extractors_for(params)
    settings = dict(preprocess.settings, label=label)
    try:
        start = time.perf_counter()
        image, mask = preprocess.loadImage(image, mask, None, **settings)
        middle = time.perf_counter()
        values = compute.execute(image, mask, label=label)
        timings["resample"] += middle - start
        timings["extract"] += time.perf_counter() - middle
    except (ValueError, RuntimeError) as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CaseError(pid, mask_field, f"pyradiomics refused phase '{phase}': {message}") from exc
    out = {}
    for name, value in values.items():
        if name.startswith("diagnostics_"):
            continue
        out[schemas.feature_column(phase, name)] = float(np.asarray(value))
    return out
