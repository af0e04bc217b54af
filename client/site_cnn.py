"""The CNN stage at a site: the site half of `server/train_cnn.py`.

``train.cnn``: load the coordinator's weights, train on this site's cases for a few local
epochs, send the weights back with the number of cases (the FedAvg weight) and the mean loss.
``query.cnn_scores``: with the final weights, write every case's DL-score to
``STORE/scores.parquet`` (column ``dl_score``) and its deep features to
``STORE/deep_features.parquet``; send back only the site's C-index of the DL-score.
Images are found through the manifest the store was prepared from; only cases in the store
(not quarantined) are used.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from flwr.app import MetricRecord, RecordDict

from client.privacy import Disclosure
from client.site_data import site_log
from client.site_fit import SCORES
from client.store import FeatureStore
from common import schemas
from common.errors import StoreError
from common.messages import arrays_record

DEEP_FEATURES = "deep_features.parquet"


def site_cases(store: FeatureStore, cnn: dict, *, train: bool = False):
    """The store's cases as a MONAI dataset (phases, mask, outcome) from the manifest it was prepared from."""
    from client.cnn_task import case_dataset

    manifest_path = Path(str(store.meta.get("manifest") or ""))
    if not manifest_path.is_file():
        raise StoreError("this site's store was not prepared from a manifest with images (or the manifest moved); "
                         "the CNN needs the images")
    manifest = pd.read_csv(manifest_path, dtype={schemas.ID: str})
    ids = set(store.features[schemas.ID].astype(str))
    manifest = manifest[manifest[schemas.ID].isin(ids)]
    return case_dataset(manifest, manifest_path.parent, list(cnn["phases"]), spacing=tuple(cnn["spacing"]),
                        box=tuple(cnn["box"]), window=tuple(cnn["window"]), dims=cnn["dims"],
                        train=train), manifest


def network_with(cnn: dict, arrays: dict):
    import torch

    from client.cnn_task import build_network

    net = build_network(cnn["architecture"], spatial_dims=cnn["dims"], in_channels=len(cnn["phases"]))
    state = net.state_dict()
    missing = [k for k in state if k not in arrays]
    if missing:
        raise StoreError(f"the coordinator's weights lack {len(missing)} tensor(s), e.g. {missing[:2]}")
    net.load_state_dict({k: torch.as_tensor(arrays[k]).to(v.dtype).reshape(v.shape) for k, v in state.items()})
    return net


def _weights_disclosure(ids, arrays: dict) -> Disclosure:
    """Weights have no per-case axis; their dimensions are declared so a layer as wide as the site's case
    count is not mistaken for one."""
    axes = {d for a in arrays.values() for d in np.shape(a)}
    return Disclosure(n_cases=len(ids), identifiers=frozenset(ids), shared_axes=frozenset(axes))


def train_reply(store: FeatureStore, plan: dict, site: str, arrays: dict) -> tuple[RecordDict, Disclosure]:
    from client.cnn_task import train_epochs

    cnn = plan["study"]["cnn"]
    dataset, manifest = site_cases(store, cnn, train=True)
    net = network_with(cnn, arrays)
    history = train_epochs(net, dataset, epochs=cnn["local_epochs"], lr=cnn["lr"], batch_size=cnn["batch_size"],
                           endpoint=cnn["endpoint"], proximal_mu=cnn["proximal_mu"],
                           seed=cnn["seed"] + int(plan["round"]))
    weights = {k: v.detach().cpu().numpy() for k, v in net.state_dict().items()}
    content = RecordDict({"arrays": arrays_record(**weights),
                          "metrics": MetricRecord({"num-examples": len(manifest), "loss": float(history[-1])})})
    ids = manifest[schemas.ID].astype(str).tolist()
    return content, _weights_disclosure(ids, weights)


def scores_reply(store: FeatureStore, plan: dict, site: str, arrays: dict) -> tuple[RecordDict, Disclosure]:
    from client.cnn_task import deep_features, predict
    from common.survival_metrics import harrell_c

    cnn = plan["study"]["cnn"]
    dataset, manifest = site_cases(store, cnn)
    net = network_with(cnn, arrays)
    scores = predict(net, dataset)
    table = scores[[schemas.ID, "dl_score"]]
    path = store.path / SCORES
    if path.is_file():  # keep other scores the site holds
        old = pd.read_parquet(path)
        table = old.drop(columns=["dl_score"], errors="ignore").merge(table, on=schemas.ID, how="outer")
    table.to_parquet(path, index=False)
    deep_features(net, dataset).to_parquet(store.path / DEEP_FEATURES, index=False)
    site_log(store.path, f"train_cnn: DL-score and deep features of {len(scores)} case(s) written "
             f"(run reference {plan['weights_id'][:12]})")
    c = harrell_c(scores["time"], scores["event"].astype(bool), scores["dl_score"])
    ids = manifest[schemas.ID].astype(str).tolist()
    return RecordDict({"metrics": MetricRecord({"n": len(scores), "c_index": float(c)})}), \
        Disclosure(n_cases=len(ids), identifiers=frozenset(ids))
