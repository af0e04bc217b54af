"""The Flower ClientApp a site runs: one handler per message type, all behind the guard.

The SuperNode's node config names the site's store and label::

    flower-supernode ... --node-config 'store="/data/fedrad-store" site-name="sarcoma-centre-a"'

Optional ``min-count=10`` raises the site's own minimum above the study's (never lowers it).
Every reply passes the privacy guard and is written to ``STORE/egress.jsonl`` before it
leaves; a refusal or error goes back instead, scrubbed of patient identifiers, and is on the
ledger too. Details the site's staff need (with patient ids) go to ``STORE/site.log``.
"""

from __future__ import annotations

import traceback
from pathlib import Path

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp

from fedrad.client.ledger import append_entry
from fedrad.client.privacy import PrivacyRefusal, check_reply, scrub
from fedrad.client.site_census import census_reply
from fedrad.client.site_data import site_log
from fedrad.client.site_select import select_sums_reply
from fedrad.client.site_cnn import scores_reply, train_reply
from fedrad.client.site_seg import dice_reply as seg_dice_reply, train_reply as seg_train_reply
from fedrad.client.site_evaluate import calibration_newton_reply, metrics_reply, thresholds_reply
from fedrad.client.site_fit import baseline_reply, event_times_reply, model_summaries_reply, risk_sets_reply
from fedrad.client.site_harmonise import adjust_reply, moments_reply, residuals_reply, validate_reply, zscore_reply
from fedrad.client.store import open_store
from fedrad.client.store_guard import check_unchanged, remember_census
from fedrad.common import schemas
from fedrad.common.errors import FedradError
from fedrad.common.messages import (CENSUS, CNN_SCORES, COMBAT_ADJUST, COMBAT_MOMENTS, COMBAT_RESIDUALS,
                                    COMBAT_VALIDATE, COX_EVENT_TIMES, COX_RISK_SETS, EVALUATE_CALIBRATION,
                                    EVALUATE_METRICS, EVALUATE_THRESHOLDS, MODEL_BASELINE, MODEL_SUMMARIES,
                                    PRIVACY_REFUSED, SELECT_SUMS, SEG_DICE, SITE_FAILED, STAGE_OF, TRAIN_CNN,
                                    TRAIN_SEG, ZSCORE_APPLY, join_batch_reply, record_arrays, request_plan,
                                    split_batch)
from fedrad.common.study import parse_study

app = ClientApp()


def site_settings(node_config) -> tuple[Path, str, int]:
    if "store" not in node_config:
        raise FedradError("this SuperNode has no 'store' in its --node-config; start it with `fedrad site join`")
    store = Path(str(node_config["store"]))
    return store, str(node_config.get("site-name") or store.name), int(node_config.get("min-count", 0))


def answer(msg: Message, context: Context, build) -> Message:
    """Run ``build(store, plan, study, site, min_count) -> (content, disclosure)``, guard, ledger, reply."""
    return Message(guarded(msg.metadata.message_type, msg.content, context, build), reply_to=msg)


def guarded(message_type: str, request_content: RecordDict, context: Context, build) -> RecordDict | Error:
    """The reply content (or the refusal) of one request, guarded and on the ledger.

    Everything that reads the request or the store happens inside the guarded block, so any
    failure becomes a ledgered refusal. Only fedrad's own messages (which name fields and
    settings, never values) go to the coordinator; any other exception's text could quote
    data (numpy quotes the offending cell), so the coordinator gets its type only and the
    site's log gets the rest.
    """
    stage = STAGE_OF.get(message_type, message_type)
    store_path, site, identifiers = None, str(context.node_config.get("site-name", "site")), frozenset()
    try:
        store_path, site, site_min = site_settings(context.node_config)
        plan = request_plan(request_content)
        study = parse_study(plan.pop("study"), source="the coordinator's study")  # handlers read the parsed study
        min_count = max(study.privacy.min_count, site_min)
        store = open_store(store_path)
        if message_type == CENSUS:
            remember_census(store_path, context.run_id)
        else:
            check_unchanged(store_path, context.run_id)
        identifiers = frozenset(store.features[schemas.ID].astype(str))
        content, disclosure = build(store, plan, study, site, min_count)
        check_reply(content, disclosure, min_count)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a scrubbed, ledgered refusal
        privacy = isinstance(exc, PrivacyRefusal)
        if isinstance(exc, FedradError):
            public = f"{'privacy guard: ' if privacy else ''}{exc}"
        else:
            public = f"{type(exc).__name__} while answering {message_type} (details in the site's site.log)"
        reason = scrub(f"{site}: {public}", identifiers)
        if store_path is not None and store_path.is_dir():
            site_log(store_path, f"{message_type} refused: {getattr(exc, 'detail', exc)}\n"
                     + ("" if isinstance(exc, FedradError) else traceback.format_exc()))
            append_entry(store_path, run_id=context.run_id, stage=stage, message_type=message_type, refusal=reason)
        return Error(code=PRIVACY_REFUSED if privacy else SITE_FAILED, reason=reason)
    append_entry(store_path, run_id=context.run_id, stage=stage, message_type=message_type, content=content)
    return content


