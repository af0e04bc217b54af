"""Tumour segmentation at a site: images to tensors, SegResNet, Dice loss, Dice metric, masks out.

Flower's ``task.py`` of the `train_seg` stage (and of ``fedrad prepare --segment``): it never
touches a Message. One contrast phase is read with SimpleITK (NIfTI, NRRD or a DICOM folder,
like ``prepare``) and resampled onto an axis-aligned grid of the study's ``spacing`` covering
the image; training and inference go through that same grid, so the network always sees one
orientation. SimpleITK rather than MONAI's loader because its inverse is exact: a predicted
mask is resampled back onto the *input image itself*, so its size, spacing, origin and
direction are the image's and pyradiomics accepts the pair.

Training crops one ``box`` (what SegResNet sees) per case and epoch at random, centred on a
tumour voxel or anywhere with equal odds (MONAI's RandCropByPosNegLabeld): boxes only ever
centred on the tumour would teach the network that the tumour is always in the middle of the
field, and inference slides the box over the whole image. One box per case and batches of
one or two: on a CPU the optimiser steps are what a round can afford, and more steps of fewer
boxes learned faster in our measurements. Held-out Dice is measured the way masks are made:
sliding-window over the whole resampled image, threshold 0.5, largest connected component.

``settings`` everywhere is the study's ``[segment]`` section as a dict (``Segment.model_dump()``):
``phase, spacing, box, window, init_filters``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage
from monai.data import CacheDataset, DataLoader, Dataset
from monai.inferers import sliding_window_inference
from monai.losses import DiceLoss
from monai.metrics import DiceMetric
from monai.transforms import (Compose, MapTransform, RandCropByPosNegLabeld, RandFlipd, RandGaussianNoised,
                              RandScaleIntensityd, ScaleIntensityRanged, SpatialPadd)

from fedrad.client import imaging
from fedrad.client.cnn_task import device
from fedrad.common.errors import CaseError, FedradError
from fedrad.common.messages import weights_id

__all__ = ["build_segmenter", "seg_dataset", "seg_transforms", "train_epochs", "dice_on", "dice_per_case",
           "predict_mask", "segment_image", "resample_case", "check_box", "segmenter_with", "write_model",
           "read_model"]

#: SegResNet halves the field three times (blocks_down has four levels): a box side must divide by 8.
BOX_MULTIPLE = 8
#: the tumour share of the field the untrained network predicts (see `build_segmenter`)
TUMOUR_PRIOR = 0.05


def check_box(box) -> tuple[int, int, int]:
    box = tuple(int(b) for b in box)
    if len(box) != 3 or any(b < BOX_MULTIPLE or b % BOX_MULTIPLE for b in box):
        raise FedradError(f"[segment] box {list(box)}: every side must be a multiple of {BOX_MULTIPLE} "
                          "(SegResNet halves the box three times)")
    return box


def build_segmenter(init_filters: int = 8) -> torch.nn.Module:
    """MONAI SegResNet, 3D, one input channel (the phase), one output channel (tumour logit, sigmoid).

    Group norm uses the largest group count ≤ 8 that divides ``init_filters``, so narrow test
    networks (4 filters) build too; with the default 8 it is MONAI's own setting. The output
    bias starts at the logit of ``TUMOUR_PRIOR``: a tumour fills a few percent of the field, and a
    network that starts by calling half of every image tumour spends its first rounds (a
    federation has few) unlearning that instead of finding the tumour (RetinaNet's prior init).
    """
    from monai.networks.nets import SegResNet

    if init_filters < 1:
        raise ValueError(f"init_filters must be ≥ 1, got {init_filters}")
    net = SegResNet(spatial_dims=3, in_channels=1, out_channels=1, init_filters=int(init_filters),
                    norm=("GROUP", {"num_groups": math.gcd(8, int(init_filters))}))
    with torch.no_grad():
        net.conv_final[-1].conv.bias.fill_(math.log(TUMOUR_PRIOR / (1 - TUMOUR_PRIOR)))
    return net


# --- the canonical grid --------------------------------------------------------------------------

def _canonical_grid(image: sitk.Image, spacing) -> sitk.Image:
    """An empty axis-aligned image at ``spacing`` covering every voxel centre of ``image``."""
    size = image.GetSize()
    corners = [image.TransformContinuousIndexToPhysicalPoint([c * (s - 1) for c, s in zip(corner, size)])
               for corner in np.ndindex(2, 2, 2)]
    low, high = np.min(corners, axis=0), np.max(corners, axis=0)
    grid_size = [int(np.floor((h - lo) / sp + 1e-6)) + 1 for lo, h, sp in zip(low, high, spacing)]
    grid = sitk.Image(grid_size, sitk.sitkUInt8)
    grid.SetSpacing(tuple(float(s) for s in spacing))
    grid.SetOrigin(tuple(float(v) for v in low))
    return grid


def _to_channel_first(image: sitk.Image) -> np.ndarray:
    """SimpleITK's (z, y, x) array as MONAI's (1, x, y, z)."""
    return sitk.GetArrayFromImage(image).transpose(2, 1, 0)[None]


def resample_case(image: sitk.Image, spacing, mask: sitk.Image | None = None):
    """(image array (1, X, Y, Z) float32, mask array or None, the grid image) on the canonical grid."""
    grid = _canonical_grid(image, spacing)
    outside = float(sitk.GetArrayViewFromImage(image).min())
    moved = sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), grid, sitk.Transform(), sitk.sitkLinear, outside,
                          sitk.sitkFloat32)
    label = None
    if mask is not None:
        label = _to_channel_first(sitk.Resample(mask, grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                                sitk.sitkUInt8)).astype(np.float32)
    return _to_channel_first(moved).astype(np.float32), label, grid


class LoadResampled(MapTransform):
    """Item paths -> ``image`` (and ``mask``, binary) arrays on the canonical grid. A mask is binarised
    as ``== label`` when the item carries one, else ``> 0``; it must share the image's grid (as
    ``prepare`` requires)."""

    def __init__(self, spacing):
        super().__init__(["image"])
        self.spacing = tuple(float(s) for s in spacing)

    def __call__(self, data):
        d = dict(data)
        pid, field = str(d.get("patient_id", "?")), str(d.get("image_field", "image"))
        image = imaging.read_image(Path(d["image"]), pid, field)
        mask = None
        if d.get("mask"):
            mask = imaging.read_image(Path(d["mask"]), pid, "mask")
            imaging.check_same_grid(image, mask, pid, field, "mask")
            label = d.get("label")
            mask = (mask == int(label)) if label is not None else (mask > 0)
        d["image"], d["mask"], _ = resample_case(image, self.spacing, mask)
        if d["mask"] is None:
            del d["mask"]
        return d


def seg_transforms(settings: dict, *, train: bool = False) -> Compose:
    """Read + resample + window (cached by `seg_dataset`), then for training the random boxes and augmentation."""
    box = check_box(settings["box"])
    window = settings["window"]
    steps = [LoadResampled(settings["spacing"]),
             ScaleIntensityRanged(["image"], a_min=window[0], a_max=window[1], b_min=0.0, b_max=1.0, clip=True)]
    if train:
        steps += [SpatialPadd(["image", "mask"], spatial_size=box),
                  RandCropByPosNegLabeld(["image", "mask"], label_key="mask", spatial_size=box, pos=1, neg=1,
                                         num_samples=1),
                  RandFlipd(["image", "mask"], prob=0.5, spatial_axis=0),
                  RandFlipd(["image", "mask"], prob=0.5, spatial_axis=1),
                  RandScaleIntensityd(["image"], factors=0.05, prob=0.3),
                  RandGaussianNoised(["image"], prob=0.3, std=0.01)]
    return Compose(steps)


def seg_dataset(items: list[dict], settings: dict, *, train: bool = False, cache: bool = True):
    """One item per case (``{"image": path, "mask": path, "patient_id": id[, "label": int]}``). The
    deterministic part (reading, resampling) is cached for the epochs of one message; a site's
    cases are tens to hundreds, which fit in memory at the study's spacing."""
    transform = seg_transforms(settings, train=train)
    if cache and items:
        return CacheDataset(items, transform=transform, cache_rate=1.0, num_workers=0, progress=False)
    return Dataset(items, transform=transform)


