"""Helpers for tests that run real Flower federations (SuperLink + SuperNodes on loopback)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from fedrad.common import schemas


def write_study(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def read_site_outputs(stores: dict[str, Path], name: str, sites=None) -> pd.DataFrame:
    """Concatenate a per-site output table (e.g. harmonised.parquet) of ``sites``."""
    sites = sites or list(stores)
    return pd.concat([pd.read_parquet(stores[s] / name) for s in sites], ignore_index=True)


def aligned(frame: pd.DataFrame, ids, columns) -> np.ndarray:
    return frame.set_index(schemas.ID).loc[list(ids), columns].to_numpy(np.float64)
