"""Harmonise stage over a real local federation vs pooled neuroCombat in one process.

For 3 and 10 sites (one SuperNode each, one SuperLink, loopback) on the same synthetic
radiomics-like cohort: wall time and round trips of the harmonise stage (ComBat by site,
parametric EB, then z-scoring), bytes each site sent and received, the same ComBat by
neuroCombat on the pooled rows in this process, their ratio, and the largest difference
between the two results. Usage:

    .venv/bin/python bench/federation.py [--sites 3 10] [--cases 40] [--features 100]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' cohort builder

from neuroCombat import neuroCombat  # noqa: E402

from fedrad.server.local import LocalFederation  # noqa: E402
from tests.federation.cohort import hospital_rows, write_stores  # noqa: E402

STUDY = '[study]\nname = "bench"\n[harmonise]\nbatch = "site"\n[federation]\nmin_sites = 2\n'


def pooled_neurocombat(table: pd.DataFrame, features: list[str]) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        out = neuroCombat(table[features].to_numpy(np.float64).T.copy(), pd.DataFrame({"batch": table["site"]}),
                          "batch")["data"].T
    return out, time.perf_counter() - start


def bench(n_sites: int, cases: int, n_features: int, tmp: Path) -> dict:
    sizes = {f"site{chr(65 + i) if i < 26 else i}": cases for i in range(n_sites)}
    table = hospital_rows(seed=7, sizes=sizes, n_features=n_features)
    stores = write_stores(tmp / f"stores{n_sites}", table)
    features = [c for c in table.columns if c.startswith("original_")]
    study = tmp / f"study{n_sites}.toml"
    study.write_text(STUDY, encoding="utf-8")
    started = time.perf_counter()
    with LocalFederation(tmp / f"fed{n_sites}", stores, echo=lambda line: None) as fed:
        up = time.perf_counter() - started
        results = fed.run_study(study, tmp / f"run{n_sites}")
    if results["status"] != "completed":
        raise SystemExit(f"{n_sites} sites: study failed: {results.get('error')}")
    reference, pooled_s = pooled_neurocombat(table, features)
    got = pd.concat([pd.read_parquet(stores[s] / "harmonised.parquet") for s in stores], ignore_index=True)
    got = got.set_index("patient_id").loc[table["patient_id"], [f"table__{f}" for f in features]].to_numpy()
    h = results["harmonise"]["traffic"]
    stage_s = results["stages"]["harmonise"]["seconds"]
    return {
        "sites": n_sites, "cases": len(table), "features": n_features,
        "federation_up_s": round(up, 1), "census_s": results["stages"]["census"]["seconds"],
        "harmonise_s": stage_s, "round_trips": h["rounds"], "s_per_round": round(stage_s / h["rounds"], 2),
        "pooled_neurocombat_s": round(pooled_s, 3), "ratio": round(stage_s / pooled_s),
        "bytes_to_site": int(np.mean(list(h["bytes_to_site"].values()))),
        "bytes_from_site": int(np.mean(list(h["bytes_from_site"].values()))),
        "max_abs_diff": float(np.abs(got - reference).max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 10])
    parser.add_argument("--cases", type=int, default=40, help="cases per site")
    parser.add_argument("--features", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [bench(n, args.cases, args.features, Path(tmp)) for n in args.sites]
    frame = pd.DataFrame(rows)
    with pd.option_context("display.width", 200, "display.max_columns", 50):
        print(frame.to_string(index=False))
    print("ratio = harmonise stage wall time / pooled neuroCombat in one process (same data, same run); "
          "bytes are per site over the whole stage (mean of sites)")


if __name__ == "__main__":
    main()
