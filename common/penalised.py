"""Elastic-net / LASSO paths with cross-validation, federated, equal to the pooled fit.

Objective for each penalty λ (glmnet's and scikit-survival ``CoxnetSurvivalAnalysis``'s scaling):

.. math::

    \\min_\\beta\\; -\\frac{1}{n}\\,\\ell(\\beta)
        + \\lambda \\sum_j f_j\\Big(r\\,|\\beta_j| + \\frac{1-r}{2}\\beta_j^2\\Big)

with ``r = l1_ratio`` and penalty factors ``f_j`` (0 = unpenalised, e.g. an intercept).

Algorithm: proximal Newton. At the current point the sites send ℓ, ∇ℓ and ∇²ℓ (the same
summary as an unpenalised Newton round, :mod:`fedrad.common.newton`); the coordinator minimises the
penalised quadratic model exactly by coordinate descent, and the proposal is evaluated in the
next round (a step that raises the objective is halved towards the best point). Every λ of
the path and every cross-validation fold runs its own such sequence, **all in the same
messages**: a round sends one β per (fold, λ) and gets one summary per (fold, λ) back, so the
whole cross-validated path costs the rounds of its slowest sequence (typically 6-10), not
folds × λ × Newton steps. Identical points (e.g. every sequence's start at β = 0) are sent once.

Cross-validation: each site splits its own rows into K folds (a patient never crosses sites);
fold k of the federation is the union of the sites' fold k. Each summary also carries the
held-out score at the same point, so the CV deviance is known as soon as a sequence converges:
Cox uses the cross-validated partial likelihood of Verweij & van Houwelingen (1993),
``cvpl_k = ℓ_all(β_{-k}) − ℓ_{-k}(β_{-k})``; logistic uses the held-out binomial log-likelihood.
λ is then chosen by the minimum CV deviance or the 1-SE rule.

The per-fold rule is written once: a site's summary of one (fold, point) is
:func:`site_path_summary` (the site handler and the in-process estimators call it) and the
coordinator sums them with :func:`combine_path_summary`. :class:`FederatedNetCV` is the in-process
cross-validated estimator behind ``FederatedCoxnetCV`` and ``FederatedLogisticNetCV``.
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass, field

import numpy as np
from scipy import linalg

from fedrad.common.newton import ConvergenceError, NewtonSummary, combine_newton

__all__ = ["Penalty", "PathSummary", "PathState", "penalised_objective", "solve_penalised_quadratic",
           "lambda_max", "lambda_grid", "start_path", "update_path", "unique_points", "cv_choice", "fold_ids",
           "site_fold_ids", "HELDOUT", "site_path_summary", "combine_path_summary", "run_path", "path_choice",
           "NetProblem", "FederatedNetCV"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Penalty:
    """l1_ratio : r in [0, 1]; factors : (p,) per-coefficient multipliers (0 = unpenalised)."""

    l1_ratio: float
    factors: np.ndarray


def penalised_objective(loglik: float, beta: np.ndarray, n: int, lam: float, penalty: Penalty) -> float:
    f, r = penalty.factors, penalty.l1_ratio
    return -loglik / n + lam * float(np.sum(f * (r * np.abs(beta) + 0.5 * (1 - r) * beta**2)))


def solve_penalised_quadratic(beta0: np.ndarray, grad: np.ndarray, hess: np.ndarray, n: int, lam: float,
                              penalty: Penalty, *, sweeps_per_check: int = 25, max_sweeps: int = 20_000) -> np.ndarray:
    """Exact minimiser of the penalised quadratic model of -ℓ/n around ``beta0``.

    Coordinate descent finds the support and signs; the solution on that support is then solved
    exactly (a linear system) and accepted when its signs agree and every coefficient off the
    support satisfies the KKT condition, so the result is exact to rounding even where
    correlated features make coordinate descent crawl. Where features are exactly collinear the
    minimiser is not unique; coordinate descent's point is returned once it meets the KKT
    conditions to ``KKT_TOL``.
    """
    a = -hess / n  # positive semi-definite
    b = grad / n
    l1 = lam * penalty.l1_ratio * penalty.factors
    l2 = lam * (1 - penalty.l1_ratio) * penalty.factors
    beta = beta0.copy()
    resid = np.zeros_like(beta)  # a @ (beta - beta0)
    for sweep in range(max_sweeps):
        for j in range(len(beta)):
            denom = a[j, j] + l2[j]
            if denom <= 0:
                if l1[j] > 0 or abs(b[j]) < 1e-300:
                    continue
                raise ConvergenceError(f"coefficient {j} has no curvature and no penalty; it is unbounded")
            z = a[j, j] * beta[j] + b[j] - resid[j]
            new = np.sign(z) * max(abs(z) - l1[j], 0.0) / denom
            if new != beta[j]:
                resid += a[:, j] * (new - beta[j])
                beta[j] = new
        if (sweep + 1) % sweeps_per_check == 0 or sweep == 0:
            exact = _exact_on_support(beta, beta0, a, b, l1, l2)
            if exact is not None:
                return exact
            if _kkt_violation(beta, beta0, a, b, l1, l2) < KKT_TOL:
                return beta  # optimal, though not unique: exactly collinear features share the weight
    raise ConvergenceError(f"the penalised sub-problem did not converge in {max_sweeps} sweeps at lambda={lam:.4g}: "
                           "some features are (nearly) collinear; drop redundant ones (correlation filter, mRMR) "
                           "or use l1_ratio < 1 (elastic net)")


#: largest violation of the optimality (KKT) conditions accepted from coordinate descent alone.
KKT_TOL = 1e-11


def _kkt_violation(beta, beta0, a, b, l1, l2) -> float:
    g = -b + a @ (beta - beta0) + l2 * beta
    on = beta != 0
    return float(max(np.max(np.abs(g[on] + l1[on] * np.sign(beta[on])), initial=0.0),
                     np.max(np.abs(g[~on]) - l1[~on], initial=0.0)))


def _exact_on_support(beta, beta0, a, b, l1, l2) -> np.ndarray | None:
    """Solve the stationarity equations on the current support; None unless the KKT conditions hold."""
    support = np.flatnonzero((beta != 0) | (l1 == 0))
    signs = np.sign(beta[support])
    candidate = np.zeros_like(beta)
    if len(support):
        system = a[np.ix_(support, support)] + np.diag(l2[support])
        rhs = b[support] + a[support] @ beta0 - l1[support] * signs
        try:  # least squares: near-duplicate features (e.g. two volume measures) make the system singular
            candidate[support] = linalg.lstsq(system, rhs, lapack_driver="gelsy")[0]
        except (linalg.LinAlgError, ValueError):
            return None
        penalised = l1[support] > 0
        if np.any(np.sign(candidate[support][penalised]) != signs[penalised]):
            return None
    smooth_grad = -b + a @ (candidate - beta0) + l2 * candidate
    off = np.setdiff1d(np.arange(len(beta)), support)
    if np.any(np.abs(smooth_grad[off]) > l1[off] * (1 + 1e-9) + 1e-12):
        return None
    return candidate


def lambda_max(grad: np.ndarray, n: int, penalty: Penalty) -> float:
    """Smallest λ at which every penalised coefficient is 0 (gradient at the unpenalised-only fit)."""
    penalised = penalty.factors > 0
    if penalty.l1_ratio <= 0 or not penalised.any():
        raise ValueError("lambda_max needs an L1 part (l1_ratio > 0) and at least one penalised coefficient")
    return float(np.max(np.abs(grad[penalised]) / (n * penalty.l1_ratio * penalty.factors[penalised])))


def lambda_grid(lam_max: float, n_lambdas: int = 50, min_ratio: float = 0.01) -> np.ndarray:
    return lam_max * np.logspace(0, np.log10(min_ratio), n_lambdas)


@dataclass(frozen=True)
class PathSummary:
    """Summed site summaries at one (fold, λ) point: training ℓ/∇/∇² plus the held-out score."""

    train: NewtonSummary
    heldout: float = 0.0


@dataclass(frozen=True)
class PathState:
    """One proximal-Newton sequence per (fold, λ); arrays have leading shape (n_folds, n_lambdas).

    beta : points to evaluate next; best_beta / best_objective : best accepted so far;
    heldout : held-out score at the best point; converged : (F, L) bool.
    """

    lambdas: np.ndarray
    beta: np.ndarray
    best_beta: np.ndarray
    best_objective: np.ndarray
    heldout: np.ndarray
    converged: np.ndarray
    halvings: np.ndarray
    iteration: int = 0
    history: tuple = field(default_factory=tuple)

    @property
    def done(self) -> bool:
        return bool(self.converged.all())


def start_path(n_folds: int, lambdas: np.ndarray, beta0: np.ndarray) -> PathState:
    shape = (n_folds, len(lambdas))
    beta = np.broadcast_to(beta0, shape + beta0.shape).copy()
    return PathState(lambdas=np.asarray(lambdas, dtype=float), beta=beta, best_beta=beta.copy(),
                     best_objective=np.full(shape, np.inf), heldout=np.full(shape, np.nan),
                     converged=np.zeros(shape, dtype=bool), halvings=np.zeros(shape, dtype=int))


def unique_points(state: PathState) -> tuple[np.ndarray, np.ndarray]:
    """Distinct points per fold that still need evaluating: (points (F, U, p), index (F, L) into them, -1 = none).

    Converged sequences are not re-evaluated; sequences at the same point share one evaluation."""
    n_folds, n_lambdas, p = state.beta.shape
    per_fold, index = [], np.full((n_folds, n_lambdas), -1)
    for f in range(n_folds):
        seen: dict[bytes, int] = {}
        points = []
        for j in range(n_lambdas):
            if state.converged[f, j]:
                continue
            key = state.beta[f, j].tobytes()
            if key not in seen:
                seen[key] = len(points)
                points.append(state.beta[f, j])
            index[f, j] = seen[key]
        per_fold.append(points)
    width = max((len(pts) for pts in per_fold), default=0)
    out = np.zeros((n_folds, width, p))
    for f, pts in enumerate(per_fold):
        if pts:
            out[f, : len(pts)] = pts
    return out, index


def update_path(state: PathState, summaries: dict[tuple[int, int], PathSummary], n_train: np.ndarray,
                penalty: Penalty, *, tol: float = 1e-9, max_halvings: int = 30) -> PathState:
    """Advance every sequence given its summed summary at ``state.beta`` (keys: (fold, λ index))."""
    beta, best_beta = state.beta.copy(), state.best_beta.copy()
    best_obj, heldout = state.best_objective.copy(), state.heldout.copy()
    converged, halvings = state.converged.copy(), state.halvings.copy()
    for (f, j), summary in summaries.items():
        lam, n = state.lambdas[j], int(n_train[f])
        point = state.beta[f, j]
        objective = penalised_objective(summary.train.loglik, point, n, lam, penalty)
        if objective > best_obj[f, j] + 1e-13 * abs(best_obj[f, j]):
            if halvings[f, j] >= max_halvings:
                raise ConvergenceError(f"fold {f}, lambda {lam:.4g}: step-halving collapsed")
            beta[f, j] = best_beta[f, j] + 0.5 * (point - best_beta[f, j])
            halvings[f, j] += 1
            continue
        improvement = best_obj[f, j] - objective
        best_beta[f, j], best_obj[f, j], heldout[f, j], halvings[f, j] = point, objective, summary.heldout, 0
        proposal = solve_penalised_quadratic(point, summary.train.grad, summary.train.hess, n, lam, penalty)
        if np.abs(proposal - point).max() < tol or (np.isfinite(improvement) and improvement < tol * 1e-3
                                                      and np.abs(proposal - point).max() < np.sqrt(tol)):
            converged[f, j] = True
        else:
            beta[f, j] = proposal
    history = state.history + ({"iteration": state.iteration, "evaluated": len(summaries),
                                "converged": int(converged.sum())},)
    return PathState(lambdas=state.lambdas, beta=beta, best_beta=best_beta, best_objective=best_obj,
                     heldout=heldout, converged=converged, halvings=halvings, iteration=state.iteration + 1,
                     history=history)


def fold_ids(n: int, n_folds: int, seed, stratify=None) -> np.ndarray:
    """Fold of each of a site's rows, 0..K-1, balanced (and balanced within ``stratify`` levels, e.g. events)."""
    rng = np.random.default_rng(seed)
    folds = np.empty(n, dtype=int)
    groups = [np.arange(n)] if stratify is None else [np.flatnonzero(np.asarray(stratify) == s)
                                                      for s in np.unique(stratify)]
    offset = 0
    for rows in groups:
        rows = rng.permutation(rows)
        folds[rows] = (np.arange(len(rows)) + offset) % n_folds
        offset += len(rows)
    return folds


