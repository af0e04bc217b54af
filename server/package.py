"""The model package: everything a new hospital needs to validate the study's models alone.

A directory (``RUN_DIR/package`` by default) with ``manifest.json`` (format version, fedrad
version, the study, extraction-settings hash, features, harmonisation reference id and
design, selected features, every model's coefficients, HR/OR table, baseline hazard,
score sources, cut-off and calibration, the scoring plan, and the study's metrics),
``params.yaml`` (the pyradiomics settings the sites extracted with) and
``harmonisation.npz`` (the reference arrays), and with a CNN ``cnn_weights.npz`` (its final weights; the
manifest's ``cnn`` entry has its settings, so a new site computes the DL-score and deep features itself).
``signature.json`` is the coordinator's Ed25519 signature over every other file (common/package.py);
`fedrad validate --trust KEY.pub` refuses the package unless it verifies.

The signing key (PEM, as ``openssl genpkey -algorithm ed25519`` writes it), first found of:
``--sign-key`` of `fedrad package`; the key `fedrad coordinator run --sign-key` named in
``RUN_DIR/signing-key.path`` (the consortium's, from deploy/make-credentials.sh); else
``RUN_DIR/package-signing.key``, generated once per run directory (`fedrad local`, `make demo`).
Its public half is written beside the package, ``<package>-signing.pub``
(``RUN_DIR/package-signing.pub`` for the default folder).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedrad import common
from fedrad.common import signing
from fedrad.common.package import (CNN_WEIGHTS, MANIFEST, PACKAGE_FORMAT, PARAMS, REFERENCE_ARRAYS, SIGNATURE,
                                   PackageError, package_digests)
from fedrad.common.study import Study

#: the run directory's own signing key (generated once) and the file naming the consortium's key instead
RUN_KEY = "package-signing.key"
KEY_POINTER = "signing-key.path"
#: every file a package may hold
PACKAGE_FILES = (MANIFEST, PARAMS, REFERENCE_ARRAYS, CNN_WEIGHTS, SIGNATURE)

MODEL_KEYS = ("kind", "penalty", "columns", "coefficients", "table", "baseline", "score_sources", "independent",
              "nomogram", "n", "events", "sites")


def write_package(run_dir: Path, results: dict, study: Study, out: Path | None = None,
                  sign_key: Path | None = None) -> Path:
    """Write and sign the package (``sign_key``, else the run directory's key: see the module docstring)."""
    run_dir = Path(run_dir)
    out = Path(out) if out else run_dir / "package"
    if "models" not in results:
        raise PackageError(f"run '{run_dir}' has no fitted models to package")
    key = load_signing_key(sign_key) if sign_key else run_signing_key(run_dir)
    _empty_package_folder(out)
    census, harmonise = results["census"], results.get("harmonise")
    (out / PARAMS).write_text(census.get("params_yaml", ""), encoding="utf-8")
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
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str), encoding="utf-8")
    (out / SIGNATURE).write_text(json.dumps(signing.sign(key, package_digests(out)), indent=2), encoding="utf-8")
    trust_file(out).write_bytes(signing.public_pem(key.public_key()))
    return out


def _empty_package_folder(out: Path) -> None:
    """``out`` empty, or an older package's files removed: everything in the folder gets signed."""
    if out.exists():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in PACKAGE_FILES or not p.is_file())
        if foreign:
            raise PackageError(f"'{out}' holds '{foreign[0]}', which is not a model package file; write the "
                               "package to an empty folder")
        for name in PACKAGE_FILES:
            (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def trust_file(package: Path) -> Path:
    """Where the public half of a package's signing key is written: beside it, ``<package>-signing.pub``."""
    package = Path(package)
    return package.with_name(f"{package.name}-signing.pub")


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """The coordinator's Ed25519 private key (unencrypted PEM: ``openssl genpkey -algorithm ed25519``)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise PackageError(f"signing key '{path}' does not exist (deploy/make-credentials.sh makes "
                           "package-signing.key)") from None
    except OSError as exc:
        raise PackageError(f"signing key '{path}' cannot be read: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise PackageError(f"signing key '{path}' is not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise PackageError(f"signing key '{path}' is not an Ed25519 key (fedrad signs packages with Ed25519)")
    return key


def run_signing_key(run_dir: Path) -> Ed25519PrivateKey:
    """The key the run named (``RUN_DIR/signing-key.path``), else the run directory's own, made on first use."""
    run_dir = Path(run_dir)
    pointer = run_dir / KEY_POINTER
    if pointer.is_file():
        named = Path(pointer.read_text(encoding="utf-8").strip())
        if not named.is_file():
            raise PackageError(f"{pointer} names the signing key '{named}', which does not exist here")
        return load_signing_key(named)
    own = run_dir / RUN_KEY
    if own.exists():
        return load_signing_key(own)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    run_dir.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(own, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(pem)
    return key


def name_signing_key(run_dir: Path, key: Path | None) -> None:
    """`fedrad coordinator run --sign-key KEY`: the run's package stage signs with KEY (None: forget a named key)."""
    pointer = Path(run_dir) / KEY_POINTER
    if key is None:
        pointer.unlink(missing_ok=True)
        return
    load_signing_key(key)  # refuse a wrong key before the study starts
    pointer.write_text(f"{Path(key).absolute()}\n", encoding="utf-8")


def _package_cnn(cnn: dict | None, study: Study, out: Path) -> dict | None:
    if not cnn:
        return None
    shutil.copyfile(cnn["weights"], out / CNN_WEIGHTS)
    return {"settings": study.cnn.model_dump(mode="json"), "weights": CNN_WEIGHTS, "weights_id": cnn["weights_id"],
            "deep_features": cnn["deep_features"], "dl_score_c_index": cnn["dl_score_c_index"]}
