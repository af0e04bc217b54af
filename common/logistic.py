"""Federated logistic regression by Newton-Raphson that equals the pooled fit.

Reference: scikit-learn ``LogisticRegression`` without penalty (``C=np.inf``; ``penalty=None``
before scikit-learn 1.8) for the coefficients, and statsmodels' ``Logit`` for the Wald table
(standard errors from the inverse observed information, normal-quantile CIs, exp(coef) = OR).

Conventions:

* model ``P(y = 1 | x) = expit(x β)``; the log-likelihood is
  ``Σ y η - log(1 + e^η)`` with ``η = x β``, computed with ``np.logaddexp`` so that no
  ``|η|`` overflows.
* the intercept (when ``fit_intercept``) is the first design column, named ``"intercept"``.
* ``ridge`` adds ``-½ · ridge · Σ_j β_j²`` over the coefficients to the log-likelihood and does
  **not** penalise the intercept, as scikit-learn's l2 penalty. scikit-learn minimises
  ``C · Σ loss + ½ |w|²``, so ``ridge = 1 / C``.
* the Wald table uses the Hessian of the penalised log-likelihood (the unpenalised one when
  ``ridge = 0``, which is statsmodels').
* ``loglik_null_`` is statsmodels' ``llnull``: the intercept-only model, in closed form from n and
  events (``n₁ log(n₁/n) + n₀ log(n₀/n)``); without an intercept, β = 0 (``n log ½``).

Round trips: every Newton round the coordinator sends β and each site returns a
:class:`~common.newton.NewtonSummary` (log-likelihood, gradient (p,), Hessian (p, p), n, events);
:func:`~common.newton.combine_newton` sums them and :func:`update_logistic_newton` takes the step
(penalty, step-halving, stopping rules of :func:`~common.newton.update_newton`) and watches for
separation. A site whose outcomes are all 0 (or all 1) is fine: its rows add to the sums.

Separation (the maximum-likelihood estimate does not exist) is detected at the coordinator from
the sums only, when ``ridge == 0``:

1. *complete separation*: at an evaluated β ≠ 0 the deviance ``-2 loglik`` is below ``1e-6 · n``
   (every fitted probability is numerically 0 or 1);
2. *quasi-complete separation*: Newton's stopping rule is met (or the Hessian turns singular)
   while the last two accepted steps point the same way and the last is at
   least half the one before. Newton converges quadratically to a finite maximum, so by then its
   steps shrink fast; under separation the log-likelihood creeps towards its supremum while β moves
   by a roughly constant amount per round.

No absolute threshold on |β| is used, since β's scale follows the units of X. Either rule raises
:class:`SeparationError` naming the columns whose coefficients grew most in the last step. Reaching
``max_iter`` with non-shrinking steps only warns (``ConvergenceWarning``, naming those columns): a
strong but finite effect also takes several equal steps before Newton's quadratic phase.

References
----------
Albert, A. & Anderson, J. A. (1984). On the existence of maximum likelihood estimates in logistic
regression models. Biometrika 71(1), 1-10.
scikit-learn ``sklearn/linear_model/_logistic.py``; statsmodels ``statsmodels/discrete/discrete_model.py``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from numbers import Integral, Real

import numpy as np
import pandas as pd
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.metrics import roc_auc_score
from sklearn.utils._param_validation import Interval, Options, StrOptions

from fedrad.common.errors import FedradError
from fedrad.common.newton import (
    STEP_RATIO_DIVERGING,
    ConvergenceError,
    NewtonState,
    NewtonSummary,
    NoFiniteEstimateError,
    combine_newton,
    growing_columns,
    last_step,
    newton_fit,
    steps_not_shrinking,
    update_newton,
    wald_table,
)
from fedrad.common.penalised import FederatedNetCV, NetProblem

__all__ = ["SeparationError", "LogisticInputError", "site_logistic_newton", "update_logistic_newton",
           "logistic_null_intercept", "logistic_null_loglik",
           "FederatedLogisticRegression", "FederatedLogisticNetCV", "DEVIANCE_SEPARATION", "STEP_RATIO_SEPARATION",
           "INTERCEPT"]

logger = logging.getLogger(__name__)

#: Rule 1: deviance below this times n means every fitted probability is numerically 0 or 1.
DEVIANCE_SEPARATION = 1e-6
#: Rule 2: the last accepted step is at least this fraction of the one before (not shrinking).
STEP_RATIO_SEPARATION = STEP_RATIO_DIVERGING
#: Name of the intercept column in the design and in ``summary_``.
INTERCEPT = "intercept"


class SeparationError(NoFiniteEstimateError):
    """The outcome is (quasi-)completely separated by the covariates: the MLE does not exist."""


class LogisticInputError(FedradError):
    """X, y or site cannot be used for logistic regression (shape, values, missing data)."""


def site_logistic_newton(X: np.ndarray, y: np.ndarray, beta: np.ndarray) -> NewtonSummary:
    """One site's binomial log-likelihood and its derivatives at β.

    Parameters
    ----------
    X : (n_samples, n_params)
        Design, with the intercept column (ones) included if wanted.
    y : (n_samples,)
        Outcomes in {0, 1}.
    beta : (n_params,)

    Returns
    -------
    NewtonSummary
        loglik (float), grad (n_params,), hess (n_params, n_params), n = rows, events = Σ y.

    Notes
    -----
    .. math::

        \\ell(\\beta) = \\sum_i y_i \\eta_i - \\log(1 + e^{\\eta_i}), \\quad \\eta = X\\beta,

        \\nabla \\ell = X^T (y - \\pi), \\quad \\nabla^2 \\ell = -X^T W X,
        \\quad \\pi = \\operatorname{expit}(\\eta), \\; W = \\operatorname{diag}(\\pi (1 - \\pi)).

    ``π(1 - π)`` is computed as ``expit(η) · expit(-η)``, exact for large ``|η|``.
    """
    X = np.asarray(X, dtype=float)
    y = np.asarray(y, dtype=float)
    beta = np.asarray(beta, dtype=float)
    if X.ndim != 2:
        raise LogisticInputError(f"X must be 2-D (n_samples, n_params); got shape {X.shape}")
    if y.shape != (X.shape[0],):
        raise LogisticInputError(f"X has {X.shape[0]} rows but y has shape {y.shape}")
    if beta.shape != (X.shape[1],):
        raise LogisticInputError(f"beta has shape {beta.shape}; X has {X.shape[1]} columns")
    eta = X @ beta
    loglik = float(np.sum(y * eta - np.logaddexp(0.0, eta)))
    prob = expit(eta)
    weight = prob * expit(-eta)
    return NewtonSummary(loglik=loglik, grad=X.T @ (y - prob), hess=-(X.T * weight) @ X, n=int(X.shape[0]),
                         events=int(y.sum()))


def logistic_null_intercept(n: int, events: int) -> float:
    """Intercept of the intercept-only model: ``logit(events / n)``."""
    return float(np.log(events / (n - events)))


def logistic_null_loglik(n: int, events: int) -> float:
    """Log-likelihood of the intercept-only model (statsmodels' ``llnull``): ``n₁ log(n₁/n) + n₀ log(n₀/n)``."""
    return float(sum(k * np.log(k / n) for k in (events, n - events)))


def _penalise(total: NewtonSummary, beta: np.ndarray, ridge: float, intercept: bool) -> NewtonSummary:
    """Add ``-½ ridge Σ β_j²`` over the coefficients (not column 0 when ``intercept``)."""
    if not ridge:
        return total
    weights = np.full(len(beta), float(ridge))
    if intercept:
        weights[0] = 0.0
    return replace(total, loglik=total.loglik - 0.5 * float(weights @ beta**2), grad=total.grad - weights * beta,
                   hess=total.hess - np.diag(weights))


def _separation_error(why: str, step: np.ndarray, beta: np.ndarray, names: list[str] | None, intercept: bool,
                      iteration: int) -> SeparationError:
    detail = growing_columns(step, beta, names, intercept)
    return SeparationError(
        f"the outcome is separated by the covariates ({why} after {iteration} Newton iterations): the "
        f"maximum-likelihood estimate does not exist and the coefficients grow without bound. Likely separating "
        f"column(s): {detail}. Drop or merge them, or set a ridge penalty (e.g. ridge=1.0)")


def update_logistic_newton(state: NewtonState, total: NewtonSummary, *, ridge: float = 0.0, tol: float = 1e-10,
                           intercept: bool = True, names: list[str] | None = None) -> NewtonState:
    """The coordinator's step: penalise the summed summary, step with Newton, watch for separation.

    Parameters
    ----------
    state : NewtonState
        Where the sites evaluated ``total`` (``state.beta``, shape (n_params,)).
    total : NewtonSummary
        :func:`~common.newton.combine_newton` of the sites' :func:`site_logistic_newton`.
    ridge : float
        ``½ · ridge · Σ β_j²`` penalty, the intercept excluded.
    intercept : bool
        Column 0 is the intercept (unpenalised, never named as separating).
    names : list of str, length n_params
        Column names for error messages (``"intercept"`` first when ``intercept``).

    Raises
    ------
    SeparationError
        By the rules in the module docstring (only when ``ridge == 0``).
    RankDeficientError, ConvergenceError
        From :func:`~common.newton.update_newton`.
    """
    watch = not ridge
    reached = last_step(state)
    if watch and reached is not None and -2.0 * total.loglik < DEVIANCE_SEPARATION * total.n:
        raise _separation_error(f"deviance {-2.0 * total.loglik:.3g} < {DEVIANCE_SEPARATION:g} x n = "
                                f"{DEVIANCE_SEPARATION * total.n:.3g}", reached, state.beta, names, intercept,
                                state.iteration)
    pen = _penalise(total, state.beta, ridge, intercept)
    try:
        new = update_newton(state, pen, ridge=0.0, tol=tol, names=names, watch=False)  # separation: rules above
    except ConvergenceError as exc:
        sizes = [e["step"] for e in state.history if isinstance(e["step"], float)]
        if watch and state.halvings == 0 and reached is not None and len(sizes) >= 2 \
                and sizes[-1] > 1e-6 * (1.0 + np.abs(state.beta).max()) \
                and sizes[-1] >= STEP_RATIO_SEPARATION * sizes[-2]:
            raise _separation_error(f"{exc}", reached, state.beta, names, intercept, state.iteration) from exc
        raise
    step = last_step(new)
    if new.iteration > state.iteration and watch:
        # An accepted step: compare it with the step that led to the point just accepted.
        if new.converged and steps_not_shrinking(step, reached, new.beta):
            raise _separation_error("Newton's stopping rule met while its steps were not shrinking", step, new.beta,
                                    names, intercept, new.iteration)
    return new


def _step_is_diverging(state: NewtonState, previous_state: NewtonState | None) -> bool:
    """Rule 2 at ``max_iter``: the last two accepted steps (from the two states) are diverging."""
    if previous_state is None or state.halvings or previous_state.halvings:
        return False
    return steps_not_shrinking(last_step(state), last_step(previous_state), state.beta)


def _checked_inputs(estimator, X, y) -> tuple[np.ndarray, np.ndarray, int]:
    """(X values, 0/1 outcome, events) after the estimator's checks; both classes must occur."""
    estimator._validate_params()
    if hasattr(estimator, "feature_names_in_"):
        del estimator.feature_names_in_
    values = estimator._features(X, fitting=True)
    n = len(values)
    y = estimator._outcome(y, n)
    events = int(y.sum())
    if events in (0, n):
        raise LogisticInputError(f"all {n} outcomes are {int(y[0]) if n else 0}; logistic regression needs both "
                                 "classes")
    return values, y, events


def _site_groups(site, n: int) -> dict:
    """{site label: row indices}, in order of first appearance (default: one site, label 0)."""
    if site is None:
        return {0: np.arange(n)}
    site = np.asarray(site)
    if site.shape != (n,):
        raise LogisticInputError(f"X has {n} rows but site has shape {site.shape}")
    return {s: np.flatnonzero(site == s) for s in dict.fromkeys(site.tolist())}


class FederatedLogisticRegression(ClassifierMixin, BaseEstimator):
    """Binary logistic regression fitted by federated Newton, one summary per site and round.

    ``fit(X, y, site=...)`` groups rows by ``site`` (default: one site), and every round computes
    :func:`site_logistic_newton` per site, sums with :func:`~common.newton.combine_newton` and steps
    with :func:`update_logistic_newton`. A last round evaluates the summary at the returned β for
    ``loglik_``, ``hessian_`` and ``summary_``. This is the single-process reference every federated
    run is compared against; it equals pooled scikit-learn whatever the split into sites.

    Parameters
    ----------
    fit_intercept : bool
        Add an unpenalised intercept column (first, named ``"intercept"``).
    ridge : float >= 0
        Penalty ``½ · ridge · Σ β_j²`` on the coefficients (not the intercept); scikit-learn's
        ``C = 1 / ridge``.
    tol : float > 0
        Newton stops when the decrement ``δᵀ(-H)δ / 2`` or the largest step is below ``tol``.
    max_iter : int >= 1
        Newton rounds; reaching it warns with ``ConvergenceWarning`` and leaves ``converged_ = False``.

    Attributes
    ----------
    coef_ : (n_features,)
    intercept_ : float (0.0 without ``fit_intercept``)
    classes_ : (2,) array [0, 1]
    n_iter_ : int
        Accepted Newton steps.
    converged_ : bool
    loglik_ : float
        Unpenalised log-likelihood at the fit.
    loglik_null_ : float
        Log-likelihood of the intercept-only model (statsmodels' ``llnull``); without an intercept,
        at β = 0.
    hessian_ : (n_params, n_params)
        Hessian of the penalised log-likelihood at the fit, intercept first.
    summary_ : DataFrame, index ``["intercept", *features]``
        :func:`~common.newton.wald_table` with ``exp_name="OR"``.
    history_ : tuple of dict
        One entry per evaluation (iteration, loglik, step, decrement).
    n_sites_ : int
    feature_names_in_ : (n_features,) (only when X is a DataFrame with string column names)
    n_features_in_ : int
    """

    _parameter_constraints: dict = {
        "fit_intercept": ["boolean"],
        "ridge": [Interval(Real, 0, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="neither")],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
    }

    def __init__(self, *, fit_intercept: bool = True, ridge: float = 0.0, tol: float = 1e-10, max_iter: int = 100):
        self.fit_intercept = fit_intercept
        self.ridge = ridge
        self.tol = tol
        self.max_iter = max_iter

    # -- input checks -----------------------------------------------------------------------------------
    def _features(self, X, *, fitting: bool) -> np.ndarray:
        """X as a float array (n_samples, n_features), refusing NaN / non-numeric columns by name."""
        if isinstance(X, pd.DataFrame):
            columns = [str(c) for c in X.columns]
            if fitting:
                if all(isinstance(c, str) for c in X.columns):
                    self.feature_names_in_ = np.asarray(columns, dtype=object)
            elif hasattr(self, "feature_names_in_"):
                missing = [c for c in self.feature_names_in_ if c not in X.columns]
                if missing:
                    raise LogisticInputError(f"X lacks the fitted column(s) {', '.join(map(repr, missing))}")
                X = X[list(self.feature_names_in_)]
                columns = list(self.feature_names_in_)
            blocks = []
            for name in X.columns:
                try:
                    blocks.append(np.asarray(X[name], dtype=float))
                except (TypeError, ValueError):
                    raise LogisticInputError(f"column '{name}' is not numeric (dtype {X[name].dtype}); encode it "
                                             "first") from None
            values = np.column_stack(blocks) if blocks else np.empty((len(X), 0))
        else:
            values = np.asarray(X, dtype=float)
            if values.ndim != 2:
                raise LogisticInputError(f"X must be 2-D (n_samples, n_features); got shape {values.shape}")
            columns = self._names(values.shape[1], fitting=fitting)
        if not fitting and values.shape[1] != self.n_features_in_:
            raise LogisticInputError(f"X has {values.shape[1]} features; the model was fitted with "
                                     f"{self.n_features_in_}")
        bad = ~np.isfinite(values)
        if bad.any():
            j = int(np.flatnonzero(bad.any(axis=0))[0])
            raise LogisticInputError(f"column '{columns[j]}' has {int(bad[:, j].sum())} missing or non-finite "
                                     f"value(s) (first at row {int(np.flatnonzero(bad[:, j])[0])})")
        return values

    def _names(self, n_features: int, *, fitting: bool = False) -> list[str]:
        if not fitting and hasattr(self, "feature_names_in_"):
            return list(self.feature_names_in_)
        return [f"x{j}" for j in range(n_features)]

    @staticmethod
    def _outcome(y, n_rows: int) -> np.ndarray:
        y = np.asarray(y)
        if y.ndim != 1:
            y = np.squeeze(y)
        if y.ndim != 1:
            raise LogisticInputError(f"y must be 1-D (n_samples,); got shape {np.asarray(y).shape}")
        if len(y) != n_rows:
            raise LogisticInputError(f"X has {n_rows} rows but y has {len(y)}")
        values = pd.unique(pd.Series(y, dtype=object))
        bad = [v for v in values if not (isinstance(v, (bool, np.bool_, Integral, Real)) and v in (0, 1))]
        if bad:
            shown = ", ".join(repr(v.item() if isinstance(v, np.generic) else v) for v in bad[:10])
            raise LogisticInputError(f"y must be binary (0/1 or boolean); found value(s) {shown}"
                                     + (f" and {len(bad) - 10} more" if len(bad) > 10 else ""))
        return y.astype(float)

    def _design(self, values: np.ndarray) -> np.ndarray:
        if self.fit_intercept:
            return np.column_stack([np.ones(len(values)), values])
        return values

    # -- fitting --------------------------------------------------------------------------------------------
    def fit(self, X, y, *, site=None):
        """Fit by federated Newton over the groups of ``site``.

        Parameters
        ----------
        X : (n_samples, n_features) array or DataFrame
        y : (n_samples,) 0/1 or boolean
        site : (n_samples,), optional
            Site label of every row (default: one site).
        """
        values, y, events = _checked_inputs(self, X, y)
        n, n_features = values.shape
        groups = list(_site_groups(site, n).values())
        design = self._design(values)
        names = ([INTERCEPT] if self.fit_intercept else []) + self._names(n_features)
        rows = [(design[g], y[g]) for g in groups]

        started = [0.0]

        def evaluate(beta):
            started[0] = time.perf_counter()
            return combine_newton([site_logistic_newton(Xs, ys, beta) for Xs, ys in rows])

        p = design.shape[1]
        bytes_per_round = len(rows) * 8 * (p + p * p + 3)

        def step(state, total):
            return update_logistic_newton(state, total, ridge=self.ridge, tol=self.tol, intercept=self.fit_intercept,
                                          names=names)

        def log_round(state):
            entry = state.history[-1]
            logger.debug("round %d: loglik %.10g, |dbeta| %s, decrement %.3g, %.3f s, %d bytes", entry["iteration"],
                         entry["loglik"], entry["step"], entry["decrement"], time.perf_counter() - started[0],
                         bytes_per_round)

        def not_converged(state, previous):
            hint = ""
            if not self.ridge and _step_is_diverging(state, previous):
                hint = ("; its steps were not shrinking, as under separation: "
                        + growing_columns(last_step(state), state.beta, names, self.fit_intercept))
            last = state.history[-1]["step"]
            last = f"{last:.3g}" if isinstance(last, float) else last
            return (f"Newton did not converge in {self.max_iter} iterations (last step {last}){hint}; "
                    "increase max_iter or set a ridge penalty")

        state = newton_fit(evaluate, p, max_iter=self.max_iter, step=step, on_step=log_round, message=not_converged,
                           stacklevel=3)
        beta = state.beta
        final = evaluate(beta)
        pen = _penalise(final, beta, self.ridge, self.fit_intercept)
        self.n_features_in_ = n_features
        self.classes_ = np.array([0, 1])
        self.n_sites_ = len(groups)
        self.n_iter_ = state.iteration
        self.converged_ = bool(state.converged)
        self.loglik_ = final.loglik
        if self.fit_intercept:
            self.loglik_null_ = logistic_null_loglik(n, events)
        else:
            self.loglik_null_ = float(state.loglik_null)
        self.hessian_ = pen.hess
        self.history_ = state.history
        self.intercept_ = float(beta[0]) if self.fit_intercept else 0.0
        self.coef_ = beta[1:].copy() if self.fit_intercept else beta.copy()
        self.summary_ = wald_table(beta, pen.hess, names, exp_name="OR")
        return self

    # -- prediction -----------------------------------------------------------------------------------------
    def _check_fitted(self):
        if not hasattr(self, "coef_"):
            raise AttributeError("this FederatedLogisticRegression is not fitted yet; call fit first")

    def decision_function(self, X) -> np.ndarray:
        """Linear predictor ``η = intercept + X coef``, shape (n_samples,)."""
        self._check_fitted()
        return self._features(X, fitting=False) @ self.coef_ + self.intercept_

    def predict_proba(self, X) -> np.ndarray:
        """Probabilities of classes [0, 1], shape (n_samples, 2)."""
        eta = self.decision_function(X)
        return np.column_stack([expit(-eta), expit(eta)])

    def predict(self, X) -> np.ndarray:
        """1 where P(y = 1) > 0.5, else 0; shape (n_samples,)."""
        return (self.decision_function(X) > 0).astype(int)

    def score(self, X, y, sample_weight=None) -> float:
        """ROC AUC of ``decision_function(X)`` against ``y`` (not accuracy, unlike ClassifierMixin)."""
        eta = self.decision_function(X)
        return float(roc_auc_score(self._outcome(y, len(eta)), eta, sample_weight=sample_weight))


class FederatedLogisticNetCV(ClassifierMixin, BaseEstimator, FederatedNetCV):
    """Elastic-net logistic path with site-local K-fold cross-validation (see :mod:`fedrad.common.penalised`).

    For each ``alpha`` on the path the coefficients minimise (glmnet's binomial scaling)

    .. math::

        -\\frac{1}{n}\\,\\ell(\\beta_0, w) + \\alpha \\sum_j \\Big(r\\,|w_j| + \\frac{1-r}{2} w_j^2\\Big),

    with ``ℓ`` the binomial log-likelihood of :func:`site_logistic_newton`, ``r = l1_ratio`` and the
    intercept ``β_0`` unpenalised. This is scikit-learn's ``LogisticRegression(solver="saga",
    l1_ratio=r, C=1 / (n · alpha))``: scikit-learn minimises ``C · Σ loss + r|w|₁ + (1-r)/2 |w|²``
    and ``Σ loss = -ℓ``.

    ``fit`` (:class:`~common.penalised.FederatedNetCV`'s, shared with ``FederatedCoxnetCV``) runs
    :func:`~common.penalised.run_path` in one process: every round, each site evaluates
    :func:`site_logistic_newton` on its training rows of every (fold, alpha) point, and the
    log-likelihood of its held-out rows at the same point (:func:`~common.penalised.site_path_summary`,
    as the sites of a federated run do); the sums over sites are what a federated
    round would return, so this is the single-process reference of the federated path. Fold K (the
    last) is all data; it sets ``alpha_max`` and ``coef_path_``. Every sequence starts at the
    intercept-only fit of all the data (intercept ``logit(events / n)``, coefficients 0), where the
    intercept's gradient is 0, so ``alphas_[0]`` is exactly the smallest alpha with every coefficient 0.

    Parameters
    ----------
    l1_ratio : float in (0, 1]
        ``r``: 1 is the lasso, smaller values mix in a ridge penalty.
    alphas : array-like, shape = (n_alphas,), optional
        Penalties, largest first (default: ``n_alphas`` on a log scale from alpha_max down to
        ``alpha_min_ratio · alpha_max``).
    n_alphas : int >= 1
    alpha_min_ratio : float in (0, 1)
    cv : int, 0 or >= 2
        Folds; 0 fits the path on all data only (``alpha_`` is then the last alpha).
    rule : {"min", "1se"}
        :func:`~common.penalised.cv_choice`: smallest mean CV deviance, or the largest alpha within
        one standard error of it.
    fit_intercept : bool
        Add an unpenalised intercept column (first, named ``"intercept"``).
    seed : int >= 0
        Fold assignment: each site splits its own rows, stratified by outcome, with
        :func:`~common.penalised.site_fold_ids` (from the seed and the site's label).
    tol : float > 0
        Stopping rule of each proximal-Newton sequence (:func:`~common.penalised.update_path`).

    Attributes
    ----------
    alphas_ : (n_alphas,)
    coef_path_ : (n_alphas, n_features)
        Coefficients on all data at each alpha.
    intercept_path_ : (n_alphas,)
        Intercepts on all data (zeros without ``fit_intercept``).
    alpha_ : float
        The chosen alpha.
    coef_ : (n_features,); intercept_ : float
        At ``alpha_``.
    cv_deviance_ : (cv, n_alphas)
        ``-2 ·`` held-out binomial log-likelihood per fold (only when ``cv``).
    cv_mean_, cv_se_ : (n_alphas,)
        Mean over folds and its standard error (only when ``cv``).
    n_rounds_ : int
        Round trips a federation needs (all folds and alphas share each round).
    folds_ : (n_samples,)
        Fold of each row, 0..cv-1 (all 0 when ``cv = 0``).
    classes_ : (2,) array [0, 1]
    n_sites_ : int
    feature_names_in_ : (n_features,) (only when X is a DataFrame with string column names)
    n_features_in_ : int

    References
    ----------
    Friedman, J., Hastie, T. & Tibshirani, R. (2010). Regularization paths for generalized linear
    models via coordinate descent. J. Stat. Softw. 33(1). R ``glmnet::cv.glmnet(family="binomial")``.
    """

    _parameter_constraints: dict = {
        "l1_ratio": [Interval(Real, 0, 1, closed="right")],
        "alphas": ["array-like", None],
        "n_alphas": [Interval(Integral, 1, None, closed="left")],
        "alpha_min_ratio": [Interval(Real, 0, 1, closed="neither")],
        "cv": [Interval(Integral, 2, None, closed="left"), Options(Integral, {0})],
        "rule": [StrOptions({"min", "1se"})],
        "fit_intercept": ["boolean"],
        "seed": [Interval(Integral, 0, None, closed="left")],
        "tol": [Interval(Real, 0, None, closed="neither")],
    }

    kind = "logistic"

    def __init__(self, *, l1_ratio: float = 1.0, alphas=None, n_alphas: int = 50, alpha_min_ratio: float = 0.01,
                 cv: int = 5, rule: str = "min", fit_intercept: bool = True, seed: int = 0, tol: float = 1e-9):
        super().__init__(l1_ratio=l1_ratio, alphas=alphas, n_alphas=n_alphas, alpha_min_ratio=alpha_min_ratio, cv=cv,
                         rule=rule, seed=seed, tol=tol)
        self.fit_intercept = fit_intercept

    # Input checks and prediction are FederatedLogisticRegression's.
    _features = FederatedLogisticRegression._features
    _names = FederatedLogisticRegression._names
    _outcome = staticmethod(FederatedLogisticRegression._outcome)
    _design = FederatedLogisticRegression._design
    decision_function = FederatedLogisticRegression.decision_function
    predict_proba = FederatedLogisticRegression.predict_proba
    predict = FederatedLogisticRegression.predict
    score = FederatedLogisticRegression.score

    def _check_fitted(self):
        if not hasattr(self, "coef_"):
            raise AttributeError("this FederatedLogisticNetCV is not fitted yet; call fit first")

    def _problem(self, X, y, site) -> NetProblem:
        values, y, events = _checked_inputs(self, X, y)
        n, n_features = values.shape
        alphas = None
        if self.alphas is not None:
            alphas = np.asarray(self.alphas, dtype=float)
            if alphas.ndim != 1 or len(alphas) == 0 or not np.all(np.isfinite(alphas) & (alphas > 0)):
                raise ValueError(f"alphas must be a non-empty 1-D array of positive numbers; got {self.alphas!r}")
        groups = _site_groups(site, n)
        design = self._design(values)
        p = design.shape[1]

        def summarise(rows, beta):
            return site_logistic_newton(design[rows], y[rows], beta)

        factors = np.ones(p)
        beta0 = np.zeros(p)
        if self.fit_intercept:
            factors[0] = 0.0
            beta0[0] = logistic_null_intercept(n, events)  # intercept-only fit: its gradient is 0
        self.n_features_in_ = n_features
        self.n_sites_ = len(groups)
        return NetProblem(groups=groups, stratify=y, units=[(g, summarise) for g in groups.values()],
                          factors=factors, beta0=beta0, alphas=alphas)

    def _store(self, path, chosen):
        self.coef_path_ = path[:, 1:].copy() if self.fit_intercept else path.copy()
        self.intercept_path_ = path[:, 0].copy() if self.fit_intercept else np.zeros(len(self.alphas_))
        self.coef_ = self.coef_path_[chosen].copy()
        self.intercept_ = float(self.intercept_path_[chosen])
        self.classes_ = np.array([0, 1])
