"""Extraction throughput: `fedrad prepare --jobs 1` vs `--jobs 2` on the same synthetic site.

Prints cases/min for each, their ratio (measured side by side in one run), and the
per-case time split (read, resample, extract). Usage:

    .venv/bin/python bench/extraction.py [--patients 24] [--params demo|default] [--repeats 1]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from fedrad.client.extraction import default_params_path
from fedrad.client.prepare import prepare_from_manifest
from fedrad.client.synth import generate_cohort


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=24)
    parser.add_argument("--params", default="demo", help="shipped settings: demo or default")
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs per job count")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate_cohort(tmp / "cohort", n_sites=1, n_patients=args.patients, seed=11, repeat_fraction=0.0)
        manifest = tmp / "cohort" / "siteA" / "manifest.csv"
        params = default_params_path(args.params)
        walls = {1: [], 2: []}
        splits = {}
        for repeat in range(args.repeats):
            for jobs in (1, 2):  # alternate so drift in machine load hits both alike
                start = time.perf_counter()
                report = prepare_from_manifest(manifest, tmp / f"store{jobs}-{repeat}", params_path=params,
                                               jobs=jobs, show_progress=False, use_cache=False)
                walls[jobs].append(time.perf_counter() - start)
                splits[jobs] = report.timings
                assert report.clean and report.n_cases == args.patients

    n = args.patients
    print(f"extraction benchmark: {n} synthetic cases x 3 phases, params={args.params}.yaml, "
          f"{os.cpu_count()} cores, best of {args.repeats}")
    print(f"{'jobs':>4} {'wall s':>8} {'cases/min':>10}")
    rate = {}
    for jobs in (1, 2):
        best = min(walls[jobs])
        rate[jobs] = 60 * n / best
        print(f"{jobs:>4} {best:>8.1f} {rate[jobs]:>10.1f}")
    print(f"ratio jobs2/jobs1 = {rate[2] / rate[1]:.2f}x")
    split = splits[1]
    total = sum(split.values())
    print("per-case time split at --jobs 1 (ms): " + ", ".join(
        f"{step} {1000 * seconds / n:.0f} ({100 * seconds / total:.0f}%)" for step, seconds in split.items()))


if __name__ == "__main__":
    main()
