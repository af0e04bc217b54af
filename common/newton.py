"""Newton-Raphson on a log-likelihood that is a sum over sites, with step-halving.

Every model fitted by Newton (Cox, logistic) sends the same summary from each site:
log-likelihood, gradient and Hessian at the coordinator's current β (p + p² + 1 numbers
plus counts). Sums of those equal the pooled ones, so the federated iterates equal the
pooled iterates exactly.

Stopping rules (named, as in lifelines' ``_newton_raphson_for_efron_model``): the
Newton decrement ``δᵀ(-H)δ / 2`` below ``tol``, or the largest step ``|δ|`` below ``tol``.
Once a rule is met the loop evaluates the new point once more (``NewtonState.final``), so the
log-likelihood, gradient and standard errors reported are those of the returned β, not of
the iterate before it. A fit stopped by the iteration limit returns the best point it
evaluated, marked not converged (``NewtonState.stop`` says which rule ended it).
A step that lowers the (penalised) log-likelihood is halved, from the best point so far.
Before the first step the Hessian is checked for aliased columns (a clear error names
them) unless a ridge penalty makes the problem well posed.

No finite estimate (monotone likelihood in Cox, separation in logistic): the likelihood rises
for ever along some direction, β moves by a roughly constant amount per step while the
decrement shrinks geometrically, so the decrement rule is met with β far out (|β| ≈ 20).
A finite maximum is reached quadratically, its last steps shrinking fast; so a stopping rule
met while the last accepted step is at least half the one before, the same way, raises
:class:`NoFiniteEstimateError` naming the columns that moved (unless a ridge penalty is set).

One loop drives every Newton fit, in one process or federated (:func:`run_newton`; one fit:
:func:`newton_fit`): it evaluates, steps, stops on the rule or at the iteration limit and warns
(``ConvergenceWarning``) when the limit stopped it. The evaluation is a callback, so the same loop
serves an in-process sum over sites and a coordinator's round trip, and several fits may share
each evaluation (the univariate screen, calibration slopes).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
from scipy import linalg

from fedrad.common.errors import FedradError

__all__ = ["NewtonSummary", "NewtonState", "RankDeficientError", "ConvergenceError", "ConvergenceWarning",
           "NoFiniteEstimateError", "combine_newton", "start_newton", "update_newton", "run_newton", "newton_fit",
           "aliased_columns", "wald_table", "fitted_point", "stop_report", "last_step", "steps_not_shrinking",
           "growing_columns", "STEP_RATIO_DIVERGING"]

#: a stopping rule met while the last step is at least this fraction of the one before: no finite estimate
STEP_RATIO_DIVERGING = 0.5


class RankDeficientError(FedradError):
    """Some columns are constant or linear combinations of others: the model is not identifiable."""


class ConvergenceError(FedradError):
    """Newton could not make progress (a non-finite step, or the step collapsed under halving)."""


class NoFiniteEstimateError(FedradError):
    """The likelihood has no maximum: some coefficients grow without bound (monotone likelihood, separation)."""


class ConvergenceWarning(UserWarning):
    """Newton stopped at ``max_iter`` before meeting its stopping rule."""


@dataclass(frozen=True)
class NewtonSummary:
    """One site's (or the pooled) log-likelihood and derivatives at β.

    loglik : float; grad : (p,); hess : (p, p) (negative semi-definite); n : cases; events : events.
    """

    loglik: float
    grad: np.ndarray
    hess: np.ndarray
    n: int
    events: int


def combine_newton(parts: list[NewtonSummary]) -> NewtonSummary:
    return NewtonSummary(loglik=float(sum(p.loglik for p in parts)), grad=sum(p.grad for p in parts),
                         hess=sum(p.hess for p in parts), n=sum(p.n for p in parts),
                         events=sum(p.events for p in parts))


@dataclass(frozen=True)
class NewtonState:
    """Where the coordinator is: ``beta`` is the point the sites evaluate next.

    best_beta, best : the best point evaluated so far and its (penalised) summary.
    loglik_null : log-likelihood at β = 0 (the first evaluation).
    history : one dict per evaluation (iteration, loglik, step, halvings, decrement).
    final : the (penalised) summary at ``beta`` once a stopping rule was met and ``beta`` evaluated.
    stop : the rule that ended the fit: "decrement", "step", or (set by :func:`run_newton`) the limit.
    """

    beta: np.ndarray
    best_beta: np.ndarray | None = None
    best: NewtonSummary | None = None
    iteration: int = 0
    halvings: int = 0
    converged: bool = False
    loglik_null: float | None = None
    history: tuple = field(default_factory=tuple)
    final: NewtonSummary | None = None
    stop: str = ""


def start_newton(n_params: int, beta0: np.ndarray | None = None) -> NewtonState:
    return NewtonState(beta=np.zeros(n_params) if beta0 is None else np.asarray(beta0, dtype=float).copy())


def _penalised(total: NewtonSummary, beta: np.ndarray, ridge: float) -> NewtonSummary:
    if not ridge:
        return total
    p = len(beta)
    return replace(total, loglik=total.loglik - 0.5 * ridge * float(beta @ beta), grad=total.grad - ridge * beta,
                   hess=total.hess - ridge * np.eye(p))


def aliased_columns(information: np.ndarray, rtol: float = 1e-10) -> list[int]:
    """Columns of a p x p information matrix (-H) that a pivoted QR finds dependent on the others."""
    scale = np.sqrt(np.clip(np.diag(information), 0, None))
    zero = scale == 0
    safe = np.where(zero, 1.0, scale)
    normalised = information / np.outer(safe, safe)
    normalised[zero, :] = 0
    normalised[:, zero] = 0
    _, r, pivots = linalg.qr(normalised, pivoting=True)
    diag = np.abs(np.diag(r))
    rank = int(np.sum(diag > rtol * max(diag.max(initial=0.0), 1.0)))
    return sorted(set(pivots[rank:].tolist()) | set(np.flatnonzero(zero).tolist()))


def last_step(state: NewtonState) -> np.ndarray | None:
    """The step that led from ``state.best_beta`` to ``state.beta`` (None before the first step)."""
    return None if state.best_beta is None else state.beta - state.best_beta


def steps_not_shrinking(step: np.ndarray | None, previous: np.ndarray | None, beta: np.ndarray) -> bool:
    """Two steps the same way, the last not much shorter than the one before (steps at rounding level,
    below ``1e-6 · (1 + max|β|)``, never count): how a fit without a finite maximum moves."""
    if step is None or previous is None:
        return False
    size, before = np.abs(step).max(), np.abs(previous).max()
    return bool(size > 1e-6 * (1.0 + np.abs(beta).max()) and float(step @ previous) > 0
                and size >= STEP_RATIO_DIVERGING * before)


def growing_columns(step: np.ndarray, beta: np.ndarray, names: list[str] | None, skip_first: bool = False) -> str:
    """The columns that moved most in the last step (at least 10% of the largest), for error messages;
    ``skip_first``: column 0 is an intercept, named only when nothing else moved."""
    labels = list(names) if names else [f"column {i}" for i in range(len(step))]
    order = [i for i in np.argsort(-np.abs(step), kind="stable") if not (skip_first and i == 0)] or [0]
    top = np.abs(step[order[0]])
    named = [i for i in order if np.abs(step[i]) >= 0.1 * top][:5]
    return ", ".join(f"'{labels[i]}' (coef {beta[i]:+.3g}, {step[i]:+.3g} in the last step)" for i in named)


def _final(state: NewtonState, pen: NewtonSummary) -> NewtonState:
    """The evaluation at the point a stopping rule returned: its summary becomes the fit's."""
    try:
        decrement = 0.5 * float(pen.grad @ linalg.solve(-pen.hess, pen.grad, assume_a="sym"))
    except (linalg.LinAlgError, ValueError):
        decrement = float("nan")
    entry = {"iteration": state.iteration, "loglik": pen.loglik, "step": "final", "decrement": decrement}
    return replace(state, final=pen, history=state.history + (entry,))


