"""Stage `train_seg` over real Flower processes on small synthetic CT volumes (CPU).

Three sites of 8 delineated cases each train a narrow SegResNet by FedAvg for two rounds. Checks:
segmentation Dice on the sites' held-out cases improves over the rounds (round 1 measures the
untrained network the sites received, the last figure the final model); a training round sends
only the network's weights and four scalars; the saved model segments a held-out image onto
its exact grid.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from fedrad.client.extraction import default_params_path
from fedrad.client.prepare import prepare_from_manifest
from fedrad.client.segmentation import build_segmenter, read_model, segment_image, segmenter_with
from fedrad.client.synth import generate_cohort
from fedrad.common.splits import held_out
from fedrad.server.local import LocalFederation
from tests.federation.conftest import write_study

SITES = ("siteA", "siteB", "siteC")
SEED = 2  # the split seed: every site holds out 2 of its 8 cases
STUDY = f"""
[study]
name = "segmentation"
stages = ["census", "train_seg"]

[features]
include = ["venous__original_firstorder_*"]

[privacy]
min_count = 2

[segment]
phase = "venous"
box = [32, 32, 16]
init_filters = 4
rounds = 2
local_epochs = 2
batch_size = 1
lr = 0.01
validation_fraction = 0.3
seed = {SEED}
"""


@pytest.fixture(scope="module")
def federated(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    generate_cohort(root / "cohort", n_sites=3, n_patients=8, seed=5, phases=("venous",), shape=(48, 48, 24),
                    repeat_fraction=0.0)
    stores = {}
    for site in SITES:
        stores[site] = root / "stores" / site
        prepare_from_manifest(root / "cohort" / site / "manifest.csv", stores[site],
                              params_path=default_params_path("demo"), jobs=1, show_progress=False)
    with LocalFederation(root / "flower", stores, echo=print) as fed:
        results = fed.run_study(write_study(root / "study.toml", STUDY), root / "run")
    assert results["status"] == "completed", results.get("error")
    return root, stores, results


def _manifest(root, site) -> pd.DataFrame:
    return pd.read_csv(root / "cohort" / site / "manifest.csv")


def test_segmentation_dice_improves_over_rounds(federated):
    root, stores, results = federated
    seg = results["segmentation"]
    print("mean held-out Dice per round:", seg["mean_dice_per_round"], "final:", seg["final_mean_dice"],
          "per site:", seg["final_dice"])
    assert [h["round"] for h in seg["history"]] == [1, 2]
    for site in SITES:  # the split is the site's own; every site here reports its Dice
        ids = _manifest(root, site)["patient_id"].tolist()
        assert seg["final_held_out"][site] == len(held_out(ids, 0.3, SEED)) >= 2
        assert seg["history"][0]["cases"][site] == len(ids) - seg["final_held_out"][site]
    first, final = seg["mean_dice_per_round"][0], seg["final_mean_dice"]
    assert first is not None and final is not None
    assert final > first + 0.15, f"Dice {first:.3f} -> {final:.3f}"
    assert all(d is not None and 0.0 <= d <= 1.0 for d in seg["final_dice"].values())
    assert set(seg["bytes_up_per_site"]) == set(SITES) and not seg["failed"]


def test_a_training_round_sends_only_weights_and_four_scalars(federated):
    _, stores, _ = federated
    names = set(build_segmenter(4).state_dict())
    for store in stores.values():
        entries = [json.loads(line) for line in (store / "egress.jsonl").read_text(encoding="utf-8").splitlines()]
        rounds = [e for e in entries if e["message_type"] == "train.seg"]
        assert len(rounds) == 2 and all(e["status"] == "sent" and e["stage"] == "train_seg" for e in rounds)
        for entry in rounds:
            arrays = {i["name"] for i in entry["items"] if i["kind"] == "array"}
            assert arrays == {f"arrays.{n}" for n in names}
            others = [i for i in entry["items"] if i["kind"] != "array"]
            assert others == [{"name": "metrics", "kind": "metrics", "bytes": others[0]["bytes"],
                               "keys": ["dice", "loss", "n_held_out", "num-examples"]}]
        final = [e for e in entries if e["message_type"] == "query.seg_dice"]
        assert len(final) == 1 and [i["keys"] for i in final[0]["items"]] == [["dice", "n_held_out"]]


def test_the_saved_model_segments_held_out_images_on_their_grid(federated, tmp_path):
    """The model file is the model the sites measured: applied here to the held-out images of the site
    where it did best, its masks lie on each image's exact grid and overlap the manual masks as the
    site reported (the site measured on the resampled grid, hence the tolerance)."""
    root, _, results = federated
    seg = results["segmentation"]
    weights, meta = read_model(seg["model"])
    assert meta["weights_sha256"] == seg["weights_id"]
    assert meta["settings"]["box"] == [32, 32, 16] and meta["settings"]["init_filters"] == 4
    net = segmenter_with(meta["settings"], weights)
    site = max(seg["final_dice"], key=seg["final_dice"].get)
    manifest = _manifest(root, site).set_index("patient_id")
    dice = []
    for pid in sorted(held_out(manifest.index.tolist(), 0.3, SEED)):
        image_path = root / "cohort" / site / manifest.loc[pid, "image_venous"]
        segment_image(net, image_path, tmp_path / f"{pid}.nii.gz", meta["settings"])
        mask, image = sitk.ReadImage(str(tmp_path / f"{pid}.nii.gz")), sitk.ReadImage(str(image_path))
        assert (mask.GetSize(), mask.GetSpacing(), mask.GetOrigin(), mask.GetDirection()) == \
            (image.GetSize(), image.GetSpacing(), image.GetOrigin(), image.GetDirection())
        auto = sitk.GetArrayFromImage(mask) > 0
        truth = sitk.GetArrayFromImage(sitk.ReadImage(str(root / "cohort" / site / manifest.loc[pid, "mask"]))) > 0
        dice.append(2 * (auto & truth).sum() / max(auto.sum() + truth.sum(), 1))
    print(f"{site}: Dice of the saved model on the original grids {np.round(dice, 3)}; "
          f"reported {seg['final_dice'][site]:.3f}")
    assert np.mean(dice) > 0.2
    assert np.mean(dice) == pytest.approx(seg["final_dice"][site], abs=0.1)
