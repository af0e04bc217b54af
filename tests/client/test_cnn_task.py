"""The CNN's site-side pieces on small synthetic volumes (CPU): tensors, networks, loss, training."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from fedrad.client.cnn_task import build_network, case_dataset, cox_loss, deep_features, predict, train_epochs
from fedrad.client.synth import generate_cohort
from fedrad.common.cox import site_cox_newton
from fedrad.common.messages import arrays_record, record_arrays

PHASES = ["arterial", "venous"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cnn")
    generate_cohort(root, n_sites=1, n_patients=8, seed=3, phases=tuple(PHASES), shape=(48, 48, 24))
    return pd.read_csv(root / "siteA" / "manifest.csv"), root / "siteA"


@pytest.mark.parametrize("dims, shape", [(3, (2, 32, 32, 8)), (2, (2, 32, 32))])
def test_a_case_is_a_channel_per_phase_cropped_around_the_mask(cohort, dims, shape):
    manifest, root = cohort
    item = case_dataset(manifest, root, PHASES, box=(32, 32, 8), dims=dims)[0]
    assert tuple(item["image"].shape) == shape
    assert float(item["image"].min()) >= 0.0 and float(item["image"].max()) <= 1.0
    mask = np.asarray(item["mask"])[0]
    assert mask.sum() > 0
    centre = np.array(np.nonzero(mask)).mean(axis=1)
    np.testing.assert_allclose(centre[:2], np.array(mask.shape[:2]) / 2 - 0.5, atol=4)  # the tumour is in the middle


def test_manifest_without_a_phase_is_refused(cohort):
    manifest, root = cohort
    with pytest.raises(Exception, match="image_delayed"):
        case_dataset(manifest, root, ["delayed"])


def test_cox_loss_equals_the_breslow_partial_likelihood():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 3))
    beta = np.array([0.3, -0.5, 0.8])
    time = np.round(rng.exponential(10, 40))  # ties
    event = rng.random(40) < 0.6
    expected = -site_cox_newton(X, time, event, beta, ties="breslow").loglik / event.sum()
    got = cox_loss(torch.tensor(X @ beta), torch.tensor(time), torch.tensor(event))
    assert float(got) == pytest.approx(expected, rel=1e-12)
    assert float(cox_loss(torch.zeros(3), torch.ones(3), torch.zeros(3))) == 0.0


@pytest.mark.parametrize("architecture, dims, box, features", [
    ("resnet18", 3, (32, 32, 8), 512), ("resnet18", 2, (32, 32, 8), 512),
    ("densenet121", 3, (32, 32, 32), 1024)])  # DenseNet halves the size 5 times: 32 voxels at least
def test_networks_give_one_score_and_penultimate_features(cohort, architecture, dims, box, features):
    manifest, root = cohort
    data = case_dataset(manifest.head(3), root, PHASES, box=box, dims=dims)
    net = build_network(architecture, spatial_dims=dims, in_channels=len(PHASES))
    scores = predict(net, data)
    assert list(scores.columns) == ["patient_id", "dl_score", "time", "event"] and len(scores) == 3
    deep = deep_features(net, data)
    assert deep.shape == (3, features + 1) and deep.columns[1] == "deep__cnn_0000"


def test_local_training_changes_weights_and_lowers_the_loss(cohort):
    manifest, root = cohort
    torch.manual_seed(0)
    data = case_dataset(manifest, root, PHASES, box=(32, 32, 8), dims=2)
    net = build_network("resnet18", spatial_dims=2, in_channels=len(PHASES))
    before = [p.detach().clone() for p in net.parameters()]
    history = train_epochs(net, data, epochs=6, lr=1e-3, batch_size=8)
    assert history[-1] < history[0]
    assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters()))
    with pytest.raises(ValueError, match="architecture must be one of"):
        build_network("vgg")


def test_fedavg_of_identical_sites_equals_local_training(cohort):
    """Two sites holding the same cases, starting from the same weights with the same seed, return the same
    weights, and Flower's FedAvg of them is local training itself (augmentation included)."""
    manifest, root = cohort
    start = build_network("resnet18", spatial_dims=2, in_channels=len(PHASES)).state_dict()

    def site_round():
        net = build_network("resnet18", spatial_dims=2, in_channels=len(PHASES))
        net.load_state_dict(start)
        data = case_dataset(manifest, root, PHASES, box=(32, 32, 8), dims=2, train=True)
        train_epochs(net, data, epochs=2, lr=1e-3, batch_size=4, seed=7)
        return {k: v.detach().numpy() for k, v in net.state_dict().items()}

    local, site_a, site_b = site_round(), site_round(), site_round()
    replies = [RecordDict({"arrays": arrays_record(**w), "metrics": MetricRecord({"num-examples": len(manifest)})})
               for w in (site_a, site_b)]
    averaged = record_arrays(aggregate_arrayrecords(replies, "num-examples"))
    assert any(not np.array_equal(local[k], start[k].numpy()) for k in local)  # training did something
    for name, value in local.items():
        np.testing.assert_array_equal(averaged[name], value.astype(np.float64), err_msg=name)
