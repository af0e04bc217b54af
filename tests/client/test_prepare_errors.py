"""Each kind of bad input is quarantined with a message naming the case and the field,
and the good cases still reach the store."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from fedrad.client.cli import EXIT_QUARANTINED
from fedrad.server.cli import app  # the `fedrad` command
from tests.conftest import tumour_case, write_manifest, write_volume

GOOD = ("good-1", "good-2", "good-3")
CLINICAL = {"age": "61", "grade": "2"}


def _row(cells, time="12.5", event="1", **clinical):
    return {**cells, "time": time, "event": event, **CLINICAL, **clinical}


def _bad_cases(folder):
    """(patient_id, manifest row) for every image-level and row-level fault."""
    rows = []

    def case(pid, seed=0, **kwargs):
        return tumour_case(folder, pid, seed=seed, **kwargs)

    c = case("missing-file")
    c["image_venous"] = str(folder / "nowhere.nii.gz")
    rows.append(_row(c))

    c = case("corrupt-file")
    (folder / "corrupt.nii.gz").write_bytes(b"this is not a nifti file" * 20)
    c["image_venous"] = str(folder / "corrupt.nii.gz")
    rows.append(_row(c))

    c = case("size-mismatch")
    c["mask"] = str(write_volume(folder / "size_mask.nii.gz", np.ones((12, 24, 20), np.uint8)))
    rows.append(_row(c))

    c = case("spacing-mismatch")
    mask = np.zeros((12, 24, 24), np.uint8)
    mask[4:8, 8:16, 8:16] = 1
    c["mask"] = str(write_volume(folder / "spacing_mask.nii.gz", mask, spacing=(1.0, 1.0, 2.5)))
    rows.append(_row(c))

    c = case("origin-mismatch")
    c["mask"] = str(write_volume(folder / "origin_mask.nii.gz", mask, origin=(0.0, 5.0, 0.0)))
    rows.append(_row(c))

    c = case("direction-mismatch")
    c["mask"] = str(write_volume(folder / "direction_mask.nii.gz", mask,
                                 direction=(0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)))
    rows.append(_row(c))

    c = case("empty-mask")
    c["mask"] = str(write_volume(folder / "empty_mask.nii.gz", np.zeros((12, 24, 24), np.uint8)))
    rows.append(_row(c))

    c = case("several-labels")
    two = mask.copy()
    two[4:8, 8:12, 8:16] = 2
    c["mask"] = str(write_volume(folder / "two_labels.nii.gz", two))
    rows.append(_row(c))

    c = case("nan-voxels")
    values = np.full((12, 24, 24), 40.0, np.float32)
    values[6, 12, 12] = np.nan
    values[6, 12, 13] = np.inf
    # NRRD: ITK's NIfTI reader turns NaN/inf into 0 (observed with SimpleITK 2.5), so NIfTI cannot carry them
    c["image_venous"] = str(write_volume(folder / "nan.nrrd", values))
    rows.append(_row(c))

    c = case("tiny-mask")
    tiny = np.zeros((12, 24, 24), np.uint8)
    tiny[6, 12, 12:15] = 1
    c["mask"] = str(write_volume(folder / "tiny_mask.nii.gz", tiny))
    rows.append(_row(c))

    c = case("float-mask")
    c["mask"] = str(write_volume(folder / "half_mask.nii.gz", mask.astype(np.float32) * 0.5))
    rows.append(_row(c))

    c = case("four-d")
    for key, values in (("image_venous", np.full((2, 12, 24, 24), 40, np.int16)), ("mask", np.stack([mask] * 2))):
        volume = sitk.GetImageFromArray(values, isVector=False)  # (t, z, y, x) -> a 4-D image
        sitk.WriteImage(volume, str(folder / f"four_d_{key}.nii.gz"))
        c[key] = str(folder / f"four_d_{key}.nii.gz")
    rows.append(_row(c))

    c = case("mask-is-image")
    c["mask"] = c["image_venous"]
    rows.append(_row(c))

    rows.append(_row(case("time-missing"), time=""))
    rows.append(_row(case("time-text"), time="about a year"))
    rows.append(_row(case("time-negative"), time="-3"))
    rows.append(_row(case("event-bad"), event="2"))
    rows.append(_row(case("clinical-missing"), grade=""))
    rows.append(_row(case("dup-id")))
    rows.append(_row(case("dup-id", seed=1)))
    return rows


EXPECTED = [
    ("missing-file", "image_venous", r"file not found: .*nowhere\.nii\.gz"),
    ("corrupt-file", "image_venous", r"cannot read .*corrupt\.nii\.gz"),
    ("size-mismatch", "mask", r"size \(20, 24, 12\) differs from image_venous size \(24, 24, 12\)"),
    ("spacing-mismatch", "mask", r"spacing \(1, 1, 2\.5\) differs from image_venous spacing \(1, 1, 2\) \(by 0\.5"),
    ("origin-mismatch", "mask", r"origin \(0, 5, 0\) differs from image_venous origin \(0, 0, 0\)"),
    ("direction-mismatch", "mask", r"direction .* differs from image_venous direction"),
    ("empty-mask", "mask", r"mask is empty \(no non-zero voxels\)"),
    ("several-labels", "mask", r"mask has several labels \(1, 2\); choose one with --label"),
    ("nan-voxels", "image_venous", r"image has 2 NaN/inf voxels"),
    ("tiny-mask", "mask", r"mask has 3 voxels with label 1; at least 10 required"),
    ("float-mask", "mask", r"^mask is not a label image \(non-integer values, e.g. 0\.5, in \d+ voxels\)"),
    ("four-d", "mask", r"^4-D images are not supported: pick a volume \(four_d_mask\.nii\.gz has size "
                       r"\(24, 24, 12, 2\)\)$"),
    ("mask-is-image", "mask", r"^mask has \d{2,} labels \(the first 5: -?\d+, -?\d+, -?\d+, -?\d+, -?\d+\): "
                              r"is it an image rather than a label map\? If not, choose one label with --label$"),
    ("time-missing", "time", r"time is missing"),
    ("time-text", "time", r"time 'about a year' is not a number"),
    ("time-negative", "time", r"time is -3; must be >= 0"),
    ("event-bad", "event", r"event is '2'; must be 0 \(censored\) or 1 \(event\)"),
    ("clinical-missing", "grade", r"required clinical value 'grade' is missing"),
    ("dup-id", "patient_id", r"duplicate patient_id \(CSV rows \d+, \d+\)"),
]


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    rows = [_row(tumour_case(folder, pid, seed=i)) for i, pid in enumerate(GOOD)]
    rows[1:1] = _bad_cases(folder)  # bad rows between good ones
    for row in rows:
        row["image_portal"] = row["image_venous"]  # a phase column this run does not extract
    manifest = write_manifest(folder / "manifest.csv", rows)
    result = CliRunner().invoke(app, ["prepare", "--manifest", str(manifest), "--out", str(folder / "store"),
                                      "--phases", "venous", "--require", "age,grade", "--jobs", "2", "--quiet"])
    quarantine = pd.read_csv(folder / "store" / "quarantine.csv", dtype=str, keep_default_na=False)
    store = pd.read_parquet(folder / "store" / "features.parquet")
    return result, quarantine, store


@pytest.mark.parametrize("pid, field, pattern", EXPECTED, ids=[e[0] for e in EXPECTED])
def test_bad_case_is_quarantined_with_reason(bad_run, pid, field, pattern):
    result, quarantine, store = bad_run
    mine = quarantine[quarantine["patient_id"] == pid]
    assert len(mine) >= 1, f"{pid} not in quarantine.csv"
    assert (mine["field"] == field).any(), mine
    assert mine["reason"].str.contains(pattern, regex=True).any(), mine["reason"].tolist()
    assert pid not in set(store["patient_id"])
    assert pid in result.output  # also on screen (the reason is in the table beside it)


def test_good_cases_survive_and_exit_status_says_quarantined(bad_run):
    result, quarantine, store = bad_run
    assert result.exit_code == EXIT_QUARANTINED
    assert list(store["patient_id"]) == list(GOOD)
    assert store.filter(like="venous__").notna().all().all()
    assert not store.columns.str.startswith("portal__").any()
    assert {pid for pid, _, _ in EXPECTED} == set(quarantine["patient_id"])  # nothing dropped silently
    assert len(store) + quarantine["patient_id"].nunique() == len(GOOD) + len(EXPECTED)


def test_unknown_phase_column_is_reported(bad_run):
    result, _, _ = bad_run
    assert "unknown phase column 'image_portal': phase 'portal' is not among the phases of this run (venous)" \
        in result.output


def test_duplicate_ids_both_rows_quarantined(bad_run):
    _, quarantine, _ = bad_run
    assert (quarantine["patient_id"] == "dup-id").sum() == 2


def test_label_not_in_mask(tmp_path):
    rows = [_row(tumour_case(tmp_path, pid, seed=i)) for i, pid in enumerate(GOOD)]
    other = tumour_case(tmp_path, "label-two")
    mask = np.zeros((12, 24, 24), np.uint8)
    mask[4:8, 8:16, 8:16] = 2
    other["mask"] = str(write_volume(tmp_path / "label2.nii.gz", mask))
    rows.append(_row(other))
    manifest = write_manifest(tmp_path / "manifest.csv", rows)
    result = CliRunner().invoke(app, ["prepare", "--manifest", str(manifest), "--out", str(tmp_path / "store"),
                                      "--label", "1", "--jobs", "1", "--quiet"])
    assert result.exit_code == EXIT_QUARANTINED
    quarantine = pd.read_csv(tmp_path / "store" / "quarantine.csv")
    assert quarantine.to_dict("records") == [
        {"patient_id": "label-two", "field": "mask", "reason": "mask has no voxels with label 1 (labels present: 2)"}
    ]
    assert len(pd.read_parquet(tmp_path / "store" / "features.parquet")) == 3


def test_clean_run_exits_zero(tmp_path):
    rows = [_row(tumour_case(tmp_path, pid, seed=i)) for i, pid in enumerate(GOOD)]
    manifest = write_manifest(tmp_path / "manifest.csv", rows)
    result = CliRunner().invoke(app, ["prepare", "--manifest", str(manifest), "--out", str(tmp_path / "store"),
                                      "--jobs", "1", "--quiet"])
    assert result.exit_code == 0, result.output
    store = pd.read_parquet(tmp_path / "store" / "features.parquet")
    assert store["age"].tolist() == [61.0] * 3 and not math.isnan(store["venous__original_firstorder_Mean"][0])


def test_manifest_without_required_column_is_refused(tmp_path):
    write_manifest(tmp_path / "manifest.csv", [{"patient_id": "a", "image_venous": "x", "time": 1, "event": 0}])
    result = CliRunner().invoke(app, ["prepare", "--manifest", str(tmp_path / "manifest.csv"),
                                      "--out", str(tmp_path / "store")])
    assert result.exit_code == 2
    assert "has no 'mask' column" in result.output


def test_na_markers_are_missing_not_text(tmp_path):
    rows = [_row(tumour_case(tmp_path, pid, seed=i)) for i, pid in enumerate(GOOD)]
    rows[0]["age"] = "NA"
    rows[1]["grade"] = "n/a"
    rows[2]["image_venous"] = ""
    manifest = write_manifest(tmp_path / "manifest.csv", rows)
    result = CliRunner().invoke(app, ["prepare", "--manifest", str(manifest), "--out", str(tmp_path / "store"),
                                      "--require", "grade", "--jobs", "1", "--quiet"])
    assert result.exit_code == EXIT_QUARANTINED, result.output
    store = pd.read_parquet(tmp_path / "store" / "features.parquet")
    assert store["patient_id"].tolist() == ["good-1"]
    assert store["age"].isna().all() and store["age"].dtype == float
    quarantine = pd.read_csv(tmp_path / "store" / "quarantine.csv")
    assert quarantine.values.tolist() == [
        ["good-2", "grade", "required clinical value 'grade' is missing"],
        ["good-3", "image_venous", "image path is empty"],
    ]


def test_header_only_manifest_and_bad_params_exit_2(tmp_path):
    write_manifest(tmp_path / "manifest.csv", [{"patient_id": "x", "image_venous": "a", "mask": "m", "time": 1,
                                               "event": 0}])
    (tmp_path / "empty.csv").write_text("patient_id,image_venous,mask,time,event\n", encoding="utf-8")
    result = CliRunner().invoke(app, ["prepare", "--manifest", str(tmp_path / "empty.csv"), "--out",
                                      str(tmp_path / "s1")])
    assert result.exit_code == 2 and "has a header but no cases" in result.output
    result = CliRunner().invoke(app, ["prepare", "--manifest", str(tmp_path / "manifest.csv"), "--out",
                                      str(tmp_path / "s2"), "--params", str(tmp_path / "nope.yaml")])
    assert result.exit_code == 2 and "params file" in result.output and "not found" in result.output
    result = CliRunner().invoke(app, ["prepare", "--manifest", str(tmp_path / "manifest.csv"), "--out",
                                      str(tmp_path / "s3"), "--quiet"])
    assert result.exit_code == 2 and "no case was accepted" in result.output


def test_binary_params_file_is_named_not_a_traceback(tmp_path):
    rows = [_row(tumour_case(tmp_path, "good-1"))]
    (tmp_path / "params.yaml").write_bytes(bytes(range(128, 256)) * 4)
    result = CliRunner().invoke(app, ["prepare", "--manifest", str(write_manifest(tmp_path / "m.csv", rows)),
                                      "--out", str(tmp_path / "store"), "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 2, result.output
    assert f"params file {tmp_path / 'params.yaml'} is not a text YAML file" in " ".join(result.output.split())
