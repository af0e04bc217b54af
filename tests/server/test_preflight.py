"""`fedrad local` checks the study and every store before it starts a Flower process (a TOML syntax error took
15-26 s to be reported, after the SuperLink and SuperNodes had started)."""

from __future__ import annotations

import time

import pytest
from typer.testing import CliRunner

from fedrad.client.table_import import prepare_from_table
from fedrad.server.cli import app
from fedrad.server.preflight import PreflightError, preflight
from tests.conftest import TEST_DATA
from tests.federation.cohort import hospital_rows, write_stores

SIZES = {"siteA": 12, "siteB": 10}
GOOD = """
[study]
name = "preflight"
stages = ["census", "harmonise", "fit"]
[features]
include = ["table__original_firstorder_*"]
[harmonise]
batch = "scanner"
categorical = ["sex"]
continuous = ["age"]
[[models]]
name = "rad"
features = ["table__original_firstorder_F0[0-3]"]
clinical = ["age"]
"""


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("preflight")
    table = hospital_rows(seed=3, sizes=SIZES, n_features=4)
    stores = write_stores(root / "stores", table)
    lacking = table[table["site"] == "siteB"].drop(columns=["site", "original_firstorder_F03", "age"])
    lacking.to_csv(root / "siteC.csv", index=False)
    prepare_from_table(root / "siteC.csv", root / "siteC", scanner_col="scanner", clinical_cols=["sex"],
                       params_path=TEST_DATA / "pyradiomics_baseline.yaml")
    return {**stores, "siteC": root / "siteC"}


class NotStarted:
    """Stands in for LocalFederation: a test fails if a federation is constructed."""

    def __init__(self, *args, **kwargs):
        raise AssertionError("a Flower federation was started")


def _local(tmp_path, study_text: str, sites: dict, monkeypatch):
    monkeypatch.setattr("fedrad.server.local.LocalFederation", NotStarted)
    study = tmp_path / "study.toml"
    study.write_text(study_text, encoding="utf-8")
    args = ["local", "--study", str(study), "--out", str(tmp_path / "run")]
    for name, store in sites.items():
        args += ["--site", f"{name}={store}"]
    started = time.monotonic()
    result = CliRunner().invoke(app, args)
    return result, time.monotonic() - started


def test_a_good_study_passes(stores):
    study_file = stores["siteA"].parent / "good.toml"
    study_file.write_text(GOOD, encoding="utf-8")
    assert preflight(study_file, {s: stores[s] for s in SIZES}).study.name == "preflight"


def test_a_toml_syntax_error_fails_at_once_without_starting_flower(tmp_path, stores, monkeypatch):
    result, seconds = _local(tmp_path, GOOD.replace('name = "rad"', 'name = "rad'), {s: stores[s] for s in SIZES},
                             monkeypatch)
    assert result.exit_code == 2, result.output
    assert "is not valid TOML" in result.output and "study.toml" in result.output
    assert seconds < 10
    assert not (tmp_path / "run" / "logs").exists() and not (tmp_path / "run" / "flwr").exists()


def test_a_store_lacking_what_the_study_names_is_refused_naming_site_and_column(tmp_path, stores, monkeypatch):
    study = GOOD.replace('include = ["table__original_firstorder_*"]',
                         'include = ["table__original_firstorder_*", "table__original_shape_*"]')
    sites = {"siteA": stores["siteA"], "siteC": stores["siteC"], "siteZ": tmp_path / "nowhere"}
    result, seconds = _local(tmp_path, study + '[sites]\nvalidation = ["site-C"]\n', sites, monkeypatch)
    assert result.exit_code == 2, result.output
    out = " ".join(result.output.split())
    assert "no process was started" in out
    assert "[sites] validation names 'site-C', not a site of this run (sites: 'siteA', 'siteC', 'siteZ')" in out
    assert "site 'siteA'" in out and "[features] include 'table__original_shape_*' matches no feature column" in out
    assert "site 'siteZ'" in out and "the store does not exist" in out
    assert "[harmonise] covariate column 'age' is not a column of the store" in out
    assert "model 'rad' feature 'table__original_firstorder_F0[0-3]'" not in out  # F00-F02 are there
    assert seconds < 10 and not (tmp_path / "run" / "logs").exists()


def test_each_kind_of_missing_column_is_named(stores, tmp_path):
    study = tmp_path / "study.toml"
    study.write_text(GOOD.replace('features = ["table__original_firstorder_F0[0-3]"]',
                                  'features = ["table__original_firstorder_F03", "table__wavelet_*"]\n'
                                  'scores = ["dl_score"]')
                     .replace('clinical = ["age"]', 'clinical = ["grade"]'), encoding="utf-8")
    with pytest.raises(PreflightError) as refused:
        preflight(study, {"siteC": stores["siteC"]})
    text = str(refused.value)
    for problem in ("model 'rad' feature 'table__original_firstorder_F03' matches no feature column",
                    "model 'rad' feature 'table__wavelet_*' matches no feature column",
                    "model 'rad' clinical column 'grade' is not a column of the store",
                    "the models use score(s) 'dl_score', but the store has no scores.parquet"):
        assert problem in text, text
    assert text.count("site 'siteC'") == text.count("\n")  # one line per problem, each naming the site
