"""Start the CNN from a local weights file (no weights can be fetched): match, inflate, adapt, report.

A file is a ``.pt``/``.pth`` torch state dict (or a checkpoint dict holding one under
``state_dict`` or ``model``), read with ``torch.load(weights_only=True)`` (no code runs), or an
``.npz`` of arrays (e.g. a previous run's ``cnn/weights.npz``). Names lose the wrappers'
prefixes ``module.`` (DataParallel) and ``_module.`` (Opacus); torchvision's DenseNet names
(``denselayer1.conv1``, ``classifier``) are mapped to MONAI's (``denselayer1.layers.conv1``,
``class_layers.out``); MONAI's ResNet already uses torchvision's names. A tensor is loaded
when its name and shape match, with two adaptations:

- 2D kernels into a 3D network (I3D inflation): ``(out, in, kx, ky)`` is repeated along the
  network's last (axial, z) axis and divided by its depth ``kz``, so on an input constant along
  z the 3D convolution equals the 2D one;
- the input convolution's channels (e.g. ImageNet RGB, 3, vs the study's phases, k): the file's
  kernels are summed over its channels and divided by k, i.e. averaged and rescaled by 3/k, so a
  grey image replicated over the k channels gives the response the RGB kernel gives to that grey
  image replicated over R, G and B (a plain average would give a third of it and upset the batch
  norm that follows).

Anything else whose shape differs (the classifier head: 1000 ImageNet classes vs one score) is
skipped, named with its reason, and keeps the network's initial values.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from fedrad.common.errors import FedradError

__all__ = ["load_pretrained", "read_weights"]

PREFIXES = ("module.", "_module.")
#: torchvision DenseNet names -> MONAI DenseNet names
_RENAMES = ((re.compile(r"^(.*denselayer\d+)\.((?:norm|relu|conv)[12]\..*)$"), r"\1.layers.\2"),
            (re.compile(r"^classifier\.(weight|bias)$"), r"class_layers.out.\1"))


def _strip(name: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix):], True
    return name


def read_weights(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a weights file by name (prefixes stripped) and the entries that are not tensors (with why).
    FedradError when the file is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise FedradError(f"pretrained weights: no file {path}")
    try:
        if path.suffix.lower() == ".npz":
            with np.load(path, allow_pickle=False) as npz:
                raw = {k: npz[k] for k in npz.files}
        else:
            raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is the same message to the user
        raise FedradError(f"pretrained weights: cannot read {path} ({type(exc).__name__}: {exc}); expected a torch "
                          f"state dict (.pt/.pth, saved with torch.save) or an .npz of arrays") from exc
    for key in ("state_dict", "model"):
        while isinstance(raw, Mapping) and isinstance(raw.get(key), Mapping):
            raw = raw[key]
    if not isinstance(raw, Mapping):
        raise FedradError(f"pretrained weights: {path} holds a {type(raw).__name__}, not a state dict "
                          f"(name -> tensor)")
    tensors, other = {}, {}
    for name, value in raw.items():
        name = _strip(str(name))
        if isinstance(value, np.ndarray) and value.dtype.kind in "fiub":
            value = torch.from_numpy(np.array(value))  # (np.ascontiguousarray would make a 0-d array 1-d)
        if not isinstance(value, torch.Tensor):
            other[name] = f"not a tensor ({type(value).__name__})"
        elif name in tensors:
            other[name] = "duplicate name after stripping prefixes"
        else:
            tensors[name] = value
    return tensors, other


def _network_name(name: str, state: Mapping) -> str:
    if name in state:
        return name
    for pattern, replacement in _RENAMES:
        renamed = pattern.sub(replacement, name)
        if renamed != name and renamed in state:
            return renamed
    return name


def _adapt(name: str, value: torch.Tensor, target: torch.Tensor,
           input_conv: str | None) -> tuple[torch.Tensor | None, list[str], str]:
    """``value`` shaped as ``target`` (or None) and what was done (``inflated``, ``channels``), or why not."""
    done = []
    if tuple(value.shape) == tuple(target.shape) or (value.numel() == target.numel() == 1):
        return value.reshape(target.shape), done, ""
    file_shape, net_shape = tuple(value.shape), tuple(target.shape)
    why = f"shape {file_shape} in the file, {net_shape} in the network"
    if value.ndim < 3 or target.ndim < 3:
        return None, done, why
    if value.ndim == target.ndim - 1:  # a 2D kernel for a 3D network: inflate along z (the last axis)
        if value.shape[2:] != target.shape[2:-1]:
            return None, done, why + " (2D kernel size differs from the 3D kernel's x, y size)"
        depth = target.shape[-1]
        value = value.unsqueeze(-1).expand(*value.shape, depth) / depth
        done.append("inflated")
    elif value.ndim != target.ndim:
        return None, done, why + " (a 3D kernel is not collapsed for a 2D network)"
    if value.shape[1] != target.shape[1]:
        if name != input_conv:
            return None, done, why + " (input channels differ in a layer that is not the input convolution)"
        k = target.shape[1]
        value = value.sum(1, keepdim=True).expand(-1, k, *value.shape[2:]) / k
        done.append("channels")
    if tuple(value.shape) != net_shape:
        return None, [], why
    return value, done, ""


def load_pretrained(net: torch.nn.Module, path) -> dict:
    """Load the weights of ``path`` into ``net`` (in place) by name and shape, with 2D→3D inflation and
    input-channel adaptation (module docstring). Returns the report: ``file``, ``loaded`` (count), ``inflated``
    and ``channels_adapted`` (names), ``skipped`` ({name: reason}: in the file, not loaded, e.g. the head),
    ``kept_initialised`` (network tensors not loaded), ``unmatched`` (file names the network lacks).
    FedradError when the file is unreadable or no tensor matches."""
    tensors, skipped = read_weights(path)
    state = net.state_dict()
    input_conv = next((k for k, v in state.items() if v.ndim >= 3 and k.endswith("weight")), None)
    new_state = dict(state)
    loaded, inflated, adapted, unmatched = [], [], [], []
    for file_name, value in tensors.items():
        name = _network_name(file_name, state)
        if name not in state:
            unmatched.append(file_name)
            continue
        target = state[name]
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            skipped[name] = "not finite (NaN or infinity)"
            continue
        value, done, why = _adapt(name, value.detach(), target, input_conv)
        if value is None:
            skipped[name] = why + ("; the classifier head keeps its initial values"
                                   if name.startswith(("fc.", "class_layers.out.")) else "")
            continue
        new_state[name] = value.to(dtype=target.dtype).reshape(target.shape).clone()
        loaded.append(name)
        inflated += [name] if "inflated" in done else []
        adapted += [name] if "channels" in done else []
    if not loaded:
        raise FedradError(f"pretrained weights: nothing in {path} matches the {type(net).__name__} by name and "
                          f"shape (file names e.g. {sorted(tensors)[:3]}, network names e.g. {list(state)[:3]}; "
                          f"{len(skipped)} skipped: {dict(list(skipped.items())[:3])})")
    net.load_state_dict(new_state)
    kept = [k for k in state if k not in set(loaded)]
    return {"file": str(path), "loaded": len(loaded), "loaded_names": loaded, "inflated": inflated,
            "channels_adapted": adapted, "skipped": skipped, "kept_initialised": kept, "unmatched": unmatched}
