"""The coordinator's run log: SQLite under the run directory, read by `fedrad status`.

One row per run, stage, round and site exchange (bytes each way, how long, why it failed),
plus convergence figures, plus each finished stage's result keyed by its inputs (resume).
A round's exchanges are written as ``pending`` when its messages leave and updated when the
round ends; ``series`` holds per-round figures as they happen (Newton log-likelihood and
|Δβ|, CNN loss, C-index and ε per site). Readers open it while a run writes (WAL), which is
what the live dashboard (`fedrad dashboard`, server/dashboard.py) needs.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pandas as pd

RUNLOG = "runlog.sqlite"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (run_id TEXT, study TEXT, started REAL, ended REAL, status TEXT, detail TEXT);
CREATE TABLE IF NOT EXISTS stages (run_id TEXT, stage TEXT, started REAL, ended REAL, status TEXT,
                                   rounds INTEGER, detail TEXT);
CREATE TABLE IF NOT EXISTS rounds (run_id TEXT, stage TEXT, round INTEGER, message_type TEXT,
                                   started REAL, ended REAL, asked INTEGER, answered INTEGER);
CREATE TABLE IF NOT EXISTS exchanges (run_id TEXT, stage TEXT, round INTEGER, site TEXT, node_id TEXT,
                                      status TEXT, reason TEXT, bytes_out INTEGER, bytes_in INTEGER, seconds REAL);
CREATE TABLE IF NOT EXISTS figures (run_id TEXT, stage TEXT, name TEXT, value REAL);
CREATE TABLE IF NOT EXISTS series (run_id TEXT, stage TEXT, part TEXT, name TEXT, round INTEGER, site TEXT,
                                   value REAL, at REAL);
CREATE TABLE IF NOT EXISTS stage_results (stage TEXT PRIMARY KEY, input_key TEXT, run_id TEXT, finished REAL,
                                          result TEXT);
"""


