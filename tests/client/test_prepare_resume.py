"""Re-running `prepare` reuses finished cases and redoes only what changed; DICOM series read like files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import SimpleITK as sitk

from fedrad.client.prepare import prepare_from_manifest
from fedrad.client.store import open_store
from tests.conftest import tumour_case, write_manifest, write_volume


def _site(folder, n=4):
    rows = [{**tumour_case(folder, f"p{i}", seed=i), "time": 10 + i, "event": i % 2} for i in range(n)]
    return write_manifest(folder / "manifest.csv", rows)


def test_rerun_reuses_cache_and_redoes_changed_case(tmp_path):
    manifest = _site(tmp_path)
    first = prepare_from_manifest(manifest, tmp_path / "store", jobs=2, show_progress=False)
    assert first.n_cached == 0 and first.n_cases == 4
    before = open_store(tmp_path / "store").features.set_index("patient_id")

    again = prepare_from_manifest(manifest, tmp_path / "store", jobs=2, show_progress=False)
    assert again.n_cached == 4
    pd.testing.assert_frame_equal(open_store(tmp_path / "store").features.set_index("patient_id"), before)

    changed = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "p2_venous.nii.gz"))) + 50
    write_volume(tmp_path / "p2_venous.nii.gz", changed.astype(np.int16))
    third = prepare_from_manifest(manifest, tmp_path / "store", jobs=2, show_progress=False)
    assert third.n_cached == 3
    after = open_store(tmp_path / "store").features.set_index("patient_id")
    mean = "venous__original_firstorder_Mean"
    assert after.loc["p2", mean] == before.loc["p2", mean] + 50
    pd.testing.assert_frame_equal(after.drop(index="p2"), before.drop(index="p2"))


def test_store_metadata_records_params_hash_and_roles(tmp_path):
    manifest = _site(tmp_path)
    prepare_from_manifest(manifest, tmp_path / "store", jobs=1, show_progress=False)
    store = open_store(tmp_path / "store")
    assert len(store.params_hash) == 64 and (tmp_path / "store" / "params.yaml").is_file()
    assert store.meta["phases"] == ["venous"] and store.meta["n_events"] == 2
    assert all(c.startswith("venous__") for c in store.feature_columns)
    assert list(store.features.columns[:3]) == ["patient_id", "time", "event"]


def _write_dicom_series(image: sitk.Image, folder):
    """One slice per file, with the tags SimpleITK's DICOM series reader needs for geometry."""
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    direction = image.GetDirection()
    orientation = "\\".join(str(v) for v in (direction[0], direction[3], direction[6], direction[1], direction[4],
                                             direction[7]))
    for k in range(image.GetDepth()):
        piece = image[:, :, k]
        for tag, value in (("0008|0060", "CT"), ("0020|000d", "1.2.826.0.1.3680043.2.1125.1"),
                           ("0020|000e", "1.2.826.0.1.3680043.2.1125.1.1"), ("0020|0037", orientation),
                           ("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, k))))),
                           ("0020|0013", str(k + 1)), ("0028|1052", "0"), ("0028|1053", "1")):
            piece.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"slice{k:03d}.dcm"))
        writer.Execute(piece)


def test_dicom_series_folder_reads_like_the_nifti(tmp_path):
    cells = tumour_case(tmp_path, "nifti")
    image = sitk.ReadImage(cells["image_venous"])
    _write_dicom_series(image, tmp_path / "series")
    rows = [{**cells, "time": 5, "event": 1},
            {**cells, "patient_id": "dicom", "image_venous": str(tmp_path / "series"), "time": 5, "event": 1}]
    report = prepare_from_manifest(write_manifest(tmp_path / "manifest.csv", rows), tmp_path / "store", jobs=1,
                                   show_progress=False)
    assert report.clean, report.problems
    features = open_store(tmp_path / "store").features.set_index("patient_id")
    columns = [c for c in features.columns if "__original_" in c]
    np.testing.assert_allclose(features.loc["dicom", columns].astype(float),
                               features.loc["nifti", columns].astype(float), rtol=1e-6)


def test_a_case_that_kills_its_worker_quarantines_only_itself(tmp_path, monkeypatch):
    """A worker dying (say, out of memory) breaks the whole pool; only that case may be lost."""
    import os

    from fedrad.client import extraction

    original = extraction.extract_case

    def dies_on_p1(case, *args, **kwargs):
        if case.patient_id == "p1":
            os._exit(9)
        return original(case, *args, **kwargs)

    monkeypatch.setattr(extraction, "extract_case", dies_on_p1)  # workers are forked, so they see it
    report = prepare_from_manifest(_site(tmp_path, n=6), tmp_path / "store", jobs=2, show_progress=False)
    assert [(p.patient_id, p.field) for p in report.problems] == [("p1", "extraction")]
    assert "process died on this case" in report.problems[0].reason
    assert report.n_cases == 5
