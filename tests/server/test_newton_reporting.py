"""Newton fits that tell the truth: no finite estimate is an error naming the column, and what is
reported (coefficients, log-likelihood, standard errors, the stopping rule) belongs to the returned β.

The coordinator's Newton (`server.fit._newton`) runs here on an in-process sum over sites
(`common.cox.cox_summary`: the same sums each site sends), so these checks need no federation.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from lifelines import CoxPHFitter
from sksurv.util import Surv

from fedrad.common.cox import FederatedCoxPH, cox_summary
from fedrad.common.newton import ConvergenceWarning, NoFiniteEstimateError, wald_table
from fedrad.common.penalised import PathSummary
from fedrad.common.study import Model
from fedrad.server.fit import _newton
from fedrad.server.report import _stop_line

SITES, PER_SITE = 3, 60


def _cohort(isolated_event: bool, seed: int = 0):
    """Three sites; `marker` is 1 in one patient per site, that patient censored (no finite estimate:
    the partial likelihood rises for ever as the marker's coefficient → -∞) or, as a control, an event."""
    rng = np.random.default_rng(seed)
    n = SITES * PER_SITE
    site = np.repeat(np.arange(SITES), PER_SITE)
    age = rng.normal(size=n)
    time = rng.exponential(10, size=n) * np.exp(-0.5 * age)
    event = rng.random(n) < 0.6
    marker = np.zeros(n)
    for s in range(SITES):
        pick = np.flatnonzero((site == s) & (event == isolated_event))[3]
        marker[pick] = 1.0
    return np.column_stack([age, marker]), time, event, site


def _evaluator(X, time, event, site):
    groups = [np.flatnonzero(site == s) for s in range(SITES)]

    def evaluate(points):  # the coordinator's view: one (fold, point) per round trip for plain Newton
        return {(0, 0): PathSummary(train=cox_summary(X, time, event, groups, points[0, 0]))}
    return evaluate, groups


def _lifelines(X, time, event, site):
    frame = pd.DataFrame({"age": X[:, 0], "marker": X[:, 1], "T": time, "E": event, "site": site})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CoxPHFitter().fit(frame, "T", "E", strata=["site"], fit_options={"precision": 1e-12,
                                                                               "r_precision": 1e-14})


def test_a_column_isolating_censored_patients_has_no_finite_estimate_and_is_named():
    X, time, event, site = _cohort(isolated_event=False)
    evaluate, groups = _evaluator(X, time, event, site)
    # the data really has no maximum: along the marker's axis the partial likelihood keeps rising
    along = [cox_summary(X, time, event, groups, np.array([0.5, -t])).loglik for t in (5, 10, 20, 40)]
    assert np.all(np.diff(along) > 0)
    with pytest.raises(NoFiniteEstimateError, match=r"no finite estimate.*'marker' \(coef -"):
        _newton(evaluate, ["age", "marker"], Model(name="clinical", clinical=("age", "marker")), logistic=False)
    with pytest.raises(NoFiniteEstimateError, match="'x1'"):  # the in-process estimator, same rule
        FederatedCoxPH(ties="breslow").fit(X, Surv.from_arrays(event, time), site=site)
    # a reference library returns a number instead: why it cannot be the oracle here
    assert abs(_lifelines(X, time, event, site).params_["marker"]) > 10


def test_a_ridge_penalty_gives_the_same_design_a_finite_fit():
    X, time, event, site = _cohort(isolated_event=False)
    evaluate, _ = _evaluator(X, time, event, site)
    got = _newton(evaluate, ["age", "marker"], Model(name="clinical", clinical=("age", "marker"), ridge=1.0), logistic=False)
    assert got["converged"] and abs(got["coefficients"]["marker"]) < 5


def test_what_is_reported_belongs_to_the_returned_beta_and_equals_lifelines():
    X, time, event, site = _cohort(isolated_event=True)  # the control: the marker's patients had events
    evaluate, groups = _evaluator(X, time, event, site)
    got = _newton(evaluate, ["age", "marker"], Model(name="clinical", clinical=("age", "marker")), logistic=False)
    beta = np.array([got["coefficients"]["age"], got["coefficients"]["marker"]])
    at_beta = cox_summary(X, time, event, groups, beta)
    table = pd.DataFrame(got["table"]).set_index("covariate")
    np.testing.assert_allclose(table["se"], wald_table(beta, at_beta.hess, ["age", "marker"])["se"], rtol=1e-13)
    assert got["loglik"] == pytest.approx(at_beta.loglik, rel=1e-14)
    ref = _lifelines(X, time, event, site)  # lifelines stops earlier (its relative-loglik rule): ~1e-8 off
    reference = ref.params_[["age", "marker"]].to_numpy()
    np.testing.assert_allclose(beta, reference, rtol=1e-6)
    np.testing.assert_allclose(table["se"], ref.standard_errors_[["age", "marker"]], rtol=1e-6)
    stop = got["stop"]
    assert stop["converged"] and stop["rule"] in ("decrement", "step") and stop["grad_norm"] < 1e-12
    assert stop["grad_norm"] < np.abs(cox_summary(X, time, event, groups, reference).grad).max()  # closer to the MLE
    assert stop["grad_norm"] == pytest.approx(np.abs(at_beta.grad).max(), rel=1e-9, abs=1e-15)
    assert _stop_line(stop).startswith("Converged (")


def test_a_fit_stopped_by_the_iteration_limit_is_not_converged_and_reports_an_evaluated_point(monkeypatch):
    import fedrad.server.fit as fit

    monkeypatch.setattr(fit, "MAX_NEWTON_ROUNDS", 2)
    X, time, event, site = _cohort(isolated_event=True)
    evaluate, groups = _evaluator(X, time, event, site)
    with pytest.warns(ConvergenceWarning, match="did not converge in 2 iterations"):
        got = _newton(evaluate, ["age", "marker"], Model(name="clinical", clinical=("age", "marker")), logistic=False)
    assert not got["converged"] and got["stop"]["rule"] == "limit: 2 iterations"
    beta = np.array([got["coefficients"]["age"], got["coefficients"]["marker"]])
    at_beta = cox_summary(X, time, event, groups, beta)
    assert got["loglik"] == pytest.approx(at_beta.loglik, rel=1e-14)  # an evaluated point, not the next iterate
    assert _stop_line(got["stop"]).startswith("NOT converged: stopped at the 2 iterations limit")