def fitted_point(state: NewtonState) -> tuple[np.ndarray, NewtonSummary]:
    """(β, its penalised summary) to report: the confirmed final point, or the best point evaluated
    when a limit stopped the fit (the unevaluated next iterate is never reported)."""
    if state.final is not None:
        return state.beta, state.final
    return state.best_beta, state.best


def stop_report(state: NewtonState) -> dict:
    """What ended the fit, for results.json and the report: the rule, the iterations, the last accepted
    step's largest |Δβ|, and the largest |gradient| and the Newton decrement at the returned β."""
    beta, summary = fitted_point(state)
    steps = [e["step"] for e in state.history if isinstance(e["step"], float)]
    decrement = state.history[-1]["decrement"] if state.final is not None else float("nan")
    return {"rule": state.stop or "not converged", "converged": bool(state.converged), "iterations": state.iteration,
            "max_step": steps[-1] if steps else None, "grad_norm": float(np.abs(summary.grad).max(initial=0.0)),
            "decrement": None if np.isnan(decrement) else float(decrement)}


def _no_finite_estimate(step: np.ndarray, beta: np.ndarray, names: list[str] | None, iteration: int):
    return NoFiniteEstimateError(
        f"no finite estimate: Newton's stopping rule was met after {iteration} iterations while its steps were not "
        f"shrinking, so the likelihood keeps rising as these coefficients grow without bound (monotone likelihood): "
        f"{growing_columns(step, beta, names)}. Typical cause: a binary column one of whose levels holds only "
        "censored patients (or only the earliest events) in every site. Drop or merge it, or set a ridge penalty "
        "(e.g. ridge = 1.0)")