def site_fold_ids(n: int, n_folds: int, seed: int, site: str, stratify=None) -> np.ndarray:
    """A site's folds, reproducible from the study seed and the site's name (the in-process
    reference and the federated run assign the same folds); without cross-validation
    (``n_folds == 0``) every row is in fold 0."""
    if not n_folds:
        return np.zeros(n, dtype=int)
    return fold_ids(n, n_folds, [int(seed), zlib.crc32(str(site).encode())], stratify=stratify)


#: The held-out score of a CV fold, by model kind. Cox: the partial likelihood does not split over
#: rows, so the score is Verweij & van Houwelingen's ``ℓ_all(β) − ℓ_train(β)`` ("cvpl"); logistic:
#: the log-likelihood of the held-out rows ("rows").
HELDOUT = {"cox": "cvpl", "logistic": "rows"}


def site_path_summary(summarise, folds: np.ndarray, fold: int, n_cv: int, heldout: str) -> PathSummary:
    """One site's summary at one point of CV fold ``fold``: training ℓ/∇/∇² and the held-out score.

    Parameters
    ----------
    summarise : callable ``(rows) -> NewtonSummary``
        The site's model summary at the point over ``rows`` (indices into ``folds``).
    folds : (n_rows,) the site's folds (:func:`site_fold_ids`).
    fold : 0..n_cv; ``fold == n_cv`` is all the rows (nothing held out: the path on all data).
    heldout : a value of :data:`HELDOUT`.
    """
    everyone = np.arange(len(folds))
    if fold == n_cv:
        return PathSummary(train=summarise(everyone))
    train = summarise(everyone[folds != fold])
    if heldout == "cvpl":
        return PathSummary(train=train, heldout=float(summarise(everyone).loglik - train.loglik))
    if heldout == "rows":
        rows = everyone[folds == fold]
        return PathSummary(train=train, heldout=float(summarise(rows).loglik) if len(rows) else 0.0)
    raise ValueError(f"heldout must be one of {sorted(set(HELDOUT.values()))}, got {heldout!r}")


