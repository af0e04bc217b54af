"""Fits that do not depend on each other share their round trips.

The study's clinical model and its Rad-score are fitted from the same sites but neither needs
the other, so each round trip can carry both models' requests. Each fit runs in its own thread
and calls ``ask`` as if it had the federation to itself; once every fit still running is
waiting for a reply, the requests of that moment travel to each site as one ``query.batch``
message (a lone request travels as itself). A site answers every part as if it had come alone
(guard and ledger per part, `client/site_app.py`), so each fit sees exactly the replies it
would have seen, and its mathematics is unchanged; only the number of round trips falls, to
that of the longest fit.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from fedrad.common.messages import BATCH, make_batch, payload_bytes, split_batch_reply
from fedrad.server.federation import Federation, RoundOutcome, StageTraffic


@dataclass
class _Request:
    message_type: str
    requests: dict
    targets: dict
    traffic: StageTraffic | None


class _FitView:
    """What one fit sees: the federation, with ``ask`` going through the shared rounds."""

    def __init__(self, shared: "SharedRounds", key: str):
        self._shared, self._key = shared, key

    def __getattr__(self, name):
        return getattr(self._shared.fed, name)

    def ask(self, stage, round_no, message_type, requests, targets, traffic=None) -> RoundOutcome:
        return self._shared._wait_for_round(self._key, _Request(message_type, requests, targets, traffic))


class SharedRounds:
    """Run ``{key: fit(federation) -> result}`` together; ``traffic`` counts the stage's real round trips."""

    def __init__(self, fed: Federation, stage: str, traffic: StageTraffic):
        self.fed, self.stage, self.traffic = fed, stage, traffic
        self._changed = threading.Condition()
        self._running: set[str] = set()
        self._waiting: dict[str, _Request] = {}
        self._answers: dict[str, RoundOutcome] = {}

    def run(self, fits: dict) -> dict:
        """Every fit's result; the first fit's exception (in ``fits`` order) is raised once all have ended."""
        results, errors = {}, {}

        def work(key, fit):
            try:
                results[key] = fit(_FitView(self, key))
            except BaseException as exc:  # noqa: BLE001 - raised again below, in the caller's thread
                errors[key] = exc
            finally:
                with self._changed:
                    self._running.discard(key)
                    self._changed.notify_all()

        self._running = set(fits)
        threads = [threading.Thread(target=work, args=item, name=f"fit-{item[0]}", daemon=True)
                   for item in fits.items()]
        for thread in threads:
            thread.start()
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._running <= set(self._waiting))
                if not self._running:
                    break
                round_requests, self._waiting = self._waiting, {}
            answers = self._send(round_requests)
            with self._changed:
                self._answers.update(answers)
                self._changed.notify_all()
        for thread in threads:
            thread.join()
        for key in fits:
            if key in errors:
                raise errors[key]
        return results

    def _wait_for_round(self, key: str, request: _Request) -> RoundOutcome:
        with self._changed:
            self._waiting[key] = request
            self._changed.notify_all()
            self._changed.wait_for(lambda: key in self._answers)
            return self._answers.pop(key)

    def _send(self, round_requests: dict[str, _Request]) -> dict[str, RoundOutcome]:
        round_no = self.traffic.rounds + 1
        if len(round_requests) == 1:
            (key, request), = round_requests.items()
            outcome = self.fed.ask(self.stage, round_no, request.message_type, request.requests, request.targets,
                                   self.traffic)
            _count(request.traffic, outcome, {label: len(payload_bytes(c)) for label, c in request.requests.items()},
                   {label: len(payload_bytes(c)) for label, c in outcome.replies.items()})
            return {key: outcome}
        keys = list(round_requests)
        labels = list(dict.fromkeys(label for r in round_requests.values() for label in r.requests))
        contents = {label: make_batch({str(i): (round_requests[k].message_type, round_requests[k].requests[label])
                                       for i, k in enumerate(keys) if label in round_requests[k].requests})
                    for label in labels}
        targets = {label: t for r in round_requests.values() for label, t in r.targets.items()}
        outcome = self.fed.ask(self.stage, round_no, BATCH, contents, targets, self.traffic)
        return {k: self._part(outcome, str(i), round_requests[k]) for i, k in enumerate(keys)}

    @staticmethod
    def _part(outcome: RoundOutcome, part: str, request: _Request) -> RoundOutcome:
        """One fit's view of a batch round: its own part of every site's reply."""
        replies, failures, refused = {}, {}, set()
        for label in request.requests:
            if label in outcome.failures:  # the whole message failed (offline, silent, crashed)
                failures[label] = outcome.failures[label]
                if label in outcome.refused_by_site:
                    refused.add(label)
                continue
            answer = split_batch_reply(outcome.replies[label], [part])[part]
            if isinstance(answer, tuple):  # this part refused by the site
                failures[label] = answer[1]
                refused.add(label)
            else:
                replies[label] = answer
        own = RoundOutcome(replies=replies, failures=failures, seconds=outcome.seconds, refused_by_site=refused)
        _count(request.traffic, own, {label: len(payload_bytes(c)) for label, c in request.requests.items()},
               {label: len(payload_bytes(c)) for label, c in replies.items()})
        return own


def _count(traffic: StageTraffic | None, outcome: RoundOutcome, sent: dict[str, int], received: dict[str, int]):
    """A fit's own share of a round: one round trip, its parts' bytes."""
    if traffic is None:
        return
    traffic.rounds += 1
    traffic.seconds += outcome.seconds
    for label, size in sent.items():
        traffic.bytes_out[label] = traffic.bytes_out.get(label, 0) + size
    for label, size in received.items():
        traffic.bytes_in[label] = traffic.bytes_in.get(label, 0) + size