# --- training and measuring ----------------------------------------------------------------------

def train_epochs(net: torch.nn.Module, dataset, *, epochs: int = 1, lr: float = 1e-3, batch_size: int = 2,
                 seed: int = 0) -> list[float]:
    """Local training: Adam on MONAI's soft Dice loss (sigmoid; ``batch=True``: one Dice over all the
    batch's voxels, steadier than a mean of per-box Dice when a box holds little tumour).
    Returns the mean loss of each epoch."""
    dev = device()
    net.to(dev).train()
    torch.manual_seed(seed)
    if hasattr(dataset, "transform") and hasattr(dataset.transform, "set_random_state"):
        dataset.transform.set_random_state(seed=seed % 2 ** 32)
    optimiser = torch.optim.Adam(net.parameters(), lr=lr)
    loss_fn = DiceLoss(sigmoid=True, batch=True)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(seed), num_workers=0)
    history = []
    for _ in range(epochs):
        losses = []
        for batch in loader:
            optimiser.zero_grad()
            loss = loss_fn(net(batch["image"].to(dev)), batch["mask"].to(dev))
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
        history.append(float(np.mean(losses)) if losses else float("nan"))
    return history


@torch.no_grad()
def predict_mask(net: torch.nn.Module, image: torch.Tensor, box, *, overlap: float = 0.25) -> np.ndarray:
    """Binary tumour mask (X, Y, Z) of one windowed image (1, X, Y, Z): sliding-window SegResNet,
    sigmoid > 0.5, largest connected component (a tumour is one object; specks are noise)."""
    dev = device()
    net.to(dev).eval()
    image = torch.as_tensor(np.asarray(image), dtype=torch.float32)
    logits = sliding_window_inference(image[None].to(dev), roi_size=check_box(box), sw_batch_size=4,
                                      predictor=net, overlap=overlap, mode="gaussian")
    return largest_component(np.asarray((torch.sigmoid(logits[0, 0]) > 0.5).cpu(), dtype=np.uint8))


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected object of a binary mask, as 0/1 uint8 (scipy: MONAI's version needs scikit-image)."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if count <= 1:
        return (labels > 0).astype(np.uint8)
    sizes = np.bincount(labels.ravel())[1:]
    return (labels == 1 + int(np.argmax(sizes))).astype(np.uint8)


def dice_per_case(net: torch.nn.Module, dataset, box) -> list[float]:
    """Dice of the predicted mask (as `predict_mask` makes it) against each case's own mask."""
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=False)
    values = []
    for item in dataset:
        predicted = torch.as_tensor(predict_mask(net, item["image"], box))[None, None].float()
        truth = torch.as_tensor(np.asarray(item["mask"]))[None].float()
        values.append(float(metric(predicted, truth).reshape(-1)[0]))
    return values


