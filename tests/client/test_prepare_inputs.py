"""`prepare` refuses what ITK would read quietly (cut-off files, a DICOM series missing a slice), guards the
store it writes (another manifest's store, derived files, a second run, a read-only folder), caps --jobs
and stops at once on Ctrl-C.

Real cases: pyradiomics' breast1 and brain1 (../shared/data/pyradiomics, see its PROVENANCE.md), cut
short in tmp_path.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from typer.testing import CliRunner

from fedrad.client import extraction, prepare as prepare_module
from fedrad.client.cli import EXIT_QUARANTINED
from fedrad.client.prepare import prepare_from_manifest
from fedrad.client.site_data import DERIVED, SCORES
from fedrad.client.store import CACHE, LOCK
from fedrad.common.errors import StoreError
from fedrad.server.cli import app  # the `fedrad` command
from tests.client.test_prepare_resume import _write_dicom_series
from tests.conftest import tumour_case, write_manifest, write_volume

DEMO = str(extraction.default_params_path("demo"))
MEAN = "mr__original_firstorder_Mean"


def _cut(source, target, fraction):
    data = source.read_bytes()
    target.write_bytes(data[: int(len(data) * fraction)])
    return target


def _row(pid, image, mask, repeat="", i=0):
    return {"patient_id": pid, "image_mr": str(image), "mask": str(mask), "mask_repeat": str(repeat),
            "time": 10 + i, "event": i % 2}


def _prepare(manifest, out, *extra):
    return CliRunner().invoke(app, ["prepare", "--manifest", str(manifest), "--out", str(out), "--params", DEMO,
                                    "--jobs", "1", "--quiet", *extra])


@pytest.fixture(scope="module")
def cut_files_run(tmp_path_factory, shared_data):
    """breast1 as NIfTI (gzip and plain) and NRRD (gzip), whole and cut short, through one prepare run."""
    folder = tmp_path_factory.mktemp("cut")
    data = shared_data / "pyradiomics"
    image, mask = sitk.ReadImage(str(data / "breast1_image.nrrd")), sitk.ReadImage(str(data / "breast1_label.nrrd"))
    for name, volume in (("image.nii.gz", image), ("mask.nii.gz", mask), ("image.nii", image)):
        sitk.WriteImage(volume, str(folder / name))
    crc = bytearray((folder / "image.nii.gz").read_bytes())
    crc[-6] ^= 0xFF  # the gzip trailer's CRC-32 no longer matches the data
    (folder / "crc.nii.gz").write_bytes(bytes(crc))
    good_image, good_mask = folder / "image.nii.gz", folder / "mask.nii.gz"
    rows = [
        _row("good", good_image, good_mask, good_mask),
        _row("image-half", _cut(good_image, folder / "image_half.nii.gz", 0.5), good_mask, i=1),
        _row("mask-60", good_image, _cut(good_mask, folder / "mask_60.nii.gz", 0.6), i=2),
        _row("repeat-60", good_image, good_mask, _cut(good_mask, folder / "repeat_60.nii.gz", 0.6), i=3),
        _row("plain-half", _cut(folder / "image.nii", folder / "image_half.nii", 0.5), good_mask, i=4),
        _row("nrrd-half", _cut(data / "breast1_image.nrrd", folder / "image_half.nrrd", 0.5),
             data / "breast1_label.nrrd", i=5),
        _row("crc", folder / "crc.nii.gz", good_mask, i=6),
        _row("nrrd-good", data / "breast1_image.nrrd", data / "breast1_label.nrrd", i=7),
    ]
    result = _prepare(write_manifest(folder / "manifest.csv", rows), folder / "store")
    quarantine = pd.read_csv(folder / "store" / "quarantine.csv", dtype=str, keep_default_na=False)
    return result, quarantine, pd.read_parquet(folder / "store" / "features.parquet").set_index("patient_id")


CUT = [
    ("image-half", "image_mr", r"image_half\.nii\.gz: its gzip stream ends early"),
    ("mask-60", "mask", r"mask_60\.nii\.gz: its gzip stream ends early"),
    ("repeat-60", "mask_repeat", r"repeat_60\.nii\.gz: its gzip stream ends early"),
    ("plain-half", "image_mr", r"image_half\.nii: its header needs 227,152 bytes, the file holds 113,576"),
    ("nrrd-half", "image_mr", r"image_half\.nrrd: its gzip stream ends early"),
    ("crc", "image_mr", r"crc\.nii\.gz: its gzip stream fails its check \(CRC check failed"),
]


@pytest.mark.parametrize("pid, field, detail", CUT, ids=[c[0] for c in CUT])
def test_cut_or_corrupt_file_is_quarantined(cut_files_run, pid, field, detail):
    """ITK zero-fills a cut-off .nii/.nii.gz (breast1's Mean fell from 63 to 31) and prepare used to accept it."""
    _, quarantine, features = cut_files_run
    mine = quarantine[quarantine["patient_id"] == pid]
    assert mine[["field"]].values.tolist() == [[field]], mine
    assert mine["reason"].str.match(r"file is truncated or corrupt: " + detail).all(), mine["reason"].tolist()
    assert pid not in features.index


def test_whole_files_of_every_format_pass_and_match(cut_files_run):
    result, quarantine, features = cut_files_run
    assert result.exit_code == EXIT_QUARANTINED, result.output
    assert set(quarantine["patient_id"]) == {pid for pid, _, _ in CUT}
    assert list(features.index) == ["good", "nrrd-good"]
    assert features.loc["good", MEAN] == pytest.approx(features.loc["nrrd-good", MEAN])


@pytest.fixture(scope="module")
def dicom_gap_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gap")
    cells = tumour_case(folder, "nifti")
    _write_dicom_series(sitk.ReadImage(cells["image_venous"]), folder / "series")
    _write_dicom_series(sitk.ReadImage(cells["image_venous"]), folder / "gap")
    _write_dicom_series(sitk.ReadImage(cells["mask"]), folder / "mask_gap")
    for series in ("gap", "mask_gap"):
        (folder / series / "slice005.dcm").unlink()  # slices 2 mm apart; 10 -> 14 mm is now one gap
    rows = [{**cells, "patient_id": "whole", "image_venous": str(folder / "series")},
            {**cells, "patient_id": "image-gap", "image_venous": str(folder / "gap")},
            {**cells, "patient_id": "both-gap", "image_venous": str(folder / "gap"), "mask": str(folder / "mask_gap")}]
    manifest = write_manifest(folder / "manifest.csv", [{**row, "time": 5, "event": 1} for row in rows])
    result = CliRunner().invoke(app, ["prepare", "--manifest", str(manifest), "--out", str(folder / "store"),
                                      "--params", DEMO, "--jobs", "1", "--quiet"])
    return result, pd.read_csv(folder / "store" / "quarantine.csv", dtype=str, keep_default_na=False)


def test_dicom_series_with_a_missing_slice_is_quarantined_naming_the_gap(dicom_gap_run):
    """ITK stacks the 11 slices at an average 2.2 mm and only logs a warning: a mask drawn on the same
    series matched the image, so the case was accepted with every slice after the gap misplaced."""
    result, quarantine = dicom_gap_run
    assert result.exit_code == EXIT_QUARANTINED, result.output
    gap = ("DICOM series has uneven slice spacing: a gap of 4 mm between the slices at 8 and 12 mm, 2 mm elsewhere "
           "(1 uneven gap(s) in 11 slices); is a slice missing?")
    assert quarantine.values.tolist() == [["image-gap", "image_venous", gap], ["both-gap", "mask", gap]]


def _two_sites(tmp_path):
    """Manifests of two sites, each in its own folder, with different cases."""
    manifests = []
    for site in ("a", "b"):
        folder = tmp_path / site
        rows = [{**tumour_case(folder, f"{site}{i}", seed=i), "time": 10 + i, "event": i % 2} for i in range(3)]
        manifests.append(write_manifest(folder / "manifest.csv", rows))
    return manifests


def _plant_derived(store):
    for name in DERIVED:
        (store / name).write_text("made from the old features", encoding="utf-8")
    ids = pd.read_parquet(store / "features.parquet")["patient_id"]
    pd.DataFrame({"patient_id": ids, "dl_score": 0.5, "site_score": np.arange(len(ids), dtype=float)}).to_parquet(
        store / SCORES, index=False)  # the network's column, and a score the site supplied itself


def test_store_of_another_manifest_is_refused_unless_overwrite(tmp_path):
    site_a, site_b = _two_sites(tmp_path)
    store = tmp_path / "store"
    assert _prepare(site_a, store).exit_code == 0
    _plant_derived(store)

    refused = _prepare(site_b, store)
    assert refused.exit_code == 2, refused.output
    assert f"built from manifest {site_a}, not from this run's manifest {site_b}; give --overwrite" in refused.output
    assert pd.read_parquet(store / "features.parquet")["patient_id"].tolist() == ["a0", "a1", "a2"]
    assert all((store / name).is_file() for name in DERIVED)

    replaced = _prepare(site_b, store, "--overwrite")
    assert replaced.exit_code == 0, replaced.output
    assert pd.read_parquet(store / "features.parquet")["patient_id"].tolist() == ["b0", "b1", "b2"]
    assert not any((store / name).exists() for name in DERIVED)
    assert "the features changed: removed harmonised.parquet, standardised.parquet" in replaced.output


def test_derived_files_go_only_when_the_features_change(tmp_path):
    manifest, _ = _two_sites(tmp_path)
    store = tmp_path / "store"
    prepare_from_manifest(manifest, store, jobs=1, show_progress=False)
    _plant_derived(store)
    again = prepare_from_manifest(manifest, store, jobs=1, show_progress=False)
    assert again.n_cached == 3 and again.info == []
    assert all((store / name).is_file() for name in DERIVED)  # same features: the study's files stay valid

    image = tmp_path / "a" / "a1_venous.nii.gz"
    write_volume(image, (sitk.GetArrayFromImage(sitk.ReadImage(str(image))) + 50).astype(np.int16))
    changed = prepare_from_manifest(manifest, store, jobs=1, show_progress=False)
    assert changed.n_cached == 2
    assert not any((store / name).exists() for name in DERIVED)
    assert list(pd.read_parquet(store / SCORES).columns) == ["patient_id", "site_score"]  # the site's own stays
    assert changed.info == [f"the features changed: removed {', '.join(DERIVED)}, {SCORES} (dl_score) "
                            "(made from the old ones)"]


def test_the_scores_file_the_fit_stage_reads_is_the_one_prepare_cleans():
    from fedrad.client import site_fit

    assert site_fit.SCORES == SCORES


def test_store_being_written_by_another_prepare_is_refused(tmp_path):
    manifest, _ = _two_sites(tmp_path)
    store = tmp_path / "store"
    store.mkdir()
    with open(store / LOCK, "a+", encoding="utf-8") as held:  # what a running prepare holds
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        with pytest.raises(StoreError, match=r"another `fedrad prepare` \(pid 4242\) is writing the store"):
            prepare_from_manifest(manifest, store, jobs=1, show_progress=False)
    assert not (store / "features.parquet").exists() and not (store / CACHE).exists()
    assert prepare_from_manifest(manifest, store, jobs=1, show_progress=False).n_cases == 3  # lock released


@contextmanager
def _read_only(folder):
    """chmod for a user; root writes through modes, so the immutable attribute instead."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    made = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True, encoding="utf-8")  # e2fsprogs: make test
    assert made.returncode == 0, f"chattr +i {folder}: {made.stderr}"
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_read_only_out_is_refused_before_any_case(tmp_path, monkeypatch):
    manifest, _ = _two_sites(tmp_path)
    out = tmp_path / "readonly"
    out.mkdir()
    started = []
    monkeypatch.setattr(extraction, "extract_case", lambda *a, **k: started.append(a) or pytest.fail("extracted"))
    with _read_only(out):
        result = _prepare(manifest, out)
    assert result.exit_code == 2, result.output
    assert f"cannot write to '{out}' (" in result.output and "give an --out folder you can write to" in result.output
    assert not started and "Traceback" not in result.output


def test_jobs_are_capped_at_cases_and_cores(tmp_path, monkeypatch):
    """--jobs 1000 on 3 cases forked 1000 workers."""
    manifest, _ = _two_sites(tmp_path)
    real, asked = prepare_module.ProcessPoolExecutor, []

    def spy(*args, max_workers, **kwargs):
        asked.append(max_workers)
        if max_workers > 3:
            raise AssertionError(f"{max_workers} workers for 3 cases")
        return real(*args, max_workers=max_workers, **kwargs)

    monkeypatch.setattr(prepare_module, "ProcessPoolExecutor", spy)
    report = prepare_from_manifest(manifest, tmp_path / "store", jobs=1000, show_progress=False)
    cores = len(os.sched_getaffinity(0))
    cap = min(3, cores)
    assert report.n_cases == 3 and report.clean
    assert report.info == [f"--jobs 1000 lowered to {cap}: 3 case(s) to extract, {cores} core(s)"]
    assert asked in ([cap], [])  # no pool at all when one worker is all there is


def test_ctrl_c_stops_at_once_and_says_how_to_resume(tmp_path, shared_data):
    """A Ctrl-C used to wait for every queued case (76 s) and print nothing. brain1 takes seconds per case,
    so 16 of them keep two workers busy well past the bound; a second prepare meanwhile is refused."""
    data = shared_data / "pyradiomics"
    rows = [_row(f"brain-{i:02d}", data / "brain1_image.nrrd", data / "brain1_label.nrrd", i=i) for i in range(16)]
    manifest, store = write_manifest(tmp_path / "manifest.csv", rows), tmp_path / "store"
    command = [sys.executable, "-m", "fedrad.server.cli", "prepare", "--manifest", str(manifest), "--out",
               str(store), "--jobs", "2", "--quiet"]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True, encoding="utf-8")  # its own process group, as a terminal's Ctrl-C reaches
    try:
        deadline = time.monotonic() + 240
        while not list((store / CACHE).glob("*.json")) and run.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert run.poll() is None, run.communicate()
        assert list((store / CACHE).glob("*.json")), "no case finished in 240 s"
        second = _prepare(manifest, store)
        assert second.exit_code == 2 and f"(pid {run.pid}) is writing the store" in second.output, second.output

        os.killpg(run.pid, signal.SIGINT)
        sent = time.monotonic()
        out, err = run.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert took < 20, f"{took:.0f} s to stop"
    assert run.returncode == 130, err
    cached = len(list((store / CACHE).glob("*.json")))
    assert f"interrupted: {cached} of 16 case(s) are cached in {store / CACHE}" in " ".join(err.split()), err
    assert "run the same command again to resume" in " ".join(err.split())
    assert 1 <= cached < 16 and "Traceback" not in err
    with pytest.raises(ProcessLookupError):  # no worker left behind in the group
        os.killpg(run.pid, 0)
