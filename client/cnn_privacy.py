"""Differential privacy for the CNN a site trains: Opacus DP-SGD and the site's own privacy accountant.

Each round the site trains ``local_epochs`` epochs with DP-SGD: every step draws a Poisson
sample of the site's cases (each case in with probability q), clips each case's gradient to
``max_grad_norm`` (C), sums, adds Gaussian noise of standard deviation σ·C and takes an Adam
step. The (ε, δ) the site has spent is the RDP composition of every step it ever took for the
run — over all rounds, so the history (σ, q, steps) is kept in ``STORE/dp_accountant.json``
keyed by run id: Flower keeps nothing on the site between rounds.

What the guarantee covers depends on the loss:

* ``binary`` (BCE): the loss is a sum of per-case terms, so clipping bounds one case's
  influence on a step by C and the accounted ε is a proven bound for one patient, as long as a
  patient is one case of the site (``PER_SAMPLE``).
* ``cox``: the partial likelihood couples the cases of a batch — each case sits in the risk
  sets (denominators) of the other cases. Opacus clips the gradient that flows through each
  case's *own* output, but removing one patient also changes the other cases' clipped terms,
  so one patient can move a step's sum by up to (2b − 1)·C in a batch of b, not C. The ε
  reported is that of the mechanism that was run, *not* a proven bound for one patient:
  report it as ``BATCH_COUPLED`` and never as a formal guarantee.

Randomness: Poisson sampling and noise come from generators seeded from the operating
system's entropy, never from the study's public seed — a coordinator that knew the seed could
regenerate the noise and subtract it. They are not cryptographic generators (Opacus'
``secure_mode`` needs torchcsprng), so the guarantee is the usual "non-secure-mode" one.

A network must be made DP-compatible *before* the first round (BatchNorm, which mixes cases,
becomes GroupNorm): the coordinator and every site build it with
``build_network(..., dp=True)`` so tensor names and shapes agree.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from opacus.utils.uniform_sampler import UniformWithReplacementSampler
from torch.utils.data import DataLoader

from fedrad.client.cnn_task import _batch_loss, _require_compatible, device, dp_compatible
from fedrad.common.errors import FedradError

__all__ = ["dp_compatible", "guarantee", "planned_steps", "PrivateTraining", "train_epochs_private", "epsilon_for",
           "epsilon_after", "check_budget", "load_history", "record_steps", "epsilon_spent", "ACCOUNTANT_FILE",
           "PER_SAMPLE", "BATCH_COUPLED"]

ACCOUNTANT_FILE = "dp_accountant.json"
PER_SAMPLE = "per-sample"
BATCH_COUPLED = "batch-coupled (Cox)"

Entry = tuple[float, float, int]  # (noise multiplier σ, sample rate q, steps): RDPAccountant's history item


def guarantee(endpoint: str) -> str:
    """What the accounted ε means for this endpoint's loss (see the module docstring)."""
    if endpoint == "binary":
        return PER_SAMPLE
    if endpoint == "cox":
        return BATCH_COUPLED
    raise FedradError(f"endpoint must be 'cox' or 'binary', got {endpoint!r}")


