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
        return self.ask_many([(message_type, requests, targets)], traffic)[0]

    def ask_many(self, asks: list[tuple[str, dict, dict]], traffic=None) -> list[RoundOutcome]:
        """Several requests of this fit in the same round trip (e.g. the last Newton evaluation and the
        baseline hazard at the same β): one outcome each, in order."""
        return self._shared._wait_for_round(self._key, [_Request(t, r, n, traffic) for t, r, n in asks])


class SharedRounds:
    """Run ``{key: fit(federation) -> result}`` together; ``traffic`` counts the stage's real round trips."""

    def __init__(self, fed: Federation, stage: str, traffic: StageTraffic):
        self.fed, self.stage, self.traffic = fed, stage, traffic
        self._changed = threading.Condition()
        self._running: set[str] = set()
        self._waiting: dict[str, list[_Request]] = {}
        self._answers: dict[str, list[RoundOutcome]] = {}

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

    def _wait_for_round(self, key: str, requests: list[_Request]) -> list[RoundOutcome]:
        with self._changed:
            self._waiting[key] = requests
            self._changed.notify_all()
            self._changed.wait_for(lambda: key in self._answers)
            return self._answers.pop(key)

    def _send(self, round_requests: dict[str, list[_Request]]) -> dict[str, list[RoundOutcome]]:
        round_no = self.traffic.rounds + 1
        parts = [(key, request) for key, requests in round_requests.items() for request in requests]
        if len(parts) == 1:
            (key, request), = parts
            outcome = self.fed.ask(self.stage, round_no, request.message_type, request.requests, request.targets,
                                   self.traffic)
            _count(request.traffic, outcome, outcome.bytes_out, outcome.bytes_in)
            return {key: [outcome]}
        labels = list(dict.fromkeys(label for _, r in parts for label in r.requests))
        contents = {label: make_batch({str(i): (r.message_type, r.requests[label])
                                       for i, (_, r) in enumerate(parts) if label in r.requests})
                    for label in labels}
        targets = {label: t for _, r in parts for label, t in r.targets.items()}
        outcome = self.fed.ask(self.stage, round_no, BATCH, contents, targets, self.traffic)
        answers: dict[str, list[RoundOutcome]] = {key: [] for key in round_requests}
        counted: set[int] = set()  # a fit with two parts in this round trip took one round trip
        for i, (key, request) in enumerate(parts):
            answers[key].append(self._part(outcome, str(i), request, counted))
        return answers

    @staticmethod
    def _part(outcome: RoundOutcome, part: str, request: _Request, counted: set[int]) -> RoundOutcome:
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
        first = id(request.traffic) not in counted
        counted.add(id(request.traffic))
        _count(request.traffic, own, {label: len(payload_bytes(c)) for label, c in request.requests.items()},
               {label: len(payload_bytes(c)) for label, c in replies.items()}, new_round=first)
        return own


def _count(traffic: StageTraffic | None, outcome: RoundOutcome, sent: dict[str, int], received: dict[str, int],
           new_round: bool = True):
    """A fit's own share of a round: one round trip (once, however many parts it sent), its parts' bytes."""
    if traffic is None:
        return
    if new_round:
        traffic.rounds += 1
        traffic.seconds += outcome.seconds
    for label, size in sent.items():
        traffic.bytes_out[label] = traffic.bytes_out.get(label, 0) + size
    for label, size in received.items():
        traffic.bytes_in[label] = traffic.bytes_in.get(label, 0) + size
