"""DP-SGD at a site (CPU, tiny 2D images): clipping, weights that keep their names, and the persisted accountant."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample import get_gsm_class
from torch.utils.data import Dataset

import fedrad.client.cnn_privacy as cnn_privacy
from fedrad.client.cnn_privacy import (BATCH_COUPLED, PER_SAMPLE, check_budget, epsilon_after, epsilon_for, epsilon_spent,
                                load_history, planned_steps, record_steps, train_epochs_private)
from fedrad.client.cnn_task import _batch_loss, build_network
from fedrad.common.errors import FedradError

SIDE = 16  # ResNet-18 halves 16 pixels down to one: the smallest image it takes


class Cases(Dataset):
    """Items shaped like the MONAI pipeline's: a channel-first image, the outcome and the case id."""

    def __init__(self, n: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 1, SIDE, SIDE, generator=g)
        self.times = torch.rand(n, generator=g) * 10
        self.events = torch.tensor([i % 2 == 0 for i in range(n)], dtype=torch.float32)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "time": float(self.times[i]), "event": float(self.events[i]),
                "patient_id": f"case-{i:03d}"}


def network(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_network("resnet18", spatial_dims=2, in_channels=1, dp=True)


def largest_change(net, before) -> float:
    return max(float((net.state_dict()[k] - v).abs().max()) for k, v in before.items())


def copy_of(net) -> dict:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_a_dp_network_is_the_same_everywhere_and_has_no_batchnorm():
    plain, a, b = build_network("resnet18", spatial_dims=2), network(seed=1), network(seed=1)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in a.modules())
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())  # coordinator == site
    assert set(a.state_dict()) == {k for k in plain.state_dict()
                                   if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def test_each_case_gradient_is_its_own_when_the_loss_is_per_case():
    """What the accountant assumes for BCE: Opacus' per-case gradient of a case is the gradient of its own loss."""
    net, cases = network(), Cases(3)
    batch = cnn_privacy._collate([cases[i] for i in range(3)])
    wrapped = get_gsm_class(cnn_privacy._grad_sample_mode(net))(net, loss_reduction="mean")
    _batch_loss(wrapped, batch, "cpu", "binary").backward()
    per_case = [p.grad_sample.clone() for p in net.parameters()]
    wrapped.to_standard_module()
    for i in range(3):
        net.zero_grad()
        _batch_loss(net, {k: v[i:i + 1] for k, v in batch.items()}, "cpu", "binary").backward()
        for p, g in zip(net.parameters(), per_case):
            torch.testing.assert_close(g[i], p.grad, rtol=1e-4, atol=1e-4)


def test_private_training_moves_the_weights_and_keeps_their_names():
    net, cases = network(), Cases(4)
    before = copy_of(net)
    done = train_epochs_private(net, cases, noise_multiplier=1.0, max_grad_norm=1.0, epochs=1, batch_size=2)
    assert (done.sample_rate, done.steps) == planned_steps(4, 2, 1) == (0.5, 2)
    assert done.entry == (1.0, 0.5, 2) and done.guarantee == BATCH_COUPLED and len(done.losses) == 1
    assert largest_change(net, before) > 1e-4
    assert list(net.state_dict()) == list(before)  # no "_module." prefix: the coordinator can average them
    assert not any(hasattr(p, "grad_sample") for p in net.parameters())
    assert not any(m._forward_hooks or m._backward_hooks for m in net.modules())


def test_clipping_bounds_each_case_gradient():
    """One step on all 4 cases (q = 1). Adam moves a weight by lr·g/(|g| + 1e-8): about lr for any gradient
    that is not tiny. Clipped to C = 1e-12 (noise σ·C alike), |g| <= ~1e-11 and no weight moves more than
    ~1e-6; without the clipping the same step moves weights by about lr."""
    lr = 1e-3
    for max_grad_norm, bound in [(1e-12, lambda change: change < 1e-5), (1e3, lambda change: change > lr / 2)]:
        net = network()
        before = copy_of(net)
        done = train_epochs_private(net, Cases(4), noise_multiplier=1.0, max_grad_norm=max_grad_norm, lr=lr,
                                    batch_size=4, endpoint="binary")
        assert done.steps == 1 and done.sample_rate == 1.0 and done.guarantee == PER_SAMPLE
        assert bound(largest_change(net, before)), max_grad_norm


def test_an_empty_poisson_batch_still_takes_a_noise_step(monkeypatch):
    monkeypatch.setattr(cnn_privacy, "_collate", lambda items: None)
    net = network()
    before = copy_of(net)
    done = train_epochs_private(net, Cases(2), noise_multiplier=1.0, batch_size=2, endpoint="binary")
    assert done.steps == 1 and np.isnan(done.losses[0])
    assert largest_change(net, before) > 1e-4  # noise only, yet an update: skipping it would tell


def test_epsilon_of_the_persisted_history_is_opacus_accountant_stepped_alike(tmp_path):
    rounds = [(1.1, 0.25, 8), (1.1, 0.25, 8), (0.9, 0.2, 10)]
    stepped = RDPAccountant()
    for sigma, q, steps in rounds:
        record_steps(tmp_path, "run-1", sigma, q, steps)
        for _ in range(steps):
            stepped.step(noise_multiplier=sigma, sample_rate=q)
    assert load_history(tmp_path, "run-1") == rounds
    assert epsilon_spent(tmp_path, "run-1", 1e-5) == pytest.approx(stepped.get_epsilon(delta=1e-5), rel=1e-12)
    assert epsilon_spent(tmp_path, "another-run", 1e-5) == 0.0
    assert epsilon_after(rounds[:2], rounds[2], 1e-5) == pytest.approx(epsilon_for(rounds, 1e-5), rel=1e-12)
    assert json.loads((tmp_path / "dp_accountant.json").read_text(encoding="utf-8"))["run-1"][2] == [0.9, 0.2, 10]


def test_epsilon_agrees_with_independent_calibrations():
    """Opacus' σ calibration (a bisection on ε) inverts ours; the PRV accountant (numerical, tighter) sits
    just below the RDP bound."""
    q, steps = 0.1, 200
    sigma = get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=q, steps=steps)
    assert epsilon_for([(sigma, q, steps)], 1e-5) == pytest.approx(3.0, rel=1e-2)
    prv = PRVAccountant()
    prv.history = [(sigma, q, steps)]
    assert 0.7 * 3.0 < prv.get_epsilon(delta=1e-5) <= epsilon_for([(sigma, q, steps)], 1e-5)


