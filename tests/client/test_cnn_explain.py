"""Grad-CAM saved at the site, on small synthetic volumes (CPU): maps, files, the network left untouched."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from fedrad.client.cnn_explain import gradcam_maps, save_gradcam, target_layer_of
from fedrad.client.cnn_task import build_network, case_dataset, train_epochs
from fedrad.client.synth import generate_cohort
from fedrad.common.errors import FedradError

PHASES = ["arterial", "venous"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cam")
    generate_cohort(root, n_sites=1, n_patients=8, seed=3, phases=tuple(PHASES), shape=(48, 48, 24))
    return pd.read_csv(root / "siteA" / "manifest.csv"), root / "siteA"


def _check_map(cam: np.ndarray, shape) -> None:
    assert cam.shape == tuple(shape)
    assert np.isfinite(cam).all() and cam.min() >= 0.0 and cam.max() <= 1.0


def test_a_trained_2d_network_gives_maps_of_the_image_shape_and_files_named_by_patient(cohort, tmp_path):
    manifest, root = cohort
    torch.manual_seed(0)
    source = case_dataset(manifest, root, PHASES, box=(48, 48, 8), dims=2)
    data = [source[i] for i in range(len(source))]  # transformed once for both epochs and the maps
    net = build_network("resnet18", spatial_dims=2, in_channels=len(PHASES))
    train_epochs(net, data, epochs=1, batch_size=4)  # trained a little
    before = {k: v.clone() for k, v in net.state_dict().items()}
    paths = save_gradcam(net, data, tmp_path / "gradcam", 2, dims=2)
    ids = manifest["patient_id"].astype(str).tolist()[:2]
    assert [p.name for p in paths] == [f"{i}_gradcam.{ext}" for i in ids for ext in ("png", "npy")]
    for path in paths:
        assert path.is_file() and path.stat().st_size > 0
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for npy in paths[1::2]:
        _check_map(np.load(npy), (48, 48))
    images = torch.stack([torch.as_tensor(data[i]["image"]) for i in range(2)])
    raises, lowers = (gradcam_maps(net, images, direction=d) for d in ("raises", "lowers"))
    np.testing.assert_allclose(raises, np.stack([np.load(p) for p in paths[1::2]]), atol=1e-5)
    for up, down in zip(raises, lowers):  # layer4 is 3x3 here: the signed map varies, one side at least shows it
        _check_map(up, (48, 48))
        _check_map(down, (48, 48))
        assert np.ptp(up) > 0 or np.ptp(down) > 0
    # the caller's network is as it was: same weights, no hooks left by MONAI
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert not any(m._forward_hooks or m._backward_hooks for m in net.modules())


def test_3d_maps_cover_the_volume_and_the_png_shows_the_largest_mask_slice(cohort, tmp_path):
    manifest, root = cohort
    torch.manual_seed(1)
    data = case_dataset(manifest.head(2), root, PHASES, box=(48, 48, 16), dims=3)
    net = build_network("resnet18", spatial_dims=3, in_channels=len(PHASES))
    paths = save_gradcam(net, data, tmp_path, 5, dims=3)  # more asked than there are cases
    assert len(paths) == 4 and all(p.is_file() for p in paths)
    for npy in paths[1::2]:
        _check_map(np.load(npy), (48, 48, 16))
    assert save_gradcam(net, data, tmp_path / "none", 0, dims=3) == [] and not (tmp_path / "none").exists()
    with pytest.raises(FedradError, match="expected \\(phases, 2 spatial axes\\)"):
        save_gradcam(net, data, tmp_path, 1, dims=2)


def test_densenet_target_layer_is_the_relu_after_the_last_block(cohort):
    manifest, root = cohort
    net = build_network("densenet121", spatial_dims=2, in_channels=len(PHASES))
    assert target_layer_of(net) == "class_layers.relu"
    assert target_layer_of(build_network("resnet18", spatial_dims=3)) == "layer4"
    data = case_dataset(manifest.head(1), root, PHASES, box=(64, 64, 8), dims=2)
    cam = gradcam_maps(net, torch.as_tensor(data[0]["image"])[None])
    _check_map(cam[0], (64, 64))  # 2x2 at the last block
    assert net.class_layers.relu.inplace  # MONAI switches it off on the copy only
    with pytest.raises(FedradError, match="no Grad-CAM target layer"):
        target_layer_of(torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3)))