def combine_path_summary(parts: list[PathSummary]) -> PathSummary:
    """Sum the sites' summaries of one (fold, point)."""
    return PathSummary(train=combine_newton([p.train for p in parts]), heldout=float(sum(p.heldout for p in parts)))


def cv_choice(deviance: np.ndarray, lambdas: np.ndarray, rule: str = "min") -> tuple[int, np.ndarray, np.ndarray]:
    """Index of the chosen λ from CV deviance (n_folds, n_lambdas); also the mean and SE curves.

    "min": smallest mean deviance. "1se": the largest λ whose mean is within one SE of the minimum."""
    mean = deviance.mean(axis=0)
    se = deviance.std(axis=0, ddof=1) / np.sqrt(deviance.shape[0])
    best = int(np.argmin(mean))
    if rule == "min":
        return best, mean, se
    if rule != "1se":
        raise ValueError(f"rule must be 'min' or '1se', got {rule!r}")
    within = np.flatnonzero(mean <= mean[best] + se[best])
    return int(within[np.argmax(lambdas[within])]), mean, se


def run_path(evaluate, n_folds: int, penalty: Penalty, beta0: np.ndarray, *, lambdas=None,
             n_lambdas: int = 50, min_ratio: float = 0.01, tol: float = 1e-9, max_rounds: int = 100) -> PathState:
    """The coordinator's loop. ``evaluate(points (F, U, p)) -> {(f, u): PathSummary}`` returns the
    sums over sites (in one process, or one federated round); the last fold is the full data (it
    sets λ_max). Training sizes come from the summaries' ``n``."""
    start = np.broadcast_to(beta0, (n_folds, 1) + beta0.shape).copy()
    first = evaluate(start)
    n_train = np.array([first[(f, 0)].train.n for f in range(n_folds)])
    if lambdas is None:
        lambdas = lambda_grid(lambda_max(first[(n_folds - 1, 0)].train.grad, int(n_train[-1]), penalty),
                              n_lambdas, min_ratio)
    state = start_path(n_folds, np.asarray(lambdas, dtype=float), beta0)
    state = update_path(state, {(f, j): first[(f, 0)] for f in range(n_folds) for j in range(len(lambdas))},
                        n_train, penalty, tol=tol)
    while not state.done and state.iteration < max_rounds:
        points, index = unique_points(state)
        results = evaluate(points)
        state = update_path(state, {(f, j): results[(f, int(index[f, j]))] for f, j in zip(*np.nonzero(index >= 0))},
                            n_train, penalty, tol=tol)
    if not state.done:
        raise ConvergenceError(f"the penalised path did not converge in {max_rounds} rounds")
    return state


