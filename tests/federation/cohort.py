"""Three hospitals' feature stores with known scanner effects, built through `prepare --table`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fedrad.client.table_import import prepare_from_table
from tests.conftest import TEST_DATA

N_FEATURES = 12
SITE_SIZES = {"siteA": 30, "siteB": 24, "siteC": 36}


#: scanner of every site but the first (which has two models, GE and Siemens)
SINGLE_SCANNERS = ("Philips", "GE", "Canon", "Siemens")


def hospital_rows(seed: int = 42, sizes: dict[str, int] = SITE_SIZES, n_features: int = N_FEATURES) -> pd.DataFrame:
    """Radiomics-like features (scales differing by orders of magnitude), a scanner model shared
    by siteA and siteC, age (whole years: float32-exact, as neuroCombat needs) and sex to preserve."""
    rng = np.random.default_rng(seed)
    names = list(sizes)
    site = np.repeat(names, list(sizes.values()))
    single = {name: SINGLE_SCANNERS[(i - 1) % len(SINGLE_SCANNERS)] for i, name in enumerate(names) if i}
    mixed = rng.choice(["GE", "Siemens"], size=len(site), p=[0.5, 0.5])
    scanner = np.where(site == names[0], mixed, [single.get(s, "") for s in site])
    age = np.round(rng.normal(58, 12, size=len(site)))
    sex = rng.choice(["F", "M"], size=len(site))
    spread = rng.uniform(1, 50, size=n_features)
    centre = rng.uniform(-500, 2000, size=n_features)
    truth = rng.normal(size=(len(site), n_features)) + 0.05 * (age[:, None] - 58) + 0.5 * (sex == "M")[:, None]
    gain = {"GE": 1.1, "Siemens": 0.9, "Philips": 1.3, "Canon": 0.8}
    shift = {"GE": 0.2, "Siemens": -0.35, "Philips": 0.6, "Canon": -0.1}
    y = np.array([(truth[i] * gain[s] + shift[s]) * spread + centre for i, s in enumerate(scanner)])
    table = pd.DataFrame(y, columns=[f"original_firstorder_F{j:02d}" for j in range(n_features)])
    table.insert(0, "patient_id", [f"{s}-{i:03d}" for s, i in zip(site, range(len(site)))])
    table.insert(1, "time", np.round(rng.exponential(30, size=len(site)), 1) + 0.5)
    table.insert(2, "event", rng.integers(0, 2, size=len(site)))
    table.insert(3, "scanner", scanner)
    table.insert(4, "age", age)
    table.insert(5, "sex", sex)
    table.insert(6, "site", site)
    return table


def write_stores(root: Path, table: pd.DataFrame, params: Path = TEST_DATA / "pyradiomics_baseline.yaml") -> dict:
    """One store per site under ``root/<site>``; returns {site: store path}."""
    stores = {}
    for site, rows in table.groupby("site", sort=False):
        csv = Path(root) / f"{site}.csv"
        csv.parent.mkdir(parents=True, exist_ok=True)
        rows.drop(columns="site").to_csv(csv, index=False)
        stores[site] = Path(root) / site
        prepare_from_table(csv, stores[site], scanner_col="scanner", clinical_cols=["age", "sex"], params_path=params)
    return stores
