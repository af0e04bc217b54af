"""What travels between coordinator and sites: message types and record layout.

Every request carries the study and the coordinator's plan as JSON text in the
``ConfigRecord`` "plan", so a site that restarted mid-run (Flower keeps no state across a
SuperNode restart) can still answer. Arrays travel as float64 ``Array`` s (bit-exact); network
weights in their own dtype (float32), which is just as exact.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common.serde import recorddict_to_proto

from fedrad.common.errors import FedradError

CENSUS = "query.census"
COMBAT_MOMENTS = "query.combat_moments"
COMBAT_RESIDUALS = "query.combat_residuals"
COMBAT_ADJUST = "query.combat_adjust"
ZSCORE_APPLY = "query.zscore_apply"
COMBAT_VALIDATE = "query.combat_validate"
EVALUATE_THRESHOLDS = "query.evaluate_thresholds"
EVALUATE_METRICS = "query.evaluate_metrics"
EVALUATE_CALIBRATION = "query.evaluate_calibration"
TRAIN_CNN = "train.cnn"
CNN_SCORES = "query.cnn_scores"
TRAIN_SEG = "train.seg"
SEG_DICE = "query.seg_dice"
MODEL_SUMMARIES = "query.model_summaries"
SELECT_SUMS = "query.select_sums"
COX_EVENT_TIMES = "query.cox_event_times"
COX_RISK_SETS = "query.cox_risk_sets"
MODEL_BASELINE = "query.model_baseline"

#: per-site scalars of the evaluate stage, in this order, in each model's ``<model>__scalars`` array
EVALUATION_SCALARS = ("n", "events", "n_binary", "events_binary", "left_out", "c_index", "c_index_lo", "c_index_hi",
                      "uno_c", "auc", "auc_lo", "auc_hi", "auc_var", "brier_binary", "ibs", "hl_statistic", "hl_p",
                      "calibration_intercept", "calibration_slope", "sum_risk", "uno_c_lo", "uno_c_hi")

#: error codes of a site's own refusal (privacy guard) and failure (data or settings); any
#: other code is Flower's (node unavailable, ClientApp crashed, ...).
PRIVACY_REFUSED = 901
SITE_FAILED = 902

#: the stage each message type belongs to (the ledger names it).
STAGE_OF = {CENSUS: "census", COMBAT_MOMENTS: "harmonise", COMBAT_RESIDUALS: "harmonise",
            COMBAT_ADJUST: "harmonise", ZSCORE_APPLY: "harmonise", COMBAT_VALIDATE: "harmonise",
            EVALUATE_THRESHOLDS: "evaluate", EVALUATE_METRICS: "evaluate", EVALUATE_CALIBRATION: "evaluate",
            TRAIN_CNN: "train_cnn", CNN_SCORES: "train_cnn", TRAIN_SEG: "train_seg", SEG_DICE: "train_seg",
            MODEL_SUMMARIES: "fit",
            COX_EVENT_TIMES: "fit", COX_RISK_SETS: "fit", MODEL_BASELINE: "fit", SELECT_SUMS: "select"}


def arrays_record(**arrays) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v, dtype=np.float64)) for k, v in arrays.items()})


def record_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def weights_record(weights: dict) -> ArrayRecord:
    """Network weights in their own dtype (float32 for MONAI networks): exact, and half the bytes of float64."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in weights.items()})


def weights_id(weights: dict[str, np.ndarray]) -> str:
    """sha256 of a network's tensor names and float64 values: the same whatever the file format, dtype on the
    wire or key order, so a site, a package and a saved model can all name the network they hold."""
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode())
        h.update(np.ascontiguousarray(weights[name], dtype=np.float64).tobytes())
    return h.hexdigest()


def weights_request(plan: dict, weights: dict) -> RecordDict:
    content = request(plan)
    content["arrays"] = weights_record(weights)
    return content


def request(plan: dict, **arrays) -> RecordDict:
    content = RecordDict({"plan": ConfigRecord({"json": json.dumps(plan, sort_keys=True)})})
    if arrays:
        content["arrays"] = arrays_record(**arrays)
    return content


def request_plan(content: RecordDict) -> dict:
    return json.loads(content["plan"]["json"])


def payload_bytes(content: RecordDict) -> bytes:
    """A record as Flower serialises it (deterministic): what is sized, hashed and ledgered."""
    return recorddict_to_proto(content).SerializeToString(deterministic=True)


#: several requests in one message: independent fits that share their round trips (see server/shared_rounds.py)
BATCH = "query.batch"
_BATCH_RECORD = "batch"


def make_batch(parts: dict[str, tuple[str, RecordDict]]) -> RecordDict:
    """One message's content from ``{key: (message type, request content)}``; each part's records travel
    under ``"<key>.<record>"`` and the types in the ``"batch"`` record."""
    content = RecordDict({_BATCH_RECORD: ConfigRecord({"types": json.dumps({k: t for k, (t, _) in parts.items()})})})
    for key, (_, part) in parts.items():
        for name, record in part.items():
            content[f"{key}.{name}"] = record
    return content


def _prefixed(content: RecordDict, key: str) -> RecordDict:
    return RecordDict({name.split(".", 1)[1]: record for name, record in content.items()
                       if name.startswith(f"{key}.")})


def split_batch(content: RecordDict) -> dict[str, tuple[str, RecordDict]]:
    """The parts of :func:`make_batch`'s content."""
    if _BATCH_RECORD not in content or "types" not in content[_BATCH_RECORD]:
        raise FedradError("the coordinator's batch request names no parts")
    return {key: (message_type, _prefixed(content, key))
            for key, message_type in json.loads(content[_BATCH_RECORD]["types"]).items()}


def join_batch_reply(answers: dict) -> RecordDict:
    """A site's reply to a batch: each part's reply content, or its refusal (an ``Error``: code and reason)."""
    errors = {key: [int(a.code), str(a.reason)] for key, a in answers.items() if not isinstance(a, RecordDict)}
    reply = RecordDict({_BATCH_RECORD: ConfigRecord({"errors": json.dumps(errors)})})
    for key, answer in answers.items():
        if isinstance(answer, RecordDict):
            for name, record in answer.items():
                reply[f"{key}.{name}"] = record
    return reply


def split_batch_reply(content: RecordDict, keys) -> dict[str, RecordDict | tuple[int, str]]:
    """``{key: reply content, or (error code, reason)}`` of :func:`join_batch_reply`'s content."""
    errors = json.loads(content[_BATCH_RECORD]["errors"]) if _BATCH_RECORD in content else {}
    return {key: tuple(errors[key]) if key in errors else _prefixed(content, key) for key in keys}
