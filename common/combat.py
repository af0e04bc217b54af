"""Distributed ComBat that equals pooled neuroCombat.

Reference: neuroCombat 0.2.12 (``neuroCombat.py``; Fortin et al. 2018), which follows
Johnson et al. (2007). Distributed algebra after d-ComBat (Chen et al. 2022).

Conventions (neuroCombat's, matched exactly):

* design = [one-hot batch (all levels, sorted) | one-hot categorical covariates without
  their first sorted level | continuous covariates]. neuroCombat casts continuous
  covariates to float32; pass float32-representable values to compare at 1e-8.
* pooled variance divides by n (not n - 1); per-batch ``delta_hat`` uses n_b - 1;
  ``delta_hat == 0`` becomes 1; the priors use ddof=1 across features.
* parametric EB iterates until the largest relative change of gamma*, delta* is below 1e-4,
  from gamma_hat, delta_hat; mean-only parametric uses ``postmean(g, g_bar, 1, 1, t2)``.
* a feature with zero pooled residual variance is refused (neuroCombat silently replaces it).

Round trips: sites send (1) XᵀX, Xᵀy, n per batch; (2) Σ(y - Xβ)² and, per batch level,
Σr and Σr² of r = y - grand mean - covariate part, from which the coordinator forms
Σz = Σr/σ and Σz² = Σr²/σ² for the empirical-Bayes step. (3) The coordinator's estimates go
back and each site adjusts its own rows. A batch level may span several sites: its sums add.

Arrays are sample-major: ``y`` has shape (n_samples, n_features).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "DesignSpec", "CombatMoments", "CombatResiduals", "CombatFit", "CombatEstimates",
    "design_matrix", "site_combat_moments", "combine_combat_moments", "update_combat_fit",
    "site_combat_residuals", "combine_combat_residuals", "update_combat_estimates", "site_combat_adjust",
    "site_combat_new_batch",
    "FederatedComBat", "estimates_to_arrays", "estimates_from_arrays",
]

#: neuroCombat's stopping rule for the parametric EB iteration.
EB_TOLERANCE = 1e-4


@dataclass(frozen=True)
class DesignSpec:
    """Global levels every site uses to build the same design columns (from the census)."""

    batch_levels: tuple[str, ...]
    categorical: dict[str, tuple[str, ...]] = field(default_factory=dict)
    continuous: tuple[str, ...] = ()

    @property
    def n_batch(self) -> int:
        return len(self.batch_levels)

    @property
    def n_columns(self) -> int:
        return self.n_batch + sum(len(v) - 1 for v in self.categorical.values()) + len(self.continuous)


def design_matrix(batch, covariates: dict | None, spec: DesignSpec) -> np.ndarray:
    """Design X, shape (n_samples, n_columns), in neuroCombat's column order."""
    batch = np.asarray(batch).astype(str)
    unknown = sorted(set(batch) - set(spec.batch_levels))
    if unknown:
        raise ValueError(f"batch level(s) {', '.join(unknown)} not in the study's levels {list(spec.batch_levels)}")
    covariates = covariates or {}
    blocks = [(batch[:, None] == np.asarray(spec.batch_levels)[None, :]).astype(float)]
    for name, levels in spec.categorical.items():
        values = np.asarray(covariates[name]).astype(str)
        bad = sorted(set(values) - set(levels))
        if bad:
            raise ValueError(f"covariate '{name}' has level(s) {', '.join(bad)} not in {list(levels)}")
        blocks.append((values[:, None] == np.asarray(levels[1:])[None, :]).astype(float))
    for name in spec.continuous:
        values = np.asarray(covariates[name], dtype=float)
        if not np.all(np.isfinite(values)):
            raise ValueError(f"covariate '{name}' has missing or non-finite values")
        blocks.append(values[:, None])
    return np.hstack(blocks)


@dataclass(frozen=True)
class CombatMoments:
    """Round 1 summary of one site (or their sum).

    xtx : (n_columns, n_columns); xty : (n_columns, n_features); n_batch : (n_batch,)
    """

    xtx: np.ndarray
    xty: np.ndarray
    n_batch: np.ndarray


