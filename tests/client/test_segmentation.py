"""Segmentation at one site (CPU, small synthetic volumes): the held-out split, local training that
raises held-out Dice, masks written on exactly the image's grid, and `prepare --segment`."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

from fedrad.server.cli import app  # the `fedrad` command
from fedrad.client.extraction import default_params_path
from fedrad.client.segmentation import (build_segmenter, dice_on, read_model, seg_dataset, segment_image, train_epochs,
                                 write_model)
from fedrad.client.store import MASK_SOURCE, open_store
from fedrad.client.synth import generate_cohort
from fedrad.common.errors import FedradError
from fedrad.common.messages import weights_id
from fedrad.common.splits import held_out, unit_hash
from fedrad.common.study import Segment, parse_study

SETTINGS = {**Segment(box=(32, 32, 16), init_filters=4, validation_fraction=0.25).model_dump(mode="json")}


# --- the held-out split --------------------------------------------------------------------------

def test_held_out_is_a_fixed_hash_split_of_about_the_fraction():
    ids = [f"case-{i}" for i in range(2000)]
    held = held_out(ids, 0.2, seed=7)
    assert held == held_out(list(reversed(ids)), 0.2, seed=7)  # order does not matter
    assert held == {i for i in ids if unit_hash(i, 7) < 0.2}  # the documented rule
    assert abs(len(held) / len(ids) - 0.2) < 0.03
    assert held != held_out(ids, 0.2, seed=8)
    assert held_out(ids[:1000], 0.2, seed=7) == held & set(ids[:1000])  # new cases never move old ones
    assert held_out(ids, 0.1, seed=7) <= held  # a smaller fraction holds out a subset


@pytest.mark.parametrize("fraction", [0.001, 0.5, 0.999, 1.0])
def test_held_out_keeps_one_case_on_each_side(fraction):
    for n in (2, 3, 5):
        ids = [f"p{n}-{i}" for i in range(n)]
        held = held_out(ids, fraction, seed=1)
        assert 1 <= len(held) <= n - 1 and held <= set(ids)
    assert held_out(["only"], fraction) == set()
    assert held_out([], fraction) == set()
    assert held_out(["a", "b"], 0.0) == set()
    with pytest.raises(ValueError, match="fraction"):
        held_out(["a", "b"], 1.5)


# --- training on one site ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """One synthetic site: its manifest, delineated items, and the held-out / training sides."""
    root = tmp_path_factory.mktemp("seg")
    generate_cohort(root, n_sites=1, n_patients=10, seed=11, phases=("venous",), shape=(48, 48, 24),
                    repeat_fraction=0.0)
    folder = root / "siteA"
    manifest = pd.read_csv(folder / "manifest.csv")
    items = [{"patient_id": r.patient_id, "image": str(folder / r.image_venous), "mask": str(folder / r.mask)}
             for r in manifest.itertuples()]
    held = held_out([i["patient_id"] for i in items], SETTINGS["validation_fraction"], SETTINGS["seed"])
    return {"folder": folder, "manifest": manifest, "items": items,
            "held_out": [i for i in items if i["patient_id"] in held],
            "training": [i for i in items if i["patient_id"] not in held]}


@pytest.fixture(scope="module")
def trained(site):
    """(Dice before, Dice after, network) of local training on the training side, measured on the held-out side."""
    torch.manual_seed(0)
    net = build_segmenter(SETTINGS["init_filters"])
    evaluation = seg_dataset(site["held_out"], SETTINGS)
    before = dice_on(net, evaluation, SETTINGS["box"])
    history = train_epochs(net, seg_dataset(site["training"], SETTINGS, train=True), epochs=EPOCHS, lr=1e-2,
                           batch_size=1, seed=0)
    after = dice_on(net, evaluation, SETTINGS["box"])
    print(f"held-out Dice {before:.3f} -> {after:.3f}; Dice loss per epoch {np.round(history, 3)}")
    return before, after, history, net


EPOCHS = 4


def test_local_epochs_raise_held_out_dice(site, trained):
    before, after, history, _ = trained
    assert len(site["held_out"]) >= 2 and len(site["training"]) >= 6
    assert before < 0.1  # the untrained network starts by predicting (almost) no tumour
    assert after > before + 0.2, f"held-out Dice {before:.3f} -> {after:.3f}"
    assert history[-1] < history[0]


def test_a_training_item_is_a_box_of_the_resampled_phase_and_its_mask(site):
    whole = seg_dataset(site["training"][:1], SETTINGS)[0]  # the phase resampled to 1 x 1 x 3 mm, windowed
    assert 0.0 <= float(whole["image"].min()) and float(whole["image"].max()) <= 1.0
    assert whole["image"].shape == whole["mask"].shape and float(whole["mask"].sum()) > 0
    samples = seg_dataset(site["training"][:1], SETTINGS, train=True)[0]  # one random box per case and epoch
    assert len(samples) == 1
    for sample in samples:
        assert tuple(sample["image"].shape) == (1, 32, 32, 16) == tuple(sample["mask"].shape)
        assert set(np.unique(np.asarray(sample["mask"]))) <= {0.0, 1.0}


# --- masks on the image's own grid ---------------------------------------------------------------

def _oblique(path, shape=(20, 30, 28)):
    """A tumour-like blob on a grid with non-trivial spacing, origin and an oblique direction."""
    z, y, x = np.indices(shape)
    blob = ((z - 10) / 4.0) ** 2 + ((y - 15) / 7.0) ** 2 + ((x - 14) / 6.0) ** 2 < 1
    values = np.where(blob, 70.0, 40.0) + np.random.default_rng(0).normal(0, 5, size=shape)
    image = sitk.GetImageFromArray(values.astype(np.int16))
    angle = math.radians(12)
    image.SetDirection((math.cos(angle), -math.sin(angle), 0.0, math.sin(angle), math.cos(angle), 0.0, 0.0, 0.0, 1.0))
    image.SetSpacing((0.83, 0.91, 2.7))
    image.SetOrigin((-31.5, 12.25, 104.0))
    sitk.WriteImage(image, str(path))
    return image


def test_segment_image_writes_a_binary_mask_on_exactly_the_image_grid(tmp_path, trained):
    _oblique(tmp_path / "oblique.nii.gz")
    image = sitk.ReadImage(str(tmp_path / "oblique.nii.gz"))  # as stored (NIfTI keeps float32 geometry)
    for name, net in (("untrained", build_segmenter(4)), ("trained", trained[3])):
        out = tmp_path / f"{name}_mask.nii.gz"
        voxels = segment_image(net, tmp_path / "oblique.nii.gz", out, SETTINGS)
        mask = sitk.ReadImage(str(out))
        assert mask.GetSize() == image.GetSize()
        assert mask.GetSpacing() == image.GetSpacing()
        assert mask.GetOrigin() == image.GetOrigin()
        assert mask.GetDirection() == image.GetDirection()
        values = sitk.GetArrayFromImage(mask)
        assert values.dtype == np.uint8 and set(np.unique(values)) <= {0, 1}
        assert int(values.sum()) == voxels
        if voxels:  # only the largest connected object is kept
            assert sitk.GetArrayFromImage(sitk.ConnectedComponent(mask)).max() == 1


def test_the_trained_network_finds_the_held_out_tumours(site, trained, tmp_path):
    case = site["held_out"][0]
    segment_image(trained[3], case["image"], tmp_path / "auto.nii.gz", SETTINGS)
    auto = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "auto.nii.gz"))) > 0
    truth = sitk.GetArrayFromImage(sitk.ReadImage(case["mask"])) > 0
    assert 2 * (auto & truth).sum() / (auto.sum() + truth.sum()) > 0.2


# --- the model on disk and `prepare --segment` ---------------------------------------------------

@pytest.fixture(scope="module")
def model(trained, tmp_path_factory):
    weights = {k: v.detach().cpu().numpy().astype(np.float64) for k, v in trained[3].state_dict().items()}
    return write_model(tmp_path_factory.mktemp("model") / "segmentation", weights, SETTINGS, study="unit")


def test_a_model_is_read_from_its_folder_or_weights_and_checked(model, tmp_path):
    weights, meta = read_model(model)
    assert meta["weights_sha256"] == weights_id(weights) and meta["settings"]["init_filters"] == 4
    assert read_model(model / "model.npz")[1] == meta
    (tmp_path / "model.json").write_text((model / "model.json").read_text(encoding="utf-8"), encoding="utf-8")
    np.savez(tmp_path / "model.npz", **{k: v + (k.endswith("bias")) for k, v in weights.items()})
    with pytest.raises(FedradError, match="does not match the weights_sha256"):
        read_model(tmp_path)
    with pytest.raises(FedradError, match="not found"):
        read_model(tmp_path / "elsewhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FedradError, match="not a segmentation model"):
        read_model(tmp_path / "empty")


PARAMS = str(default_params_path("demo"))


def _prepare(manifest, out, *extra):
    return CliRunner().invoke(app, ["prepare", "--manifest", str(manifest), "--out", str(out), "--params", PARAMS,
                                    "--jobs", "1", "--quiet", *extra])


@pytest.fixture(scope="module")
def segmented(site, model, tmp_path_factory):
    """A manifest with two training cases' masks blanked, prepared with and without the model."""
    folder = tmp_path_factory.mktemp("prepare")
    manifest = site["manifest"].copy()
    blank = [i["patient_id"] for i in site["training"][:2]]
    manifest["image_venous"] = [str(site["folder"] / p) for p in manifest["image_venous"]]
    manifest["mask"] = ["" if pid in blank else str(site["folder"] / m)
                        for pid, m in zip(manifest["patient_id"], manifest["mask"])]
    manifest.drop(columns=["mask_repeat"]).to_csv(folder / "manifest.csv", index=False)
    plain = _prepare(folder / "manifest.csv", folder / "plain")
    result = _prepare(folder / "manifest.csv", folder / "store", "--segment", str(model))
    return {"folder": folder, "manifest": manifest, "blank": blank, "plain": plain, "result": result}


