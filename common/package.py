"""The model package's layout and its reader (the writer is the coordinator's: `server/package.py`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from fedrad.common.errors import FedradError

__all__ = ["PACKAGE_FORMAT", "MANIFEST", "PARAMS", "REFERENCE_ARRAYS", "PackageError", "read_package"]

PACKAGE_FORMAT = 1
MANIFEST = "manifest.json"
PARAMS = "params.yaml"
REFERENCE_ARRAYS = "harmonisation.npz"
CNN_WEIGHTS = "cnn_weights.npz"


class PackageError(FedradError):
    """A model package is missing, altered or incomplete, or does not fit the store it is used on."""


def read_package(path: Path) -> dict:
    """The manifest, after checking the format and every file's sha256."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise PackageError(f"'{path}' is not a fedrad model package (no {MANIFEST})")
    manifest = json.loads((path / MANIFEST).read_text())
    if manifest.get("format") != PACKAGE_FORMAT:
        raise PackageError(f"package '{path}' has format {manifest.get('format')}; this fedrad reads "
                           f"format {PACKAGE_FORMAT}")
    for name, digest in manifest.get("files", {}).items():
        file = path / name
        if not file.is_file() or hashlib.sha256(file.read_bytes()).hexdigest() != digest:
            raise PackageError(f"package file '{name}' is missing or altered (sha256 does not match the manifest)")
    if not manifest.get("scoring"):
        raise PackageError(f"package '{path}' has no scoring plan: the study ran without the 'evaluate' stage")
    return manifest