def site_combat_moments(y: np.ndarray, X: np.ndarray, spec: DesignSpec) -> CombatMoments:
    y = np.asarray(y, dtype=float)
    return CombatMoments(xtx=X.T @ X, xty=X.T @ y, n_batch=X[:, : spec.n_batch].sum(axis=0))


def combine_combat_moments(parts: list[CombatMoments]) -> CombatMoments:
    return CombatMoments(
        xtx=sum(p.xtx for p in parts), xty=sum(p.xty for p in parts), n_batch=sum(p.n_batch for p in parts)
    )


@dataclass(frozen=True)
class CombatFit:
    """Location model: beta (n_columns, n_features), grand_mean (n_features,), n_batch (n_batch,)."""

    beta: np.ndarray
    grand_mean: np.ndarray
    n_batch: np.ndarray
    spec: DesignSpec


def update_combat_fit(total: CombatMoments, spec: DesignSpec) -> CombatFit:
    empty = [level for level, n in zip(spec.batch_levels, total.n_batch) if n == 0]
    if empty:
        raise ValueError(f"batch level(s) {', '.join(empty)} have no samples at any site")
    try:
        beta = np.linalg.solve(total.xtx, total.xty)
    except np.linalg.LinAlgError as exc:
        raise ValueError("ComBat design is singular: a covariate is constant or aliased with the batches") from exc
    n = total.n_batch.sum()
    grand_mean = (total.n_batch / n) @ beta[: spec.n_batch]
    return CombatFit(beta=beta, grand_mean=grand_mean, n_batch=total.n_batch, spec=spec)


@dataclass(frozen=True)
class CombatResiduals:
    """Round 2 summary: ss_resid (n_features,); sum_r, sum_r2 (n_batch, n_features); n_batch (n_batch,)."""

    ss_resid: np.ndarray
    sum_r: np.ndarray
    sum_r2: np.ndarray
    n_batch: np.ndarray


def _covariate_part(X, fit: CombatFit) -> np.ndarray:
    """neuroCombat's ``mod_mean``: the covariates' share of each row, shape (n_samples, n_features)."""
    return X[:, fit.spec.n_batch:] @ fit.beta[fit.spec.n_batch:]


def _centred(y, X, fit: CombatFit) -> np.ndarray:
    """r = y - grand mean - covariate part (neuroCombat's ``X - stand_mean - mod_mean``)."""
    return np.asarray(y, dtype=float) - fit.grand_mean - _covariate_part(X, fit)


def site_combat_residuals(y: np.ndarray, X: np.ndarray, fit: CombatFit) -> CombatResiduals:
    y = np.asarray(y, dtype=float)
    ss_resid = ((y - X @ fit.beta) ** 2).sum(axis=0)
    r = _centred(y, X, fit)
    onehot = X[:, : fit.spec.n_batch]
    return CombatResiduals(ss_resid=ss_resid, sum_r=onehot.T @ r, sum_r2=onehot.T @ (r**2),
                           n_batch=onehot.sum(axis=0))


def combine_combat_residuals(parts: list[CombatResiduals]) -> CombatResiduals:
    return CombatResiduals(
        ss_resid=sum(p.ss_resid for p in parts), sum_r=sum(p.sum_r for p in parts),
        sum_r2=sum(p.sum_r2 for p in parts), n_batch=sum(p.n_batch for p in parts),
    )


@dataclass(frozen=True)
class CombatEstimates:
    """Everything a site needs to adjust its rows, and the reference kept for new sites.

    var_pooled : (n_features,); gamma_hat, delta_hat, gamma_star, delta_star : (n_batch, n_features);
    gamma_bar, t2, a_prior, b_prior : (n_batch,) (priors None when mean-only).
    """

    fit: CombatFit
    var_pooled: np.ndarray
    gamma_hat: np.ndarray
    delta_hat: np.ndarray
    gamma_bar: np.ndarray
    t2: np.ndarray
    a_prior: np.ndarray | None
    b_prior: np.ndarray | None
    gamma_star: np.ndarray
    delta_star: np.ndarray
    eb_iterations: tuple[int, ...] = ()