def update_newton(state: NewtonState, total: NewtonSummary, *, ridge: float = 0.0, tol: float = 1e-10,
                  max_halvings: int = 30, names: list[str] | None = None, watch: bool = True) -> NewtonState:
    """Take the sites' summed summary at ``state.beta`` and return the next point to evaluate.

    A state whose stopping rule was met gets its final summary (see the module docstring). ``watch``
    (only without a ridge penalty) raises :class:`NoFiniteEstimateError` when the rule is met while the
    steps are not shrinking; a model with its own rule (logistic separation) turns it off.
    """
    beta = state.beta
    pen = _penalised(total, beta, ridge)
    if not np.isfinite(pen.loglik) or not np.all(np.isfinite(pen.grad)):
        raise ConvergenceError(f"non-finite log-likelihood or gradient at Newton iteration {state.iteration}")
    if state.converged:
        return _final(state, pen)
    null = total.loglik if state.loglik_null is None else state.loglik_null
    if state.best is not None and pen.loglik < state.best.loglik - 1e-12 * abs(state.best.loglik):
        if state.halvings >= max_halvings:
            raise ConvergenceError(f"step-halving collapsed after {max_halvings} halvings at iteration "
                                   f"{state.iteration}; the likelihood may have no maximum (separation?)")
        entry = {"iteration": state.iteration, "loglik": pen.loglik, "step": "halved", "decrement": np.nan}
        return replace(state, beta=state.best_beta + 0.5 * (beta - state.best_beta), halvings=state.halvings + 1,
                       loglik_null=null, history=state.history + (entry,))
    information = -pen.hess
    if state.best is None and not ridge:
        aliased = aliased_columns(information)
        if aliased:
            label = [names[i] if names else f"column {i}" for i in aliased]
            raise RankDeficientError(
                f"{len(aliased)} column(s) are constant or linear combinations of the others: {', '.join(label)}; "
                "drop them or set a ridge penalty")
    try:
        delta = linalg.solve(information, pen.grad, assume_a="sym")
    except (linalg.LinAlgError, ValueError) as exc:
        raise ConvergenceError(f"the Hessian is singular at iteration {state.iteration}: {exc}") from None
    if not np.all(np.isfinite(delta)):
        raise ConvergenceError(f"non-finite Newton step at iteration {state.iteration}")
    decrement = 0.5 * float(pen.grad @ delta)
    entry = {"iteration": state.iteration, "loglik": pen.loglik, "step": float(np.abs(delta).max()),
             "decrement": decrement}
    stop = "decrement" if decrement < tol else "step" if np.abs(delta).max() < tol else ""
    if stop and watch and not ridge and steps_not_shrinking(delta, last_step(state), beta + delta):
        raise _no_finite_estimate(delta, beta + delta, names, state.iteration + 1)
    return NewtonState(beta=beta + delta, best_beta=beta, best=pen, iteration=state.iteration + 1, halvings=0,
                       converged=bool(stop), loglik_null=null, history=state.history + (entry,), stop=stop)


