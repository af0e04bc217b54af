"""The coordinator's side of a round trip: send one message type to sites, collect every answer.

Flower's ``send_and_receive`` gives replies without saying which site failed; here every
message is pushed, its id kept, and each reply or error mapped back to the site through
``reply_to_message_id`` (a dead node's error comes from the SuperLink, node id 1, so the
sender is useless). A site that is offline, errors, refuses or stays silent past the
timeout is a named failure; the caller decides whether enough sites answered.

A reply can be lost without an error: a SuperNode that cannot write it to a busy SuperLink
("database is locked") drops it, a task whose runtime died before it started never answers.
So a query a site has not answered after ``resend_after_s`` is sent to it again (at most
twice), and the first reply to any copy is taken. Queries are safe to repeat: a site's answer
is a deterministic function of its store and the request, so a second answer discloses
nothing new (both are on its ledger). Training messages are never repeated (a DP-SGD round
spends privacy budget).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from logging import INFO, WARNING

import httpx
import numpy as np

from flwr.app import Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_utils import ObjectPushError

from fedrad.common.errors import FedradError
from fedrad.common.messages import PRIVACY_REFUSED, SITE_FAILED, payload_bytes
from fedrad.server.runlog import RunLog

#: copies of an unanswered query sent after the first
MAX_RESENDS = 2
#: pushes of the same messages before their sites count as not reached
PUSH_ATTEMPTS = 3

#: seconds between pulls for replies (Flower's own loop sleeps 3 s): one small HTTP request to the SuperLink
PULL_INTERVAL_S = 0.1


class StageFailed(FedradError):
    """A stage could not finish (too few sites answered, or the data cannot support it)."""


@dataclass
class RoundOutcome:
    replies: dict[str, RecordDict]
    failures: dict[str, str]
    seconds: float
    #: labels whose failure is the site's own refusal (its reason starts with the site's name)
    refused_by_site: set[str] = field(default_factory=set)
    #: bytes of each site's request and of its reply (or refusal), as the traffic counts them
    bytes_out: dict[str, int] = field(default_factory=dict)
    bytes_in: dict[str, int] = field(default_factory=dict)


@dataclass
class StageTraffic:
    """Round trips and bytes of one stage, per site (what results.json reports)."""

    rounds: int = 0
    seconds: float = 0.0
    bytes_out: dict[str, int] = field(default_factory=dict)
    bytes_in: dict[str, int] = field(default_factory=dict)

    def summary(self) -> dict:
        return {"rounds": self.rounds, "seconds": round(self.seconds, 2),
                "bytes_to_site": dict(self.bytes_out), "bytes_from_site": dict(self.bytes_in)}


class Federation:
    """The grid, the run log, and which node is which site (filled in by the census)."""

    def __init__(self, grid: Grid, runlog: RunLog, timeout_s: float, resend_after_s: float | None = None):
        self.grid = grid
        self.runlog = runlog
        self.timeout_s = timeout_s
        self.resend_after_s = resend_after_s
        self.sites: dict[str, int] = {}
        #: each accepted site's features.parquet hash at the census: a site that rejoins must bring the same store
        self.store_hashes: dict[str, str] = {}

    def online(self) -> set[int]:
        return set(self.grid.get_node_ids())

    def wait_for_nodes(self, expected: int, wait_s: float) -> set[int]:
        """Wait until ``expected`` nodes are online or ``wait_s`` passes; return who is there."""
        deadline = time.monotonic() + wait_s
        nodes = self.online()
        while len(nodes) < expected and time.monotonic() < deadline:
            log(INFO, "waiting for sites: %d of %d connected", len(nodes), expected)
            time.sleep(2)
            nodes = self.online()
        return nodes

    def _push(self, build, stage: str, round_no: int) -> list[str | None]:
        """Message ids (None where not accepted) of the messages ``build()`` makes. A SuperLink under load can
        fail a push ("database is locked", an object-push session that expired): fresh copies are pushed
        again, three times in all, before their sites count as not reached; the study never stops on it."""
        for attempt in range(PUSH_ATTEMPTS):
            messages = build()
            if not messages:
                return []
            try:
                return list(self.grid.push_messages(messages))
            except (ObjectPushError, httpx.HTTPError) as exc:
                log(WARNING, "%s round %d: the SuperLink failed a push (%s: %s); attempt %d of %d", stage, round_no,
                    type(exc).__name__, str(exc)[:200], attempt + 1, PUSH_ATTEMPTS)
                time.sleep(1.0 + attempt)
        return [None] * len(messages)

    def ask(self, stage: str, round_no: int, message_type: str, requests: dict[str, RecordDict],
            targets: dict[str, int], traffic: StageTraffic | None = None) -> RoundOutcome:
        """Send ``requests[label]`` to node ``targets[label]``; wait for all answers (or the timeout)."""
        started = time.time()
        online = self.online()
        failures: dict[str, str] = {}
        labels = []
        for label in requests:
            if targets[label] not in online:
                failures[label] = "offline: its SuperNode is not connected to the SuperLink"
                continue
            labels.append(label)

        def messages_to(sites: list[str]) -> list[Message]:
            return [Message(requests[label], dst_node_id=targets[label], message_type=message_type,
                            group_id=f"{stage}-{round_no}") for label in sites]

        sizes = {label: len(payload_bytes(requests[label])) for label in labels}
        ids = self._push(lambda: messages_to(labels), stage, round_no)
        pending = {mid: label for mid, label in zip(ids, labels) if mid}
        for label in set(labels) - set(pending.values()):
            failures[label] = "the SuperLink did not accept the message"
        self.runlog.pending(stage, round_no, message_type, {label: targets[label] for label in pending.values()},
                            sizes)  # settled below, row by row, by runlog.exchange
        replies: dict[str, RecordDict] = {}
        refused_by_site: set[str] = set()
        received: dict[str, tuple[int, float]] = {}
        deadline = time.monotonic() + self.timeout_s
        resends = _Resends(self.resend_after_s if message_type.startswith("query") else None)
        while pending and time.monotonic() < deadline:
            for reply in self.grid.pull_messages(list(pending)):
                label = pending.pop(reply.metadata.reply_to_message_id, None)
                if label is None:
                    continue
                for mid in [m for m, other in pending.items() if other == label]:  # copies still out there
                    del pending[mid]
                if reply.has_error():
                    failures[label] = _reason(reply)
                    if reply.error.code in (PRIVACY_REFUSED, SITE_FAILED):
                        refused_by_site.add(label)
                    received[label] = (len(reply.error.reason.encode()), time.time() - started)
                else:
                    replies[label] = reply.content
                    received[label] = (len(payload_bytes(reply.content)), time.time() - started)
            if pending and resends.due():
                silent = sorted(set(pending.values()))
                for mid, label in zip(self._push(lambda: messages_to(silent), stage, round_no), silent):
                    if mid:
                        pending[mid] = label
                log(WARNING, "%s round %d: no reply yet from %s after %.0f s: asked again", stage, round_no,
                    ", ".join(silent), time.time() - started)
            if pending:
                time.sleep(PULL_INTERVAL_S)
        for label in set(pending.values()):
            failures[label] = f"no reply within {self.timeout_s:.0f} s" + (
                f" (asked {resends.sent + 1} times)" if resends.sent else "")
        seconds = time.time() - started
        for label in requests:
            status = "answered" if label in replies else "failed"
            nbytes_in, took = received.get(label, (0, seconds))
            self.runlog.exchange(stage, round_no, label, targets[label], status, failures.get(label, ""),
                                 sizes.get(label, 0), nbytes_in, took)
            if traffic is not None:
                traffic.bytes_out[label] = traffic.bytes_out.get(label, 0) + sizes.get(label, 0)
                traffic.bytes_in[label] = traffic.bytes_in.get(label, 0) + nbytes_in
        if traffic is not None:
            traffic.rounds += 1
            traffic.seconds += seconds
        self.runlog.round(stage, round_no, message_type, started, len(requests), len(replies))
        log(INFO, "%s round %d (%s): %d/%d sites answered in %.1f s", stage, round_no, message_type,
            len(replies), len(requests), seconds)
        for label, reason in failures.items():
            log(WARNING, "%s round %d: %s failed: %s", stage, round_no, label, reason)
        return RoundOutcome(replies=replies, failures=failures, seconds=seconds, refused_by_site=refused_by_site,
                            bytes_out={label: sizes.get(label, 0) for label in requests},
                            bytes_in={label: received.get(label, (0, 0.0))[0] for label in requests})


class _Resends:
    """When an unanswered query is due to be sent again: every ``after_s`` seconds, ``MAX_RESENDS`` times."""

    def __init__(self, after_s: float | None):
        self.after_s, self.sent = after_s, 0
        self._next = time.monotonic() + after_s if after_s else float("inf")

    def due(self) -> bool:
        if self.sent >= MAX_RESENDS or time.monotonic() < self._next:
            return False
        self.sent += 1
        self._next = time.monotonic() + self.after_s
        return True


def _reason(reply: Message) -> str:
    if reply.error.code == ErrorCode.NODE_UNAVAILABLE:
        return f"its SuperNode stopped responding mid-round (Flower: {reply.error.reason})"
    return reply.error.reason


def fedavg_round(fed: "Federation", stage: str, message_type: str, sites: list[str], plan: dict, round_no: int,
                 weights: dict, traffic: StageTraffic, min_sites: int) -> tuple[RoundOutcome, dict]:
    """One round of federated averaging: the global weights to every site, their replies, and the new
    global weights (Flower's ``aggregate_arrayrecords``, weighted by ``num-examples``). Fails the stage
    when fewer than ``min_sites`` answer, naming who did not and why."""
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    from fedrad.common.messages import record_arrays, weights_request

    outcome = fed.ask(stage, traffic.rounds + 1, message_type,
                      {s: weights_request({**plan, "round": round_no}, weights) for s in sites},
                      {s: fed.sites[s] for s in sites}, traffic)
    if len(outcome.replies) < min_sites:
        raise StageFailed(f"{stage}: round {round_no}: {len(outcome.replies)} site(s) answered, the study needs "
                          f"min_sites={min_sites}; " + "; ".join(f"{s}: {r}" for s, r in outcome.failures.items()))
    return outcome, record_arrays(aggregate_arrayrecords(list(outcome.replies.values()), "num-examples"))


def finite_or_none(value) -> float | None:
    """A site's scalar as results.json holds it: NaN (a withheld figure) becomes None."""
    return float(value) if value is not None and np.isfinite(value) else None


def case_weighted_mean(values: dict[str, float | None], cases: dict[str, int]) -> float | None:
    """Mean of the sites' figures weighted by their case counts, over the sites that reported one."""
    weighted = [(cases[s], v) for s, v in values.items() if v is not None and cases.get(s, 0) > 0]
    total = sum(n for n, _ in weighted)
    return sum(n * v for n, v in weighted) / total if total else None
