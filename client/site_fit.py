"""Model summaries at a site: the site half of `server/fit.py`.

One message evaluates the model at many points at once: for each fold (the site's own
K-fold split, then all rows) and each point β the coordinator sends, the training
log-likelihood, gradient and Hessian and the held-out score. Unpenalised Newton is the
special case of one fold (all rows) and one point.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from flwr.app import RecordDict

from fedrad.client.privacy import Disclosure, two_valued
from fedrad.client.site_data import HARMONISED, HARMONISED_META, SCORES, STANDARDISED, site_log, with_deep_features

#: per-case scores written at the site by other fedrad stages (the CNN's DL score): id + one column per score
from fedrad.client.store import FEATURES, FeatureStore
from fedrad.common import schemas
from fedrad.common.cox import site_cox_baseline, site_cox_event_times, site_cox_newton, site_cox_risk_sets
from fedrad.common.errors import FedradError, StoreError
from fedrad.common.messages import arrays_record
from fedrad.common.penalised import HELDOUT, site_fold_ids, site_path_summary


def model_table(store: FeatureStore, plan: dict) -> pd.DataFrame:
    """The rows the model sees: standardised (harmonised, z-scored) features when the study harmonised,
    with the CNN's deep features joined on when the model or the selection uses any."""
    if plan["data"] in ("standardised", "harmonised"):
        meta_path = store.path / HARMONISED_META
        if not meta_path.is_file() or json.loads(meta_path.read_text(encoding="utf-8")).get("reference") != plan["reference"]:
            raise StoreError(f"this site's {plan['data']} features are not from the study's harmonisation; "
                             "rerun the harmonise stage")
        table = pd.read_parquet(store.path / (STANDARDISED if plan["data"] == "standardised" else HARMONISED))
    else:
        table = pd.read_parquet(store.path / FEATURES)
    wanted = list(plan.get("columns", [])) + list(plan.get("features", []))
    if any(schemas.is_deep_feature(c) for c in wanted):
        table = with_deep_features(store.path, table, plan.get("deep_features_id"))
    return table


def add_scores(store: FeatureStore, table: pd.DataFrame, plan: dict) -> pd.DataFrame:
    """Append the score columns the model uses: earlier models' linear predictors (computed here
    from their coefficients) and DL scores from ``STORE/scores.parquet`` (the deep-learning hook)."""
    name = plan["model"]["name"]
    table = table.copy()
    for score, coefficients in plan.get("scores", {}).items():
        terms = {c: b for c, b in coefficients.items() if c != "intercept"}
        absent = [c for c in terms if c not in table.columns]
        if absent:
            raise StoreError(f"model '{name}': score '{score}' needs column(s) the store lacks, e.g. {absent[:3]}")
        table[score] = table[list(terms)].to_numpy(dtype=float) @ np.array(list(terms.values()), dtype=float) \
            if terms else 0.0
    external = plan.get("external_scores", [])
    if external:
        path = store.path / SCORES
        if not path.is_file():
            raise StoreError(f"model '{name}' uses score(s) {external}, which are neither earlier models nor in "
                             f"this site's {SCORES} (written by the deep-learning stage)")
        scores = pd.read_parquet(path)
        absent = [s for s in external if s not in scores.columns]
        if absent:
            raise StoreError(f"model '{name}': {SCORES} has no column(s) {absent}")
        merged = table[[schemas.ID]].merge(scores[[schemas.ID] + external], on=schemas.ID, how="left")
        lacking = merged[external].isna().any(axis=1).to_numpy()
        if lacking.any():
            site_log(store.path, f"model '{name}': no {external} score for: "
                     + ", ".join(table.loc[lacking, schemas.ID].astype(str)))
            raise StoreError(f"model '{name}': {int(lacking.sum())} case(s) have no {external} score in {SCORES} "
                             "(ids in site.log)")
        for score in external:
            table[score] = merged[score].to_numpy(dtype=float)
    return table