def planned_steps(n_cases: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """(sample rate q, steps) of one round, as Opacus sets them for a loader of ``batch_size``:
    ⌈n/batch_size⌉ steps an epoch, q = 1/⌈n/batch_size⌉ (an expected batch of at most batch_size).
    Known before training, so a site (or a coordinator that knows n) can price the next round."""
    if n_cases < 1 or batch_size < 1 or epochs < 1:
        raise FedradError(f"DP-SGD needs at least one case, batch size and epoch, got n={n_cases}, "
                          f"batch_size={batch_size}, epochs={epochs}")
    steps_per_epoch = math.ceil(n_cases / batch_size)
    return 1.0 / steps_per_epoch, steps_per_epoch * epochs


@dataclass(frozen=True)
class PrivateTraining:
    """What one round of DP-SGD did: the mean loss of each epoch and what the accountant must record."""

    losses: list[float]
    noise_multiplier: float
    sample_rate: float
    steps: int
    guarantee: str

    @property
    def entry(self) -> Entry:
        return (self.noise_multiplier, self.sample_rate, self.steps)


def _secret_generator(dev) -> torch.Generator:
    """Seeded from the OS, not the study seed: a coordinator knowing the seed could subtract the noise."""
    return torch.Generator(device=dev).manual_seed(secrets.randbits(63))


def _collate(items: list[dict]) -> dict | None:
    """Only what the loss needs, as plain tensors (no MetaTensor metadata reaches Opacus' per-case gradient
    code); ``None`` for the empty batch Poisson sampling can draw."""
    if not items:
        return None
    return {"image": torch.stack([torch.as_tensor(i["image"]) for i in items]).as_subclass(torch.Tensor),
            "time": torch.as_tensor([float(i["time"]) for i in items]),
            "event": torch.as_tensor([float(i["event"]) for i in items])}


def _check_settings(noise_multiplier: float, max_grad_norm: float, endpoint: str) -> None:
    if not noise_multiplier > 0:
        raise FedradError(f"DP-SGD needs noise_multiplier > 0 (0 turns DP off: use train_epochs), "
                          f"got {noise_multiplier}")
    if not max_grad_norm > 0:
        raise FedradError(f"DP-SGD needs max_grad_norm > 0, got {max_grad_norm}")
    guarantee(endpoint)


def _noise_only(optimiser) -> None:
    """An empty Poisson batch still takes a (pure-noise) step: skipping it would reveal the batch was empty."""
    for p in optimiser.params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)


def _grad_sample_mode(model: torch.nn.Module) -> str:
    """How Opacus gets per-case gradients. Its default ("hooks") wraps each layer's output, to which MONAI's
    ResNet then adds the residual in place (autograd refuses); torch's expanded weights ("ew") need no
    wrapping but fail on DenseNet's concatenations. Both give the same per-case gradients."""
    from monai.networks.nets import ResNet

    return "ew" if isinstance(model, ResNet) else "hooks"


def train_epochs_private(model: torch.nn.Module, dataset, *, noise_multiplier: float, max_grad_norm: float = 1.0,
                         epochs: int = 1, lr: float = 1e-3, batch_size: int = 8, endpoint: str = "cox",
                         proximal_mu: float = 0.0, num_workers: int = 0) -> PrivateTraining:
    """``train_epochs`` under DP-SGD (Adam on clipped, noised gradients), training ``model`` in place.

    The FedProx gradient μ·(w − w_global) is added after clipping and noise: it depends only on the
    weights (already private) and the global weights, not on any case, so it costs no privacy. There is
    no seed: sampling and noise must not be reproducible from the plan. ``model`` keeps its own
    state-dict names (Opacus' wrapper is removed before returning)."""
    _check_settings(noise_multiplier, max_grad_norm, endpoint)
    dev = device()
    model.to(dev).train()  # Opacus validates the training-mode module (a scored model comes in eval mode)
    _require_compatible(model)
    sample_rate, steps = planned_steps(len(dataset), batch_size, epochs)
    global_weights = [p.detach().clone() for p in model.parameters()] if proximal_mu else None
    sampler = UniformWithReplacementSampler(num_samples=len(dataset), sample_rate=sample_rate,
                                            steps=steps // epochs, generator=_secret_generator("cpu"))
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=_collate, num_workers=num_workers)
    with warnings.catch_warnings():  # the module docstring says what the RNG is; no warning every round
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="rdp")
    # The loader already samples Poisson batches (and copes with empty ones, which Opacus' own wrapper
    # cannot for dictionary batches), so Opacus is told to leave it as it is.
    private, optimiser, loader = engine.make_private(
        module=model, optimizer=torch.optim.Adam(model.parameters(), lr=lr), data_loader=loader,
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, poisson_sampling=False,
        noise_generator=_secret_generator(dev), grad_sample_mode=_grad_sample_mode(model))
    history = []
    try:
        for _ in range(epochs):
            losses = []
            for batch in loader:
                optimiser.zero_grad()
                if batch is None:
                    _noise_only(optimiser)
                else:
                    loss = _batch_loss(private, batch, dev, endpoint)
                    loss.backward()
                    losses.append(float(loss.detach()))
                if optimiser.pre_step():  # clip, sum, noise, scale: p.grad is now private
                    if global_weights is not None:
                        for p, g in zip(model.parameters(), global_weights):
                            p.grad.add_(p.detach() - g, alpha=proximal_mu)
                    optimiser.original_optimizer.step()
            history.append(float(np.mean(losses)) if losses else float("nan"))
    finally:
        private.to_standard_module()  # hooks and per-sample gradients off the caller's model
    if engine.accountant.history != [(noise_multiplier, sample_rate, steps)]:  # what we record is what Opacus ran
        raise RuntimeError(f"Opacus accounted {engine.accountant.history}, expected "
                           f"{[(noise_multiplier, sample_rate, steps)]}")
    return PrivateTraining(history, float(noise_multiplier), sample_rate, steps, guarantee(endpoint))


