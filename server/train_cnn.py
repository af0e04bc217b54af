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

from logging import INFO
from pathlib import Path

import numpy as np
from flwr.common.logger import log

from fedrad.common.schemas import DEEP_PREFIX
from fedrad.common.messages import CNN_SCORES, TRAIN_CNN, weights_id, weights_request
from fedrad.common.study import Study
from fedrad.server.federation import Federation, StageTraffic, case_weighted_mean, fedavg_round, finite_or_none
from fedrad.server.fit import study_sites

WEIGHTS = "weights.npz"


def initial_weights(study: Study) -> dict[str, np.ndarray]:
    import torch

    from fedrad.client.cnn_task import network_for

    torch.manual_seed(study.cnn.seed)
    net = network_for(study.cnn.model_dump(mode="json"))
    if study.cnn.pretrained:  # a local file at the coordinator (client.cnn_weights: match, inflate, adapt)
        from fedrad.client.cnn_weights import load_pretrained

        report = load_pretrained(net, study.cnn.pretrained)
        log(INFO, "train_cnn: pretrained %s: %d tensor(s) loaded (%d inflated 2D->3D, %d input channels adapted), "
            "%d kept as initialised, %d file tensor(s) unmatched", report["file"], report["loaded"],
            len(report["inflated"]), len(report["channels_adapted"]), len(report["kept_initialised"]),
            len(report["unmatched"]))
        for name, reason in report["skipped"].items():
            log(INFO, "train_cnn: pretrained %s skipped: %s", name, reason)
    return {k: v.detach().cpu().numpy() for k, v in net.state_dict().items()}


def deep_feature_names(study: Study) -> list[str]:
    """Names of the penultimate layer's outputs, as every site writes them (``deep__cnn_0000`` ...)."""
    from fedrad.client.cnn_task import network_for

    net = network_for(study.cnn.model_dump(mode="json"))
    head = net.fc if hasattr(net, "fc") else net.class_layers.out
    return [f"{DEEP_PREFIX}cnn_{j:04d}" for j in range(head.in_features)]


def _round_figures(round_no: int, replies: dict) -> dict:
    """One round's per-site training loss and, on each site's validation split, the loss and C-index of the
    global weights the site received (so round r measures the model after r − 1 rounds); NaN = withheld."""
    metrics = {s: r["metrics"] for s, r in replies.items()}
    figures = {"round": round_no,
               "loss": {s: float(m["loss"]) for s, m in metrics.items()},
               "cases": {s: int(m["num-examples"]) for s, m in metrics.items()},
               "val_loss": {s: finite_or_none(m.get("val_loss")) for s, m in metrics.items()},
               "val_c_index": {s: finite_or_none(m.get("val_c_index")) for s, m in metrics.items()},
               "val_cases": {s: int(m.get("val_n", 0)) for s, m in metrics.items()}}
    if any("dp_epsilon" in m for m in metrics.values()):
        figures["dp_epsilon"] = {s: float(m["dp_epsilon"]) for s, m in metrics.items()}
        figures["dp_epsilon_next"] = {s: float(m["dp_epsilon_next"]) for s, m in metrics.items()}
    figures["val_loss_mean"] = case_weighted_mean(figures["val_loss"], figures["val_cases"])
    return figures


def _record_round(fed: Federation, figures: dict) -> None:
    """The round's figures in the run log as they come (the dashboard's loss, C-index and ε plots)."""
    for name in ("loss", "val_loss", "val_c_index", "dp_epsilon"):
        for site, value in figures.get(name, {}).items():
            fed.runlog.series("train_cnn", name, figures["round"], value, site=site)
    fed.runlog.series("train_cnn", "val_loss_mean", figures["round"], figures["val_loss_mean"])


def _over_budget(figures: dict, study: Study) -> str:
    """The sites one more round would take past the study's ε budget (empty: none, or no budget)."""
    budget = study.cnn.privacy.epsilon_budget
    if budget is None or "dp_epsilon_next" not in figures:
        return ""
    return ", ".join(f"{s} (to ε = {e:.2f})" for s, e in figures["dp_epsilon_next"].items() if e > budget)


