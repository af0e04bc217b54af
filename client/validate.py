"""`fedrad validate`: a new hospital validates a finished model package alone, offline.

Checks first (a clear refusal, nothing written): the package verifies with the coordinator's public
key (``--trust``; the signature covers every file, the manifest included, and an unsigned package,
one signed by another key, or one with a file missing, altered or added is refused, the file named),
the store was extracted with the package's pyradiomics settings (same hash), and it holds every
feature the harmonisation and the models use. Then, on a working copy of the store under
``OUT/store`` (the hospital's store is never written): harmonise to the package's reference exactly
as a validation site of a federated study does, score every case with every model, and compute the
same per-site metrics the `evaluate` stage reports. Writes ``OUT/predictions.csv`` (one row per case
and model: linear predictor and predicted risk), ``OUT/metrics.json`` and prints a table.
When the models use the CNN's DL-score or deep features, the package's network computes them from the
hospital's own images (found through the manifest the store was prepared from). Nothing leaves the machine.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from fedrad.client.metrics_table import CONSOLE, metrics_table as table_of_metrics
from fedrad.client.site_cnn import write_cnn_outputs
from fedrad.client.site_evaluate import metrics_reply, score_model
from fedrad.client.site_harmonise import validate_reply
from fedrad.client.store import FEATURES, META, PARAMS as STORE_PARAMS, QUARANTINE, open_store
from fedrad.common import schemas
from fedrad.common.evaluation import site_metrics
from fedrad.common.messages import record_arrays
from fedrad.common.package import PackageError, read_package
from fedrad.common.signing import key_id, load_public_key
from fedrad.common.study import parse_study

SITE = "validation"


def check_store(manifest: dict, store) -> None:
    """Refuse a store extracted with other settings or lacking features the package needs."""
    if (store.params_hash or "") != manifest["params_hash"]:
        raise PackageError(
            f"store '{store.path}' was extracted with other pyradiomics settings (params hash "
            f"{(store.params_hash or 'none')[:12]}, the package's is {manifest['params_hash'][:12]}); re-extract "
            f"with the package's params.yaml: fedrad prepare ... --params PACKAGE/params.yaml")
    needed = list(manifest["features"]) if manifest.get("harmonisation") else []
    for model in manifest["scoring"]["models"]:
        needed += [c for c in model["columns"] if schemas.is_feature_column(c)]
        needed += [c for scores in model["scores"].values() for c in scores if schemas.is_feature_column(c)]
    if _needs_cnn(manifest) and not manifest.get("cnn"):
        raise PackageError("the package's models use the CNN's DL-score or deep features but it carries no CNN")
    missing = sorted({c for c in needed if c not in store.features.columns and not schemas.is_deep_feature(c)})
    if missing:
        raise PackageError(f"store '{store.path}' lacks {len(missing)} feature(s) the package's harmonisation or "
                           f"models use, e.g. {', '.join(missing[:5])}")
    clinical = sorted({c for m in manifest["scoring"]["models"] for c in m["columns"]
                       if not schemas.is_feature_column(c) and c not in {s for s in m["scores"]}
                       and c not in m["external_scores"]} - set(store.features.columns))
    if clinical:
        raise PackageError(f"store '{store.path}' lacks clinical column(s) the models use: {', '.join(clinical)}")


def _needs_cnn(manifest: dict) -> bool:
    """Whether a model uses the DL-score or deep features (which the site computes from its own images)."""
    return any("dl_score" in m["external_scores"] or any(schemas.is_deep_feature(c) for c in m["columns"])
               or any(schemas.is_deep_feature(c) for cs in m["scores"].values() for c in cs)
               for m in manifest["scoring"]["models"])


def _working_copy(store_path: Path, out: Path) -> Path:
    work = out / "store"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    for name in (FEATURES, META, QUARANTINE, STORE_PARAMS, "scores.parquet"):
        if (store_path / name).is_file():
            shutil.copyfile(store_path / name, work / name)
    return work


def validate(package: Path, store_path: Path, out: Path, trust: Path) -> dict:
    """``trust``: the coordinator's public key (PEM); the package is used only if it verifies with it."""
    trusted = load_public_key(trust)
    manifest = read_package(package, trusted)
    store = open_store(store_path)
    check_store(manifest, store)
    out = Path(out)
    work = open_store(_working_copy(Path(store_path), out))
    harmonisation = manifest.get("harmonisation")
    if harmonisation:
        arrays = dict(np.load(Path(package) / harmonisation["arrays"]))
        plan = {"features": manifest["features"], "design": harmonisation["design"],
                "reference": harmonisation["reference"]}
        validate_reply(work, plan, parse_study(manifest["study"], source="the package's study"), SITE, arrays,
                       run_id=0)
    if _needs_cnn(manifest):
        cnn = manifest["cnn"]
        write_cnn_outputs(work, cnn["settings"], dict(np.load(Path(package) / cnn["weights"])), cnn["weights_id"])
    scoring = manifest["scoring"]
    frames = []
    for model in scoring["models"]:
        scored = score_model(work, scoring, SITE, model)
        risk = np.full(len(scored.ids), np.nan)
        risk[scored.known] = scored.risk
        frames.append(pd.DataFrame({schemas.ID: scored.ids, "model": model["name"], "linear_predictor": scored.lp,
                                    "predicted_risk": risk, "high_risk": risk >= model["cutoff"]}))
    predictions = pd.concat(frames, ignore_index=True)
    predictions.to_csv(out / "predictions.csv", index=False)
    content, _ = metrics_reply(work, scoring, SITE, min_count=1)  # nothing leaves: no suppression needed
    metrics = site_metrics(scoring, record_arrays(content["arrays"]), True)
    report = {"package": str(Path(package).resolve()), "store": str(Path(store_path).resolve()),
              "study": manifest["study"]["study"]["name"], "fedrad_version": manifest["fedrad_version"],
              "signed_by": key_id(trusted),
              "metrics": metrics, "study_metrics": {k: v for k, v in manifest["evaluation"].items()
                                                    if k in ("pooled", "pooled_validation")}}
    (out / "metrics.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    return report


def metrics_table(report: dict) -> pd.DataFrame:
    """This hospital's figures per model, with the study's pooled C of the training sites beside them."""
    return table_of_metrics({SITE: report["metrics"], **report["study_metrics"]}, [SITE], ("cases", *CONSOLE),
                            models=list(report["metrics"]),
                            beside={"C (study, pooled training)": ("pooled", "c_index")})
