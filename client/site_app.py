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

from flwr.app import Context, Error, Message
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
from fedrad.common.messages import CENSUS, PRIVACY_REFUSED, SITE_FAILED, STAGE_OF, record_arrays, request_plan
from fedrad.common.study import parse_study

app = ClientApp()


def site_settings(node_config) -> tuple[Path, str, int]:
    if "store" not in node_config:
        raise FedradError("this SuperNode has no 'store' in its --node-config; start it with `fedrad site join`")
    store = Path(str(node_config["store"]))
    return store, str(node_config.get("site-name") or store.name), int(node_config.get("min-count", 0))


def answer(msg: Message, context: Context, build) -> Message:
    """Run ``build(store, plan, study, site, min_count) -> (content, disclosure)``, guard, ledger, reply.

    Everything that reads the request or the store happens inside the guarded block, so any
    failure becomes a ledgered refusal. Only fedrad's own messages (which name fields and
    settings, never values) go to the coordinator; any other exception's text could quote
    data (numpy quotes the offending cell), so the coordinator gets its type only and the
    site's log gets the rest.
    """
    message_type = msg.metadata.message_type
    stage = STAGE_OF.get(message_type, message_type)
    store_path, site, identifiers = None, str(context.node_config.get("site-name", "site")), frozenset()
    try:
        store_path, site, site_min = site_settings(context.node_config)
        plan = request_plan(msg.content)
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
        return Message(Error(code=PRIVACY_REFUSED if privacy else SITE_FAILED, reason=reason), reply_to=msg)
    append_entry(store_path, run_id=context.run_id, stage=stage, message_type=message_type, content=content)
    return Message(content, reply_to=msg)


def _arrays(msg: Message) -> dict:
    if "arrays" not in msg.content:
        raise FedradError(f"the coordinator's {msg.metadata.message_type} request carries no arrays")
    return record_arrays(msg.content["arrays"])


@app.query("census")
def census(msg: Message, context: Context) -> Message:
    return answer(msg, context, lambda store, plan, study, site, min_count:
                  census_reply(store, study, site, min_count))


@app.query("combat_moments")
def combat_moments(msg: Message, context: Context) -> Message:
    return answer(msg, context, lambda store, plan, study, site, min_count: moments_reply(store, plan, study, site))


@app.query("combat_residuals")
def combat_residuals(msg: Message, context: Context) -> Message:
    return answer(msg, context, lambda store, plan, study, site, min_count:
                  residuals_reply(store, plan, study, site, _arrays(msg)))


@app.query("combat_adjust")
def combat_adjust(msg: Message, context: Context) -> Message:
    return answer(msg, context, lambda store, plan, study, site, min_count:
                  adjust_reply(store, plan, study, site, _arrays(msg), context.run_id))


@app.query("zscore_apply")
def zscore_apply(msg: Message, context: Context) -> Message:
    return answer(msg, context, lambda store, plan, study, site, min_count:
                  zscore_reply(store, plan, _arrays(msg), context.run_id))


@app.query("combat_validate")
def combat_validate(msg: Message, context: Context) -> Message:
    return answer(msg, context, lambda store, plan, study, site, min_count:
                  validate_reply(store, plan, study, site, _arrays(msg), context.run_id))


@app.query("model_summaries")
def model_summaries(msg: Message, context: Context) -> Message:
    return answer(msg, context, lambda store, plan, study, site, min_count:
                  model_summaries_reply(store, plan, site, _arrays(msg)))


@app.query("model_baseline")
def model_baseline(msg: Message, context: Context) -> Message:
    return answer(msg, context, lambda store, plan, study, site, min_count:
                  baseline_reply(store, plan, site, _arrays(msg), min_count))


def _allows_event_times(context: Context) -> bool:
    return str(context.node_config.get("allow-event-times", "false")).lower() == "true"


@app.query("cox_event_times")
def cox_event_times(msg: Message, context: Context) -> Message:
    return answer(msg, context, lambda store, plan, study, site, min_count:
                  event_times_reply(store, plan, site, _allows_event_times(context)))


@app.query("cox_risk_sets")
def cox_risk_sets(msg: Message, context: Context) -> Message:
    return answer(msg, context, lambda store, plan, study, site, min_count:
                  risk_sets_reply(store, plan, site, _arrays(msg), _allows_event_times(context)))


@app.query("select_sums")
def select_sums(msg: Message, context: Context) -> Message:
    return answer(msg, context, lambda store, plan, study, site, min_count: select_sums_reply(store, plan, min_count))


@app.query("evaluate_thresholds")
def evaluate_thresholds(msg: Message, context: Context) -> Message:
    return answer(msg, context, lambda store, plan, study, site, min_count: thresholds_reply(store, plan, site))


@app.query("evaluate_metrics")
def evaluate_metrics(msg: Message, context: Context) -> Message:
    return answer(msg, context, lambda store, plan, study, site, min_count:
                  metrics_reply(store, plan, site, min_count))


@app.query("evaluate_calibration")
def evaluate_calibration(msg: Message, context: Context) -> Message:
    return answer(msg, context, lambda store, plan, study, site, min_count:
                  calibration_newton_reply(store, plan, site, _arrays(msg)))


@app.train("cnn")
def train_cnn(msg: Message, context: Context) -> Message:
    return answer(msg, context, lambda store, plan, study, site, min_count:
                  train_reply(store, plan, study, site, _arrays(msg), min_count, context.run_id))


@app.query("cnn_scores")
def cnn_scores(msg: Message, context: Context) -> Message:
    return answer(msg, context, lambda store, plan, study, site, min_count:
                  scores_reply(store, plan, study, site, _arrays(msg)))


@app.train("seg")
def train_seg(msg: Message, context: Context) -> Message:
    return answer(msg, context, lambda store, plan, study, site, min_count:
                  seg_train_reply(store, plan, study, site, _arrays(msg), min_count))


@app.query("seg_dice")
def seg_dice(msg: Message, context: Context) -> Message:
    return answer(msg, context, lambda store, plan, study, site, min_count:
                  seg_dice_reply(store, plan, study, site, _arrays(msg), min_count))
