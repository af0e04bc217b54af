"""Stage `train_seg`: SegResNet tumour segmentation trained by federated averaging; only weights travel.

Each round sends the global weights (``train.seg``); every training site first measures them
on its own held-out cases (Dice), then trains on its other delineated cases and returns its
weights, its training-case count, its loss and that Dice. So round r's Dice is the global
model after r − 1 rounds (round 1: the untrained network), measured at no extra round trip.
The new global weights are Flower's ``aggregate_arrayrecords`` (FedAvg, weighted by cases).
One ``query.seg_dice`` round then measures the final weights everywhere (a validation site on
all its delineated cases). A site that fails a round is left out of that round and named.

The final weights and settings are "the segmentation model": ``RUN_DIR/segmentation/model.npz``
+ ``model.json``, which ``fedrad prepare --segment`` takes at a site whose cases lack masks.
"""

from __future__ import annotations

from logging import INFO
from pathlib import Path

import numpy as np
from flwr.common.logger import log

from fedrad.common.messages import SEG_DICE, TRAIN_SEG, weights_id, weights_request
from fedrad.common.study import Study
from fedrad.server.federation import (Federation, StageFailed, StageTraffic, case_weighted_mean, fedavg_round,
                               finite_or_none)
from fedrad.server.fit import study_sites

MODEL_DIR = "segmentation"


def initial_weights(study: Study) -> dict[str, np.ndarray]:
    """The untrained SegResNet of the study's seed (float32, as it travels)."""
    import torch

    from fedrad.client.segmentation import build_segmenter, check_box

    check_box(study.segment.box)
    torch.manual_seed(study.segment.seed)
    net = build_segmenter(study.segment.init_filters)
    return {k: v.detach().cpu().numpy() for k, v in net.state_dict().items()}


def _round_figures(round_no: int, replies: dict) -> dict:
    metrics = {s: r["metrics"] for s, r in replies.items()}
    figures = {"round": round_no,
               "loss": {s: float(m["loss"]) for s, m in metrics.items()},
               "cases": {s: int(m["num-examples"]) for s, m in metrics.items()},
               "dice": {s: finite_or_none(m["dice"]) for s, m in metrics.items()},
               "held_out": {s: int(m["n_held_out"]) for s, m in metrics.items()}}
    figures["mean_dice"] = case_weighted_mean(figures["dice"], figures["held_out"])
    return figures


def run_train_seg(fed: Federation, study: Study, census: dict, run_dir: Path) -> dict:
    from fedrad.client.segmentation import write_model

    traffic = StageTraffic()
    sites = study_sites(census, None, fed, study)
    if len(sites) < study.federation.min_sites:
        raise StageFailed(f"train_seg: {len(sites)} training site(s) connected, the study needs "
                          f"min_sites={study.federation.min_sites}")
    weights = initial_weights(study)
    plan = {"study": study.model_dump(mode="json")}
    history, failed = [], {}
    for round_no in range(1, study.segment.rounds + 1):
        outcome, weights = fedavg_round(fed, "train_seg", TRAIN_SEG, sites, plan, round_no, weights, traffic,
                                        study.federation.min_sites)
        failed.update(outcome.failures)
        history.append(_round_figures(round_no, outcome.replies))
        log(INFO, "train_seg: round %d, mean local Dice loss %.4f, held-out Dice of the weights sent %s", round_no,
            np.mean(list(history[-1]["loss"].values())), history[-1]["mean_dice"])

    identifier = weights_id(weights)
    everyone = sites + [s for s in study.sites.validation if s in census["sites"] and s in fed.sites]
    outcome = fed.ask("train_seg", traffic.rounds + 1, SEG_DICE,
                      {s: weights_request({**plan, "weights_id": identifier}, weights) for s in everyone},
                      {s: fed.sites[s] for s in everyone}, traffic)
    failed.update(outcome.failures)
    final_dice = {s: finite_or_none(r["metrics"]["dice"]) for s, r in outcome.replies.items()}
    final_cases = {s: int(r["metrics"]["n_held_out"]) for s, r in outcome.replies.items()}
    final_mean = case_weighted_mean({s: d for s, d in final_dice.items() if s in sites}, final_cases)
    log(INFO, "train_seg: final held-out Dice per site %s (training sites' case-weighted mean %s)",
        {s: None if d is None else round(d, 3) for s, d in final_dice.items()}, final_mean)

    folder = write_model(Path(run_dir) / MODEL_DIR, weights, study.segment.model_dump(mode="json"),
                         study=study.study.name, rounds=study.segment.rounds, sites=sites,
                         final_dice=final_dice, final_mean_dice=final_mean)
    return {"kind": "segmentation", "network": "SegResNet", "init_filters": study.segment.init_filters,
            "phase": study.segment.phase, "rounds": study.segment.rounds, "strategy": "FedAvg", "sites": sites,
            "history": history, "mean_dice_per_round": [h["mean_dice"] for h in history],
            "final_dice": final_dice, "final_held_out": final_cases, "final_mean_dice": final_mean,
            "measured_sites": sorted(outcome.replies), "failed": failed,
            "model": str(folder), "weights_id": identifier,
            "bytes_up_per_site": dict(traffic.bytes_in), "traffic": traffic.summary()}
