"""The census refuses a study whose [sites] validation names a site that is not in the federation (a misspelt
hold-out site was accepted without a word, and the real one trained on). A federation of hand-made census
replies: no Flower."""

from __future__ import annotations

import pytest

from fedrad.common.study import parse_study
from fedrad.server.census import run_census
from fedrad.server.federation import Federation, RoundOutcome, StageFailed
from fedrad.server.runlog import RunLog


def _reply(name: str) -> dict:
    return {"site": {"name": name, "fedrad_version": "0", "params_hash": "p" * 64, "params_yaml": "",
                     "features": ["table__original_firstorder_F00"], "batch_levels": [], "small_batch_levels": [],
                     "problems": [], "harmonised_reference": "", "store_sha256": name * 4},
            "counts": {"batch_counts": [], "cases": 30, "events": 10, "quarantined": 0, "repeat_cases": 0,
                       "features_in_store": 1, "min_count": 5}}


class HandMade(Federation):
    """Nodes 11.. answer the census as the given sites; node 99 does not answer."""

    def __init__(self, runlog: RunLog, names: list[str]):
        super().__init__(grid=None, runlog=runlog, timeout_s=1)
        self.names = {11 + i: name for i, name in enumerate(names)}
        self.asked: list[str] = []

    def online(self) -> set[int]:
        return set(self.names) | {99}

    def ask(self, stage, round_no, message_type, requests, targets, traffic=None):
        self.asked.append(message_type)
        replies = {label: _reply(self.names[node]) for label, node in targets.items() if node in self.names}
        failures = {label: "no reply within 1 s" for label, node in targets.items() if node not in self.names}
        for label in targets:
            traffic.bytes_out[label], traffic.bytes_in[label] = 10, 20
        return RoundOutcome(replies=replies, failures=failures, seconds=0.1)


@pytest.fixture()
def runlog(tmp_path):
    log = RunLog(tmp_path / "runlog.sqlite", run_id=1)
    log.start_run("census")
    yield log
    log.close()


def test_an_unknown_validation_site_stops_the_study_naming_it_and_the_sites_present(runlog):
    study = parse_study({"sites": {"validation": ["site-D", "siteE"]}})
    fed = HandMade(runlog, ["siteA", "siteB", "siteC", "siteD"])
    with pytest.raises(StageFailed) as stopped:
        run_census(fed, study)
    message = str(stopped.value)
    assert message.startswith("census: [sites] validation names 'site-D', 'siteE', not a site of this federation")
    assert "present: 'node 99', 'siteA', 'siteB', 'siteC', 'siteD'" in message
    assert fed.asked == ["query.census"]  # nothing after the census was sent


def test_a_validation_site_of_the_federation_passes(runlog):
    study = parse_study({"sites": {"validation": ["siteC"]}})
    census = run_census(HandMade(runlog, ["siteA", "siteB", "siteC"]), study)
    assert sorted(census["sites"]) == ["siteA", "siteB", "siteC"]
