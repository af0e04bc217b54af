"""Federated intraclass correlation of repeat measurements, equal to the pooled two-way ANOVA.

Reference: Shrout & Fleiss (1979) and Koo & Li (2016), as computed by ``pingouin.intraclass_corr``
(``ICC3`` = ICC(3,1), ``ICC2`` = ICC(2,1)). Every case (target) is measured ``k`` times (raters:
e.g. two delineations, ``features.parquet`` and ``features_repeat.parquet``), every feature on its
own; all features are handled at once.

Conventions:

* two-way ANOVA on the pooled ``n × k`` table of a feature, cases as rows, measurements as columns,
  one observation per cell (no replication), complete cases only:

  .. math::

      SS_R = k \\sum_i (\\bar x_{i\\cdot} - \\bar x)^2, \\quad
      SS_C = n \\sum_j (\\bar x_{\\cdot j} - \\bar x)^2, \\quad
      SS_E = \\sum_{ij} (x_{ij} - \\bar x_{i\\cdot} - \\bar x_{\\cdot j} + \\bar x)^2,

      MS_R = \\frac{SS_R}{n - 1}, \\quad MS_C = \\frac{SS_C}{k - 1}, \\quad
      MS_E = \\frac{SS_E}{(n - 1)(k - 1)},

      ICC(3,1) = \\frac{MS_R - MS_E}{MS_R + (k - 1) MS_E}, \\quad
      ICC(2,1) = \\frac{MS_R - MS_E}{MS_R + (k - 1) MS_E + k (MS_C - MS_E) / n}.

* measurement ``j`` means the same thing at every site (first delineation, repeat delineation), so
  the measurement effect is pooled across sites; sites are *not* a factor of the ANOVA.
* ICC(3,1) (two-way mixed, consistency, single measure) ignores a systematic shift between the
  measurements; ICC(2,1) (two-way random, absolute agreement, single measure) penalises it.

What a site sends, per feature: its number of cases, its per-measurement means (k, p), and its own
``SS_R`` and ``SS_E`` about its own means. That is the same information as the raw sums
Σ case totals, Σ squared case totals, per-measurement totals and Σx², but pooled with the two-way
form of Chan et al.'s update (as :mod:`fedrad.common.zscore` does for variances), so no large
Σx² - n·mean² cancels when feature values are large with a small spread. One round trip.

References
----------
Shrout, P. E. & Fleiss, J. L. (1979). Intraclass correlations: uses in assessing rater reliability.
Psychological Bulletin 86(2), 420-428.
Koo, T. K. & Li, M. Y. (2016). A guideline of selecting and reporting intraclass correlation
coefficients for reliability research. J. Chiropr. Med. 15(2), 155-163.
pingouin ``pingouin/reliability.py`` (``intraclass_corr``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedrad.common.errors import FedradError
from fedrad.common.zscore import pool_moments

__all__ = ["IccInputError", "IccSums", "IccAnova", "site_icc", "combine_icc", "icc_anova", "update_icc", "ICC_KINDS"]

#: Supported forms, Shrout & Fleiss notation.
ICC_KINDS = ("3,1", "2,1")


class IccInputError(FedradError):
    """Repeat measurements or site summaries that cannot give an ICC."""


@dataclass(frozen=True)
class IccSums:
    """Two-way ANOVA summary of one site (or of several, pooled).

    n : int
        Cases (targets).
    rater_mean : (k, n_features)
        Mean of each measurement over the cases.
    ss_cases : (n_features,)
        ``k Σ_i (x̄_i· - x̄)²`` about this summary's own grand mean (``SS_R``).
    ss_error : (n_features,)
        ``Σ_ij (x_ij - x̄_i· - x̄_·j + x̄)²`` about this summary's own means (``SS_E``).
    """

    n: int
    rater_mean: np.ndarray
    ss_cases: np.ndarray
    ss_error: np.ndarray

    @property
    def k(self) -> int:
        return int(self.rater_mean.shape[0])


@dataclass(frozen=True)
class IccAnova:
    """Mean squares of the pooled two-way ANOVA, shape (n_features,) each; n cases, k measurements."""

    msr: np.ndarray
    msc: np.ndarray
    mse: np.ndarray
    n: int
    k: int


def site_icc(measurements: np.ndarray) -> IccSums:
    """Summarise one site's repeat measurements.

    Parameters
    ----------
    measurements : (n_cases, k, n_features)
        ``measurements[i, j, f]`` is feature f of case i in measurement (delineation) j; k >= 2.

    Returns
    -------
    IccSums
        n, rater_mean (k, n_features), ss_cases and ss_error (n_features,).
    """
    x = np.asarray(measurements, dtype=float)
    if x.ndim != 3:
        raise IccInputError(f"measurements must be 3-D (n_cases, k, n_features); got shape {x.shape}")
    n, k, _ = x.shape
    if n == 0:
        raise IccInputError("no cases to summarise")
    if k < 2:
        raise IccInputError(f"an ICC needs k >= 2 measurements per case; got k={k}")
    bad = ~np.isfinite(x)
    if bad.any():
        i, j, f = (int(v[0]) for v in np.nonzero(bad))
        raise IccInputError(f"{int(bad.sum())} missing or non-finite value(s) (first: case {i}, measurement {j}, "
                            f"feature {f}); drop incomplete cases before the ICC")
    rater_mean = x.mean(axis=0)
    case_mean = x.mean(axis=1)
    grand = rater_mean.mean(axis=0)
    residual = x - case_mean[:, None, :] - rater_mean[None, :, :] + grand
    return IccSums(n=n, rater_mean=rater_mean, ss_cases=k * ((case_mean - grand) ** 2).sum(axis=0),
                   ss_error=(residual**2).sum(axis=(0, 1)))


def combine_icc(parts: list[IccSums]) -> IccSums:
    """Pool site summaries (two-way Chan update; associative, so partial pools may be pooled again).

    With site means ``c_sj`` (measurement j), ``m_s = mean_j c_sj`` and pooled ``c_j``, ``g``:

    .. math::

        SS_R = \\sum_s SS_{R,s} + k\\, n_s (m_s - g)^2, \\qquad
        SS_E = \\sum_s SS_{E,s} + n_s \\sum_j \\big((c_{sj} - m_s) - (c_j - g)\\big)^2.
    """
    if not parts:
        raise IccInputError("no site summaries to combine")
    shapes = {p.rater_mean.shape for p in parts}
    if len(shapes) > 1:
        raise IccInputError(f"sites sent different (k, n_features) shapes: {sorted(shapes)}")
    k = parts[0].k
    counts = [p.n for p in parts]
    site_grand = [p.rater_mean.mean(axis=0) for p in parts]  # m_s
    raters = pool_moments(counts, [p.rater_mean for p in parts])
    # SS_R: the case means' deviations, each site's mean m_s standing for k·n_s values
    cases = pool_moments([k * c for c in counts], site_grand, [p.ss_cases for p in parts])
    # SS_E: the deviations of the measurement effects c_sj - m_s from the pooled ones c_j - g
    effects = pool_moments(counts, [p.rater_mean - m for p, m in zip(parts, site_grand)])
    ss_error = sum(p.ss_error for p in parts) + effects.m2.sum(axis=0)
    return IccSums(n=raters.n, rater_mean=raters.mean, ss_cases=cases.m2, ss_error=ss_error)


def icc_anova(total: IccSums) -> IccAnova:
    """Mean squares MSR, MSC, MSE of the pooled two-way ANOVA (see the module docstring)."""
    n, k = total.n, total.k
    if n < 2:
        raise IccInputError(f"an ICC needs at least 2 cases over all sites; got n={n}")
    grand = total.rater_mean.mean(axis=0)
    ss_raters = n * ((total.rater_mean - grand) ** 2).sum(axis=0)
    return IccAnova(msr=total.ss_cases / (n - 1), msc=ss_raters / (k - 1), mse=total.ss_error / ((n - 1) * (k - 1)),
                    n=n, k=k)


def update_icc(total: IccSums, kind: str = "3,1", *, feature_names: list[str] | None = None) -> np.ndarray:
    """ICC of every feature from the pooled summary.

    Parameters
    ----------
    total : IccSums
        :func:`combine_icc` of the sites' summaries.
    kind : {"3,1", "2,1"}
        ICC(3,1): two-way mixed, consistency, single measure. ICC(2,1): two-way random, absolute
        agreement, single measure.
    feature_names : list of str, optional
        Used to name constant features in the error.

    Returns
    -------
    icc : (n_features,)
        In (-1/(k-1), 1]; 1 is perfect agreement.
    """
    if kind not in ICC_KINDS:
        raise IccInputError(f"kind must be one of {ICC_KINDS}, got {kind!r}")
    a = icc_anova(total)
    denominator = a.msr + (a.k - 1) * a.mse
    if kind == "2,1":
        denominator = denominator + a.k * (a.msc - a.mse) / a.n
    constant = np.flatnonzero(denominator <= 0)
    if constant.size:
        names = [feature_names[i] if feature_names else str(i) for i in constant[:10]]
        raise IccInputError(f"{constant.size} feature(s) vary neither between nor within cases (e.g. "
                            f"{', '.join(names)}); their ICC({kind}) is undefined: drop them first")
    return (a.msr - a.mse) / denominator
