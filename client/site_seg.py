"""The segmentation stage at a site: the site half of `server/train_seg.py`.

``train.seg``: measure the weights received on this site's held-out cases (Dice), train them
on its other delineated cases for a few local epochs, and send back the weights, the number
of training cases (the FedAvg weight), the last epoch's loss, the Dice and the held-out count.
``query.seg_dice``: the Dice of the final weights on the held-out cases (at a validation site,
on every delineated case: it trained nothing).

Only cases delineated by hand train or measure the model: a mask the model itself drew
(``mask_source`` "automatic" in the store) would teach it its own mistakes. Images and masks
are found through the manifest the store was prepared from. The split is the site's own,
fixed by a hash of the case ids (`fedrad.common.splits.held_out`), so it is the same every round.

A Dice is a mean over held-out cases; from fewer than ``min_count`` cases it is withheld (sent
as NaN) and the site log says so, as for any other aggregate. Per-case Dice values go to the
site log only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from flwr.app import MetricRecord, RecordDict

from fedrad.client.privacy import Disclosure
from fedrad.client.site_data import site_log
from fedrad.client.store import MASK_SOURCE, FeatureStore
from fedrad.common import schemas
from fedrad.common.errors import FedradError, StoreError
from fedrad.common.messages import weights_record
from fedrad.common.splits import held_out
from fedrad.common.study import Study

PARTS = ("training", "held_out", "all")


def delineated_cases(store: FeatureStore, settings: dict) -> list[dict]:
    """Items (image, mask, label, patient_id) of the store's cases with a manual mask, in id order."""
    manifest_path = Path(str(store.meta.get("manifest") or ""))
    if not manifest_path.is_file():
        raise StoreError("this site's store was not prepared from a manifest with images (or the manifest moved); "
                         "segmentation needs the images and masks")
    manifest = pd.read_csv(manifest_path, dtype=str, keep_default_na=False)
    column = schemas.image_column(settings["phase"])
    if column not in manifest.columns:
        raise StoreError(f"the manifest has no column '{column}': the study segments phase '{settings['phase']}'")
    table = store.features
    manual = table if MASK_SOURCE not in table.columns else table[table[MASK_SOURCE].astype(str) != "automatic"]
    ids = set(manual[schemas.ID].astype(str))
    rows = manifest[manifest[schemas.ID].str.strip().isin(ids) & (manifest[schemas.MASK].str.strip() != "")
                    & (manifest[column].str.strip() != "")]
    base = manifest_path.parent
    label = {} if store.meta.get("label") is None else {"label": int(store.meta["label"])}  # None cannot be batched
    return [{"patient_id": row[schemas.ID].strip(), "image": str(base / row[column].strip()),
             "mask": str(base / row[schemas.MASK].strip()), "image_field": column, **label}
            for _, row in rows.sort_values(schemas.ID).iterrows()]


def split_cases(items: list[dict], settings: dict, part: str) -> list[dict]:
    """One side of the site-local split (`held_out` on the case ids with the study's fraction and seed)."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    if part == "all":
        return list(items)
    held = held_out([i["patient_id"] for i in items], settings["validation_fraction"], settings["seed"])
    return [i for i in items if (i["patient_id"] in held) == (part == "held_out")]


def segmenter_with(settings: dict, arrays: dict):
    """The study's SegResNet carrying the coordinator's weights (float32 on the wire, as the network holds them)."""
    from fedrad.client.segmentation import segmenter_with as build

    try:
        return build(settings, arrays)
    except FedradError as exc:
        raise StoreError(f"the coordinator's weights: {exc}") from exc


def held_out_dice(store: FeatureStore, settings: dict, net, cases: list[dict], min_count: int,
                  what: str) -> tuple[float, dict]:
    """(mean Dice, privacy groups) of ``net`` on ``cases``; NaN and no group below ``min_count`` cases."""
    from fedrad.client.segmentation import dice_per_case, seg_dataset

    n = len(cases)
    if n < min_count:
        if n:
            site_log(store.path, f"train_seg: {what}: Dice withheld (sent as NaN): {n} held-out case(s), "
                     f"min_count is {min_count}")
        return float("nan"), {}
    values = dice_per_case(net, seg_dataset(cases, settings), settings["box"])
    site_log(store.path, f"train_seg: {what}: Dice per held-out case (stays here): "
             + ", ".join(f"{c['patient_id']}={v:.3f}" for c, v in zip(cases, values)))
    return float(np.mean(values)), {"segmentation held-out cases": n}


def _disclosure(store: FeatureStore, n_cases: int, weights: dict | None, groups: dict) -> Disclosure:
    """Weights have no per-case axis: their dimensions are declared so a layer as wide as the site's case
    count is not mistaken for one."""
    axes = {d for a in (weights or {}).values() for d in np.shape(a)}
    return Disclosure(n_cases=n_cases, groups=groups, identifiers=frozenset(store.features[schemas.ID].astype(str)),
                      shared_axes=frozenset(axes))


def train_reply(store: FeatureStore, plan: dict, study: Study, site: str, arrays: dict,
                min_count: int = 1) -> tuple[RecordDict, Disclosure]:
    from fedrad.client.segmentation import seg_dataset, train_epochs

    settings = study.segment.model_dump(mode="json")
    round_no = int(plan["round"])
    cases = delineated_cases(store, settings)
    held, training = split_cases(cases, settings, "held_out"), split_cases(cases, settings, "training")
    if not training:
        raise StoreError(f"train_seg: no case with a manual mask to train on ({len(cases)} delineated case(s) "
                         "in the store)")
    net = segmenter_with(settings, arrays)
    dice, groups = held_out_dice(store, settings, net, held, min_count, f"round {round_no}, weights received")
    history = train_epochs(net, seg_dataset(training, settings, train=True), epochs=settings["local_epochs"],
                           lr=settings["lr"], batch_size=settings["batch_size"], seed=settings["seed"] + round_no)
    weights = {k: v.detach().cpu().numpy() for k, v in net.state_dict().items()}
    metrics = MetricRecord({"num-examples": len(training), "loss": float(history[-1]), "dice": dice,
                            "n_held_out": len(held)})
    groups["segmentation training cases"] = len(training)
    return (RecordDict({"arrays": weights_record(weights), "metrics": metrics}),
            _disclosure(store, len(cases), weights, groups))


def dice_reply(store: FeatureStore, plan: dict, study: Study, site: str, arrays: dict,
               min_count: int = 1) -> tuple[RecordDict, Disclosure]:
    settings = study.segment.model_dump(mode="json")
    cases = delineated_cases(store, settings)
    validation = site in study.sites.validation
    measured = split_cases(cases, settings, "all" if validation else "held_out")
    net = segmenter_with(settings, arrays)
    dice, groups = held_out_dice(store, settings, net, measured, min_count,
                                 f"final model {str(plan.get('weights_id', ''))[:12]}")
    metrics = MetricRecord({"dice": dice, "n_held_out": len(measured)})
    return RecordDict({"metrics": metrics}), _disclosure(store, len(cases), None, groups)