def _privacy_summary(study: Study, history: list[dict], budget_stop: str | None) -> dict | None:
    dp = study.cnn.privacy
    if not dp.noise_multiplier:
        return None
    from fedrad.client.cnn_privacy import guarantee

    spent: dict[str, float] = {}
    for figures in history:
        spent.update(figures.get("dp_epsilon", {}))
    return {"mechanism": "DP-SGD (Opacus, RDP accountant)", "noise_multiplier": dp.noise_multiplier,
            "max_grad_norm": dp.max_grad_norm, "delta": dp.delta, "epsilon_budget": dp.epsilon_budget,
            "guarantee": guarantee(study.cnn.endpoint), "epsilon": spent, "budget_stop": budget_stop,
            "not_covered": "the per-round validation loss and C-index (aggregates over at least min_count "
                           "held-out cases) and the final scores round are outside the DP accounting"}


class EarlyStopping:
    """Stop when the case-weighted validation loss of the global weights has not improved for ``patience``
    rounds; remember the best weights. Patience 0 (or no validation figures) never stops."""

    def __init__(self, patience: int):
        self.patience, self.best_loss, self.best_round, self.best_weights, self.stale = patience, np.inf, None, None, 0

    def update(self, round_no: int, val_loss: float | None, weights_received: dict) -> bool:
        if not self.patience or val_loss is None:
            return False
        if val_loss < self.best_loss:
            self.best_loss, self.best_round, self.best_weights, self.stale = val_loss, round_no - 1, \
                weights_received, 0
            return False
        self.stale += 1
        return self.stale >= self.patience


def run_train_cnn(fed: Federation, study: Study, census: dict, harmonise: dict | None, run_dir: Path) -> dict:
    traffic = StageTraffic()
    sites = study_sites(census, harmonise, fed, study)
    weights = initial_weights(study)
    plan = {"study": study.model_dump(mode="json")}
    history, failed, stopping, stopped, budget_stop = [], {}, EarlyStopping(study.cnn.patience), None, None
    for round_no in range(1, study.cnn.rounds + 1):
        outcome, averaged = fedavg_round(fed, "train_cnn", TRAIN_CNN, sites, plan, round_no, weights, traffic,
                                         study.federation.min_sites)
        failed.update(outcome.failures)
        history.append(_round_figures(round_no, outcome.replies))
        _record_round(fed, history[-1])
        log(INFO, "train_cnn: round %d, mean local loss %.4f, validation loss of the global model %s", round_no,
            np.mean(list(history[-1]["loss"].values())), history[-1]["val_loss_mean"])
        over = _over_budget(history[-1], study)
        if over and round_no < study.cnn.rounds:
            budget_stop = (f"stopped after round {round_no}: another round would take {over} past the privacy "
                           f"budget ε = {study.cnn.privacy.epsilon_budget:g}")
            log(INFO, "train_cnn: %s", budget_stop)
            weights = averaged
            break
        if stopping.update(round_no, history[-1]["val_loss_mean"], weights):
            stopped = round_no
            weights = stopping.best_weights
            log(INFO, "train_cnn: early stop at round %d; keeping the weights after round %d", round_no,
                stopping.best_round)
            break
        weights = averaged
    folder = Path(run_dir) / "cnn"
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / WEIGHTS, **weights)
    identifier = weights_id(weights)
    everyone = sites + [s for s in study.sites.validation if s in census["sites"] and s in fed.sites]
    outcome = fed.ask("train_cnn", traffic.rounds + 1, CNN_SCORES,
                      {s: weights_request({**plan, "weights_id": identifier}, weights) for s in everyone},
                      {s: fed.sites[s] for s in everyone}, traffic)
    failed.update(outcome.failures)
    c_index = {s: float(r["metrics"]["c_index"]) for s, r in outcome.replies.items()}
    log(INFO, "train_cnn: DL-score C-index per site %s", {s: round(c, 3) for s, c in c_index.items()})
    return {"kind": "cnn", "architecture": study.cnn.architecture, "dims": study.cnn.dims,
            "rounds": study.cnn.rounds, "rounds_run": len(history),
            "strategy": "FedProx" if study.cnn.proximal_mu else "FedAvg", "sites": sites, "history": history,
            "early_stopping": {"patience": study.cnn.patience, "stopped_at_round": stopped,
                               "kept_weights_after_round": stopping.best_round if stopped else len(history),
                               "best_val_loss": None if stopping.best_round is None else stopping.best_loss},
            "privacy": _privacy_summary(study, history, budget_stop),
            "dl_score_c_index": c_index, "scored_sites": sorted(outcome.replies), "failed": failed,
            "weights": str(folder / WEIGHTS), "weights_id": identifier, "deep_features": deep_feature_names(study),
            "bytes_up_per_site": dict(traffic.bytes_in), "traffic": traffic.summary()}
