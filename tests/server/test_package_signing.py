"""The model package is signed at the coordinator and verified before use (no federation: a hand-written
run). An edited manifest (a coefficient's sign flipped) gave other figures and exit 0; a truncated one a
JSONDecodeError traceback."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from fedrad.common import signing
from fedrad.common.package import MANIFEST, PARAMS, SIGNATURE, PackageError, read_package
from fedrad.common.study import parse_study
from fedrad.server.cli import app
from fedrad.server.package import KEY_POINTER, RUN_KEY, name_signing_key, trust_file, write_package

FEATURE = "table__original_firstorder_F00"
STUDY = {"study": {"name": "signed", "stages": ["census", "fit", "evaluate", "package"]},
         "outcome": {"horizons": [24]}, "models": [{"name": "rad", "features": [FEATURE]}]}
RESULTS = {
    "run_id": 5, "status": "completed",
    "census": {"params_yaml": "setting:\n  binWidth: 25\n", "params_hash": "ab" * 32, "features": [FEATURE]},
    "models": {"rad": {"kind": "cox", "penalty": "none", "columns": [FEATURE], "coefficients": {FEATURE: 0.8}}},
    "evaluation_settings": {"scoring": {"models": [{"name": "rad", "columns": [FEATURE], "beta": [0.8],
                                                    "cutoff": 0.4}]}},
    "evaluation": {"pooled": {"rad": {"c_index": 0.758, "calibration_slope": 1.0}}},
}


def _pem_key(path: Path) -> Path:
    key = Ed25519PrivateKey.generate()
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    path.with_suffix(".pub").write_bytes(signing.public_pem(key.public_key()))
    return path


@pytest.fixture()
def run(tmp_path) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "results.json").write_text(json.dumps(RESULTS), encoding="utf-8")
    (run_dir / "study.toml").write_text('[study]\nname = "signed"\nstages = ["census", "fit", "evaluate", "package"]\n'
                                        '[outcome]\nhorizons = [24]\n[[models]]\nname = "rad"\n'
                                        f'features = ["{FEATURE}"]\n', encoding="utf-8")
    return run_dir


@pytest.fixture()
def package(run) -> Path:
    return write_package(run, RESULTS, parse_study(STUDY))


def _trusted(package: Path):
    return signing.load_public_key(trust_file(package))


def test_the_package_stage_signs_every_file_with_a_key_made_once_per_run_directory(run, package):
    key = run / RUN_KEY
    assert key.stat().st_mode & 0o777 == 0o600
    assert trust_file(package) == run / "package-signing.pub"  # the public half, beside the package
    document = json.loads((package / SIGNATURE).read_text(encoding="utf-8"))
    assert set(document["files"]) == {MANIFEST, PARAMS}  # the manifest is covered too
    manifest = read_package(package, _trusted(package))
    assert manifest["models"]["rad"]["coefficients"] == {FEATURE: 0.8}
    before = key.read_bytes()
    write_package(run, RESULTS, parse_study(STUDY))  # again: same key, still verifies
    assert key.read_bytes() == before
    read_package(package, _trusted(package))


def test_a_flipped_coefficient_in_the_manifest_is_refused_naming_the_file(package):
    manifest = json.loads((package / MANIFEST).read_text(encoding="utf-8"))
    manifest["models"]["rad"]["coefficients"][FEATURE] = -0.8
    (package / MANIFEST).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    with pytest.raises(PackageError, match=r"package file 'manifest.json' .*is altered"):
        read_package(package, _trusted(package))


def test_unsigned_other_key_missing_and_added_files_are_refused(tmp_path, package):
    trusted = _trusted(package)
    other = Ed25519PrivateKey.generate()
    with pytest.raises(PackageError, match=r"signed by key [0-9a-f]{16}, not by the trusted key"):
        read_package(package, other.public_key())
    (package / "extra.txt").write_text("not signed", encoding="utf-8")
    with pytest.raises(PackageError, match="holds 'extra.txt', which the signature does not cover"):
        read_package(package, trusted)
    (package / "extra.txt").unlink()
    params = (package / PARAMS).read_text(encoding="utf-8")
    (package / PARAMS).unlink()
    with pytest.raises(PackageError, match="package file 'params.yaml' is missing"):
        read_package(package, trusted)
    (package / PARAMS).write_text(params, encoding="utf-8")
    read_package(package, trusted)
    # a signature document whose listing is edited to match an edited manifest no longer verifies
    (package / MANIFEST).write_text((package / MANIFEST).read_text(encoding="utf-8").replace("0.8", "-0.8"), encoding="utf-8")
    document = json.loads((package / SIGNATURE).read_text(encoding="utf-8"))
    document["files"][MANIFEST] = signing.file_digest(package / MANIFEST)
    (package / SIGNATURE).write_text(json.dumps(document), encoding="utf-8")
    with pytest.raises(PackageError, match="signature.json: its signature does not verify with the trusted key"):
        read_package(package, trusted)
    (package / SIGNATURE).unlink()
    with pytest.raises(PackageError, match="is not signed"):
        read_package(package, trusted)


def test_a_truncated_manifest_is_a_clear_error_naming_the_file(run, package):
    text = (package / MANIFEST).read_text(encoding="utf-8")
    (package / MANIFEST).write_text(text[: len(text) // 2], encoding="utf-8")
    with pytest.raises(PackageError, match="package file 'manifest.json' .*is altered"):
        read_package(package, _trusted(package))
    # signed as it is (a coordinator's disk filled up mid-write): still a sentence, not a traceback
    key = serialization.load_pem_private_key((run / RUN_KEY).read_bytes(), password=None)
    from fedrad.common.package import package_digests

    (package / SIGNATURE).write_text(json.dumps(signing.sign(key, package_digests(package))), encoding="utf-8")
    with pytest.raises(PackageError, match=r"manifest.json' is not valid JSON \(.*line"):
        read_package(package, _trusted(package))


def _validate(package: Path, trust: Path, tmp_path: Path):
    return CliRunner().invoke(app, ["validate", "--package", str(package), "--store", str(tmp_path / "nostore"),
                                    "--trust", str(trust), "--out", str(tmp_path / "out")])


def test_fedrad_validate_refuses_an_edited_or_truncated_manifest_and_a_private_key(run, package, tmp_path):
    manifest = json.loads((package / MANIFEST).read_text(encoding="utf-8"))
    manifest["models"]["rad"]["coefficients"][FEATURE] = -0.8
    (package / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")
    edited = _validate(package, trust_file(package), tmp_path)
    assert edited.exit_code == 2 and "manifest.json" in edited.output and "altered" in edited.output, edited.output
    assert edited.exception is None or isinstance(edited.exception, SystemExit)
    (package / MANIFEST).write_text('{"format": 1, "sco', encoding="utf-8")
    truncated = _validate(package, trust_file(package), tmp_path)
    assert truncated.exit_code == 2 and "manifest.json" in truncated.output, truncated.output
    assert "Traceback" not in truncated.output and "JSONDecodeError" not in truncated.output
    private = _validate(package, run / RUN_KEY, tmp_path)
    assert private.exit_code == 2 and "is a private key" in private.output
    unsigned = CliRunner().invoke(app, ["validate", "--package", str(package), "--store", "s"])
    assert unsigned.exit_code == 2 and "--trust" in unsigned.output  # the key is not optional
    assert not (tmp_path / "out").exists()  # nothing written


def test_fedrad_package_signs_with_the_given_key_and_says_how_to_validate(run, tmp_path):
    key = _pem_key(tmp_path / "consortium.key")
    made = CliRunner().invoke(app, ["package", str(run), "--sign-key", str(key)])
    assert made.exit_code == 0, made.output
    assert "--trust" in made.output and "package-signing.pub" in made.output
    consortium = signing.load_public_key(key.with_suffix(".pub"))
    assert read_package(run / "package", consortium)["run_id"] == 5
    assert not (run / RUN_KEY).exists()  # no key of the run's own was made
    assert trust_file(run / "package").read_bytes() == key.with_suffix(".pub").read_bytes()
    bad = CliRunner().invoke(app, ["package", str(run), "--sign-key", str(key.with_suffix(".pub"))])
    assert bad.exit_code == 2 and "is not an unencrypted PEM private key" in bad.output


def test_the_key_coordinator_run_names_signs_the_package_stage(run, tmp_path):
    key = _pem_key(tmp_path / "consortium.key")
    name_signing_key(run, key)
    assert Path((run / KEY_POINTER).read_text(encoding="utf-8").strip()) == key.absolute()
    package = write_package(run, RESULTS, parse_study(STUDY))
    read_package(package, signing.load_public_key(key.with_suffix(".pub")))
    assert not (run / RUN_KEY).exists()
    name_signing_key(run, None)
    assert not (run / KEY_POINTER).exists()
    with pytest.raises(PackageError, match="signing key .* does not exist"):
        name_signing_key(run, tmp_path / "nokey")


def test_coordinator_run_needs_a_signing_key_for_a_study_with_a_package_stage(run, tmp_path):
    ca = tmp_path / "ca.crt"
    ca.write_text("placeholder", encoding="utf-8")
    refused = CliRunner().invoke(app, ["coordinator", "run", "--study", str(run / "study.toml"), "--superlink",
                                       "127.0.0.1:1", "--out", str(tmp_path / "out"), "--ca", str(ca)])
    assert refused.exit_code == 2 and "--sign-key" in refused.output, refused.output
    assert not (tmp_path / "out" / "logs").exists()  # refused before the run directory was prepared


def test_a_package_is_not_written_over_a_folder_of_other_files(run, tmp_path):
    out = tmp_path / "shared"
    out.mkdir()
    (out / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(PackageError, match="holds 'notes.txt', which is not a model package file"):
        write_package(run, RESULTS, parse_study(STUDY), out)
    assert os.listdir(out) == ["notes.txt"]