def _check_entry(entry) -> Entry:
    sigma, q, steps = float(entry[0]), float(entry[1]), int(entry[2])
    if not (sigma > 0 and 0 < q <= 1 and steps >= 1 and steps == entry[2]):
        raise FedradError(f"an accountant entry needs noise_multiplier > 0, 0 < sample_rate <= 1 and whole "
                          f"steps >= 1, got {tuple(entry)}")
    return sigma, q, steps


def epsilon_for(history, delta: float) -> float:
    """ε at ``delta`` of a history of (σ, q, steps) by Opacus' RDP accountant (0 for no step)."""
    if not 0 < delta < 1:
        raise FedradError(f"delta must be in (0, 1), got {delta}")
    accountant = RDPAccountant()
    accountant.history = [_check_entry(e) for e in history]
    return float(accountant.get_epsilon(delta=delta)) if accountant.history else 0.0


def epsilon_after(history, next_entry, delta: float) -> float:
    """ε the run would have spent after one more round ``next_entry`` (see ``planned_steps``)."""
    return epsilon_for([*history, next_entry], delta)


def check_budget(history, next_entry, delta: float, budget: float | None) -> float:
    """The ε after the next round; refuses the round if it would go past ``budget`` (None: no budget).
    The site should check this itself rather than trust the coordinator to stop in time."""
    after = epsilon_after(history, next_entry, delta)
    if budget is not None and after > budget:
        raise FedradError(f"one more round would spend ε = {after:.3g} (δ = {delta:g}), past the budget "
                          f"of {budget:g}; this site trains no further")
    return after


def _accountant_path(store_path) -> Path:
    return Path(store_path) / ACCOUNTANT_FILE


def _read(store_path) -> dict:
    path = _accountant_path(store_path)
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise FedradError(f"{path} is not readable JSON ({error}); refusing to guess the privacy spent") from error


def load_history(store_path, run_id: str) -> list[Entry]:
    """The (σ, q, steps) of every round this site trained for the run, oldest first."""
    return [_check_entry(e) for e in _read(store_path).get(str(run_id), [])]


def record_steps(store_path, run_id: str, noise_multiplier: float, sample_rate: float, steps: int) -> list[Entry]:
    """Append one round to the run's history (written atomically) and return the new history.
    Call it as soon as training ends, before the weights leave: a round that was trained counts."""
    entry = _check_entry((noise_multiplier, sample_rate, steps))
    runs = _read(store_path)
    runs[str(run_id)] = [*runs.get(str(run_id), []), list(entry)]
    path = _accountant_path(store_path)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(runs, indent=1), encoding="utf-8")
    os.replace(tmp, path)
    return [_check_entry(e) for e in runs[str(run_id)]]


def epsilon_spent(store_path, run_id: str, delta: float) -> float:
    """ε at ``delta`` this site has spent on the run so far."""
    return epsilon_for(load_history(store_path, run_id), delta)