def dice_on(net: torch.nn.Module, dataset, box) -> float:
    """Mean Dice per case over ``dataset`` (the held-out cases); NaN for an empty dataset."""
    values = dice_per_case(net, dataset, box)
    return float(np.mean(values)) if values else float("nan")


# --- a mask for an image without one -------------------------------------------------------------

def segment_image(net: torch.nn.Module, image_path: Path, out_mask_path: Path, settings: dict, *,
                  patient_id: str = "?", field: str = "image") -> int:
    """Segment one image and write its mask (labels 0/1, uint8) on exactly the image's grid.

    Returns the number of tumour voxels (0: the network found nothing; the empty mask is still
    written so the caller decides what an empty mask means).
    """
    image = imaging.read_image(Path(image_path), patient_id, field)
    imaging.check_finite(image, patient_id, field)
    array, _, grid = resample_case(image, settings["spacing"])
    window = settings["window"]
    windowed = np.clip((array - window[0]) / (window[1] - window[0]), 0.0, 1.0)
    predicted = predict_mask(net, windowed, settings["box"])
    on_grid = sitk.GetImageFromArray(predicted.transpose(2, 1, 0).astype(np.uint8))
    on_grid.CopyInformation(grid)
    mask = sitk.Resample(on_grid, image, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    if sitk.GetArrayViewFromImage(mask).any():  # nearest-neighbour back-sampling can split a thin object
        mask = sitk.Cast(sitk.RelabelComponent(sitk.ConnectedComponent(mask), sortByObjectSize=True) == 1,
                         sitk.sitkUInt8)
    mask.CopyInformation(image)
    out_mask_path = Path(out_mask_path)
    out_mask_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        if _is_nifti(Path(image_path)) and _is_nifti(out_mask_path):
            _write_nifti_like(sitk.GetArrayFromImage(mask), Path(image_path), out_mask_path)
        else:
            sitk.WriteImage(mask, str(out_mask_path), useCompression=True)
    except (RuntimeError, OSError) as exc:
        raise CaseError(patient_id, "mask", f"cannot write the automatic mask {out_mask_path}: {exc}") from exc
    return int(sitk.GetArrayViewFromImage(mask).sum())


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


def _write_nifti_like(mask_zyx: np.ndarray, image_path: Path, out: Path) -> None:
    """Write the mask with a copy of the image's own NIfTI header (qform, sform, codes, pixdim).

    SimpleITK would rebuild the header from its direction matrix, and NIfTI's float32 quaternion
    does not survive that round trip bit for bit on an oblique scan (it drifts by ~1e-8): the
    copied header gives back exactly the image's geometry when read.
    """
    import nibabel as nib

    reference = nib.load(str(image_path))
    header = reference.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1.0, 0.0)
    data = np.ascontiguousarray(mask_zyx.transpose(2, 1, 0).astype(np.uint8))
    if data.shape != reference.shape[:3]:
        raise OSError(f"mask shape {data.shape} differs from the image's {reference.shape[:3]}")
    nib.save(nib.Nifti1Image(data, None, header=header), str(out))  # affine None: the header's fields, untouched