def update_combat_estimates(
    fit: CombatFit, total: CombatResiduals, *, eb: bool = True, parametric: bool = True, mean_only: bool = False,
    feature_names: list[str] | None = None,
) -> CombatEstimates:
    n = total.n_batch.sum()
    var_pooled = total.ss_resid / n
    constant = np.flatnonzero(var_pooled == 0)
    if constant.size:
        names = [feature_names[i] if feature_names else str(i) for i in constant[:10]]
        raise ValueError(f"{constant.size} feature(s) have zero residual variance (e.g. {', '.join(names)}); "
                         "drop them before ComBat")
    sum_z = total.sum_r / np.sqrt(var_pooled)
    sum_z2 = total.sum_r2 / var_pooled
    gamma_hat, delta_hat, gamma_bar, t2, a_prior, b_prior, gamma_star, delta_star, iterations = _batch_effects(
        sum_z, sum_z2, total.n_batch, list(fit.spec.batch_levels), eb=eb, parametric=parametric, mean_only=mean_only)
    return CombatEstimates(fit=fit, var_pooled=var_pooled, gamma_hat=gamma_hat, delta_hat=delta_hat,
                           gamma_bar=gamma_bar, t2=t2, a_prior=a_prior, b_prior=b_prior,
                           gamma_star=gamma_star, delta_star=delta_star, eb_iterations=iterations)


def _batch_effects(sum_z, sum_z2, n_batch, levels, *, eb, parametric, mean_only):
    """γ̂, δ̂, the per-batch priors (across features) and γ*, δ* from per-batch Σz, Σz²."""
    n_b = np.asarray(n_batch, dtype=float)[:, None]
    gamma_hat = sum_z / n_b
    if mean_only:
        delta_hat = np.ones_like(gamma_hat)
    else:
        delta_hat = (sum_z2 - n_b * gamma_hat**2) / (n_b - 1)
        delta_hat[delta_hat == 0] = 1
    gamma_bar = gamma_hat.mean(axis=1)
    t2 = gamma_hat.var(axis=1, ddof=1)
    a_prior = b_prior = None
    if not mean_only:
        m = delta_hat.mean(axis=1)
        s2 = delta_hat.var(axis=1, ddof=1)
        a_prior = (2 * s2 + m**2) / s2
        b_prior = (m * s2 + m**3) / s2
    iterations = ()
    if not eb:
        gamma_star, delta_star = gamma_hat.copy(), delta_hat.copy()
    elif parametric and mean_only:
        gamma_star = _postmean(gamma_hat, gamma_bar[:, None], 1, 1, t2[:, None])
        delta_star = np.ones_like(gamma_hat)
    elif parametric:
        gamma_star, delta_star, iterations = _parametric_eb(gamma_hat, delta_hat, gamma_bar, t2, a_prior, b_prior,
                                                            sum_z, sum_z2, np.asarray(n_batch))
    else:
        gamma_star, delta_star = _nonparametric_eb(gamma_hat, delta_hat, sum_z, sum_z2, np.asarray(n_batch), levels)
    return gamma_hat, delta_hat, gamma_bar, t2, a_prior, b_prior, gamma_star, delta_star, iterations


def site_combat_new_batch(y: np.ndarray, covariate_design: np.ndarray, estimates: CombatEstimates, *,
                          eb: bool = True, parametric: bool = True, mean_only: bool = False,
                          level: str = "new") -> tuple[np.ndarray, dict]:
    """Harmonise a batch the reference never saw (a validation site) to the training reference.

    The site standardises its rows with the stored grand mean, pooled variance and covariate
    effects, estimates its own location/scale (γ̂, δ̂) and their empirical-Bayes shrinkage
    with priors taken across its features (as ComBat does for every batch), and adjusts. The
    training sites' estimates are untouched: nothing is refitted and nothing leaves the site.
    ``covariate_design``: the design's covariate columns (``design_matrix(...)[:, n_batch:]``).

    Returns the adjusted rows and this batch's γ*, δ* (kept at the site).
    """
    fit = estimates.fit
    y = np.asarray(y, dtype=float)
    if len(y) < 2:
        raise ValueError(f"batch '{level}' needs at least 2 cases to estimate its scale")
    sigma = np.sqrt(estimates.var_pooled)
    covariate_part = covariate_design @ fit.beta[fit.spec.n_batch:]
    z = (y - fit.grand_mean - covariate_part) / sigma
    _, _, _, _, _, _, gamma_star, delta_star, iterations = _batch_effects(
        z.sum(axis=0)[None], (z**2).sum(axis=0)[None], [len(y)], [level], eb=eb, parametric=parametric,
        mean_only=mean_only)
    adjusted = (z - gamma_star[0]) / np.sqrt(delta_star[0]) * sigma + fit.grand_mean + covariate_part
    return adjusted, {"gamma_star": gamma_star[0], "delta_star": delta_star[0], "eb_iterations": iterations}