def path_choice(state: PathState, rule: str) -> tuple[int, np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """(chosen λ index, CV deviance (K, L), mean, SE) of a finished path; without CV folds, the smallest λ."""
    if state.beta.shape[0] == 1:
        return len(state.lambdas) - 1, None, None, None
    deviance = -2 * state.heldout[:-1]
    chosen, mean, se = cv_choice(deviance, state.lambdas, rule)
    return chosen, deviance, mean, se


@dataclass(frozen=True)
class NetProblem:
    """What a model hands :class:`FederatedNetCV` after checking its inputs.

    groups : {site label: row indices}; stratify : (n_rows,) what folds are balanced on (events,
    outcomes); units : [(rows, summarise)] whose summaries add up to the federation's, with
    ``summarise(rows, beta) -> NewtonSummary`` over those (global) rows: one per site, or one for all
    rows where the likelihood is not a sum over sites; factors, beta0 : (p,) penalty factors and the
    start of every sequence; alphas : the given penalties or None.
    """

    groups: dict
    stratify: np.ndarray
    units: list
    factors: np.ndarray
    beta0: np.ndarray
    alphas: np.ndarray | None = None


class FederatedNetCV:
    """Elastic-net path with site-local K-fold cross-validation, in one process: every round, each
    site evaluates :func:`site_path_summary` at every (fold, point) and the sums
    (:func:`combine_path_summary`) go to :func:`run_path`, as a federated round would.

    Shared by the models' estimators (``FederatedCoxnetCV``, ``FederatedLogisticNetCV``), which set
    ``kind`` (a key of :data:`HELDOUT`) and supply ``_problem(X, y, site) -> NetProblem`` and
    ``_store(path, chosen)`` (their own attributes from the all-data path (L, p) and the chosen index).
    """

    kind: str

    def __init__(self, *, l1_ratio: float = 1.0, alphas=None, n_alphas: int = 50, alpha_min_ratio: float = 0.01,
                 cv: int = 5, rule: str = "min", seed: int = 0, tol: float = 1e-9):
        self.l1_ratio = l1_ratio
        self.alphas = alphas
        self.n_alphas = n_alphas
        self.alpha_min_ratio = alpha_min_ratio
        self.cv = cv
        self.rule = rule
        self.seed = seed
        self.tol = tol

    def fit(self, X, y, *, site=None):
        """Fit the path on all data and on every training fold, then choose alpha by CV deviance.

        ``site`` : (n_samples,), optional: the site label of every row (default: one site).
        """
        problem = self._problem(X, y, site)
        folds = np.zeros(len(problem.stratify), dtype=int)
        for label, rows in problem.groups.items():
            folds[rows] = site_fold_ids(len(rows), self.cv, self.seed, label, stratify=problem.stratify[rows])
        heldout = HELDOUT[self.kind]
        p = len(problem.beta0)

        def evaluate(points):
            started = time.perf_counter()
            out = {(f, u): combine_path_summary([
                site_path_summary(lambda r, rows=rows, summarise=summarise, beta=points[f, u]: summarise(rows[r], beta),
                                  folds[rows], f, self.cv, heldout)
                for rows, summarise in problem.units])
                for f in range(points.shape[0]) for u in range(points.shape[1])}
            logger.debug("path round: %d points, %.3f s, %d bytes", len(out), time.perf_counter() - started,
                         len(problem.groups) * len(out) * 8 * (p + p * p + 4))
            return out

        state = run_path(evaluate, self.cv + 1, Penalty(float(self.l1_ratio), problem.factors), problem.beta0,
                         lambdas=problem.alphas, n_lambdas=self.n_alphas, min_ratio=self.alpha_min_ratio, tol=self.tol)
        self.alphas_ = state.lambdas
        self.n_rounds_ = state.iteration  # one evaluation (round trip) per iteration
        chosen, self.cv_deviance_, self.cv_mean_, self.cv_se_ = path_choice(state, self.rule)
        self.alpha_ = float(self.alphas_[chosen])
        self.folds_ = folds
        self._store(state.best_beta[-1], chosen)
        return self
