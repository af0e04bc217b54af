"""The site's egress ledger: one JSON line per message that leaves the hospital.

``STORE/egress.jsonl`` is appended *before* a reply is handed to Flower, so a message that
is sent is always on the ledger (a crash between the two leaves an entry for a message
that never left, never the reverse). An IT admin reads it with ``fedrad ledger STORE``.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import pandas as pd
from flwr.app import RecordDict

from fedrad.common.messages import payload_bytes

LEDGER = "egress.jsonl"


def describe_content(content: RecordDict) -> list[dict]:
    """Name, kind, shape, dtype and bytes of everything in a reply."""
    items = []
    for record_name, record in content.array_records.items():
        for key, array in record.items():
            items.append({"name": f"{record_name}.{key}", "kind": "array", "shape": list(array.shape),
                          "dtype": array.dtype, "bytes": len(array.data)})
    for kind, records in (("metrics", content.metric_records), ("config", content.config_records)):
        for record_name, record in records.items():
            items.append({"name": record_name, "kind": kind, "keys": sorted(record.keys()),
                          "bytes": len(json.dumps({k: _plain(v) for k, v in record.items()}, default=str))})
    return items


def _plain(value):
    return value.hex() if isinstance(value, bytes) else value


def append_entry(store: Path, *, run_id: int, stage: str, message_type: str, content: RecordDict | None = None,
                 refusal: str | None = None) -> dict:
    """Record one outgoing message (a reply, or the refusal sent instead of it)."""
    if content is not None:
        body = payload_bytes(content)
        entry_items = describe_content(content)
    else:
        body = (refusal or "").encode()
        entry_items = [{"name": "error", "kind": "refusal", "bytes": len(body)}]
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "run": int(run_id),
        "stage": stage,
        "message_type": message_type,
        "status": "sent" if content is not None else "refused",
        "items": entry_items,
        "bytes": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
    }
    if refusal:
        entry["reason"] = refusal
    if content is not None and "metrics" in content and "dp_epsilon" in content["metrics"]:
        entry["dp_epsilon"] = float(content["metrics"]["dp_epsilon"])  # the site's privacy spent so far, in view
    line = json.dumps(entry) + "\n"
    path = Path(store) / LEDGER
    with open(path, "a", encoding="utf-8") as fh:  # one write() of one line: appends do not interleave
        fh.write(line)
        fh.flush()
        os.fsync(fh.fileno())
    return entry


def read_ledger(store: Path) -> pd.DataFrame:
    """The ledger as a table, one row per message (empty if nothing has left yet)."""
    path = Path(store) / LEDGER
    columns = ["time", "run", "stage", "message_type", "status", "arrays", "bytes", "sha256", "reason", "dp_epsilon"]
    if not path.is_file():
        return pd.DataFrame(columns=columns)
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            raise ValueError(f"{path}: line {number} is not valid JSON (the ledger was edited or truncated)") from None
        arrays = [f"{i['name']}{tuple(i['shape'])}" for i in entry["items"] if i["kind"] == "array"]
        rows.append({"time": entry["time"][:19].replace("T", " "), "run": entry["run"], "stage": entry["stage"],
                     "message_type": entry["message_type"], "status": entry["status"],
                     "arrays": " ".join(arrays), "bytes": entry["bytes"], "sha256": entry["sha256"][:12],
                     "reason": entry.get("reason", ""), "dp_epsilon": entry.get("dp_epsilon")})
    return pd.DataFrame(rows, columns=columns)
