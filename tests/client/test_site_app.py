"""The site's ClientApp called directly (no server): guard, ledger and refusals.

Flower needs a task identity to build Messages outside a run (see notes/flower-1.41.md §1).
"""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedrad.client.ledger import read_ledger
from fedrad.client.privacy import Disclosure, PrivacyRefusal, check_reply, scrub
from fedrad.client.site_app import PRIVACY_REFUSED, SITE_FAILED, answer, app
from fedrad.common.errors import FedradError
from fedrad.common.messages import CENSUS, request
from fedrad.common.study import parse_study
from tests.federation.cohort import hospital_rows, write_stores


@pytest.fixture(autouse=True)
def task_identity():
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    table = hospital_rows()
    return write_stores(tmp_path_factory.mktemp("stores"), table[table["site"] == "siteB"])["siteB"]


def read_store_column(store, column):
    import pandas as pd

    return pd.read_parquet(store / "features.parquet")[column]


def _context(store, **extra):
    return Context(run_id=7, node_id=3, node_config={"store": str(store), "site-name": "siteB", **extra},
                   state=RecordDict(), run_config={})


def _census_message(**study):
    plan = {"study": parse_study(study).model_dump(mode="json")}
    return Message(request(plan), dst_node_id=3, message_type=CENSUS)


def test_census_reply_holds_counts_only_and_is_ledgered(store):
    before = len(read_ledger(store))
    reply = app(_census_message(harmonise={"batch": "scanner"}), _context(store))
    assert not reply.has_error()
    assert reply.content["counts"]["cases"] == 24
    assert list(reply.content["site"]["batch_levels"]) == ["Philips"]
    assert list(reply.content["counts"]["batch_counts"]) == [24]
    assert not reply.content.array_records  # no arrays at all in a census
    ledger = read_ledger(store)
    assert len(ledger) == before + 1 and ledger.iloc[-1]["message_type"] == CENSUS
    assert ledger.iloc[-1]["status"] == "sent"


def test_below_min_count_is_refused_scrubbed_and_ledgered(store):
    reply = app(_census_message(privacy={"min_count": 30}), _context(store))
    assert reply.has_error() and reply.error.code == PRIVACY_REFUSED
    assert "fewer cases than min_count=30" in reply.error.reason and "24" not in reply.error.reason
    assert read_ledger(store).iloc[-1]["status"] == "refused"
    assert "24 case(s); min_count is 30" in (store / "site.log").read_text(encoding="utf-8")  # the count stays at the site


def test_site_minimum_overrides_a_lower_study_minimum(store):
    reply = app(_census_message(privacy={"min_count": 5}), _context(store, **{"min-count": 25}))
    assert reply.has_error() and "min_count=25" in reply.error.reason


def test_the_census_reports_each_sites_effective_minimum(store):
    from fedrad.server.census import _public, _site_info

    higher_at_site = app(_census_message(privacy={"min_count": 5}), _context(store, **{"min-count": 10}))
    assert higher_at_site.content["counts"]["min_count"] == 10
    assert _public(_site_info(higher_at_site.content))["min_count"] == 10  # what results.json shows of the site
    higher_in_study = app(_census_message(privacy={"min_count": 7}), _context(store, **{"min-count": 3}))
    assert _site_info(higher_in_study.content)["min_count"] == 7


def test_per_patient_array_is_refused_before_it_leaves(store):
    def leak(store_, plan, study, site, min_count):
        y = store_.features.filter(like="__").to_numpy()
        return (RecordDict({"arrays": ArrayRecord({"y": Array(y)})}),
                Disclosure(n_cases=len(y), identifiers=frozenset(store_.features["patient_id"])))

    reply = answer(_census_message(), _context(store), leak)
    assert reply.has_error() and reply.error.code == PRIVACY_REFUSED
    assert "per-patient array" in reply.error.reason and "(24, 12)" in reply.error.reason
    last = read_ledger(store).iloc[-1]
    assert last["status"] == "refused" and "per-patient" in last["reason"]


def test_rare_category_level_is_withheld_and_excludes_the_site(store):
    reply = app(_census_message(harmonise={"categorical": ["sex"]}, privacy={"min_count": 12}), _context(store))
    sexes = read_store_column(store, "sex").value_counts()
    assert sexes.min() < 12 <= sexes.max()  # one level is rare at min_count 12
    assert list(reply.content["site"]["levels:sex"]) == [sexes.idxmax()]
    assert any("fewer than min_count=12" in p for p in reply.content["site"]["problems"])


