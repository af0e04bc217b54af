"""Stage `train_cnn`: the CNN trained by federated averaging; only weights travel.

Each round sends the global weights (``train.cnn``); every training site trains locally and
returns its weights and case count; the new global weights are Flower's
``aggregate_arrayrecords`` (FedAvg, weighted by cases). FedProx is the same loop with the
proximal term in the sites' loss (``[cnn] proximal_mu``). A site that fails a round is left
out of that round and named. Afterwards ``query.cnn_scores`` has every site (training and
validation) write the DL-score and deep features of its cases into its own store; the final
weights are kept in ``RUN_DIR/cnn/weights.npz``.
"""

from __future__ import annotations

import hashlib
from logging import INFO
from pathlib import Path

import numpy as np
from flwr.common.logger import log
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

from common.messages import CNN_SCORES, TRAIN_CNN, record_arrays, request
from common.study import Study
from server.federation import Federation, StageFailed, StageTraffic
from server.fit import study_sites

WEIGHTS = "weights.npz"


def initial_weights(study: Study) -> dict[str, np.ndarray]:
    import torch

    from client.cnn_task import build_network

    torch.manual_seed(study.cnn.seed)
    net = build_network(study.cnn.architecture, spatial_dims=study.cnn.dims, in_channels=len(study.cnn.phases))
    return {k: v.detach().cpu().numpy().astype(np.float64) for k, v in net.state_dict().items()}


def weights_id(weights: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode())
        h.update(np.ascontiguousarray(weights[name], dtype=np.float64).tobytes())
    return h.hexdigest()


def run_train_cnn(fed: Federation, study: Study, census: dict, harmonise: dict | None, run_dir: Path) -> dict:
    traffic = StageTraffic()
    sites = study_sites(census, harmonise, fed, study)
    weights = initial_weights(study)
    plan = {"study": study.model_dump(mode="json")}
    history, failed = [], {}
    for round_no in range(1, study.cnn.rounds + 1):
        outcome = fed.ask("train_cnn", traffic.rounds + 1, TRAIN_CNN,
                          {s: request({**plan, "round": round_no}, **weights) for s in sites},
                          {s: fed.sites[s] for s in sites}, traffic)
        failed.update(outcome.failures)
        if len(outcome.replies) < study.federation.min_sites:
            raise StageFailed(f"train_cnn: round {round_no}: {len(outcome.replies)} site(s) answered, the study "
                              f"needs min_sites={study.federation.min_sites}; " +
                              "; ".join(f"{s}: {r}" for s, r in outcome.failures.items()))
        replies = list(outcome.replies.values())
        weights = record_arrays(aggregate_arrayrecords(replies, "num-examples"))
        history.append({"round": round_no, "loss": {s: float(r["metrics"]["loss"]) for s, r in outcome.replies.items()},
                        "cases": {s: int(r["metrics"]["num-examples"]) for s, r in outcome.replies.items()}})
        log(INFO, "train_cnn: round %d, mean local loss %.4f", round_no,
            np.mean(list(history[-1]["loss"].values())))
    folder = Path(run_dir) / "cnn"
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / WEIGHTS, **weights)
    identifier = weights_id(weights)
    everyone = sites + [s for s in study.sites.validation if s in census["sites"] and s in fed.sites]
    outcome = fed.ask("train_cnn", traffic.rounds + 1, CNN_SCORES,
                      {s: request({**plan, "weights_id": identifier}, **weights) for s in everyone},
                      {s: fed.sites[s] for s in everyone}, traffic)
    failed.update(outcome.failures)
    c_index = {s: float(r["metrics"]["c_index"]) for s, r in outcome.replies.items()}
    log(INFO, "train_cnn: DL-score C-index per site %s", {s: round(c, 3) for s, c in c_index.items()})
    return {"architecture": study.cnn.architecture, "dims": study.cnn.dims, "rounds": study.cnn.rounds,
            "strategy": "FedProx" if study.cnn.proximal_mu else "FedAvg", "sites": sites, "history": history,
            "dl_score_c_index": c_index, "scored_sites": sorted(outcome.replies), "failed": failed,
            "weights": str(folder / WEIGHTS), "weights_id": identifier,
            "bytes_up_per_site": dict(traffic.bytes_in), "traffic": traffic.summary()}
