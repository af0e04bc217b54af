"""Federated z-scoring with the pooled mean and standard deviation.

Reference: scikit-learn ``StandardScaler`` (population SD, ddof=0). Each site sends its
count, mean and sum of squared deviations about its own mean; the coordinator pools them
with Chan et al.'s update, which avoids the cancellation of Σy² - n·mean² when features
are large with a small spread (e.g. HU-based radiomics). One round trip.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ZMoments", "ZScale", "site_zscore_moments", "combine_zscore_moments", "update_zscore", "site_zscore_apply"]


@dataclass(frozen=True)
class ZMoments:
    """n : int; mean, m2 : (n_features,) with m2 = Σ(y - mean)²."""

    n: int
    mean: np.ndarray
    m2: np.ndarray


@dataclass(frozen=True)
class ZScale:
    """Pooled mean and SD, shape (n_features,) each."""

    mean: np.ndarray
    sd: np.ndarray


def site_zscore_moments(y: np.ndarray) -> ZMoments:
    y = np.asarray(y, dtype=float)
    if len(y) == 0:
        raise ValueError("no rows to summarise")
    if not np.all(np.isfinite(y)):
        raise ValueError("feature values include NaN/inf")
    mean = y.mean(axis=0)
    return ZMoments(n=len(y), mean=mean, m2=((y - mean) ** 2).sum(axis=0))


def combine_zscore_moments(parts: list[ZMoments]) -> ZMoments:
    n = sum(p.n for p in parts)
    mean = sum(p.n * p.mean for p in parts) / n
    m2 = sum(p.m2 + p.n * (p.mean - mean) ** 2 for p in parts)
    return ZMoments(n=n, mean=mean, m2=m2)


def update_zscore(total: ZMoments, feature_names: list[str] | None = None) -> ZScale:
    sd = np.sqrt(total.m2 / total.n)
    constant = np.flatnonzero(sd == 0)
    if constant.size:
        names = [feature_names[i] if feature_names else str(i) for i in constant[:10]]
        raise ValueError(f"{constant.size} feature(s) are constant across all sites (e.g. {', '.join(names)})")
    return ZScale(mean=total.mean, sd=sd)


def site_zscore_apply(y: np.ndarray, scale: ZScale) -> np.ndarray:
    return (np.asarray(y, dtype=float) - scale.mean) / scale.sd