def test_the_history_persists_across_rounds_and_epsilon_grows(tmp_path):
    net, cases = network(), Cases(4)
    spent = []
    for round_, mu in [(1, 0.0), (2, 0.5)]:  # a fresh call per round, as a Flower message each; FedProx in round 2
        done = train_epochs_private(net, cases, noise_multiplier=1.5, batch_size=4, endpoint="binary",
                                    proximal_mu=mu)
        history = load_history(tmp_path, "run-7")
        predicted = epsilon_after(history, done.entry, 1e-5)
        assert len(record_steps(tmp_path, "run-7", *done.entry)) == round_
        spent.append(epsilon_spent(tmp_path, "run-7", 1e-5))
        assert spent[-1] == pytest.approx(predicted, rel=1e-12)
    assert 0 < spent[0] < spent[1]
    assert check_budget(load_history(tmp_path, "run-7"), done.entry, 1e-5, None) > spent[1]
    with pytest.raises(FedradError, match="past the budget"):
        check_budget(load_history(tmp_path, "run-7"), done.entry, 1e-5, spent[1])


def test_bad_settings_are_refused(tmp_path):
    batchnorm = build_network("resnet18", spatial_dims=2)
    with pytest.raises(FedradError, match=r"dp=True"):
        train_epochs_private(batchnorm, Cases(4), noise_multiplier=1.0)
    for settings, message in [({"noise_multiplier": 0.0}, "noise_multiplier > 0"),
                              ({"noise_multiplier": 1.0, "max_grad_norm": 0.0}, "max_grad_norm > 0"),
                              ({"noise_multiplier": 1.0, "endpoint": "os"}, "endpoint")]:
        with pytest.raises(FedradError, match=message):
            train_epochs_private(network(), Cases(4), **settings)
    with pytest.raises(FedradError, match="at least one case"):
        train_epochs_private(network(), Cases(0), noise_multiplier=1.0)
    with pytest.raises(FedradError, match="sample_rate"):
        record_steps(tmp_path, "run", 1.0, 0.0, 3)
    with pytest.raises(FedradError, match="delta"):
        epsilon_for([(1.0, 0.5, 2)], 1.0)
    (tmp_path / "dp_accountant.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(FedradError, match="refusing to guess"):
        epsilon_spent(tmp_path, "run", 1e-5)