def _arrays(content: RecordDict, message_type: str) -> dict:
    if "arrays" not in content:
        raise FedradError(f"the coordinator's {message_type} request carries no arrays")
    return record_arrays(content["arrays"])


def _allows_event_times(context: Context) -> bool:
    return str(context.node_config.get("allow-event-times", "false")).lower() == "true"


#: message type -> ``(request content, context) -> build`` (see :func:`answer`); one entry per Flower handler
BUILDS = {
    CENSUS: lambda content, context: lambda store, plan, study, site, min_count:
        census_reply(store, study, site, min_count),
    COMBAT_MOMENTS: lambda content, context: lambda store, plan, study, site, min_count:
        moments_reply(store, plan, study, site),
    COMBAT_RESIDUALS: lambda content, context: lambda store, plan, study, site, min_count:
        residuals_reply(store, plan, study, site, _arrays(content, COMBAT_RESIDUALS)),
    COMBAT_ADJUST: lambda content, context: lambda store, plan, study, site, min_count:
        adjust_reply(store, plan, study, site, _arrays(content, COMBAT_ADJUST), context.run_id),
    ZSCORE_APPLY: lambda content, context: lambda store, plan, study, site, min_count:
        zscore_reply(store, plan, _arrays(content, ZSCORE_APPLY), context.run_id),
    COMBAT_VALIDATE: lambda content, context: lambda store, plan, study, site, min_count:
        validate_reply(store, plan, study, site, _arrays(content, COMBAT_VALIDATE), context.run_id),
    MODEL_SUMMARIES: lambda content, context: lambda store, plan, study, site, min_count:
        model_summaries_reply(store, plan, site, _arrays(content, MODEL_SUMMARIES)),
    MODEL_BASELINE: lambda content, context: lambda store, plan, study, site, min_count:
        baseline_reply(store, plan, site, _arrays(content, MODEL_BASELINE), min_count),
    COX_EVENT_TIMES: lambda content, context: lambda store, plan, study, site, min_count:
        event_times_reply(store, plan, site, _allows_event_times(context)),
    COX_RISK_SETS: lambda content, context: lambda store, plan, study, site, min_count:
        risk_sets_reply(store, plan, site, _arrays(content, COX_RISK_SETS), _allows_event_times(context)),
    SELECT_SUMS: lambda content, context: lambda store, plan, study, site, min_count:
        select_sums_reply(store, plan, min_count),
    EVALUATE_THRESHOLDS: lambda content, context: lambda store, plan, study, site, min_count:
        thresholds_reply(store, plan, site),
    EVALUATE_METRICS: lambda content, context: lambda store, plan, study, site, min_count:
        metrics_reply(store, plan, site, min_count),
    EVALUATE_CALIBRATION: lambda content, context: lambda store, plan, study, site, min_count:
        calibration_newton_reply(store, plan, site, _arrays(content, EVALUATE_CALIBRATION)),
    TRAIN_CNN: lambda content, context: lambda store, plan, study, site, min_count:
        train_reply(store, plan, study, site, _arrays(content, TRAIN_CNN), min_count, context.run_id),
    CNN_SCORES: lambda content, context: lambda store, plan, study, site, min_count:
        scores_reply(store, plan, study, site, _arrays(content, CNN_SCORES)),
    TRAIN_SEG: lambda content, context: lambda store, plan, study, site, min_count:
        seg_train_reply(store, plan, study, site, _arrays(content, TRAIN_SEG), min_count),
    SEG_DICE: lambda content, context: lambda store, plan, study, site, min_count:
        seg_dice_reply(store, plan, study, site, _arrays(content, SEG_DICE), min_count),
}
#: what a batch may hold: the aggregate queries (never training, whose replies are weights)
BATCHABLE = frozenset(t for t in BUILDS if t.startswith("query."))


def _handler(message_type: str):
    def handle(msg: Message, context: Context) -> Message:
        return answer(msg, context, BUILDS[message_type](msg.content, context))
    handle.__name__ = message_type.replace(".", "_")
    return handle


for _type in BUILDS:
    _kind, _action = _type.split(".")
    (app.train if _kind == "train" else app.query)(_action)(_handler(_type))


@app.query("batch")
def batch(msg: Message, context: Context) -> Message:
    """Several requests in one message (independent models fitted in the same round trips): each is
    answered, guarded and ledgered as if it had come alone; a refusal of one is that part's error only."""
    try:
        parts = split_batch(msg.content)
    except FedradError as exc:
        return Message(Error(code=SITE_FAILED, reason=f"{context.node_config.get('site-name', 'site')}: {exc}"),
                       reply_to=msg)
    answers = {}
    for key, (message_type, content) in parts.items():
        if message_type not in BATCHABLE:
            answers[key] = Error(code=SITE_FAILED, reason=f"a batch cannot carry {message_type}")
            continue
        answers[key] = guarded(message_type, content, context, BUILDS[message_type](content, context))
    return Message(join_batch_reply(answers), reply_to=msg)
