"""Federated Pearson correlation matrix of the features, and mRMR selection on it.

Reference: ``numpy.corrcoef`` on the pooled rows (the ddof cancels). Each site sends its count,
its mean (p,) and its centred cross-product matrix M = Σ(x - x̄)(x - x̄)ᵀ (p, p); the coordinator
pools them with the matrix form of Chan et al.'s update, as :mod:`fedrad.common.zscore` does for the
variances, so no Σxxᵀ - n x̄x̄ᵀ cancels for large feature values. One round trip; p(p + 1)/2 + p + 1
numbers per site (M is symmetric; the dataclass keeps it whole).

mRMR (minimum redundancy, maximum relevance; Peng, Long & Ding 2005), MID scheme, greedy:
the first pick is the most relevant feature, and each later pick maximises

.. math::

    \\text{rel}_j - \\frac{1}{|S|} \\sum_{s \\in S} |\\rho_{js}|

over the features not yet selected (S: those already selected). Relevance and redundancy must be
on one scale: :func:`relevance_from_statistic` turns a score-screen χ²₁ statistic into
``sqrt(χ² / n)``, which for the logistic screen (n = cases) is exactly |r(x_j, y)|, the absolute
point-biserial correlation with the outcome (see :mod:`fedrad.common.screen`); for the Cox screen use
n = events, a correlation-like effect size. Ties go to the lower feature index.

References
----------
Chan, T. F., Golub, G. H. & LeVeque, R. J. (1979). Updating formulae and a pairwise algorithm for
computing sample variances. Stanford CS tech. report STAN-CS-79-773.
Peng, H., Long, F. & Ding, C. (2005). Feature selection based on mutual information: criteria of
max-dependency, max-relevance, and min-redundancy. IEEE TPAMI 27(8), 1226-1238.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedrad.common.errors import FedradError
from fedrad.common.zscore import pool_moments

__all__ = ["CorrelationInputError", "CrossProducts", "site_correlation", "combine_correlation",
           "update_correlation", "relevance_from_statistic", "mrmr"]


class CorrelationInputError(FedradError):
    """Rows, summaries or a selection request that cannot be used."""


@dataclass(frozen=True)
class CrossProducts:
    """n : int; mean : (n_features,); m : (n_features, n_features) = Σ(x - mean)(x - mean)ᵀ."""

    n: int
    mean: np.ndarray
    m: np.ndarray


def site_correlation(X: np.ndarray) -> CrossProducts:
    """Count, mean and centred cross-products of one site.

    Parameters
    ----------
    X : (n_samples, n_features)

    Returns
    -------
    CrossProducts
        n, mean (n_features,), m (n_features, n_features).
    """
    X = np.asarray(X, dtype=float)
    if X.ndim != 2:
        raise CorrelationInputError(f"X must be 2-D (n_samples, n_features); got shape {X.shape}")
    if len(X) == 0:
        raise CorrelationInputError("no rows to summarise")
    bad = ~np.isfinite(X)
    if bad.any():
        j = int(np.flatnonzero(bad.any(axis=0))[0])
        raise CorrelationInputError(f"feature {j} has {int(bad[:, j].sum())} missing or non-finite value(s)")
    mean = X.mean(axis=0)
    centred = X - mean
    return CrossProducts(n=len(X), mean=mean, m=centred.T @ centred)


def combine_correlation(parts: list[CrossProducts]) -> CrossProducts:
    """Pool: ``M = Σ_s M_s + n_s (x̄_s - x̄)(x̄_s - x̄)ᵀ`` (associative)."""
    if not parts:
        raise CorrelationInputError("no site summaries to combine")
    shapes = {p.mean.shape for p in parts}
    if len(shapes) > 1:
        raise CorrelationInputError(f"sites sent different numbers of features: {sorted(s[0] for s in shapes)}")
    pooled = pool_moments([p.n for p in parts], [p.mean for p in parts], [p.m for p in parts], outer=True)
    return CrossProducts(n=pooled.n, mean=pooled.mean, m=pooled.m2)


def update_correlation(total: CrossProducts, *, feature_names: list[str] | None = None) -> np.ndarray:
    """Pooled Pearson correlation matrix, shape (n_features, n_features), clipped to [-1, 1] as numpy's."""
    sd = np.sqrt(np.diag(total.m))
    constant = np.flatnonzero(sd == 0)
    if constant.size:
        names = [feature_names[i] if feature_names else str(i) for i in constant[:10]]
        raise CorrelationInputError(f"{constant.size} feature(s) are constant across all sites "
                                    f"(e.g. {', '.join(names)}); their correlation is undefined")
    corr = total.m / sd[:, None] / sd[None, :]
    return np.clip(corr, -1, 1)


def relevance_from_statistic(statistic, n: int) -> np.ndarray:
    """``sqrt(χ² / n)``, shape (n_features,): a screen's statistics on the scale of |correlation|.

    Parameters
    ----------
    statistic : (n_features,)
        χ²₁ score statistics (:class:`fedrad.common.screen.ScreenResult`).
    n : int
        Cases for the logistic screen (then exactly |r(x_j, y)|); events for the Cox screen.
    """
    statistic = np.asarray(statistic, dtype=float)
    if n <= 0:
        raise CorrelationInputError(f"n must be positive; got {n}")
    return np.sqrt(statistic / n)


def mrmr(relevance, correlation, k: int, names: list[str] | None = None) -> list[int]:
    """Greedy mRMR (MID): the most relevant feature first, then ``max rel_j - mean_S |ρ_js|``.

    Parameters
    ----------
    relevance : (n_features,)
        Larger is more relevant, on the scale of |correlation| (see :func:`relevance_from_statistic`).
    correlation : (n_features, n_features)
        Pooled Pearson correlations (:func:`update_correlation`).
    k : int
        Number of features to select, 1 <= k <= n_features.
    names : list of str, optional
        Feature names, used in errors.

    Returns
    -------
    selected : list of int
        Indices into the features, in the order picked.
    """
    relevance = np.asarray(relevance, dtype=float)
    correlation = np.asarray(correlation, dtype=float)
    if relevance.ndim != 1:
        raise CorrelationInputError(f"relevance must be 1-D (n_features,); got shape {relevance.shape}")
    p = len(relevance)
    if correlation.shape != (p, p):
        raise CorrelationInputError(f"correlation has shape {correlation.shape}; relevance has {p} features")
    if names is not None and len(names) != p:
        raise CorrelationInputError(f"{len(names)} names for {p} features")
    bad = np.flatnonzero(~np.isfinite(relevance) | ~np.isfinite(correlation).all(axis=1))
    if bad.size:
        shown = [names[i] if names else str(i) for i in bad[:10]]
        raise CorrelationInputError(f"{bad.size} feature(s) have non-finite relevance or correlations "
                                    f"(e.g. {', '.join(shown)})")
    if not 1 <= k <= p:
        raise CorrelationInputError(f"k must be between 1 and the number of features ({p}); got {k}")
    redundancy = np.abs(correlation)
    selected = [int(np.argmax(relevance))]
    total_redundancy = redundancy[selected[0]].copy()  # Σ_S |ρ_js|, updated as features are picked
    available = np.ones(p, dtype=bool)
    available[selected[0]] = False
    while len(selected) < k:
        score = np.where(available, relevance - total_redundancy / len(selected), -np.inf)
        pick = int(np.argmax(score))
        selected.append(pick)
        available[pick] = False
        total_redundancy += redundancy[pick]
    return selected