def test_prepare_without_a_model_quarantines_rows_without_a_mask_as_before(segmented):
    assert segmented["plain"].exit_code == 3, segmented["plain"].output
    quarantine = pd.read_csv(segmented["folder"] / "plain" / "quarantine.csv")
    assert set(quarantine["patient_id"]) == set(segmented["blank"])
    assert set(quarantine["reason"]) == {"mask path is empty"}
    assert set(open_store(segmented["folder"] / "plain").features[MASK_SOURCE]) == {"manual"}


def test_prepare_segment_fills_missing_masks_and_marks_them_automatic(segmented, model):
    folder, manifest, blank, result = (segmented[k] for k in ("folder", "manifest", "blank", "result"))
    assert result.exit_code == 0, result.output
    assert "2 with an automatic mask" in result.output
    store = open_store(folder / "store")
    table = store.features.set_index("patient_id")
    assert len(table) == len(manifest)
    assert table[MASK_SOURCE].to_dict() == {pid: "automatic" if pid in blank else "manual" for pid in table.index}
    assert np.isfinite(table.loc[blank, store.feature_columns].to_numpy(float)).all()
    assert store.meta["n_automatic_masks"] == 2
    assert store.meta["segmentation_model"]["weights_sha256"] == read_model(model)[1]["weights_sha256"]
    for pid in blank:
        mask = sitk.ReadImage(str(folder / "store" / "auto_masks" / f"{pid}.nii.gz"))
        image = sitk.ReadImage(str(manifest.set_index("patient_id").loc[pid, "image_venous"]))
        assert (mask.GetSize(), mask.GetSpacing(), mask.GetOrigin(), mask.GetDirection()) == \
            (image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    # the store's manifest as used points at the automatic masks (later stages read images through it)
    used = pd.read_csv(store.meta["manifest"], dtype=str, keep_default_na=False).set_index("patient_id")
    assert all(used.loc[pid, "mask"].endswith(f"auto_masks/{pid}.nii.gz") for pid in blank)
    assert store.meta["source_manifest"] == str((folder / "manifest.csv").resolve())

    # a re-run reuses the automatic masks (same image, same model)
    again = _prepare(folder / "manifest.csv", folder / "store", "--segment", str(model))
    assert again.exit_code == 0, again.output
    assert open_store(folder / "store").meta["segmentation_model"]["reused"] == 2


def test_a_site_measures_only_manual_masks_and_withholds_dice_below_min_count(site, segmented, trained, model):
    from fedrad.client.privacy import check_reply
    from fedrad.client.site_seg import delineated_cases, dice_reply, split_cases

    store = open_store(segmented["folder"] / "store")
    weights, meta = read_model(model)
    plan, study = {"weights_id": meta["weights_sha256"]}, parse_study({"segment": SETTINGS})
    cases = delineated_cases(store, SETTINGS)
    assert {c["patient_id"] for c in cases} == set(store.features["patient_id"]) - set(segmented["blank"])
    held = split_cases(cases, SETTINGS, "held_out")
    assert {c["patient_id"] for c in held} == {i["patient_id"] for i in site["held_out"]}  # the blanked cases trained

    content, disclosure = dice_reply(store, plan, study, "siteA", weights, min_count=2)
    check_reply(content, disclosure, 2)
    expected = dice_on(trained[3], seg_dataset(held, SETTINGS), SETTINGS["box"])
    assert content["metrics"]["dice"] == pytest.approx(expected, abs=1e-6)
    assert content["metrics"]["n_held_out"] == len(held)

    content, disclosure = dice_reply(store, plan, study, "siteA", weights, min_count=len(held) + 1)
    check_reply(content, disclosure, len(held) + 1)
    assert math.isnan(content["metrics"]["dice"])
    assert "Dice withheld" in (store.path / "site.log").read_text(encoding="utf-8")


def test_a_training_reply_carries_weights_and_four_scalars_that_pass_the_guard(segmented, model):
    from fedrad.client.privacy import check_reply
    from fedrad.client.site_seg import train_reply

    store = open_store(segmented["folder"] / "store")
    weights, _ = read_model(model)
    settings = {**SETTINGS, "local_epochs": 1}
    plan = {"round": 3}
    content, disclosure = train_reply(store, plan, parse_study({"segment": settings}), "siteA", weights, min_count=2)
    check_reply(content, disclosure, 2)
    assert set(content["arrays"]) == set(weights)
    assert any(not np.allclose(content["arrays"][k].numpy(), weights[k]) for k in weights)
    metrics = dict(content["metrics"])
    assert set(metrics) == {"num-examples", "loss", "dice", "n_held_out"}
    assert metrics["num-examples"] == 8 - metrics["n_held_out"]  # 10 cases, 2 automatic masks never train
    assert 0.0 <= metrics["dice"] <= 1.0 and 0.0 <= metrics["loss"] <= 1.0
