"""The CNN at a site: images to tensors, the network, the survival loss, and train/test functions.

Flower's ``task.py`` of the deep-learning stage: it never touches a Message. A case becomes
one channel-first tensor — every contrast phase resampled to a common spacing, windowed to
[0, 1], cropped to a fixed box around the tumour mask and stacked as channels — in 3D
``(phases, X, Y, Z)`` or, with ``dims=2``, the axial slice with the largest mask area
``(phases, X, Y)``. Networks are MONAI's (ResNet-18 / DenseNet-121, 2D or 3D, one output:
the DL-score, a log-risk). The loss is the negative Cox partial log-likelihood over the
risk sets *within the batch* (Breslow ties; a batch without an event contributes nothing),
or binary cross-entropy for a binary endpoint.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
from monai.data import DataLoader, Dataset
from monai.transforms import (Compose, ConcatItemsd, CropForegroundd, DeleteItemsd, EnsureChannelFirstd, LoadImaged,
                              MapTransform, Orientationd, RandFlipd, RandGaussianNoised, ResizeWithPadOrCropd,
                              ScaleIntensityRanged, Spacingd)

from fedrad.common.errors import FedradError

__all__ = ["case_transforms", "case_dataset", "build_network", "network_for", "uses_dp", "cox_loss", "train_epochs", "predict",
           "deep_features", "device", "ARCHITECTURES"]

ARCHITECTURES = ("resnet18", "densenet121")


def device() -> torch.device:
    """CUDA when the site has it, the CPU otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class LargestMaskSliced(MapTransform):
    """Keep the axial slice (last axis) where the mask is largest: (C, X, Y, Z) -> (C, X, Y)."""

    def __init__(self, keys, mask_key: str = "mask"):
        super().__init__(keys)
        self.mask_key = mask_key

    def __call__(self, data):
        d = dict(data)
        area = d[self.mask_key].reshape(-1, d[self.mask_key].shape[-1]).sum(0)
        z = int(torch.as_tensor(area).argmax())
        for key in self.key_iterator(d):
            d[key] = d[key][..., z]
        return d


def case_transforms(phases: list[str], *, spacing=(1.0, 1.0, 3.0), box=(48, 48, 16), window=(-200.0, 300.0),
                    dims: int = 3, train: bool = False, margin: int = 4) -> Compose:
    """MONAI dictionary transforms from a manifest row (``image_<phase>``, ``mask`` paths) to ``image``."""
    if dims not in (2, 3):
        raise ValueError(f"dims can only be 2 or 3, got {dims}")
    phase_keys = [f"image_{p}" for p in phases]
    keys = phase_keys + ["mask"]
    steps = [
        LoadImaged(keys, image_only=True, reader="NibabelReader"), EnsureChannelFirstd(keys), Orientationd(keys, axcodes="RAS"),
        Spacingd(keys, pixdim=spacing, mode=["bilinear"] * len(phase_keys) + ["nearest"]),
        ScaleIntensityRanged(phase_keys, a_min=window[0], a_max=window[1], b_min=0.0, b_max=1.0, clip=True),
        CropForegroundd(keys, source_key="mask", margin=margin, allow_smaller=True),
        ResizeWithPadOrCropd(keys, spatial_size=box),
        ConcatItemsd(phase_keys, "image"), DeleteItemsd(phase_keys),
    ]
    if dims == 2:
        steps.append(LargestMaskSliced(["image", "mask"]))
    if train:
        steps += [RandFlipd(["image", "mask"], prob=0.5, spatial_axis=0),
                  RandGaussianNoised(["image"], prob=0.3, std=0.02)]
    return Compose(steps)


def case_dataset(manifest: pd.DataFrame, root: Path, phases: list[str], **options) -> Dataset:
    """One item per case: paths resolved against the manifest's folder, outcome carried along."""
    missing = [c for c in [f"image_{p}" for p in phases] + ["mask", "patient_id", "time", "event"]
               if c not in manifest.columns]
    if missing:
        raise FedradError(f"the manifest lacks column(s) {', '.join(missing)} needed for the CNN")
    items = []
    for row in manifest.itertuples(index=False):
        row = row._asdict()
        item = {k: str(Path(root) / row[k]) for k in [f"image_{p}" for p in phases] + ["mask"]}
        item.update(patient_id=str(row["patient_id"]), time=float(row["time"]), event=float(row["event"]))
        items.append(item)
    return Dataset(items, transform=case_transforms(phases, **options))


def build_network(architecture: str = "resnet18", *, spatial_dims: int = 3, in_channels: int = 1,
                  dp: bool = False, norm: str = "batch") -> torch.nn.Module:
    """A MONAI classifier with one output (the DL-score), trained from scratch (no weights can be fetched).
    ``norm="group"`` or ``dp`` (DP-SGD needs it): BatchNorm replaced by GroupNorm; the coordinator and the sites
    must agree on it (see `network_for`)."""
    from monai.networks import nets

    if architecture == "resnet18":
        net = nets.resnet18(spatial_dims=spatial_dims, n_input_channels=in_channels, num_classes=1)
    elif architecture == "densenet121":
        net = nets.DenseNet121(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=1)
    else:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    if dp or norm == "group":
        net = dp_compatible(net)
    return net