def test_exception_text_that_could_quote_data_stays_at_the_site(store):
    reply = app(_census_message(outcome={"event": "sex"}), _context(store))
    assert reply.has_error() and "not numeric" in reply.error.reason

    def numpy_error(store_, plan, study, site, min_count):
        return float(store_.features["sex"].str.cat()), None  # ValueError quoting every patient's sex

    reply = answer(_census_message(), _context(store), numpy_error)
    assert reply.error.reason == "siteB: ValueError while answering query.census (details in the site's site.log)"


def test_malformed_request_is_refused_and_ledgered(store):
    before = len(read_ledger(store))
    reply = app(Message(request({"study": {}}), dst_node_id=3, message_type="query.combat_residuals"),
                _context(store))
    assert reply.has_error() and "carries no arrays" in reply.error.reason
    assert len(read_ledger(store)) == before + 1


def test_errors_never_carry_patient_ids(store):
    def fails(store_, plan, study, site, min_count):
        raise FedradError(f"no image for {store_.features['patient_id'].iloc[0]}")

    reply = answer(_census_message(), _context(store), fails)
    assert reply.has_error() and reply.error.code == SITE_FAILED
    assert "siteB-" not in reply.error.reason and "<case>" in reply.error.reason
    assert "siteB-" in (store / "site.log").read_text(encoding="utf-8")  # the site's own log has the detail


def test_guard_rules():
    ids = frozenset({"P12", "P13", "1"})
    ok = RecordDict({"a": ArrayRecord({"s": Array(np.ones((3, 4)))}), "m": MetricRecord({"n": 6}),
                     "c": ConfigRecord({"version": "0.1.0", "features": [f"f{i}" for i in range(6)]})})
    check_reply(ok, Disclosure(n_cases=6, groups={"batch 'GE'": 6}, identifiers=ids), min_count=5)
    with pytest.raises(PrivacyRefusal, match="fewer than min_count=5 cases: batch 'X'$"):
        check_reply(ok, Disclosure(n_cases=6, groups={"batch 'X'": 2}, identifiers=ids), min_count=5)
    with pytest.raises(PrivacyRefusal, match="per-patient"):
        check_reply(ok, Disclosure(n_cases=4, identifiers=ids), min_count=1)
    with pytest.raises(PrivacyRefusal, match="one per case"):
        check_reply(RecordDict({"m": MetricRecord({"ages": [50.0] * 6})}), Disclosure(n_cases=6), min_count=5)
    with pytest.raises(PrivacyRefusal, match="one per case"):
        check_reply(RecordDict({"c": ConfigRecord({"sex": ["F", "M", "M", "F", "F", "M"]})}), Disclosure(n_cases=6),
                    min_count=5)
    with pytest.raises(PrivacyRefusal, match="patient identifier"):
        check_reply(RecordDict({"c": ConfigRecord({"note": "worst case P12"})}),
                    Disclosure(n_cases=6, identifiers=ids), min_count=5)
    # an identifier inside a longer token (a hash) is not a match
    check_reply(RecordDict({"c": ConfigRecord({"h": "aP12b"})}), Disclosure(n_cases=6, identifiers=ids), min_count=5)
    assert scrub("P12 and P13, not aP12b", ids) == "<case> and <case>, not aP12b"


def test_event_times_leave_only_with_the_sites_consent(store):
    plan = {"study": parse_study({}).model_dump(mode="json"), "data": "features", "reference": "",
            "model": {"name": "cox_all", "kind": "cox", "seed": 0}, "columns": ["age"], "time": "time",
            "event": "event"}
    message = Message(request(plan), dst_node_id=3, message_type="query.cox_event_times")
    refused = app(message, _context(store))
    assert refused.has_error() and "has not allowed it" in refused.error.reason
    allowed = app(message, _context(store, **{"allow-event-times": "true"}))
    assert not allowed.has_error() and allowed.content["arrays"]["times"].numpy().ndim == 1


def test_declared_shared_axis_may_equal_the_case_count_but_a_per_case_axis_may_not():
    y = RecordDict({"a": ArrayRecord({"xty": Array(np.ones((3, 24)))})})
    with pytest.raises(PrivacyRefusal, match="per-patient"):
        check_reply(y, Disclosure(n_cases=24), min_count=5)
    check_reply(y, Disclosure(n_cases=24, shared_axes=frozenset({24})), min_count=5)  # 24 features, 24 cases