# --- the segmentation model on disk --------------------------------------------------------------

#: files of "the segmentation model" (RUN_DIR/segmentation/ of a study; what `prepare --segment` takes)
MODEL_WEIGHTS = "model.npz"
MODEL_META = "model.json"
MODEL_KIND = "fedrad-segmentation"
MODEL_FORMAT = 1


def segmenter_with(settings: dict, weights: dict) -> torch.nn.Module:
    """The settings' SegResNet carrying ``weights`` (float64 arrays keyed by state_dict names)."""
    net = build_segmenter(settings["init_filters"])
    state = net.state_dict()
    missing = [k for k in state if k not in weights]
    if missing:
        raise FedradError(f"the segmentation weights lack {len(missing)} tensor(s) of SegResNet(init_filters="
                          f"{settings['init_filters']}), e.g. {missing[:2]}")
    wrong = [k for k, v in state.items() if tuple(np.shape(weights[k])) != tuple(v.shape)]
    if wrong:
        raise FedradError(f"the segmentation weights do not fit SegResNet(init_filters={settings['init_filters']}): "
                          f"{wrong[0]} has shape {tuple(np.shape(weights[wrong[0]]))}, the network "
                          f"{tuple(state[wrong[0]].shape)}")
    net.load_state_dict({k: torch.as_tensor(np.asarray(weights[k])).to(v.dtype) for k, v in state.items()})
    return net


def write_model(folder: Path, weights: dict[str, np.ndarray], settings: dict, **about) -> Path:
    """``folder/model.npz`` (float64 weights) + ``folder/model.json`` (settings, weights sha256, ``about``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / MODEL_WEIGHTS, **{k: np.asarray(v, dtype=np.float64) for k, v in weights.items()})
    meta = {"kind": MODEL_KIND, "format": MODEL_FORMAT, "settings": settings,
            "weights": MODEL_WEIGHTS, "weights_sha256": weights_id(weights), **about}
    (folder / MODEL_META).write_text(json.dumps(meta, indent=2, default=str), encoding="utf-8")
    return folder


def read_model(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """(weights, model.json) of a segmentation model given as its folder, its model.npz or its model.json.

    The weights must hash to model.json's ``weights_sha256``: a mixed-up or altered file is refused
    rather than silently segmenting with the wrong network.
    """
    path = Path(path)
    if not path.exists():
        raise FedradError(f"segmentation model '{path}' not found (give the segmentation/ folder of a study's run "
                          f"directory, or its {MODEL_WEIGHTS})")
    folder = path if path.is_dir() else path.parent
    meta_path = folder / MODEL_META
    if not meta_path.is_file():
        raise FedradError(f"'{path}' is not a segmentation model: no {MODEL_META} in {folder} (give the "
                          f"segmentation/ folder of a study's run directory, or its {MODEL_WEIGHTS})")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FedradError(f"{meta_path} is not valid JSON: {exc}") from exc
    if meta.get("kind") != MODEL_KIND or meta.get("format") != MODEL_FORMAT:
        raise FedradError(f"{meta_path} is not a fedrad segmentation model of format {MODEL_FORMAT} "
                          f"(kind {meta.get('kind')!r}, format {meta.get('format')!r})")
    weights_path = path if path.suffix == ".npz" else folder / str(meta.get("weights", MODEL_WEIGHTS))
    if not weights_path.is_file():
        raise FedradError(f"segmentation model {folder}: weights file {weights_path.name} not found")
    with np.load(weights_path, allow_pickle=False) as archive:
        weights = {k: archive[k] for k in archive.files}
    if weights_id(weights) != meta.get("weights_sha256"):
        raise FedradError(f"segmentation model {folder}: {weights_path.name} does not match the weights_sha256 "
                          f"in {MODEL_META} (the file was changed or comes from another model)")
    for key in ("phase", "spacing", "box", "window", "init_filters"):
        if key not in meta.get("settings", {}):
            raise FedradError(f"segmentation model {folder}: {MODEL_META} settings lack '{key}'")
    return weights, meta