def dp_compatible(net: torch.nn.Module) -> torch.nn.Module:
    """A copy of ``net`` with every layer Opacus cannot clip per case replaced (BatchNorm -> GroupNorm).

    The replacement is deterministic (GroupNorm starts at weight 1, bias 0, and keeps BatchNorm's
    weight/bias names), so the coordinator and the sites get the same tensors; BatchNorm's running
    statistics disappear from the state dict. In-place activations are turned off: they would overwrite
    the outputs Opacus' backward hooks capture (autograd refuses)."""
    from opacus.validators import ModuleValidator

    fixed = ModuleValidator.fix(net)
    for module in fixed.modules():
        if getattr(module, "inplace", None) is True:
            module.inplace = False
    _require_compatible(fixed)
    return fixed


def _require_compatible(net: torch.nn.Module) -> None:
    from opacus.validators import ModuleValidator

    errors = ModuleValidator.validate(net, strict=False)
    if errors:
        raise FedradError(f"the network has {len(errors)} layer(s) DP-SGD cannot train (e.g. {str(errors[0])[:120]}); "
                          "build it with build_network(..., dp=True) on the coordinator and at every site")


def network_for(cnn: dict) -> torch.nn.Module:
    """The study's network from its ``[cnn]`` settings, built alike by the coordinator and every site.

    GroupNorm is the default: BatchNorm's running statistics come from batches of a few cases and,
    in a federation, are averaged across sites; scores in eval mode then barely reflect what was learnt
    (measured on the synthetic cohort: Spearman with the truth 0.32–0.68 with BatchNorm in eval mode,
    0.82–0.97 with the statistics recomputed)."""
    return build_network(cnn["architecture"], spatial_dims=cnn["dims"], in_channels=len(cnn["phases"]),
                         dp=uses_dp(cnn), norm=cnn.get("norm", "batch"))


def uses_dp(cnn: dict) -> bool:
    """Whether the ``[cnn]`` settings ask for DP-SGD (a noise multiplier above 0)."""
    return cnn.get("privacy", {}).get("noise_multiplier", 0) > 0


def cox_loss(risk: torch.Tensor, time: torch.Tensor, event: torch.Tensor) -> torch.Tensor:
    """Negative Breslow partial log-likelihood of the batch, per event:
    −(1/d) Σ_{i: event} [r_i − log Σ_{j: t_j ≥ t_i} exp(r_j)]. Zero (with a gradient) when the batch has no event."""
    risk, time, event = risk.reshape(-1), time.reshape(-1), event.reshape(-1).bool()
    at_risk = time[None, :] >= time[:, None]  # row i: the risk set of i
    log_denominator = torch.logsumexp(risk[None, :].masked_fill(~at_risk, float("-inf")), dim=1)
    events = event.sum()
    if events == 0:
        return risk.sum() * 0.0
    return -((risk - log_denominator)[event]).sum() / events


def _batch_loss(model, batch, dev, endpoint: str) -> torch.Tensor:
    risk = model(batch["image"].to(dev)).reshape(-1)
    event = batch["event"].to(dev).float()
    if endpoint == "binary":
        return torch.nn.functional.binary_cross_entropy_with_logits(risk, event)
    return cox_loss(risk, batch["time"].to(dev).float(), event)


def train_epochs(model: torch.nn.Module, dataset, *, epochs: int = 1, lr: float = 1e-3, batch_size: int = 8,
                 endpoint: str = "cox", proximal_mu: float = 0.0, seed: int = 0, num_workers: int = 0) -> list[float]:
    """Local training (Adam); with ``proximal_mu`` > 0 the FedProx term μ/2·|w − w_global|² keeps the site near
    the weights it received. Returns the mean loss of each epoch."""
    dev = device()
    model.to(dev).train()
    global_weights = [p.detach().clone() for p in model.parameters()] if proximal_mu else None
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    if hasattr(getattr(dataset, "transform", None), "set_random_state"):  # augmentation reproducible too
        dataset.transform.set_random_state(seed=seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator, num_workers=num_workers)
    history = []
    for _ in range(epochs):
        losses = []
        for batch in loader:
            optimiser.zero_grad()
            loss = _batch_loss(model, batch, dev, endpoint)
            if global_weights is not None:
                loss = loss + proximal_mu / 2 * sum(((p - g) ** 2).sum()
                                                    for p, g in zip(model.parameters(), global_weights))
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
        history.append(float(np.mean(losses)) if losses else float("nan"))
    return history


@torch.no_grad()
def predict(model: torch.nn.Module, dataset, *, batch_size: int = 8, num_workers: int = 0) -> pd.DataFrame:
    """The DL-score (network output, a log-risk) of every case, with its outcome."""
    dev = device()
    model.to(dev).eval()
    rows = []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers):
        scores = model(batch["image"].to(dev)).reshape(-1).cpu().numpy()
        rows += [{"patient_id": p, "dl_score": float(s), "time": float(t), "event": float(e)}
                 for p, s, t, e in zip(batch["patient_id"], scores, batch["time"], batch["event"])]
    return pd.DataFrame(rows)


@torch.no_grad()
def deep_features(model: torch.nn.Module, dataset, *, batch_size: int = 8, num_workers: int = 0) -> pd.DataFrame:
    """The penultimate layer (the input of the final linear layer) of every case: the deep features."""
    dev = device()
    model.to(dev).eval()
    head = model.fc if hasattr(model, "fc") else model.class_layers.out
    captured = []
    hook = head.register_forward_hook(lambda module, inputs, output: captured.append(inputs[0].detach().cpu()))
    ids = []
    try:
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers):
            model(batch["image"].to(dev))
            ids += list(batch["patient_id"])
    finally:
        hook.remove()
    values = torch.cat(captured).numpy()
    frame = pd.DataFrame(values, columns=[f"deep__cnn_{j:04d}" for j in range(values.shape[1])])
    frame.insert(0, "patient_id", ids)
    return frame