def model_inputs(store: FeatureStore, plan: dict, site: str):
    """(ids, X, outcome, left_out) of the rows usable for the model; rows without a binary outcome are left
    out (logged, and declared as a group: their sums could be recovered by difference with other stages')."""
    table = add_scores(store, model_table(store, plan), plan)
    model = plan["model"]
    columns = plan["columns"]
    absent = [c for c in columns if c not in table.columns]
    if absent:
        raise StoreError(f"model '{model['name']}': the store lacks {len(absent)} column(s), e.g. {absent[:3]}")
    if model["kind"] == "logistic":
        outcome = plan["binary_outcome"]
        if outcome not in table.columns:
            raise StoreError(f"model '{model['name']}': the store has no column '{outcome}'")
        y = pd.to_numeric(table[outcome], errors="coerce")
        missing = y.isna()
        if missing.any():
            site_log(store.path, f"model '{model['name']}': no '{outcome}' for (left out): "
                     + ", ".join(table.loc[missing, schemas.ID].astype(str)))
        table, y = table[~missing], y[~missing]
        left_out = int(missing.sum())
        if not y.isin([0, 1]).all():
            raise StoreError(f"model '{model['name']}': column '{outcome}' must be 0/1")
        outcome_values = (y.to_numpy(dtype=float),)
    else:
        outcome_values = (table[plan["time"]].to_numpy(dtype=float), table[plan["event"]].to_numpy(dtype=bool))
        left_out = 0
    X = table[columns].to_numpy(dtype=float)
    bad = [c for c, ok in zip(columns, np.isfinite(X).all(axis=0)) if not ok]
    if bad:
        raise StoreError(f"model '{model['name']}': missing values in {len(bad)} column(s), e.g. {bad[:3]}")
    if model["kind"] == "logistic":
        X = np.hstack([np.ones((len(X), 1)), X])  # the intercept is the first coefficient
    return table[schemas.ID].astype(str).to_numpy(), X, outcome_values, left_out


def model_columns(plan: dict, X: np.ndarray) -> tuple[list[str], np.ndarray]:
    """(labels, values) of the model's own columns in ``X`` (the logistic intercept left out)."""
    lead = 1 if plan["model"]["kind"] == "logistic" else 0
    return [f"column '{c}'" for c in plan["columns"]], X[:, lead:]


def design_declarations(plan: dict, X: np.ndarray, folds: np.ndarray | None = None, width: int | None = None):
    """(values, designs) for the Disclosure of a reply with sums over the design ``X``: every two-valued model
    column with the cases holding each value over each set of rows the sums cover (the site; with CV each
    fold's training rows and, by difference with all rows, its held-out rows), and the design's width
    (``width``: columns of the widest point, default all) against the site's rows."""
    labels, own = model_columns(plan, X)
    values = two_valued(labels, own)
    for k in range(0 if folds is None else int(folds.max(initial=-1)) + 1):
        for rows, where in ((folds != k, "training"), (folds == k, "held-out")):
            values.update(two_valued([f"{label} (fold {k} {where})" for label in labels], own[rows]))
    return values, {f"model '{plan['model']['name']}'": (X.shape[1] if width is None else width, len(X))}


def model_summaries_reply(store: FeatureStore, plan: dict, site: str, arrays: dict) -> tuple[RecordDict, Disclosure]:
    ids, X, outcome, left_out = model_inputs(store, plan, site)
    model = plan["model"]
    points = arrays["points"]  # (F, U, p)
    folds = site_fold_ids(len(ids), int(plan["cv_folds"]), model["seed"], site, stratify=outcome[-1])
    n_folds, n_points, p = points.shape
    # univariate screens: point u uses only the columns subsets[u] (its β padded with zeros to p)
    subsets = plan.get("subsets") or [list(range(p))] * n_points
    loglik = np.zeros((n_folds, n_points))
    heldout = np.zeros((n_folds, n_points))
    grad = np.zeros((n_folds, n_points, p))
    hess = np.zeros((n_folds, n_points, p, p))
    n_train = np.zeros(n_folds)
    events = np.zeros(n_folds)

    def summary(rows, beta, columns):
        x = X[np.ix_(rows, columns)]
        if model["kind"] == "cox":
            return site_cox_newton(x, outcome[0][rows], outcome[1][rows], beta, ties=model["ties"])
        from fedrad.common.logistic import site_logistic_newton  # scikit-learn costs ~1 s per message: only when needed

        return site_logistic_newton(x, outcome[0][rows], beta)

    for f in range(n_folds):  # the last fold is all rows
        for u in range(n_points):
            columns = subsets[u]
            k = len(columns)
            beta = points[f, u, :k]
            s = site_path_summary(lambda rows: summary(rows, beta, columns), folds, f, n_folds - 1,
                                  HELDOUT[model["kind"]])
            loglik[f, u], grad[f, u, :k], hess[f, u, :k, :k] = s.train.loglik, s.train.grad, s.train.hess
            n_train[f], events[f] = s.train.n, s.train.events
            heldout[f, u] = s.heldout
    groups = {f"fold {k} held-out": int(np.sum(folds == k)) for k in range(n_folds - 1)}
    groups["cases without the outcome"] = left_out
    values, designs = design_declarations(plan, X, folds if n_folds > 1 else None,
                                          width=max(len(columns) for columns in subsets))
    content = RecordDict({"arrays": arrays_record(loglik=loglik, grad=grad, hess=hess, heldout=heldout,
                                                  n_train=n_train, events=events)})
    return content, Disclosure(n_cases=len(ids), groups=groups, identifiers=frozenset(ids),
                               shared_axes=frozenset({n_folds, n_points, p}), values=values, designs=designs)


class EventTimesNotAllowed(FedradError):
    """The study asks for event times, and this site has not agreed to share them."""


def _check_allowed(allowed: bool, model: dict) -> None:
    if not allowed:
        raise EventTimesNotAllowed(
            f"model '{model['name']}' is an unstratified Cox model (share_event_times), which discloses this site's "
            "event times and, at times with a single event or few patients at risk, those patients' covariates; "
            "the site has not allowed it (SuperNode node config allow-event-times=true)")


def event_times_reply(store: FeatureStore, plan: dict, site: str, allowed: bool) -> tuple[RecordDict, Disclosure]:
    """This site's distinct event times: only with the site's explicit consent."""
    _check_allowed(allowed, plan["model"])
    ids, _, (time, event), _ = model_inputs(store, plan, site)
    times = site_cox_event_times(time, event)
    site_log(store.path, f"shared {len(times)} distinct event times for model '{plan['model']['name']}'")
    return RecordDict({"arrays": arrays_record(times=times)}), Disclosure(n_cases=len(ids), identifiers=frozenset(ids))


def risk_sets_reply(store: FeatureStore, plan: dict, site: str, arrays: dict,
                    allowed: bool) -> tuple[RecordDict, Disclosure]:
    """Risk-set sums on the coordinator's event-time grid at β (unstratified exact Cox, WebDISCO-style)."""
    _check_allowed(allowed, plan["model"])
    ids, X, (time, event), _ = model_inputs(store, plan, site)
    sums = site_cox_risk_sets(X, time, event, arrays["beta"], arrays["grid"])
    content = RecordDict({"arrays": arrays_record(
        d=sums.d, x_events=sums.x_events, s0=sums.s0, s1=sums.s1, s2=sums.s2, s0_tied=sums.s0_tied,
        s1_tied=sums.s1_tied, s2_tied=sums.s2_tied, n=np.array([len(ids)]))})
    values, designs = design_declarations(plan, X)
    return content, Disclosure(n_cases=len(ids), identifiers=frozenset(ids),
                               shared_axes=frozenset({len(arrays["grid"]), X.shape[1]}), values=values, designs=designs)


def baseline_reply(store: FeatureStore, plan: dict, site: str, arrays: dict,
                   min_count: int) -> tuple[RecordDict, Disclosure]:
    """After a fit: column sums (nomogram axes) and, for Cox, this site's Breslow cumulative
    baseline hazard at the study's horizons for the fitted β. A horizon with fewer than
    ``min_count`` cases still at risk is withheld (NaN): so few patients would shape it."""
    ids, X, outcome, _ = model_inputs(store, plan, site)
    columns = X[:, 1:] if plan["model"]["kind"] == "logistic" else X
    binary = np.all((columns == 0) | (columns == 1), axis=0)
    horizons = arrays.get("horizons", np.zeros(0))
    cumhaz = np.full(len(horizons), np.nan)
    if plan["model"]["kind"] == "cox" and len(horizons):
        time, event = outcome
        hazard = site_cox_baseline(X, time, event, arrays["beta"])
        for h, t in enumerate(horizons):
            if np.sum(time >= t) >= min_count:
                cumhaz[h] = float(hazard[hazard.index <= t].iloc[-1]) if (hazard.index <= t).any() else 0.0
        withheld = int(np.isnan(cumhaz).sum())
        if withheld:
            site_log(store.path, f"model '{plan['model']['name']}': baseline hazard withheld at {withheld} "
                     f"horizon(s) with fewer than {min_count} cases at risk")
    content = RecordDict({"arrays": arrays_record(
        n=np.array([len(ids)]), col_sum=columns.sum(axis=0), col_sumsq=(columns ** 2).sum(axis=0),
        col_binary=binary.astype(float), col_integer=np.all(columns == np.round(columns), axis=0).astype(float),
        col_nonnegative=np.all(columns >= 0, axis=0).astype(float),
        cumhaz=cumhaz)})
    values, designs = design_declarations(plan, X)
    return content, Disclosure(n_cases=len(ids), identifiers=frozenset(ids),
                               shared_axes=frozenset({columns.shape[1], len(horizons)}), values=values, designs=designs)
