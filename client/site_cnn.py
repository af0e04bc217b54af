"""The CNN stage at a site: the site half of `server/train_cnn.py`.

``train.cnn``: load the coordinator's weights; score this site's held-out validation cases
with them (loss and C-index of the global model, withheld below min_count); train on the
other cases for a few local epochs (DP-SGD when the study asks, with this site's own privacy
accountant); send back the weights, the number of training cases (the FedAvg weight), the
mean loss and those scalars. ``query.cnn_scores``: with the final weights, write every
case's DL-score to ``STORE/scores.parquet`` (column ``dl_score``), its deep features to
``STORE/deep_features.parquet`` and Grad-CAM maps of a few cases to ``STORE/gradcam/``
(never sent); send back only the site's C-index of the DL-score.
Images are found through the manifest the store was prepared from; only cases in the store
(not quarantined) are used.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from flwr.app import MetricRecord, RecordDict

from fedrad.client.privacy import Disclosure
from fedrad.client.site_data import site_log, write_deep_features
from fedrad.client.site_fit import SCORES
from fedrad.client.store import FeatureStore
from fedrad.common import schemas
from fedrad.common.errors import StoreError
from fedrad.common.messages import weights_record
from fedrad.common.study import Study

GRADCAM = "gradcam"



def site_cases(store: FeatureStore, cnn: dict, *, train: bool = False, part: str = "all"):
    """The store's cases as a MONAI dataset (phases, mask, outcome) from the manifest it was prepared from;
    ``part`` "training" or "validation" takes one side of the site-local split (`validation_ids`)."""
    from fedrad.client.cnn_task import case_dataset

    manifest_path = Path(str(store.meta.get("manifest") or ""))
    if not manifest_path.is_file():
        raise StoreError("this site's store was not prepared from a manifest with images (or the manifest moved); "
                         "the CNN needs the images")
    manifest = pd.read_csv(manifest_path, dtype={schemas.ID: str})
    ids = set(store.features[schemas.ID].astype(str))
    if part != "all":
        held = validation_ids(sorted(ids), cnn)
        ids = held if part == "validation" else ids - held
    manifest = manifest[manifest[schemas.ID].isin(ids)]
    return case_dataset(manifest, manifest_path.parent, list(cnn["phases"]), spacing=tuple(cnn["spacing"]),
                        box=tuple(cnn["box"]), window=tuple(cnn["window"]), dims=cnn["dims"],
                        train=train), manifest


def validation_ids(ids: list[str], cnn: dict) -> set[str]:
    """The site-local validation split: the share of cases with the smallest hashes of their ids, so every
    round (a fresh process each time) holds out the same cases."""
    from fedrad.common.splits import held_out_share

    return held_out_share(ids, cnn["validation_fraction"], cnn["seed"])


def network_with(cnn: dict, arrays: dict):
    import torch

    from fedrad.client.cnn_task import network_for

    net = network_for(cnn)
    state = net.state_dict()
    missing = [k for k in state if k not in arrays]
    if missing:
        raise StoreError(f"the coordinator's weights lack {len(missing)} tensor(s), e.g. {missing[:2]}")
    net.load_state_dict({k: torch.as_tensor(arrays[k]).to(v.dtype).reshape(v.shape) for k, v in state.items()})
    return net


def _weights_disclosure(ids, arrays: dict, groups: dict | None = None) -> Disclosure:
    """Weights have no per-case axis; their dimensions are declared so a layer as wide as the site's case
    count is not mistaken for one."""
    axes = {d for a in arrays.values() for d in np.shape(a)}
    return Disclosure(n_cases=len(ids), identifiers=frozenset(ids), shared_axes=frozenset(axes),
                      groups=dict(groups or {}))


def validation_figures(net, dataset, endpoint: str) -> dict[str, float]:
    """Loss (risk sets over the whole split) and Harrell's C of ``net`` on the site's validation cases."""
    import torch

    from fedrad.client.cnn_task import cox_loss, predict
    from fedrad.common.survival_metrics import harrell_c

    scores = predict(net, dataset)
    risk, event = torch.tensor(scores["dl_score"].to_numpy()), torch.tensor(scores["event"].to_numpy())
    if endpoint == "binary":
        loss = torch.nn.functional.binary_cross_entropy_with_logits(risk, event.double())
    else:
        loss = cox_loss(risk, torch.tensor(scores["time"].to_numpy()), event)
    return {"val_loss": float(loss), "val_c_index": float(harrell_c(scores["time"], scores["event"].astype(bool),
                                                                   scores["dl_score"]))}


def _held_out_figures(store: FeatureStore, cnn: dict, net, min_count: int) -> tuple[dict, dict]:
    """Figures of the weights as received, on the validation split; withheld (NaN) below min_count cases or
    without an event (no C-index), so no figure comes from fewer cases than the study allows."""
    dataset, manifest = site_cases(store, cnn, part="validation")
    n, events = len(manifest), int(manifest["event"].sum()) if len(manifest) else 0
    figures = {"val_n": n, "val_loss": float("nan"), "val_c_index": float("nan")}
    if n < max(min_count, 2) or events == 0:
        if n:
            site_log(store.path, f"train_cnn: validation figures withheld ({n} case(s), {events} event(s); "
                     f"min_count {min_count})")
        return figures, {}
    figures.update(validation_figures(net, dataset, cnn["endpoint"]))
    return figures, {"cnn validation split": n}


def train_reply(store: FeatureStore, plan: dict, study: Study, site: str, arrays: dict, min_count: int = 1,
                run_id: int = 0) -> tuple[RecordDict, Disclosure]:
    from fedrad.client.cnn_task import train_epochs, uses_dp

    cnn = study.cnn.model_dump(mode="json")
    net = network_with(cnn, arrays)
    figures, groups = _held_out_figures(store, cnn, net, min_count)
    dataset, manifest = site_cases(store, cnn, train=True, part="training")
    if len(manifest) < 2:
        raise StoreError(f"train_cnn: {len(manifest)} training case(s) after the validation split; the CNN needs "
                         "at least 2 (lower [cnn] validation_fraction)")
    if uses_dp(cnn):
        loss, privacy = _train_private(store, cnn, net, dataset, run_id)
    else:
        loss = train_epochs(net, dataset, epochs=cnn["local_epochs"], lr=cnn["lr"], batch_size=cnn["batch_size"],
                            endpoint=cnn["endpoint"], proximal_mu=cnn["proximal_mu"],
                            seed=cnn["seed"] + int(plan["round"]), num_workers=cnn["workers"])[-1]
        privacy = {}
    weights = {k: v.detach().cpu().numpy() for k, v in net.state_dict().items()}
    metrics = {"num-examples": len(manifest), "loss": float(loss), **figures, **privacy}
    content = RecordDict({"arrays": weights_record(weights), "metrics": MetricRecord(metrics)})
    ids = store.features[schemas.ID].astype(str).tolist()
    if groups:
        groups["cnn training split"] = len(manifest)
    return content, _weights_disclosure(ids, weights, groups)


def _train_private(store: FeatureStore, cnn: dict, net, dataset, run_id: int) -> tuple[float, dict]:
    """One round of DP-SGD. The site checks its own budget before training and records the steps in its
    accountant before the weights leave; it reports ε spent and ε after one more such round (so the
    coordinator can stop before any site would pass the budget)."""
    from fedrad.client.cnn_privacy import check_budget, epsilon_after, epsilon_for, load_history, planned_steps, \
        record_steps, train_epochs_private

    dp = cnn["privacy"]
    key = str(run_id)
    planned = (dp["noise_multiplier"], *planned_steps(len(dataset), cnn["batch_size"], cnn["local_epochs"]))
    check_budget(load_history(store.path, key), planned, dp["delta"], dp["epsilon_budget"])
    done = train_epochs_private(net, dataset, noise_multiplier=dp["noise_multiplier"],
                                max_grad_norm=dp["max_grad_norm"], epochs=cnn["local_epochs"], lr=cnn["lr"],
                                batch_size=cnn["batch_size"], endpoint=cnn["endpoint"],
                                proximal_mu=cnn["proximal_mu"], num_workers=cnn["workers"])
    history = record_steps(store.path, key, *done.entry)
    spent = epsilon_for(history, dp["delta"])
    site_log(store.path, f"train_cnn: DP-SGD round, ε spent {spent:.3f} (δ {dp['delta']:g}, {done.guarantee})")
    return done.losses[-1], {"dp_epsilon": spent, "dp_epsilon_next": epsilon_after(history, done.entry, dp["delta"]),
                             "dp_sample_rate": done.sample_rate, "dp_steps": done.steps}


def write_cnn_outputs(store: FeatureStore, cnn: dict, arrays: dict, weights_id: str):
    """Score every case of the store with the network: ``dl_score`` into STORE/scores.parquet (other scores
    kept) and the deep features into STORE/deep_features.parquet, tagged with the network's id. Returns the
    scores (with outcome), the dataset and the network."""
    from fedrad.client.cnn_task import deep_features, predict

    dataset, manifest = site_cases(store, cnn)
    net = network_with(cnn, arrays)
    scores = predict(net, dataset, num_workers=cnn.get("workers", 0))
    table = scores[[schemas.ID, "dl_score"]]
    path = store.path / SCORES
    if path.is_file():  # keep other scores the site holds
        old = pd.read_parquet(path)
        table = old.drop(columns=["dl_score"], errors="ignore").merge(table, on=schemas.ID, how="outer")
    table.to_parquet(path, index=False)
    write_deep_features(store.path, deep_features(net, dataset, num_workers=cnn.get("workers", 0)), weights_id)
    site_log(store.path, f"train_cnn: DL-score and deep features of {len(scores)} case(s) written "
             f"(network {weights_id[:12]})")
    return scores, dataset, net


def save_site_gradcam(store: FeatureStore, cnn: dict, net, dataset) -> list[Path]:
    """Grad-CAM maps of the first ``gradcam_cases`` cases, into ``STORE/gradcam/`` for the site's own review."""
    from fedrad.client.cnn_explain import save_gradcam

    paths = save_gradcam(net, dataset, store.path / GRADCAM, cnn.get("gradcam_cases", 0), dims=cnn["dims"])
    if paths:
        site_log(store.path, f"train_cnn: Grad-CAM maps of {len(paths) // 2} case(s) in {store.path / GRADCAM}")
    return paths


def scores_reply(store: FeatureStore, plan: dict, study: Study, site: str, arrays: dict) -> tuple[RecordDict, Disclosure]:
    from fedrad.common.survival_metrics import harrell_c

    cnn = study.cnn.model_dump(mode="json")
    scores, dataset, net = write_cnn_outputs(store, cnn, arrays, plan["weights_id"])
    save_site_gradcam(store, cnn, net, dataset)
    c = harrell_c(scores["time"], scores["event"].astype(bool), scores["dl_score"])
    ids = scores[schemas.ID].astype(str).tolist()
    return RecordDict({"metrics": MetricRecord({"n": len(scores), "c_index": float(c)})}), \
        Disclosure(n_cases=len(ids), identifiers=frozenset(ids))