def test_select_withholds_icc_when_the_cases_without_a_repeat_are_too_few(tmp_path):
    import pandas as pd

    from fedrad.client.site_select import select_sums_reply
    from fedrad.client.store import open_store
    from tests.federation.cohort import hospital_rows, write_stores

    table = hospital_rows()
    store_path = write_stores(tmp_path, table[table["site"] == "siteB"])["siteB"]
    features = [c for c in pd.read_parquet(store_path / "features.parquet").columns if c.startswith("table__")]
    first = pd.read_parquet(store_path / "features.parquet")
    repeat = first[["patient_id"] + features].iloc[:21].copy()  # 21 of 24 cases repeated: 3 without
    repeat[features] += 0.01
    repeat.to_parquet(store_path / "features_repeat.parquet", index=False)
    plan = {"features": features, "outcome": "cox", "ties": "efron", "time": "time", "event": "event",
            "data": "features", "reference": ""}
    content, disclosure = select_sums_reply(open_store(store_path), plan, min_count=5)
    assert int(content["counts"]["icc_n"]) == 0 and "icc_ss_cases" not in content["arrays"]
    content, _ = select_sums_reply(open_store(store_path), plan, min_count=3)
    assert int(content["counts"]["icc_n"]) == 21


def test_a_store_changed_after_the_census_refuses_the_later_stages(tmp_path):
    """The site re-runs `prepare` between the census and the next stage: the next message is refused,
    with both row counts, and nothing is computed from the new store."""
    from fedrad.client.store_guard import CENSUS_DIR
    from fedrad.common.messages import SELECT_SUMS

    table = hospital_rows()
    rows = table[table["site"] == "siteB"]
    store = write_stores(tmp_path / "first", rows)["siteB"]
    context = _context(store)
    assert not app(_census_message(), context).has_error()
    assert (store / CENSUS_DIR / "run-7.json").is_file()
    plan = {"study": parse_study({}).model_dump(mode="json"), "features": ["table__original_firstorder_F00"]}
    write_stores(tmp_path / "again", rows.iloc[1:])  # the same site, one case fewer ...
    for name in ("features.parquet", "store.json", "quarantine.csv"):  # ... prepared into the same folder
        (store / name).write_bytes((tmp_path / "again" / "siteB" / name).read_bytes())
    reply = app(Message(request(plan), dst_node_id=3, message_type=SELECT_SUMS), context)
    assert reply.has_error() and reply.error.code == SITE_FAILED
    assert reply.error.reason.startswith(f"siteB: its feature store changed since this run's census ({len(rows)} → "
                                         f"{len(rows) - 1} rows, features.parquet ")
    assert read_ledger(store)["status"].tolist() == ["sent", "refused"]
    # another run's census takes the new store
    other = Context(run_id=8, node_id=3, node_config=context.node_config, state=RecordDict(), run_config={})
    assert not app(_census_message(), other).has_error()


def test_a_batch_is_answered_part_by_part_each_guarded_and_ledgered(store):
    """Independent fits share a message (server/shared_rounds.py); the site answers each part as if it
    had come alone: a refused part is that part's error, the others still answer, each is on the ledger."""
    from fedrad.common.messages import BATCH, TRAIN_CNN, make_batch, split_batch_reply

    plan = {"study": parse_study({}).model_dump(mode="json")}
    census = request(plan)
    no_arrays = request(plan)  # a combat_residuals request must carry arrays
    before = len(read_ledger(store))
    parts = {"0": (CENSUS, census), "1": ("query.combat_residuals", no_arrays), "2": (TRAIN_CNN, request(plan))}
    reply = app(Message(make_batch(parts), dst_node_id=3, message_type=BATCH), _context(store))
    assert not reply.has_error()
    answers = split_batch_reply(reply.content, ["0", "1", "2"])
    alone = app(Message(request(plan), dst_node_id=3, message_type=CENSUS), _context(store))
    assert answers["0"]["counts"]["cases"] == alone.content["counts"]["cases"] == 24
    assert answers["1"][0] == SITE_FAILED and "carries no arrays" in answers["1"][1]
    assert "cannot carry train.cnn" in answers["2"][1]  # weights never travel in a batch
    ledger = read_ledger(store).iloc[before:]
    assert list(ledger["message_type"]) == [CENSUS, "query.combat_residuals", CENSUS]  # the batch itself: never
    assert list(ledger["status"]) == ["sent", "refused", "sent"]