def run_newton(evaluate, states: dict, step, *, max_iter: int | None = 100, max_rounds: int | None = None,
               failures: tuple[type[BaseException], ...] = (), on_step=None, message=None,
               stacklevel: int = 2) -> tuple[dict, dict]:
    """The Newton loop, for one fit or for many that share every evaluation (round trip).

    Parameters
    ----------
    evaluate : callable ``(states, active) -> {key: NewtonSummary}``
        The sums over sites at ``states[key].beta`` for every key in ``active``: in one process, or
        one federated round trip (it is given every state, so one message can carry every point).
    states : {key: NewtonState}
        Where each sequence starts (:func:`start_newton`); the dict's order is kept.
    step : callable ``(key, state, total) -> NewtonState``
        The coordinator's update (:func:`update_newton`, or a model's own such as logistic's).
    max_iter : accepted Newton steps per sequence (None: no limit).
    max_rounds : evaluations in all (None: no limit); a step that was halved counts as one.
    failures : exceptions of ``step`` that drop that sequence (kept in the second dict returned)
        instead of ending the loop.
    on_step : callable ``(key, state)``, optional, called after every step (logging, run log).
    message : callable ``(key, state, previous) -> str``, optional: the ``ConvergenceWarning`` of a
        sequence stopped by a limit (``previous``: the state before its last accepted step, or None).

    Returns
    -------
    (states, errors) : the final state and the exception of every dropped sequence, by key.
    """
    states = dict(states)
    previous: dict = dict.fromkeys(states)
    errors: dict = {}
    rounds = 0

    def running(key) -> bool:
        state = states[key]
        if key in errors:
            return False
        if state.converged:  # one more evaluation, at the point the rule returned
            return state.final is None
        return max_iter is None or state.iteration < max_iter

    while max_rounds is None or rounds < max_rounds:
        active = [key for key in states if running(key)]
        if not active:
            break
        totals = evaluate(states, active)
        rounds += 1
        for key in active:
            before = states[key]
            try:
                states[key] = step(key, before, totals[key])
            except failures as exc:
                errors[key] = exc
                continue
            if before.converged and states[key].final is None:  # a step of its own that ignores final
                states[key] = replace(before, final=totals[key])
            if states[key].iteration > before.iteration:
                previous[key] = before
            if on_step is not None:
                on_step(key, states[key])
    for key, state in states.items():
        if key in errors:
            continue
        if state.converged and state.final is None:  # max_rounds ended it before the final evaluation
            states[key] = replace(state, beta=state.best_beta, final=state.best)
        elif not state.converged:
            capped = max_iter is not None and state.iteration >= max_iter
            limit = f"{max_iter} iterations" if capped else f"{max_rounds} rounds"
            states[key] = replace(state, stop=f"limit: {limit}")
            if message is not None:
                text = message(key, state, previous[key])
            else:
                text = f"Newton did not converge in {limit}" + ("" if len(states) == 1 else f" ({key})")
            warnings.warn(text, ConvergenceWarning, stacklevel=stacklevel)
    return states, errors


def newton_fit(evaluate, n_params: int, *, ridge: float = 0.0, tol: float = 1e-10, max_iter: int = 100,
               names: list[str] | None = None, step=None, on_step=None, message=None,
               stacklevel: int = 2) -> NewtonState:
    """Run one Newton fit: ``evaluate(beta) -> NewtonSummary`` (the sum over sites, in one process or
    one federated round trip), stepping with ``step(state, total)`` (default :func:`update_newton`
    with ``ridge``, ``tol`` and ``names``). ``on_step(state)`` follows every step; ``message(state,
    previous)`` words the ``ConvergenceWarning`` when ``max_iter`` stops it (see :func:`run_newton`)."""
    if step is None:
        def step(state, total):
            return update_newton(state, total, ridge=ridge, tol=tol, names=names)

    states, _ = run_newton(lambda current, active: {key: evaluate(current[key].beta) for key in active},
                           {0: start_newton(n_params)}, lambda _, state, total: step(state, total), max_iter=max_iter,
                           on_step=None if on_step is None else lambda _, state: on_step(state),
                           message=None if message is None else lambda _, state, previous: message(state, previous),
                           stacklevel=stacklevel + 1)
    return states[0]


def wald_table(beta: np.ndarray, hess: np.ndarray, names: list[str], *, exp_name: str = "HR",
               alpha: float = 0.05) -> pd.DataFrame:
    """Coefficients, standard errors, exp(coef) with CI, Wald z and p from the (pooled) Hessian."""
    from scipy import stats  # ~0.5 s to import; sites import this module for every message

    cov = linalg.inv(-hess)
    se = np.sqrt(np.diag(cov))
    z = beta / se
    q = stats.norm.ppf(1 - alpha / 2)
    pct = int(round(100 * (1 - alpha)))
    return pd.DataFrame({
        "coef": beta, "se": se, exp_name: np.exp(beta), f"{exp_name} lower {pct}%": np.exp(beta - q * se),
        f"{exp_name} upper {pct}%": np.exp(beta + q * se), "z": z, "p": 2 * stats.norm.sf(np.abs(z)),
    }, index=pd.Index(names, name="covariate"))
