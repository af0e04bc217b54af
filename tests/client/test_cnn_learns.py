"""After a short training with the Cox loss, the DL-score follows the synthetic truth the images carry.

What is checked. A one-site synthetic cohort (96 patients, one venous phase, 2D largest-mask slice, box
32x32) whose outcome is replaced by a *noiseless* function of the image-visible part of the true
log-hazard, ``visible = BETA·(size, heterogeneity, necrosis)`` on the latent variables of ``truth.csv``:
``time = exp(-visible)``, every case an event. A MONAI ResNet-18 (``build_network``) is trained with
``train_epochs`` (Cox loss, Adam, lr 3e-4, batch 16, 10 epochs) on the first 64 patients; ``predict``
scores all of them. Asserted (Spearman with ``visible``):

* training cases: > 0.8 after training, and at least 0.4 above the untrained network;
* the 32 held-out cases: > 0.2 after training (it generalises, it does not only memorise).

Why a noiseless outcome. With the real Weibull outcome (random ``u``, censoring) and this very setup
the network mostly fits the noise: Spearman with the visible log-hazard went 0.04 -> 0.44 on the
training cases and 0.27 -> 0.01 held-out (seed 0), -0.09 -> 0.60 and -0.14 -> 0.19 (seed 5) — too weak
and too seed-dependent for a test. A noiseless outcome still checks everything the requirement is
about: tensors from the images, the sign convention (higher DL-score = higher risk = shorter time),
the Cox loss and the optimisation.

Why ``dp=True`` (BatchNorm -> GroupNorm). With BatchNorm, a few dozen steps on batches of 8–16 and a
loss that only ranks cases within the batch, the scores ``predict`` gives in eval mode (running
statistics) hardly follow what was learnt: with ``time = exp(-heterogeneity)``, the training-case
Spearman with heterogeneity was 0.32–0.68 in eval mode and 0.82–0.97 once the running statistics were
re-estimated on the training cases (4 runs); held-out cases were between -0.34 and 0.12 in eval mode. GroupNorm has no
running statistics, so eval mode equals training mode.

Measured (1 torch thread; cohort seed = torch seed, Spearman with ``visible``; untrained -> trained):

    seed  training (64)     held-out (32)
    0     0.04 -> 0.96      0.27 -> 0.40
    1     0.24 -> 0.93      0.43 -> 0.73
    2     0.19 -> 0.96     -0.30 -> 0.42
    3     0.05 -> 0.97      0.18 -> 0.67
    4     0.14 -> 0.93      0.03 -> 0.61
    5    -0.09 -> 0.97     -0.14 -> 0.51

The held-out threshold (0.2) is half the worst seed; with 32 cases a Spearman's standard error is
about 0.15, and an untrained network reaches 0.43 by chance (seed 1), which is why the held-out check
only guards against pure memorisation and the training-case check carries the "it learnt" claim.
The test uses seed 5 (-0.09 -> 0.97 training, 0.51 held-out). About 16 s of CPU with one thread
(generation 1.3 s, decoding 3 s, training 10 s); with torch's default two threads on a loaded 2-core
machine the same test took 134 s of CPU, hence the ``one_thread`` fixture.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import spearmanr

from fedrad.client.cnn_task import build_network, case_dataset, predict, train_epochs
from fedrad.client.synth import BETA, generate_cohort

PHASES = ["venous"]
SEED = 5
N_PATIENTS, N_TRAIN = 96, 64
VISIBLE = ("size", "heterogeneity", "necrosis")  # what the image shows: extent, texture amplitude, dark core


@pytest.fixture
def one_thread():
    """Intra-op threads make this small network slower, not faster, on a shared CPU, and change the
    floating-point sums: one thread makes the figures above reproducible on any machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_dl_score_correlates_with_the_image_visible_truth_after_short_training(tmp_path, one_thread):
    truth = generate_cohort(tmp_path, n_sites=1, n_patients=N_PATIENTS, seed=SEED, phases=tuple(PHASES),
                            shape=(48, 48, 24)).set_index("patient_id")
    visible = sum(BETA[k] * truth[f"latent_{k}"] for k in VISIBLE)
    manifest = pd.read_csv(tmp_path / "siteA" / "manifest.csv")
    manifest["time"] = np.exp(-visible.loc[manifest["patient_id"]].to_numpy())  # noiseless: risk = visible
    manifest["event"] = 1

    torch.manual_seed(SEED)
    data = case_dataset(manifest, tmp_path / "siteA", PHASES, box=(32, 32, 8), dims=2)
    cases = [data[i] for i in range(len(data))]  # decode once, not every epoch
    train, held_out = cases[:N_TRAIN], cases[N_TRAIN:]
    net = build_network("resnet18", spatial_dims=2, in_channels=len(PHASES), dp=True)

    def rho(part):
        scores = predict(net, part)
        return spearmanr(scores["dl_score"], visible.loc[scores["patient_id"]])[0]

    before = rho(train)
    train_epochs(net, train, epochs=10, lr=3e-4, batch_size=16, endpoint="cox", seed=SEED)
    after, after_held_out = rho(train), rho(held_out)

    print(f"Spearman with the visible log-hazard: training {before:.2f} -> {after:.2f}, held-out {after_held_out:.2f}")
    assert after > 0.8, f"training cases: Spearman {after:.2f} (untrained {before:.2f})"
    assert after - before > 0.4, f"training cases: Spearman {before:.2f} -> {after:.2f}"
    assert after_held_out > 0.2, f"held-out cases: Spearman {after_held_out:.2f}"
