"""The synthetic cohort is reproducible, shows site effects, and its hazard is recoverable from the store."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from lifelines import CoxPHFitter
from typer.testing import CliRunner

from fedrad.server.cli import app  # the `fedrad` command
from fedrad.client.extraction import default_params_path
from fedrad.client.prepare import prepare_from_manifest
from fedrad.client.synth import generate_cohort

SIGNAL = [
    "logvol",  # tumour size
    "venous__original_firstorder_RobustMeanAbsoluteDeviation",  # texture heterogeneity
    "venous__original_firstorder_10Percentile",  # necrotic core
]


def _arrays(folder):
    return {p.name: sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in sorted(folder.rglob("*.nii.gz"))}


def test_same_seed_same_cohort_other_seed_other_cohort(tmp_path):
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        result = CliRunner().invoke(app, ["synth", "--sites", "2", "--patients", "5", "--seed", str(seed),
                                          "--shape", "24,24,12", "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
    for site in ("siteA", "siteB"):
        assert (tmp_path / "a" / site / "manifest.csv").read_text(encoding="utf-8") == (tmp_path / "b" / site / "manifest.csv").read_text(encoding="utf-8")
    assert (tmp_path / "a" / "truth.csv").read_text(encoding="utf-8") == (tmp_path / "b" / "truth.csv").read_text(encoding="utf-8")
    a, b, c = (_arrays(tmp_path / n) for n in "abc")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a if k in c)
    assert (tmp_path / "a" / "truth.csv").read_text(encoding="utf-8") != (tmp_path / "c" / "truth.csv").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    truth = generate_cohort(out, n_sites=3, n_patients=50, seed=3)
    stores = []
    for site in ("siteA", "siteB", "siteC"):
        report = prepare_from_manifest(out / site / "manifest.csv", out / "stores" / site,
                                       params_path=default_params_path("demo"), jobs=2, show_progress=False)
        assert report.clean and report.n_cases == 50
        stores.append(pd.read_parquet(out / "stores" / site / "features.parquet").assign(site=site))
    pooled = pd.concat(stores, ignore_index=True)  # lifelines needs a unique index
    pooled["logvol"] = np.log(pooled["venous__original_shape_MeshVolume"])
    return out, truth, pooled


def test_manifest_and_truth_layout(cohort):
    out, truth, pooled = cohort
    manifest = pd.read_csv(out / "siteA" / "manifest.csv")
    for column in ("patient_id", "image_arterial", "image_venous", "image_delayed", "mask", "mask_repeat",
                   "scanner", "age", "sex", "size_cm", "size_gt_10cm", "grade", "ki67", "time", "event",
                   "event_by_24m"):
        assert column in manifest.columns
    assert set(manifest["event"]) <= {0, 1} and (manifest["time"] >= 0).all()
    assert manifest["mask_repeat"].notna().sum() > 0
    for column in ("linear_predictor", "gain", "offset_hu", "noise_sd_hu", "slice_mm", "inplane_mm"):
        assert column in truth.columns
    image = sitk.ReadImage(str(out / "siteA" / manifest["image_venous"][0]))
    assert image.GetSize() == (64, 64, 32)
    assert 0.7 <= image.GetSpacing()[0] <= 1.0 and 2.5 <= image.GetSpacing()[2] <= 5.0


def test_sites_differ_like_hospitals(cohort):
    _, truth, pooled = cohort
    per_site = truth.groupby("site")
    assert per_site["slice_mm"].nunique().max() == 1 and truth["slice_mm"].nunique() == 3
    scanners = truth.groupby("site")["scanner"].unique()
    assert len(scanners["siteA"]) == 2  # two scanner models at one site
    shared = set(scanners["siteA"]) & set(scanners["siteC"])
    assert shared  # one scanner model at two sites
    # scanner gain/offset shifts the intensity of the (same-tissue) fat in the background
    means = pooled.groupby("scanner")["venous__original_firstorder_Median"].mean()
    assert means.max() - means.min() > 5


def test_hazard_is_recoverable_by_pooled_cox(cohort):
    _, truth, pooled = cohort
    columns = SIGNAL + ["grade", "ki67", "age"]
    frame = pooled[columns + ["time", "event"]].copy()
    frame[columns] = (frame[columns] - frame[columns].mean()) / frame[columns].std()
    full = CoxPHFitter().fit(frame, "time", "event")
    imaging = CoxPHFitter().fit(frame[SIGNAL + ["time", "event"]], "time", "event")
    assert full.concordance_index_ > 0.72
    assert imaging.concordance_index_ > 0.65
    lp = truth.set_index("patient_id").loc[pooled["patient_id"], "linear_predictor"].to_numpy()
    assert np.corrcoef(full.predict_log_partial_hazard(frame), lp)[0, 1] > 0.6
