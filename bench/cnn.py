"""The CNN stage in one process: throughput, federated vs pooled C-index, bytes per round.

On a synthetic cohort (``fedrad.client.synth.generate_cohort``; one phase), the MONAI datasets are
built straight from the sites' manifests (``fedrad.client.cnn_task.case_dataset``, no Flower) and
each case is transformed once and kept in memory (no training augmentation). Measured:

1. throughput of ResNet-18 in 2D and 3D: preprocessing (NIfTI → tensor) cases/s, training
   cases/s (Adam, batch Cox loss, MONAI DataLoader over the cached cases, the first batches
   excluded) and inference cases/s;
2. FedAvg vs pooled after equal epochs: FedAvg with the coordinator's math (Flower's
   ``aggregate_arrayrecords`` over the sites' weights weighted by ``num-examples``, each site
   one local epoch of ``fedrad.client.cnn_task.train_epochs`` per round, R rounds) vs the same
   initial network trained on all training cases for R epochs; Harrell's C of the DL-score on
   the held-out last site and on the training cases;
3. bytes a site exchanges per round: the serialised reply (weights + metrics) and request
   (plan + weights) exactly as the ledger sizes them (``fedrad.common.messages.payload_bytes``;
   weights in float32, as the stage sends them) for ResNet-18 and DenseNet-121, 2D and 3D.

Uses CUDA when present. Prints; asserts nothing. Usage:

    .venv/bin/python bench/cnn.py [--sites 3 --patients 40 --rounds 6 --seeds 2 --threads 0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from flwr.app import MetricRecord, RecordDict  # noqa: E402
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords  # noqa: E402
from monai.data import DataLoader  # noqa: E402

from fedrad.client.cnn_task import (LargestMaskSliced, build_network, case_dataset, cox_loss, device, predict,  # noqa: E402
                             train_epochs)
from fedrad.client.synth import generate_cohort  # noqa: E402
from fedrad.common.messages import payload_bytes, record_arrays, weights_record, weights_request  # noqa: E402
from fedrad.common.study import parse_study  # noqa: E402
from fedrad.common.survival_metrics import harrell_c  # noqa: E402

PHASES = ["venous"]


def cached_sites(root: Path, sites: list[str], *, box) -> tuple[dict[int, dict[str, list]], float]:
    """Every site's cases transformed once, in 3D and (their largest-mask slice, as ``dims=2`` gives) in 2D:
    {dims: {site: [MONAI item]}}, and the preprocessing rate (cases/s of the 3D pipeline)."""
    slice_2d = LargestMaskSliced(["image", "mask"])
    out, n, start = {2: {}, 3: {}}, 0, time.perf_counter()
    for site in sites:
        manifest = pd.read_csv(root / site / "manifest.csv", dtype={"patient_id": str})
        dataset = case_dataset(manifest, root / site, PHASES, box=box, dims=3)
        out[3][site] = [dataset[i] for i in range(len(dataset))]
        n += len(dataset)
    rate = n / (time.perf_counter() - start)
    out[2] = {site: [slice_2d(item) for item in items] for site, items in out[3].items()}
    return out, rate


def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def throughput(cases: list, *, dims: int, batch_size: int, warmup: int, seconds: float) -> tuple[float, float, int]:
    """(training cases/s, inference cases/s, timed batches) over the cached cases, cycling through them."""
    dev = device()
    torch.manual_seed(0)
    net = build_network("resnet18", spatial_dims=dims, in_channels=len(PHASES)).to(dev)
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-3)
    batches = list(DataLoader(cases, batch_size=batch_size, shuffle=False, drop_last=True))
    rates = []
    for training in (True, False):
        net.train(training)
        timed, n, start, i = 0, 0, None, 0
        while True:
            batch = batches[i % len(batches)]
            i += 1
            with torch.set_grad_enabled(training):
                risk = net(batch["image"].to(dev)).reshape(-1)
                if training:
                    optimiser.zero_grad()
                    cox_loss(risk, batch["time"].to(dev).float(), batch["event"].to(dev).float()).backward()
                    optimiser.step()
            _sync(dev)
            if i == warmup:
                start = time.perf_counter()
            elif i > warmup:
                timed, n = timed + 1, n + len(risk)
                if timed >= 3 and time.perf_counter() - start >= seconds:
                    break
        rates.append(n / (time.perf_counter() - start))
    return rates[0], rates[1], timed


def _weights(net) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in net.state_dict().items()}


def _network(dims: int, weights: dict[str, np.ndarray] | None = None, seed: int = 0):
    torch.manual_seed(seed)
    net = build_network("resnet18", spatial_dims=dims, in_channels=len(PHASES))
    if weights is not None:
        state = net.state_dict()
        net.load_state_dict({k: torch.as_tensor(weights[k]).to(v.dtype).reshape(v.shape) for k, v in state.items()})
    return net


def c_indices(net, held_out: list, training: list) -> tuple[float, float]:
    out = []
    for cases in (held_out, training):
        scores = predict(net, cases)
        out.append(harrell_c(scores["time"], scores["event"].astype(bool), scores["dl_score"]))
    return out[0], out[1]


def federated(train: dict[str, list], *, dims: int, rounds: int, seed: int, lr: float, batch_size: int):
    """FedAvg as the coordinator does it: per round every site trains one epoch from the global weights and
    replies weights + num-examples; the new global weights are ``aggregate_arrayrecords``."""
    weights = _weights(_network(dims, seed=seed))
    for round_no in range(1, rounds + 1):
        replies = []
        for cases in train.values():
            local = _network(dims, weights)
            loss = train_epochs(local, cases, epochs=1, lr=lr, batch_size=batch_size, seed=seed + round_no)
            replies.append(RecordDict({"arrays": weights_record(_weights(local)),
                                       "metrics": MetricRecord({"num-examples": len(cases), "loss": loss[-1]})}))
        weights = record_arrays(aggregate_arrayrecords(replies, "num-examples"))
    return _network(dims, weights)


def pooled(train: dict[str, list], *, dims: int, rounds: int, seed: int, lr: float, batch_size: int):
    net = _network(dims, seed=seed)
    train_epochs(net, [c for cases in train.values() for c in cases], epochs=rounds, lr=lr, batch_size=batch_size,
                 seed=seed)
    return net


def message_sizes(sites_cases: int) -> pd.DataFrame:
    plan = {"study": parse_study({"cnn": {"phases": PHASES}}).model_dump(mode="json"), "round": 1}
    rows = []
    for architecture in ("resnet18", "densenet121"):
        for dims in (2, 3):
            weights = _weights(build_network(architecture, spatial_dims=dims, in_channels=len(PHASES)))
            up = len(payload_bytes(RecordDict({"arrays": weights_record(weights), "metrics": MetricRecord(
                {"num-examples": sites_cases, "loss": 0.5})})))
            down = len(payload_bytes(weights_request(plan, weights)))
            numel = sum(int(np.prod(w.shape)) for w in weights.values())
            rows.append({"network": f"{architecture} {dims}D", "tensors": len(weights), "values": numel,
                         "float32_MB": round(numel * 4 / 1e6, 1), "reply_MB": round(up / 1e6, 1),
                         "request_MB": round(down / 1e6, 1), "per_round_MB": round((up + down) / 1e6, 1)})
            del weights
    return pd.DataFrame(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=3, help="the last site is held out")
    parser.add_argument("--patients", type=int, default=40, help="per site")
    parser.add_argument("--rounds", type=int, default=6, help="FedAvg rounds = pooled epochs")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--dims", type=int, default=2, choices=(2, 3), help="network of the C-index comparison")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seconds", type=float, default=8.0, help="timing budget of each throughput figure")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default); on a "
                        "busy machine 1 can be several times faster than oversubscribed OpenMP threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    box, shape = (48, 48, 16), (48, 48, 24)
    begin = time.perf_counter()
    dev = device()
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {dev} ({name}); torch {torch.__version__}")
    print(f"cohort: {args.sites} sites x {args.patients} patients, shape {shape}, phases {PHASES}, box {box}; "
          f"batch {args.batch_size}, Adam lr {args.lr}, no augmentation (cases cached once)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate_cohort(root, n_sites=args.sites, n_patients=args.patients, seed=0, phases=tuple(PHASES), shape=shape)
        sites = sorted(p.name for p in root.iterdir() if (p / "manifest.csv").is_file())
        cached, prep = cached_sites(root, sites, box=box)

    print("\n1. ResNet-18 throughput (cases/s; 2 warm-up batches excluded; preprocess: the 3D pipeline from NIfTI, "
          "the 2D slices are cut from it)")
    rows = []
    for dims in (2, 3):
        everyone = [c for cases in cached[dims].values() for c in cases]
        train_rate, infer_rate, timed = throughput(everyone, dims=dims, batch_size=args.batch_size, warmup=2,
                                                   seconds=args.seconds)
        rows.append({"network": f"resnet18 {dims}D", "input": "x".join(map(str, (len(PHASES),) + box[:dims])),
                     "preprocess": round(prep, 1), "train": round(train_rate, 1),
                     "inference": round(infer_rate, 1), "timed_batches": timed})
    print(pd.DataFrame(rows).to_string(index=False))

    held_site, train_sites = sites[-1], sites[:-1]
    data = cached[args.dims]
    train = {s: data[s] for s in train_sites}
    training_cases = [c for s in train_sites for c in data[s]]
    events = {s: int(sum(c["event"] for c in data[s])) for s in sites}
    print(f"\n2. FedAvg vs pooled, resnet18 {args.dims}D, {args.rounds} rounds of 1 local epoch = {args.rounds} "
          f"pooled epochs; training sites {train_sites}, held out {held_site}; events per site {events}")
    rows = []
    for seed in range(args.seeds):
        for setting, fit in (("FedAvg", federated), ("pooled", pooled)):
            start = time.perf_counter()
            net = fit(train, dims=args.dims, rounds=args.rounds, seed=seed, lr=args.lr, batch_size=args.batch_size)
            seconds = time.perf_counter() - start
            held_c, train_c = c_indices(net, data[held_site], training_cases)
            rows.append({"setting": setting, "seed": seed, "c_index_held_out": round(held_c, 3),
                         "c_index_training": round(train_c, 3), "train_s": round(seconds, 1)})
    table = pd.DataFrame(rows)
    print(table.to_string(index=False))
    means = table.groupby("setting")[["c_index_held_out", "c_index_training"]].mean().round(3)
    print("mean over seeds:\n" + means.to_string())

    print("\n3. Bytes a site exchanges per round (float32 weights as serialised by Flower; 1 input channel)")
    print(message_sizes(args.patients).to_string(index=False))
    print(f"\ntotal {time.perf_counter() - begin:.0f} s")


if __name__ == "__main__":
    main()
