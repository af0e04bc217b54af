"""Independent reference implementations the federated results are compared with."""

from __future__ import annotations

import contextlib
import io

import numpy as np
import pandas as pd
from neuroCombat import neuroCombat


def neurocombat(y, covars: pd.DataFrame, *, categorical=(), continuous=(), eb=True, parametric=True,
                mean_only=False) -> np.ndarray:
    """Pooled neuroCombat 0.2.12 (default path) on sample-major ``y``; ``covars`` has a 'batch' column.

    Pass y as float64 numpy: neuroCombat casts DataFrame input (and continuous covariates) to float32."""
    with contextlib.redirect_stdout(io.StringIO()):  # neuroCombat prints progress
        out = neuroCombat(np.asarray(y, dtype=float).T.copy(), covars, "batch", categorical_cols=list(categorical),
                          continuous_cols=list(continuous), eb=eb, parametric=parametric, mean_only=mean_only)
    return out["data"].T
