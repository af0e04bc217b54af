"""Helpers for tests that run real Flower federations (SuperLink + SuperNodes on loopback)."""

from __future__ import annotations

import threading
import time
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


def when_stage_runs(run_dir, stage: str, round_no: int, action, timeout_s: float = 240) -> threading.Thread:
    """Run ``action`` once the run log shows ``stage`` round ``round_no`` sent (mid-stage)."""
    def watch():
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                from fedrad.server.runlog import read_runlog

                ex = read_runlog(run_dir)["exchanges"]
                if ((ex.stage == stage) & (ex["round"] >= round_no)).any():
                    action()
                    return
            except (FileNotFoundError, ValueError, KeyError, pd.errors.DatabaseError):  # not written yet
                pass
            time.sleep(0.2)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread
