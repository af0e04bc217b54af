"""Small cells inside a site's design: two-valued (0/1) model columns and designs as wide as the site.

A binary clinical column held by one patient makes that patient's row solvable from the sums a
site sends (its column sum counts them; at β = 0 the logistic Hessian row of the column is ¼ of
their design row and its gradient entry is y − ½). A design with p ≥ n − min_count columns lets
the Newton terms at the coordinator's points determine the rows. The guard refuses both, for
every message that sends sums over a design: model summaries (with CV folds), baseline/nomogram
sums, risk-set sums, select screens, ComBat moments and evaluate's calibration Newton terms.

The handlers are called on stores written here (features.parquet only), without Flower; one
test goes through the ClientApp to see what the coordinator is told.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from flwr.app import RecordDict

from fedrad.client.privacy import Disclosure, PrivacyRefusal, check_reply
from fedrad.client.site_evaluate import calibration_newton_reply
from fedrad.client.site_fit import baseline_reply, model_summaries_reply, risk_sets_reply
from fedrad.client.site_harmonise import moments_reply
from fedrad.client.site_select import select_sums_reply
from fedrad.client.store import FEATURES, FeatureStore
from fedrad.common.calibration import slope_design
from fedrad.common.penalised import site_fold_ids
from fedrad.common.study import parse_study

SITE = "siteB"
RARE = "value 1 held by fewer than min_count=5 cases"


# ---------------------------------------------------------------- stores and plans

def _table(n: int, columns: dict[str, np.ndarray], seed: int = 0, scanner=None) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    event = rng.integers(0, 2, size=n)
    event[: 2] = (1, 0)  # both outcomes present
    table = pd.DataFrame({"patient_id": [f"P{i:03d}" for i in range(n)],
                          "time": np.round(rng.exponential(30, size=n), 1) + 0.5, "event": event,
                          "scanner": scanner if scanner is not None else ["GE"] * n})
    for name, values in columns.items():
        table[name] = np.asarray(values, dtype=float)
    table["table__f0"] = rng.normal(100, 10, size=n)
    table["table__f1"] = rng.normal(5, 2, size=n)
    return table


def _store(path: Path, table: pd.DataFrame) -> FeatureStore:
    path.mkdir(parents=True, exist_ok=True)
    table.to_parquet(path / FEATURES, index=False)
    features = [c for c in table.columns if c.startswith("table__")]
    clinical = [c for c in table.columns if c not in features and c not in ("patient_id", "time", "event", "scanner")]
    return FeatureStore(path=path, meta={"columns": {"features": features, "clinical": clinical}}, features=table,
                        repeat=None, quarantine=pd.DataFrame())


def _fit_plan(kind: str, columns: list[str], cv_folds: int = 0, name: str = "m") -> dict:
    return {"model": {"name": name, "kind": kind, "seed": 0, "ties": "efron"}, "columns": list(columns),
            "data": "features", "reference": "", "time": "time", "event": "event", "binary_outcome": "event",
            "cv_folds": cv_folds}


def _width(kind: str, columns) -> int:
    return len(columns) + (kind == "logistic")


def _summaries(store, kind, columns, cv_folds=0, subsets=None):
    plan = _fit_plan(kind, columns, cv_folds)
    p = _width(kind, columns)
    if subsets is not None:
        plan["subsets"] = subsets
        points = np.zeros((1, len(subsets), p))
    else:
        points = np.zeros((cv_folds + 1 if cv_folds else 1, 1, p))
    return model_summaries_reply(store, plan, SITE, {"points": points})


def _baseline(store, kind, columns):
    plan = _fit_plan(kind, columns)
    return baseline_reply(store, plan, SITE, {"beta": np.zeros(_width(kind, columns)),
                                              "horizons": np.array([10.0])}, min_count=5)


def _risk_sets(store, kind, columns):
    grid = np.unique(store.features.loc[store.features["event"] == 1, "time"].to_numpy(float))
    return risk_sets_reply(store, _fit_plan("cox", columns), SITE, {"beta": np.zeros(len(columns)), "grid": grid},
                           allowed=True)


def _select(store, kind, columns):
    plan = {"features": list(columns), "outcome": kind, "ties": "efron", "time": "time", "event": "event",
            "binary_outcome": "event", "data": "features", "reference": ""}
    return select_sums_reply(store, plan, min_count=5)


def _combat(store, kind, columns, levels=("GE",)):
    study = parse_study({"study": {"stages": ["census", "harmonise"]},
                         "harmonise": {"batch": "scanner", "continuous": list(columns)}})
    plan = {"features": ["table__f0", "table__f1"],
            "design": {"batch_levels": list(levels), "categorical": {}, "continuous": list(columns)}}
    return moments_reply(store, plan, study, SITE)


def _calibration(store, kind, columns, beta=None):
    beta = np.full(_width(kind, columns), 0.3) if beta is None else np.asarray(beta, float)
    model = {"name": "m", "kind": kind, "columns": list(columns), "scores": {}, "external_scores": [],
             "binary_outcome": "event", "beta": beta.tolist(), "cumhaz_horizon": 0.2}
    plan = {"data": "features", "reference": "", "time": "time", "event": "event", "horizon": 10.0,
            "models": [model]}
    return calibration_newton_reply(store, plan, SITE, {"points": np.array([[0.0, 1.0]])})


def _refusal(reply, min_count=5) -> PrivacyRefusal | None:
    try:
        check_reply(*reply, min_count)
    except PrivacyRefusal as exc:
        return exc
    return None


# ---------------------------------------------------------------- item 6: binary columns

def _one_smoker(n=24):
    smoker = np.zeros(n)
    smoker[5] = 1
    return smoker


MESSAGES = {
    "cox summaries": lambda store, cols: _summaries(store, "cox", cols),
    "logistic summaries": lambda store, cols: _summaries(store, "logistic", cols),
    "univariate screen of candidates": lambda store, cols: _summaries(store, "logistic", cols,
                                                                      subsets=[[0, j + 1] for j in range(len(cols))]),
    "elastic-net folds": lambda store, cols: _summaries(store, "cox", cols, cv_folds=3),
    "cox baseline and nomogram sums": lambda store, cols: _baseline(store, "cox", cols),
    "logistic nomogram sums": lambda store, cols: _baseline(store, "logistic", cols),
    "risk-set sums": lambda store, cols: _risk_sets(store, "cox", cols),
    "select, cox screen": lambda store, cols: _select(store, "cox", cols),
    "select, logistic screen": lambda store, cols: _select(store, "logistic", cols),
    "ComBat moments": lambda store, cols: _combat(store, "cox", cols),
}


@pytest.mark.parametrize("message", list(MESSAGES))
def test_a_binary_column_held_by_one_patient_is_refused_by_every_message_that_sums_it(tmp_path, message):
    n = 24
    store = _store(tmp_path, _table(n, {"age": np.arange(n) + 40.0, "smoker": _one_smoker(n)}))
    refusal = _refusal(MESSAGES[message](store, ["age", "smoker"]))
    assert refusal is not None, f"{message}: a 0/1 column held by one patient was let out"
    assert f"column 'smoker': {RARE}" in str(refusal)
    assert "held by 1" not in str(refusal) and "held by 1" in refusal.detail  # the count stays at the site
    assert "'age'" not in str(refusal)  # a continuous column is not a two-valued one


@pytest.mark.parametrize("message", list(MESSAGES))
def test_a_binary_column_with_both_values_common_is_sent(tmp_path, message):
    n = 24
    smoker = np.r_[np.ones(7), np.zeros(n - 7)]
    store = _store(tmp_path, _table(n, {"age": np.arange(n) + 40.0, "smoker": np.random.default_rng(3).permutation(smoker)}))
    refusal = _refusal(MESSAGES[message](store, ["age", "smoker"]))
    if message == "elastic-net folds":  # 7 smokers over 3 folds: a held-out fold holds fewer than 5 of them
        assert refusal is not None and "(fold " in str(refusal) and "held-out): value 1 held by" in str(refusal)
    else:
        assert refusal is None, str(refusal)


def test_the_rare_value_may_be_zero_and_a_two_valued_column_need_not_be_coded_0_1(tmp_path):
    n = 24
    sex = np.where(np.arange(n) == 3, 1.0, 2.0)  # coded 1/2: one patient is 1
    store = _store(tmp_path, _table(n, {"almost_all": 1 - _one_smoker(n), "sex": sex}))
    message = str(_refusal(_baseline(store, "cox", ["almost_all", "sex"])))
    assert "column 'almost_all': value 0 held by fewer than min_count=5 cases" in message
    assert "column 'sex': its lower value held by fewer than min_count=5 cases" in message
    assert "1.0" not in message and "2.0" not in message  # never the value itself


def test_a_column_held_by_every_case_or_none_is_no_small_group(tmp_path):
    n = 24
    store = _store(tmp_path, _table(n, {"age": np.arange(n) + 40.0, "all": np.ones(n), "none": np.zeros(n)}))
    assert _refusal(_baseline(store, "cox", ["age", "all", "none"])) is None


def test_each_cv_fold_is_a_set_of_rows_the_sums_cover(tmp_path):
    """Training sums per fold go out, and the held-out rows' sums follow by difference with all rows."""
    n = 30
    table = _table(n, {"age": np.arange(n) + 40.0})
    folds = site_fold_ids(n, 3, 0, SITE, stratify=table["event"].to_numpy(float))
    smoker = np.zeros(n)
    smoker[np.flatnonzero(folds == 0)[:6]] = 1  # 6 smokers, all in fold 0: fold 0's training rows hold none ...
    smoker[np.flatnonzero(folds == 1)[0]] = 1   # ... and one in fold 1: 7 at the site, 1 held out in fold 1
    table["smoker"] = smoker
    store = _store(tmp_path, table)
    assert _refusal(_summaries(store, "cox", ["age", "smoker"])) is None  # no CV: 7 and 23 at the site
    message = str(_refusal(_summaries(store, "cox", ["age", "smoker"], cv_folds=3)))
    assert "column 'smoker' (fold 1 held-out): value 1 held by" in message
    assert "column 'smoker' (fold 0 training): value 1 held by" in message  # 7 - 6 = 1 smoker trains in fold 0


def test_a_logistic_screen_counts_only_the_cases_with_the_outcome(tmp_path):
    n = 24
    smoker = np.r_[np.ones(6), np.zeros(n - 6)]
    table = _table(n, {"smoker": smoker})
    table["event"] = table["event"].astype(float)
    table.loc[1:5, "event"] = np.nan  # five of the six smokers have no outcome
    table.loc[10:14, "event"] = np.nan
    store = _store(tmp_path, table)
    message = str(_refusal(_select(store, "logistic", ["smoker"])))
    assert "column 'smoker' (cases with the outcome): value 1 held by fewer than min_count=5 cases" in message


def test_a_model_of_one_binary_column_has_a_two_valued_calibration_design(tmp_path):
    n = 24
    store = _store(tmp_path, _table(n, {"age": np.arange(n) + 40.0, "smoker": _one_smoker(n)}))
    message = str(_refusal(_calibration(store, "logistic", ["smoker"])))
    assert "model 'm' calibration column 'logit(risk)': its higher value held by fewer than min_count" in message
    assert _refusal(_calibration(store, "logistic", ["age", "smoker"])) is None  # risk takes many values


def test_the_coordinator_is_told_the_column_and_the_site_log_the_count(tmp_path):
    from flwr.app import Context, Message
    from flwr.supercore.task_identity import TaskIdentity

    from fedrad.client.site_app import PRIVACY_REFUSED, app
    from fedrad.client.table_import import prepare_from_table
    from fedrad.common.messages import MODEL_BASELINE, request
    from tests.conftest import TEST_DATA
    from tests.federation.cohort import hospital_rows

    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1
    rows = hospital_rows(sizes={SITE: 24}).drop(columns="site")
    rows["smoker"] = _one_smoker(len(rows))
    csv = tmp_path / "site.csv"
    rows.to_csv(csv, index=False)
    prepare_from_table(csv, tmp_path / SITE, scanner_col="scanner", clinical_cols=["age", "sex", "smoker"],
                       params_path=TEST_DATA / "pyradiomics_baseline.yaml")
    plan = dict(_fit_plan("cox", ["age", "smoker"]), study=parse_study({}).model_dump(mode="json"))
    message = Message(request(plan, beta=np.zeros(2), horizons=np.array([10.0])), dst_node_id=3,
                      message_type=MODEL_BASELINE)
    context = Context(run_id=7, node_id=3, node_config={"store": str(tmp_path / SITE), "site-name": SITE},
                      state=RecordDict(), run_config={})
    reply = app(message, context)
    assert reply.has_error() and reply.error.code == PRIVACY_REFUSED
    assert reply.error.reason == f"{SITE}: privacy guard: column 'smoker': {RARE}"
    assert "column 'smoker': value 1 held by 1" in (tmp_path / SITE / "site.log").read_text(encoding="utf-8")


# ---------------------------------------------------------------- item 7: p against n

def test_as_many_model_columns_as_cases_is_refused(tmp_path):
    """The issue's case: 6 features at a 6-case site went out as grad (1,1,6) and hess (1,1,6,6)."""
    n = 6
    rng = np.random.default_rng(0)
    store = _store(tmp_path, _table(n, {f"x{j}": rng.normal(size=n) for j in range(6)}))
    columns = [f"x{j}" for j in range(6)]
    content, _ = reply = _summaries(store, "cox", columns)
    assert content["arrays"]["grad"].numpy().shape == (1, 1, 6)
    message = str(_refusal(reply))
    assert message.startswith("model 'm': 6 design column(s) against 6 cases at this site")
    assert "n - min_count" in message
    assert "6 design column(s) against 6 cases" in str(_refusal(_baseline(store, "cox", columns)))
    assert "6 design column(s) against 6 cases" in str(_refusal(_risk_sets(store, "cox", columns)))


@pytest.mark.parametrize("kind", ["cox", "logistic"])
def test_the_design_must_have_fewer_columns_than_the_cases_minus_min_count(tmp_path, kind):
    n, min_count = 24, 5
    rng = np.random.default_rng(1)
    store = _store(tmp_path, _table(n, {f"x{j:02d}": rng.normal(size=n) for j in range(20)}))
    widest = n - min_count - 1  # 18 design columns at 24 cases and min_count 5: allowed; 19: not
    for columns in (widest, widest + 1):
        names = [f"x{j:02d}" for j in range(columns - (kind == "logistic"))]  # the intercept is a column
        for reply in (_summaries(store, kind, names), _baseline(store, kind, names)):
            refusal = _refusal(reply, min_count)
            if columns <= widest:
                assert refusal is None, str(refusal)
            else:
                assert f"{columns} design column(s) against 24 cases" in str(refusal)
    # a univariate screen of all 20 candidates fits one column (and the intercept) at a time
    names = [f"x{j:02d}" for j in range(20)]
    subsets = [[0, j + 1] for j in range(20)] if kind == "logistic" else [[j] for j in range(20)]
    assert _refusal(_summaries(store, kind, names, subsets=subsets), min_count) is None


def test_rows_below_min_count_are_not_counted_in_the_design_rules_message():
    refusal = _refusal((RecordDict(), Disclosure(n_cases=30, designs={"model 'm' calibration": (2, 4)})), min_count=5)
    assert "against fewer than min_count=5 cases" in str(refusal) and " 4 " not in str(refusal)


def test_evaluate_calibration_and_combat_designs_are_held_to_the_same_rule(tmp_path):
    n, min_count = 8, 5  # n - min_count = 3
    rng = np.random.default_rng(2)
    store = _store(tmp_path, _table(n, {"a": rng.normal(size=n), "b": rng.normal(size=n)}))
    assert _refusal(_combat(store, "cox", ["a"]), min_count) is None  # batch + a: 2 columns
    # another site's batch levels are columns of zeros here: they do not count
    assert _refusal(_combat(store, "cox", ["a"], levels=("Canon", "GE", "Siemens")), min_count) is None
    assert "ComBat design (batch and covariates): 3 design column(s) against 8 cases" in str(
        _refusal(_combat(store, "cox", ["a", "b"]), min_count))
    assert _refusal(_calibration(store, "logistic", ["a", "b"]), min_count) is None  # (1, logit risk) at 8 rows
    small = _store(tmp_path / "small", _table(7, {"a": rng.normal(size=7), "b": rng.normal(size=7)}))
    assert "model 'm' calibration: 2 design column(s) against 7 cases" in str(
        _refusal(_calibration(small, "logistic", ["a", "b"]), min_count))


# ---------------------------------------------------------------- item 8: nothing can be solved

def test_a_binary_column_held_by_one_patient_does_give_that_patients_row(tmp_path):
    """Why the rule is needed: at β = 0 the logistic Hessian row of a column held by one patient is ¼ of
    that patient's design row and its gradient entry is y − ½. The guard refuses that reply."""
    n = 24
    rng = np.random.default_rng(4)
    table = _table(n, {"age": rng.normal(60, 10, size=n), "bmi": rng.normal(25, 4, size=n), "smoker": _one_smoker(n)})
    store = _store(tmp_path, table)
    content, _ = reply = _summaries(store, "logistic", ["age", "bmi", "smoker"])
    hess, grad = content["arrays"]["hess"].numpy()[0, 0], content["arrays"]["grad"].numpy()[0, 0]
    patient = table.iloc[5]
    np.testing.assert_allclose(-4 * hess[3], [1.0, patient["age"], patient["bmi"], 1.0], rtol=1e-12)
    assert grad[3] + 0.5 == pytest.approx(patient["event"])
    assert f"column 'smoker': {RARE}" in str(_refusal(reply))


