"""A query whose reply was lost is asked again; the first reply to any copy is taken.

The loss itself (a SuperNode dropping a reply it could not write to a busy SuperLink) cannot be
caused on demand with real processes, so the coordinator's loop runs here against a grid that
loses the first copy to one site. tests/federation/test_warm_runtime.py shows, with real
processes, that a site asked twice answers twice, identically, and the study is unchanged.
"""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

import fedrad.server.federation as federation
from fedrad.server.federation import Federation
from fedrad.server.runlog import RunLog


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    TaskIdentity.run_id = TaskIdentity.node_id = TaskIdentity.task_id = 1
    monkeypatch.setattr(federation, "PULL_INTERVAL_S", 0.01)


class LosingGrid:
    """Nodes 11 and 12 answer every message at once, except that the first ``lose`` messages to node 12
    are never answered (their replies were dropped on the way)."""

    def __init__(self, lose: int):
        self.lose, self.pushed, self._replies = lose, [], {}

    def get_node_ids(self):
        return [11, 12]

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id
            self.pushed.append(msg)
            if msg.metadata.dst_node_id == 12 and self.lose:
                self.lose -= 1
            else:
                answer = RecordDict({"site": ConfigRecord({"node": msg.metadata.dst_node_id})})
                self._replies[msg.metadata.message_id] = Message(answer, reply_to=msg)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self._replies.pop(mid) for mid in list(message_ids) if mid in self._replies]


def _ask(tmp_path, grid, message_type="query.census", resend_after_s=0.2, timeout_s=5.0):
    fed = Federation(grid, RunLog(tmp_path / "runlog.sqlite"), timeout_s=timeout_s, resend_after_s=resend_after_s)
    requests = {site: RecordDict({"plan": ConfigRecord({"json": "{}"})}) for site in ("siteA", "siteB")}
    return fed.ask("census", 1, message_type, requests, {"siteA": 11, "siteB": 12})


def test_a_query_whose_reply_was_lost_is_asked_again_and_answered(tmp_path):
    grid = LosingGrid(lose=1)
    outcome = _ask(tmp_path, grid)
    assert not outcome.failures and outcome.replies["siteB"]["site"]["node"] == 12
    assert [m.metadata.dst_node_id for m in grid.pushed] == [11, 12, 12]  # siteB only, once more
    assert grid.pushed[2].content["plan"]["json"] == grid.pushed[1].content["plan"]["json"]  # the same request


def test_a_site_silent_to_every_copy_fails_after_the_timeout_naming_the_copies(tmp_path):
    grid = LosingGrid(lose=10)
    outcome = _ask(tmp_path, grid, timeout_s=1.0)
    assert outcome.failures == {"siteB": "no reply within 1 s (asked 3 times)"}
    assert sum(m.metadata.dst_node_id == 12 for m in grid.pushed) == 1 + federation.MAX_RESENDS


def test_training_is_never_asked_twice(tmp_path):
    grid = LosingGrid(lose=1)
    outcome = _ask(tmp_path, grid, message_type="train.cnn", timeout_s=1.0)
    assert "siteB" in outcome.failures and len(grid.pushed) == 2


class FailingPushGrid(LosingGrid):
    """A SuperLink under load: the first ``fail`` pushes raise what Flower raises when its object-push
    session expired."""

    def __init__(self, fail: int):
        super().__init__(lose=0)
        self.fail = fail

    def push_messages(self, messages):
        from flwr.supercore.inflatable.inflatable_utils import ObjectPushError

        if self.fail:
            self.fail -= 1
            raise ObjectPushError("390dc313", 1, "a055da3a")  # what a 30-site bench run met (file state)
        return super().push_messages(messages)


def test_a_failed_push_is_pushed_again_and_a_hopeless_one_fails_the_sites_not_the_study(tmp_path, monkeypatch):
    monkeypatch.setattr(federation.time, "sleep", lambda _: None)
    outcome = _ask(tmp_path, FailingPushGrid(fail=1))
    assert not outcome.failures and set(outcome.replies) == {"siteA", "siteB"}
    outcome = _ask(tmp_path, FailingPushGrid(fail=federation.PUSH_ATTEMPTS), timeout_s=1.0)
    assert outcome.failures == {"siteA": "the SuperLink did not accept the message",
                                "siteB": "the SuperLink did not accept the message"}