def _postmean(g_hat, g_bar, n, d_star, t2):
    return (t2 * n * g_hat + d_star * g_bar) / (t2 * n + d_star)


def _postvar(sum2, n, a, b):
    return (0.5 * sum2 + b) / (n / 2.0 + a - 1.0)


def _parametric_eb(gamma_hat, delta_hat, gamma_bar, t2, a, b, sum_z, sum_z2, n_batch):
    """neuroCombat's ``it_sol`` per batch, with Σ(z - g)² expanded from the sums."""
    gamma_star, delta_star, counts = [], [], []
    for i in range(len(n_batch)):
        n = n_batch[i]
        g_old, d_old = gamma_hat[i].copy(), delta_hat[i].copy()
        change, count = 1.0, 0
        while change > EB_TOLERANCE:
            g_new = _postmean(gamma_hat[i], gamma_bar[i], n, d_old, t2[i])
            sum2 = sum_z2[i] - 2 * g_new * sum_z[i] + n * g_new**2
            d_new = _postvar(sum2, n, a[i], b[i])
            change = max((abs(g_new - g_old) / g_old).max(), (abs(d_new - d_old) / d_old).max())
            g_old, d_old = g_new, d_new
            count += 1
        gamma_star.append(g_new)
        delta_star.append(d_new)
        counts.append(count)
    return np.array(gamma_star), np.array(delta_star), tuple(counts)


def _nonparametric_eb(gamma_hat, delta_hat, sum_z, sum_z2, n_batch, batch_levels):
    """neuroCombat's ``int_eprior``: each feature's posterior over the other features' (g, d).

    Where every likelihood underflows neuroCombat returns NaN silently; this refuses instead.
    """
    gamma_star = np.empty_like(gamma_hat)
    delta_star = np.empty_like(delta_hat)
    undefined = {i: [] for i in range(len(n_batch))}
    for i in range(len(n_batch)):
        n = n_batch[i]
        for f in range(gamma_hat.shape[1]):
            g = np.delete(gamma_hat[i], f)
            d = np.delete(delta_hat[i], f)
            sum2 = sum_z2[i, f] - 2 * g * sum_z[i, f] + n * g**2
            with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
                likelihood = np.nan_to_num(1 / (2 * math.pi * d) ** (n / 2) * np.exp(-sum2 / (2 * d)))
            total = np.sum(likelihood)
            if not total > 0:
                undefined[i].append(f)
                continue
            gamma_star[i, f] = np.sum(g * likelihood) / total
            delta_star[i, f] = np.sum(d * likelihood) / total
    failed = {batch_levels[i]: fs for i, fs in undefined.items() if fs}
    if failed:
        detail = "; ".join(f"batch '{b}' (n={int(n_batch[batch_levels.index(b)])}): {len(fs)} feature(s), "
                           f"first {fs[0]}" for b, fs in failed.items())
        raise ValueError("non-parametric EB is undefined: every likelihood underflows for " + detail
                         + " (the batch effect is far outside the other features'); use parametric EB")
    return gamma_star, delta_star


def site_combat_adjust(y: np.ndarray, X: np.ndarray, estimates: CombatEstimates) -> np.ndarray:
    """Harmonised rows of one site: y* = σ (z - γ*_b) / sqrt(δ*_b) + grand mean + covariate part."""
    fit = estimates.fit
    sigma = np.sqrt(estimates.var_pooled)
    covariate_part = _covariate_part(X, fit)
    z = (np.asarray(y, dtype=float) - fit.grand_mean - covariate_part) / sigma
    onehot = X[:, : fit.spec.n_batch]
    adjusted = (z - onehot @ estimates.gamma_star) / np.sqrt(onehot @ estimates.delta_star)
    return adjusted * sigma + fit.grand_mean + covariate_part