class RunLog:
    def __init__(self, path: Path, run_id: int = 0):
        self.path = Path(path)
        self.run_id = str(run_id)  # Flower ids are unsigned 64-bit: beyond SQLite's INTEGER
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # shared by fits that run in threads (server/shared_rounds.py): SQLite here is serialized (threadsafety 3)
        self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def _insert(self, table: str, **values) -> None:
        columns = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        self._db.execute(f"INSERT INTO {table} ({columns}) VALUES ({marks})", tuple(values.values()))

    def start_run(self, study: str) -> None:
        self._close_abandoned_runs()
        self._insert("runs", run_id=self.run_id, study=study, started=time.time(), status="running")

    def _close_abandoned_runs(self) -> None:
        """A run whose ServerApp died with its SuperLink (SIGKILL, power cut) never wrote its end. The
        next run in the same directory marks it interrupted, so that no run, stage or reply stays
        'running' or 'pending' for ever in `fedrad status` and the dashboard."""
        abandoned = [row[0] for row in self._db.execute(
            "SELECT run_id FROM runs WHERE status='running' AND run_id != ?", (self.run_id,))]
        if not abandoned:
            return
        now, detail = time.time(), f"no end was recorded; run {self.run_id} started in this run directory"
        for run_id in abandoned:
            self._db.execute("UPDATE runs SET ended=?, status='interrupted', detail=? WHERE run_id=?",
                             (now, detail, run_id))
            self._db.execute("UPDATE stages SET ended=?, status='interrupted', detail=? "
                             "WHERE run_id=? AND status='running'", (now, detail, run_id))
            self._db.execute("UPDATE exchanges SET status='failed', reason=? WHERE run_id=? AND status='pending'",
                             (f"no reply before the run ended ({detail})", run_id))

    def end_run(self, status: str, detail: str = "") -> None:
        self._db.execute("UPDATE runs SET ended=?, status=?, detail=? WHERE run_id=?",
                         (time.time(), status, detail, self.run_id))

    def start_stage(self, stage: str) -> None:
        self._insert("stages", run_id=self.run_id, stage=stage, started=time.time(), status="running", rounds=0)

    def end_stage(self, stage: str, status: str, rounds: int, detail: str = "") -> None:
        self._db.execute("UPDATE stages SET ended=?, status=?, rounds=?, detail=? WHERE run_id=? AND stage=?",
                         (time.time(), status, rounds, detail, self.run_id, stage))

    def round(self, stage: str, round_no: int, message_type: str, started: float, asked: int, answered: int) -> None:
        self._insert("rounds", run_id=self.run_id, stage=stage, round=round_no, message_type=message_type,
                     started=started, ended=time.time(), asked=asked, answered=answered)

    def pending(self, stage: str, round_no: int, message_type: str, targets: dict[str, int],
                bytes_out: dict[str, int]) -> None:
        """A round's messages have left: one ``pending`` exchange per site, until `exchange` settles it."""
        for site, node_id in targets.items():
            self._insert("exchanges", run_id=self.run_id, stage=stage, round=round_no, site=site,
                         node_id=str(node_id), status="pending", reason=f"waiting for its reply to {message_type}",
                         bytes_out=bytes_out.get(site, 0), bytes_in=0, seconds=None)

    def exchange(self, stage: str, round_no: int, site: str, node_id: int, status: str, reason: str,
                 bytes_out: int, bytes_in: int, seconds: float) -> None:
        """How a site's exchange ended: updates its ``pending`` row if the round wrote one, else a new row."""
        settled = self._db.execute(
            "UPDATE exchanges SET node_id=?, status=?, reason=?, bytes_out=?, bytes_in=?, seconds=? WHERE rowid = "
            "(SELECT MAX(rowid) FROM exchanges WHERE run_id=? AND stage=? AND round=? AND site=? AND status='pending')",
            (str(node_id), status, reason, bytes_out, bytes_in, seconds, self.run_id, stage, round_no, site))
        if settled.rowcount == 0:
            self._insert("exchanges", run_id=self.run_id, stage=stage, round=round_no, site=site,
                         node_id=str(node_id), status=status, reason=reason, bytes_out=bytes_out, bytes_in=bytes_in,
                         seconds=seconds)

    def rename_site(self, stage: str, label: str, name: str) -> None:
        """Give a node's exchanges its site name once the census has learnt it."""
        self._db.execute("UPDATE exchanges SET site=? WHERE run_id=? AND stage=? AND site=?",
                         (name, self.run_id, stage, label))

    def count_rounds(self, stage: str) -> int:
        return self._db.execute("SELECT COUNT(*) FROM rounds WHERE run_id=? AND stage=?",
                                (self.run_id, stage)).fetchone()[0]

    def end_running_stages(self, status: str, detail: str = "") -> None:
        """A run that ends abruptly (stopped, its SuperLink gone) leaves no stage 'running'."""
        self._db.execute("UPDATE stages SET ended=?, status=?, detail=? WHERE run_id=? AND status='running'",
                         (time.time(), status, detail, self.run_id))

    def figure(self, stage: str, name: str, value: float) -> None:
        self._insert("figures", run_id=self.run_id, stage=stage, name=name, value=float(value))

    def series(self, stage: str, name: str, round_no: int, value: float | None, *, site: str = "",
               part: str = "") -> None:
        """One point of a per-round figure (``part``: e.g. the model a Newton iteration belongs to)."""
        self._insert("series", run_id=self.run_id, stage=stage, part=part, name=name, round=int(round_no),
                     site=site, value=None if value is None else float(value), at=time.time())

    def save_result(self, stage: str, input_key: str, result: dict) -> None:
        self._db.execute("INSERT OR REPLACE INTO stage_results VALUES (?, ?, ?, ?, ?)",
                         (stage, input_key, self.run_id, time.time(), json.dumps(result)))

    def load_result(self, stage: str) -> tuple[str, str, dict] | None:
        row = self._db.execute("SELECT input_key, run_id, result FROM stage_results WHERE stage=?",
                               (stage,)).fetchone()
        return None if row is None else (row[0], row[1], json.loads(row[2]))


def read_runlog(run_dir: Path) -> dict[str, pd.DataFrame]:
    """Every table of a run directory's log (for `fedrad status` and the dashboard)."""
    path = Path(run_dir) / RUNLOG
    if not path.is_file():
        raise FileNotFoundError(f"'{run_dir}' has no {RUNLOG}: not a fedrad run directory, or no run started yet")
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30) as db:
        return {t: pd.read_sql_query(f"SELECT * FROM {t}", db)
                for t in ("runs", "stages", "rounds", "exchanges", "figures")}
