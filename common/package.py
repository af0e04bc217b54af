"""The model package's layout, its signature check and its reader (the writer is the coordinator's:
`server/package.py`).

``signature.json`` is the coordinator's Ed25519 signature over every other file of the package,
``manifest.json`` included (common/signing.py): a package is read only after it verifies with the
public key the reader trusts, and only the files it lists are there, unchanged.
"""

from __future__ import annotations

import json
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from fedrad.common import signing
from fedrad.common.errors import FedradError

__all__ = ["PACKAGE_FORMAT", "MANIFEST", "PARAMS", "REFERENCE_ARRAYS", "SIGNATURE", "PackageError", "read_package",
           "package_digests", "verify_package"]

PACKAGE_FORMAT = 1
MANIFEST = "manifest.json"
PARAMS = "params.yaml"
REFERENCE_ARRAYS = "harmonisation.npz"
CNN_WEIGHTS = "cnn_weights.npz"
SIGNATURE = "signature.json"


class PackageError(FedradError):
    """A model package is missing, unsigned, altered or incomplete, or does not fit the store it is used on."""


def package_digests(path: Path) -> dict[str, str]:
    """sha256 of every file of the package folder but its signature (what the coordinator signs)."""
    path = Path(path)
    extra = sorted(p.name for p in path.iterdir() if not p.is_file())
    if extra:
        raise PackageError(f"package '{path}' holds '{extra[0]}', which is not a file; a package is files only")
    return {p.name: signing.file_digest(p) for p in sorted(path.iterdir()) if p.name != SIGNATURE}


def verify_package(path: Path, trusted: Ed25519PublicKey) -> None:
    """Refuse a package that is unsigned, signed by another key, or whose files differ from the signed ones."""
    path = Path(path)
    if not (path / SIGNATURE).is_file():
        raise PackageError(f"package '{path}' is not signed (no {SIGNATURE}); ask the coordinator for the package "
                           "its study run signed (`fedrad package RUN_DIR --sign-key KEY` signs one)")
    try:
        document = json.loads((path / SIGNATURE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PackageError(f"package file '{SIGNATURE}' of '{path}' is damaged (not JSON: {exc})") from None
    try:
        signed = signing.verify(trusted, document)
    except signing.SignatureError as exc:
        raise PackageError(f"package '{path}' is refused: {SIGNATURE}: {exc}") from None
    present = {p.name for p in path.iterdir() if p.name != SIGNATURE}
    for name in sorted(signed):
        if name not in present or not (path / name).is_file():
            raise PackageError(f"package file '{name}' is missing from '{path}' (the signature lists it)")
        if signing.file_digest(path / name) != signed[name]:
            raise PackageError(f"package file '{name}' of '{path}' is altered: its sha256 differs from the "
                               "signed one; the package is refused")
    extra = sorted(present - set(signed))
    if extra:
        raise PackageError(f"package '{path}' holds '{extra[0]}', which the signature does not cover; the package "
                           "is refused")


def read_package(path: Path, trusted: Ed25519PublicKey) -> dict:
    """The manifest, once the package verifies with ``trusted`` (its every file, the manifest included)."""
    path = Path(path)
    if not path.is_dir() or not (path / MANIFEST).is_file():
        raise PackageError(f"'{path}' is not a fedrad model package (no {MANIFEST})")
    verify_package(path, trusted)
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PackageError(f"package file '{path / MANIFEST}' is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise PackageError(f"package file '{path / MANIFEST}' holds a JSON {type(manifest).__name__}, not an object")
    if manifest.get("format") != PACKAGE_FORMAT:
        raise PackageError(f"package '{path}' has format {manifest.get('format')}; this fedrad reads "
                           f"format {PACKAGE_FORMAT}")
    if not manifest.get("scoring"):
        raise PackageError(f"package '{path}' has no scoring plan: the study ran without the 'evaluate' stage")
    return manifest