class FederatedComBat:
    """ComBat as an estimator that runs the site/coordinator functions in one process.

    ``fit(Y, batch=..., covariates=..., site=...)`` groups rows by ``site`` (default: one
    site), computes every site's summaries, combines them and fits; ``transform`` adjusts
    rows. This is the single-process reference every federated run is compared against,
    and it equals pooled neuroCombat whatever the split into sites.

    Parameters
    ----------
    eb, parametric, mean_only : bool
        As in neuroCombat.
    categorical, continuous : list of str
        Covariates to preserve (keys of the ``covariates`` mapping given to fit).
    """

    def __init__(self, *, eb: bool = True, parametric: bool = True, mean_only: bool = False,
                 categorical: tuple[str, ...] = (), continuous: tuple[str, ...] = ()):
        self.eb = eb
        self.parametric = parametric
        self.mean_only = mean_only
        self.categorical = categorical
        self.continuous = continuous

    def _spec(self, batch, covariates) -> DesignSpec:
        covariates = covariates or {}
        return DesignSpec(
            batch_levels=tuple(sorted(set(np.asarray(batch).astype(str)))),
            categorical={c: tuple(sorted(set(np.asarray(covariates[c]).astype(str)))) for c in self.categorical},
            continuous=tuple(self.continuous),
        )

    def fit(self, Y, *, batch, covariates: dict | None = None, site=None):
        Y = np.asarray(Y, dtype=float)
        self.spec_ = self._spec(batch, covariates)
        X = design_matrix(batch, covariates, self.spec_)
        groups = [np.flatnonzero(np.asarray(site) == s) for s in dict.fromkeys(site)] if site is not None \
            else [np.arange(len(Y))]
        fit = update_combat_fit(combine_combat_moments(
            [site_combat_moments(Y[g], X[g], self.spec_) for g in groups]), self.spec_)
        residuals = combine_combat_residuals([site_combat_residuals(Y[g], X[g], fit) for g in groups])
        self.estimates_ = update_combat_estimates(fit, residuals, eb=self.eb, parametric=self.parametric,
                                                  mean_only=self.mean_only)
        self.n_sites_ = len(groups)
        return self

    def transform(self, Y, *, batch, covariates: dict | None = None):
        X = design_matrix(batch, covariates, self.spec_)
        return site_combat_adjust(Y, X, self.estimates_)

    def fit_transform(self, Y, *, batch, covariates: dict | None = None, site=None):
        return self.fit(Y, batch=batch, covariates=covariates, site=site).transform(
            Y, batch=batch, covariates=covariates)


def estimates_to_arrays(estimates: CombatEstimates) -> dict[str, np.ndarray]:
    """Every array of the fitted reference, by name (priors absent when mean-only)."""
    arrays = {
        "beta": estimates.fit.beta, "grand_mean": estimates.fit.grand_mean, "n_batch": estimates.fit.n_batch,
        "var_pooled": estimates.var_pooled, "gamma_hat": estimates.gamma_hat, "delta_hat": estimates.delta_hat,
        "gamma_bar": estimates.gamma_bar, "t2": estimates.t2,
        "gamma_star": estimates.gamma_star, "delta_star": estimates.delta_star,
    }
    if estimates.a_prior is not None:
        arrays.update(a_prior=estimates.a_prior, b_prior=estimates.b_prior)
    return arrays


def estimates_from_arrays(arrays: dict[str, np.ndarray], spec: DesignSpec) -> CombatEstimates:
    """Inverse of :func:`estimates_to_arrays` (what a site rebuilds from the coordinator's message)."""
    fit = CombatFit(beta=arrays["beta"], grand_mean=arrays["grand_mean"], n_batch=arrays["n_batch"], spec=spec)
    return CombatEstimates(fit=fit, var_pooled=arrays["var_pooled"], gamma_hat=arrays["gamma_hat"],
                           delta_hat=arrays["delta_hat"], gamma_bar=arrays["gamma_bar"], t2=arrays["t2"],
                           a_prior=arrays.get("a_prior"), b_prior=arrays.get("b_prior"),
                           gamma_star=arrays["gamma_star"], delta_star=arrays["delta_star"])
