"""Ed25519 signatures over a set of files (the model package): canonical bytes, sign, verify.

The signed bytes are a fixed domain line, then one ``<sha256>  <name>`` line per file, sorted by
name: signing the digests signs the files' contents (sha256 is collision resistant), and the
listing lets a verifier name the one file that is missing, altered or not covered. The signer's
key file handling is the coordinator's (server/package.py); a verifier only reads a public key
(:func:`load_public_key`). Keys are PEM, as ``openssl genpkey -algorithm ed25519`` writes them
(deploy/make-credentials.sh).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from pathlib import Path

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedrad.common.errors import FedradError

__all__ = ["ALGORITHM", "SignatureError", "KeyFileError", "canonical_bytes", "file_digest", "key_id", "sign",
           "verify", "load_public_key", "public_pem"]

ALGORITHM = "ed25519"
#: first line of the signed bytes: a signature made for anything else never verifies as a file set
DOMAIN = b"fedrad signed file set v1\n"


class SignatureError(FedradError):
    """A signature document is malformed, or its signature does not verify with the trusted key."""


class KeyFileError(FedradError):
    """A key file is missing, unreadable, or not the kind of Ed25519 key asked for."""


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def canonical_bytes(digests: dict[str, str]) -> bytes:
    """The bytes a file set's signature is over: the domain line, then ``<sha256>  <name>`` per file, by name."""
    for name in digests:
        if not name or "/" in name or "\\" in name or "\n" in name or name in (".", ".."):
            raise SignatureError(f"file name {name!r} cannot be signed (one plain name per file)")
    return DOMAIN + "".join(f"{digests[name]}  {name}\n" for name in sorted(digests)).encode()


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short name of a public key (first 16 hex digits of the sha256 of its 32 raw bytes)."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign(private_key: Ed25519PrivateKey, digests: dict[str, str]) -> dict:
    """The signature document of a file set (JSON-able)."""
    signature = private_key.sign(canonical_bytes(digests))
    return {"algorithm": ALGORITHM, "key_id": key_id(private_key.public_key()), "files": dict(sorted(digests.items())),
            "signature": base64.b64encode(signature).decode()}


def verify(public_key: Ed25519PublicKey, document: dict) -> dict[str, str]:
    """The signed ``{name: sha256}`` once ``document`` verifies with ``public_key``; else SignatureError."""
    if not isinstance(document, dict) or not isinstance(document.get("files"), dict) \
            or not isinstance(document.get("signature"), str):
        raise SignatureError("it is not a signature document (needs 'files' and 'signature')")
    if document.get("algorithm") != ALGORITHM:
        raise SignatureError(f"its algorithm is {document.get('algorithm')!r}; fedrad signs with {ALGORITHM}")
    digests = document["files"]
    if not all(isinstance(d, str) for d in digests.values()):
        raise SignatureError("its 'files' must map each file name to a sha256 in hex")
    try:
        signature = base64.b64decode(document["signature"], validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("its 'signature' is not base64") from None
    try:
        public_key.verify(signature, canonical_bytes(digests))
    except InvalidSignature:
        trusted, claimed = key_id(public_key), document.get("key_id")
        if claimed and claimed != trusted:
            raise SignatureError(f"it was signed by key {claimed}, not by the trusted key {trusted}") from None
        raise SignatureError(f"its signature does not verify with the trusted key {trusted}") from None
    return digests


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file (``openssl pkey -pubout``); refuses a private key."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"public key '{path}' does not exist") from None
    except OSError as exc:
        raise KeyFileError(f"public key '{path}' cannot be read: {exc.strerror}") from None
    if b"PRIVATE KEY" in data:
        raise KeyFileError(f"'{path}' is a private key; give its public half (the .pub file)")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFileError(f"'{path}' is not a PEM public key (expected an Ed25519 key, "
                           "as deploy/make-credentials.sh writes package-signing.pub)") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"'{path}' is not an Ed25519 public key (fedrad signs packages with Ed25519)")
    return key


def public_pem(public_key: Ed25519PublicKey) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
