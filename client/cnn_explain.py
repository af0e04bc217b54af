"""Grad-CAM maps of the CNN's DL-score, saved at the site for its own review (they never leave it).

For each case: the gradient of the network's single output (the DL-score, a log-risk) with
respect to the last convolutional block's activations, averaged per channel, weights those
activations; their positive part (where the score goes up), upsampled to the image grid and
min-max scaled to [0, 1], is the map (MONAI's ``GradCAM``), saved as
``<patient_id>_gradcam.npy`` (the image's spatial shape) and drawn in
``<patient_id>_gradcam.png``: the first phase's slice with the largest mask area (in 3D; the
2D input is already that slice), the mask contour, that map and the map of the negative part
(where the score goes down: for a risk score both matter, and a network can have no region
raising a case's score, a flat map). File names carry the patient id: these files are for the
site only.

The map is as coarse as the target layer: ResNet-18's ``layer4`` is 1/16 of the input box
per axis, DenseNet-121's last block 1/32 (a 32-voxel box gives a single value, drawn as a
flat map); ``target_layer`` can name an earlier block for a finer map.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import torch

from fedrad.common.errors import FedradError

__all__ = ["save_gradcam", "gradcam_maps", "target_layer_of"]

#: the last convolutional block of each architecture (MONAI's module names)
TARGET_LAYERS = {"resnet": "layer4", "densenet": "class_layers.relu"}


def target_layer_of(net: torch.nn.Module) -> str:
    """The module name of ``net``'s last convolutional block: ``layer4`` (ResNet), ``class_layers.relu``
    (DenseNet: the ReLU after the last block's batch norm)."""
    names = dict(net.named_modules())
    for layer in TARGET_LAYERS.values():
        if layer in names:
            return layer
    raise FedradError(f"no Grad-CAM target layer known for {type(net).__name__}; pass target_layer= "
                      f"(one of its module names)")


def _normalise(cam: np.ndarray) -> np.ndarray:
    """Per case min-max to [0, 1], high = most influence (MONAI's default normaliser flips it); a flat map
    (e.g. no region raises the score, or a 1-voxel target layer) becomes zeros."""
    out = np.zeros_like(cam, dtype=np.float64)
    for i, one in enumerate(np.nan_to_num(cam.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)):
        span = one.max() - one.min()
        if span > 0:
            out[i] = (one - one.min()) / span
    return out


def _two_sided_gradcam():
    from monai.visualize import GradCAM

    class TwoSidedGradCAM(GradCAM):
        """MONAI's Grad-CAM keeping both signs: channel 0 is the usual map (ReLU of Σ_c w_c A_c: where the
        score goes up), channel 1 the ReLU of its negative (where the score goes down); both upsampled."""

        def compute_map(self, x, class_idx=None, retain_graph=False, layer_idx=-1, **kwargs):
            logits, acti, grad = self.nn_module(x, class_idx=class_idx, retain_graph=retain_graph, **kwargs)
            self.logits = logits.detach()
            acti, grad = acti[layer_idx], grad[layer_idx]
            b, c, *spatial = grad.shape
            weights = grad.reshape(b, c, -1).mean(2).reshape(b, c, *[1] * len(spatial))
            raw = (weights * acti).sum(1, keepdim=True)
            return torch.cat([torch.relu(raw), torch.relu(-raw)], dim=1)

    return TwoSidedGradCAM


class _Explainer:
    """A copy of the network with MONAI's hooks on ``layer`` (MONAI leaves hooks on the module it is given,
    so the caller's network is not touched), on CUDA when present."""

    def __init__(self, net: torch.nn.Module, layer: str):
        from fedrad.client.cnn_task import device

        self.device = device()
        self.layer = layer
        model = copy.deepcopy(net).to(self.device).eval()
        for p in model.parameters():
            p.requires_grad_(True)
        self.cam = _two_sided_gradcam()(nn_module=model, target_layers=layer, postprocessing=lambda x: x)

    def __call__(self, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(raises, lowers, scores): the two maps ``(B, *spatial)`` in [0, 1] and the network's scores."""
        x = torch.as_tensor(images, dtype=torch.float32).to(self.device)
        with torch.enable_grad():
            maps = self.cam(x, class_idx=0).detach().cpu().double().numpy()
        scores = self.cam.logits[:, 0].cpu().double().numpy()
        return _normalise(maps[:, 0]), _normalise(maps[:, 1]), scores


def gradcam_maps(net: torch.nn.Module, images: torch.Tensor, *, target_layer: str | None = None,
                 direction: str = "raises") -> np.ndarray:
    """Grad-CAM of the score (the single output) for a batch ``(B, C, *spatial)``: ``(B, *spatial)`` in [0, 1].
    ``direction`` "raises" is the usual Grad-CAM (regions pushing the score up); "lowers" the regions pushing
    it down. ``net`` is left as it was."""
    if direction not in ("raises", "lowers"):
        raise ValueError(f"direction must be 'raises' or 'lowers', got {direction!r}")
    raises, lowers, _ = _Explainer(net, target_layer or target_layer_of(net))(images)
    return raises if direction == "raises" else lowers


def _safe_name(patient_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(patient_id)).strip("._") or "case"


def _figure(path: Path, image: np.ndarray, mask: np.ndarray, raises: np.ndarray, lowers: np.ndarray,
            title: str) -> None:
    """Three panels (image with the mask contour; the map of what raises the score; of what lowers it), drawn
    without pyplot on an Agg canvas (no global backend, safe in a server process)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2), dpi=100)
    FigureCanvasAgg(fig)
    panels = [("image + mask", None), ("Grad-CAM: raises the score", raises), ("lowers the score", lowers)]
    for ax, (name, cam) in zip(fig.subplots(1, 3), panels):
        ax.imshow(image.T, cmap="gray", origin="lower", vmin=0.0, vmax=1.0)
        if cam is not None:
            shown = ax.imshow(cam.T, cmap="jet", origin="lower", alpha=0.4, vmin=0.0, vmax=1.0)
            fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04)
            if not cam.any():
                name += " (flat map)"
        if mask.any() and not mask.all():
            ax.contour(mask.T.astype(float), levels=[0.5], colors="lime", linewidths=1.0, origin="lower")
        ax.set_axis_off()
        ax.set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path)


def save_gradcam(net: torch.nn.Module, dataset, folder: Path, n_cases: int, *, dims: int,
                 target_layer: str | None = None) -> list[Path]:
    """Grad-CAM of the first ``n_cases`` items of ``dataset`` (``fedrad.client.cnn_task.case_dataset`` items:
    ``image``, ``mask``, ``patient_id``; build it with ``train=False``) written into ``folder``: for each case
    ``<id>_gradcam.npy`` (the usual map, regions raising the score, the image's spatial shape, in [0, 1]) and
    ``<id>_gradcam.png`` (first phase, slice of largest mask area in 3D, mask contour, maps of what raises and
    what lowers the score). Returns the paths written (png, npy per case). ``net`` is left as it was."""
    if dims not in (2, 3):
        raise ValueError(f"dims can only be 2 or 3, got {dims}")
    n = min(int(n_cases), len(dataset))
    if n <= 0:
        return []
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    explain = _Explainer(net, target_layer or target_layer_of(net))
    written = []
    for i in range(n):
        item = dataset[i]
        image = torch.as_tensor(item["image"])
        patient = str(item.get("patient_id", f"case{i:04d}"))
        if image.ndim != dims + 1:
            raise FedradError(f"Grad-CAM: case {patient} has an image of shape {tuple(image.shape)}, expected "
                              f"(phases, {dims} spatial axes)")
        mask = np.asarray(item["mask"])[0] > 0
        raises, lowers, score = (a[0] for a in explain(image[None]))
        pixels = image.detach().cpu().numpy()[0]  # the first phase
        if dims == 3:
            z = int(mask.reshape(-1, mask.shape[-1]).sum(0).argmax())
            shown = (pixels[..., z], mask[..., z], raises[..., z], lowers[..., z])
            where = f", slice {z + 1}/{mask.shape[-1]}"
        else:
            shown, where = (pixels, mask, raises, lowers), ""
        name = _safe_name(patient)
        npy, png = folder / f"{name}_gradcam.npy", folder / f"{name}_gradcam.png"
        np.save(npy, raises.astype(np.float32))
        _figure(png, *shown, title=f"{patient}{where}: DL-score {score:.3f} (target layer {explain.layer})")
        written += [png, npy]
    return written