def _rare_two_valued(matrix: np.ndarray, min_count: int) -> bool:
    """Some column takes exactly two values and one of them is held by 1..min_count-1 of the rows."""
    for column in np.asarray(matrix, float).reshape(len(matrix), -1).T:
        _, counts = np.unique(column, return_counts=True)
        if len(counts) == 2 and counts.min() < min_count:
            return True
    return False


def _random_site(rng, tmp_path: Path, seed: int):
    min_count = int(rng.integers(2, 6))
    n = int(rng.integers(min_count, 3 * min_count + 8))
    p = int(rng.integers(1, min(n + 2, 13)))  # up to more columns than cases
    columns = {}
    for j in range(p):
        if rng.random() < 0.3:  # binary, often with a rare value
            ones = int(rng.choice([0, 1, 2, min_count - 1, min_count, n // 2, n - 1, n]).clip(0, n))
            values = np.zeros(n)
            values[rng.choice(n, size=ones, replace=False)] = 1
            columns[f"c{j}"] = values if rng.random() < 0.8 else 1 + values  # sometimes coded 1/2
        else:
            columns[f"c{j}"] = np.round(rng.normal(50, 10, size=n), 1)
    table = _table(n, columns, seed=seed)
    return _store(tmp_path / f"s{seed}", table), table, list(columns), min_count


@pytest.mark.parametrize("kind", ["cox", "logistic"])
def test_no_reply_of_a_random_small_site_lets_a_row_be_solved(tmp_path, kind):
    """Over many random small sites and every message with sums over a design: the guard refuses exactly
    the replies from which a row could be solved (a two-valued column with a value held by fewer than
    min_count of the rows some sum covers, or p >= n - min_count), and lets every other reply out."""
    checked = refused = 0
    for seed in range(40):
        rng = np.random.default_rng(seed)
        store, table, names, min_count = _random_site(rng, tmp_path, seed)
        n = len(table)
        X = table[names].to_numpy(float)
        design = np.c_[np.ones(n), X] if kind == "logistic" else X
        cv = int(rng.choice([0, 3])) if n >= 3 * min_count else 0
        folds = site_fold_ids(n, cv, 0, SITE, stratify=table["event"].to_numpy(float))
        row_sets = [np.ones(n, bool)] + [rows for k in range(cv) for rows in (folds != k, folds == k)]
        small_fold = any(0 < np.sum(folds == k) < min_count for k in range(cv))
        cases = {
            "summaries": (lambda: _summaries(store, kind, names, cv_folds=cv),
                          any(_rare_two_valued(X[rows], min_count) for rows in row_sets) or small_fold,
                          design.shape[1]),
            "univariate": (lambda: _summaries(store, kind, names, subsets=[[0, j + 1] if kind == "logistic" else [j]
                                                                         for j in range(len(names))]),
                           _rare_two_valued(X, min_count), 1 + (kind == "logistic")),
            "baseline": (lambda: _baseline(store, kind, names), _rare_two_valued(X, min_count), design.shape[1]),
            "select": (lambda: _select(store, kind, names), _rare_two_valued(X, min_count), 0),
        }
        if kind == "cox":
            cases["risk sets"] = (lambda: _risk_sets(store, kind, names), _rare_two_valued(X, min_count), X.shape[1])
            used = 1 + int(np.any(X != 0, axis=0).sum())  # the one batch level here and the non-zero covariates
            cases["combat"] = (lambda: _combat(store, kind, names), _rare_two_valued(X, min_count), used)
        beta = rng.normal(0, 0.3, size=design.shape[1])
        lp = design @ beta
        if kind == "cox":
            time, event = table["time"].to_numpy(), table["event"].to_numpy(bool)
            known = (time >= 10.0) | event
            risk = (1 - np.exp(-0.2 * np.exp(lp)))[known]
        else:
            risk = 1 / (1 + np.exp(-lp))
        calibration = slope_design(risk)
        cases["calibration"] = (lambda: _calibration(store, kind, names, beta), _rare_two_valued(calibration[:, 1],
                                                                                                  min_count), 2)
        rows_of = {"calibration": len(risk)}
        for name, (build, rare, width) in cases.items():
            rows = rows_of.get(name, n)
            solvable = rare or (name != "select" and width >= rows - min_count) or rows < min_count
            refusal = _refusal(build(), min_count)
            assert (refusal is not None) == solvable, (seed, name, n, min_count, width, str(refusal))
            if refusal is not None:
                assert not any(f"held by {k} " in str(refusal) for k in range(1, min_count))
            checked += 1
            refused += refusal is not None
    assert 0.2 * checked < refused < 0.9 * checked  # the random sites exercise both outcomes
