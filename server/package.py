"""The model package: everything a new hospital needs to validate the study's models alone.

A directory (``RUN_DIR/package`` by default) with ``manifest.json`` (format version, fedrad
version, the study, extraction-settings hash, features, harmonisation reference id and
design, selected features, every model's coefficients, HR/OR table, baseline hazard,
score sources, cut-off and calibration, the scoring plan, and the study's metrics),
``params.yaml`` (the pyradiomics settings the sites extracted with) and
``harmonisation.npz`` (the reference arrays), and with a CNN ``cnn_weights.npz`` (its final weights; the
manifest's ``cnn`` entry has its settings, so a new site computes the DL-score and deep features itself). ``manifest.json["files"]`` holds each file's
sha256 so a site can check the package it received.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from fedrad import common
from fedrad.common.package import CNN_WEIGHTS, MANIFEST, PACKAGE_FORMAT, PARAMS, REFERENCE_ARRAYS, PackageError
from fedrad.common.study import Study

MODEL_KEYS = ("kind", "penalty", "columns", "coefficients", "table", "baseline", "score_sources", "independent",
              "nomogram", "n", "events", "sites")


def write_package(run_dir: Path, results: dict, study: Study, out: Path | None = None) -> Path:
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "package"
    if "models" not in results:
        raise PackageError(f"run '{run_dir}' has no fitted models to package")
    out.mkdir(parents=True, exist_ok=True)
    census, harmonise = results["census"], results.get("harmonise")
    (out / PARAMS).write_text(census.get("params_yaml", ""))
    harmonisation = None
    if harmonise:
        shutil.copyfile(Path(harmonise["reference_dir"]) / REFERENCE_ARRAYS, out / REFERENCE_ARRAYS)
        harmonisation = {"reference": harmonise["reference"], "design": harmonise["design"],
                         "settings": harmonise["settings"], "arrays": REFERENCE_ARRAYS}
    scoring = results.get("evaluation_settings", {}).get("scoring")
    slopes = results.get("evaluation", {}).get("pooled", {})
    models = {}
    for name, model in results["models"].items():
        entry = {k: model[k] for k in MODEL_KEYS if k in model}
        plan_entry = next((m for m in (scoring or {}).get("models", []) if m["name"] == name), None)
        if plan_entry:
            entry["cutoff"] = plan_entry["cutoff"]
        if name in slopes:
            entry["calibration"] = {k: slopes[name].get(k) for k in ("calibration_intercept", "calibration_slope")}
        models[name] = entry
    manifest = {
        "format": PACKAGE_FORMAT, "fedrad_version": common.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "run_id": results.get("run_id"),
        "study": study.model_dump(mode="json"), "params_hash": census["params_hash"], "params": PARAMS,
        "features": census["features"], "harmonisation": harmonisation,
        "selected_features": (results.get("select") or {}).get("selected", []),
        "models": models, "scoring": scoring, "evaluation": results.get("evaluation", {}),
        "cnn": _package_cnn(results.get("cnn"), study, out),
    }
    manifest["files"] = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
                         for p in sorted(out.iterdir()) if p.name != MANIFEST and p.is_file()}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
    return out


def _package_cnn(cnn: dict | None, study: Study, out: Path) -> dict | None:
    if not cnn:
        return None
    shutil.copyfile(cnn["weights"], out / CNN_WEIGHTS)
    return {"settings": study.cnn.model_dump(mode="json"), "weights": CNN_WEIGHTS, "weights_id": cnn["weights_id"],
            "deep_features": cnn["deep_features"], "dl_score_c_index": cnn["dl_score_c_index"]}
