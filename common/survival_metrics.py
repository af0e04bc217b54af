"""Per-site survival metrics that need every case's row: Uno's C, time-dependent AUC, Brier.

Each weights cases by the inverse probability of censoring, estimated from the training
rows; at a site that is the site's own rows (a validation site's censoring is its own). The
computations are scikit-survival's; this module adds the bootstrap intervals, computed
where the rows are. Only the resulting numbers leave a site.
"""

from __future__ import annotations

import numpy as np

__all__ = ["bootstrap_ci", "harrell_c", "uno_c", "time_dependent_auc", "brier_scores"]


def bootstrap_ci(statistic, n: int, *, n_boot: int = 200, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of ``statistic(rows)`` over resamples of the n cases with replacement.
    A resample where the statistic is undefined (e.g. no usable pair) is skipped."""
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        try:
            value = statistic(rng.integers(0, n, n))
        except (ValueError, ZeroDivisionError):
            continue
        if np.isfinite(value):
            values.append(value)
    if not values:
        return float("nan"), float("nan")
    tail = (1 - level) / 2
    return float(np.quantile(values, tail)), float(np.quantile(values, 1 - tail))


def _surv(time, event):
    from sksurv.util import Surv

    return Surv.from_arrays(np.asarray(event, bool), np.asarray(time, float))


def harrell_c(time, event, risk) -> float:
    from sksurv.metrics import concordance_index_censored

    return float(concordance_index_censored(np.asarray(event, bool), np.asarray(time, float),
                                            np.asarray(risk, float))[0])


def uno_c(time, event, risk, *, tau: float | None = None) -> float:
    """Uno's C truncated at ``tau``, censoring weights from the same rows."""
    from sksurv.metrics import concordance_index_ipcw

    y = _surv(time, event)
    return float(concordance_index_ipcw(y, y, np.asarray(risk, float), tau=tau)[0])


def time_dependent_auc(time, event, risk, horizons) -> tuple[np.ndarray, float]:
    """Cumulative/dynamic AUC at each horizon and its mean (scikit-survival's ``cumulative_dynamic_auc``)."""
    from sksurv.metrics import cumulative_dynamic_auc

    y = _surv(time, event)
    auc, mean = cumulative_dynamic_auc(y, y, np.asarray(risk, float), np.asarray(horizons, float))
    return np.asarray(auc), float(mean)


def brier_scores(time, event, survival_at_horizons, horizons) -> tuple[np.ndarray, float | None]:
    """Brier score at each horizon and, with two or more horizons, the integrated Brier score."""
    from sksurv.metrics import brier_score, integrated_brier_score

    y = _surv(time, event)
    horizons = np.asarray(horizons, float)
    _, scores = brier_score(y, y, np.asarray(survival_at_horizons, float), horizons)
    integrated = float(integrated_brier_score(y, y, survival_at_horizons, horizons)) if len(horizons) > 1 else None
    return np.asarray(scores), integrated
