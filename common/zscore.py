"""Federated z-scoring with the pooled mean and standard deviation.

Reference: scikit-learn ``StandardScaler`` (population SD, ddof=0). Each site sends its
count, mean and sum of squared deviations about its own mean; the coordinator pools them
with Chan et al.'s update, which avoids the cancellation of Σy² - n·mean² when features
are large with a small spread (e.g. HU-based radiomics). One round trip.

:func:`pool_moments` is that update, once, for every pooled summary of means and centred
second moments (correlation's cross-products, the logistic screen, the ICC's two-way ANOVA).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["PooledMoments", "pool_moments", "ZMoments", "ZScale", "site_zscore_moments", "combine_zscore_moments",
           "update_zscore", "site_zscore_apply"]


@dataclass(frozen=True)
class PooledMoments:
    """n : total count; mean : pooled mean; m2 : pooled centred second moment (or co-moment)."""

    n: int
    mean: np.ndarray
    m2: np.ndarray


def pool_moments(counts, means, m2=None, *, other_means=None, outer: bool = False) -> PooledMoments:
    """Chan et al.'s parallel update: pool the parts' counts, means and centred second moments.

    .. math::

        n = \\sum_s n_s, \\quad \\bar x = \\sum_s n_s \\bar x_s / n, \\quad
        M = \\sum_s M_s + n_s (\\bar x_s - \\bar x)(\\bar y_s - \\bar y)

    (associative: pooled parts may be pooled again). No Σx² - n x̄² cancels for large values
    with a small spread.

    Parameters
    ----------
    counts : the parts' counts n_s (weights).
    means : the parts' means x̄_s, all of one shape.
    m2 : the parts' centred second moments M_s about their own means; omitted: 0 (each part is
        n_s copies of its mean, which gives the between-parts term alone).
    other_means : the parts' means ȳ_s of a second variable, for the co-moment Σ(x - x̄)(y - ȳ)
        (default: x itself, the sum of squared deviations).
    outer : the deviations' outer product (matrix co-moments, e.g. a covariance) instead of the
        elementwise one.
    """
    counts = list(counts)
    means = list(means)
    n = sum(counts)
    mean = sum(c * m for c, m in zip(counts, means)) / n
    if other_means is None:
        deviations = [(m - mean, m - mean) for m in means]
    else:
        other_means = list(other_means)
        other = sum(c * m for c, m in zip(counts, other_means)) / n
        deviations = [(m - mean, o - other) for m, o in zip(means, other_means)]
    product = np.outer if outer else np.multiply
    between = [c * product(d, e) for c, (d, e) in zip(counts, deviations)]
    if m2 is None:
        total = sum(between)
    else:
        total = sum(own + b for own, b in zip(m2, between))
    return PooledMoments(n=n, mean=mean, m2=total)


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
    pooled = pool_moments([p.n for p in parts], [p.mean for p in parts], [p.m2 for p in parts])
    return ZMoments(n=pooled.n, mean=pooled.mean, m2=pooled.m2)


def update_zscore(total: ZMoments, feature_names: list[str] | None = None) -> ZScale:
    sd = np.sqrt(total.m2 / total.n)
    constant = np.flatnonzero(sd == 0)
    if constant.size:
        names = [feature_names[i] if feature_names else str(i) for i in constant[:10]]
        raise ValueError(f"{constant.size} feature(s) are constant across all sites (e.g. {', '.join(names)})")
    return ZScale(mean=total.mean, sd=sd)


def site_zscore_apply(y: np.ndarray, scale: ZScale) -> np.ndarray:
    return (np.asarray(y, dtype=float) - scale.mean) / scale.sd
