"""`fedrad dashboard`: a live view of one run directory, read from its run log.

The page shows what the coordinator's run log (``RUN_DIR/runlog.sqlite``, server/runlog.py)
holds for the latest run in the directory: its stages with status and duration, every round
with each site's part in it (answered, failed with the reason, or still pending), bytes each
way per site, Newton convergence per model (log-likelihood and max |Δβ| per iteration), the
CNN's loss and validation C-index per round, privacy events (the sites' min-count refusals,
ε spent per site under DP-SGD) and a link to ``report.html`` once the run has written it.

Server-rendered: the HTML (charts are inline SVG drawn here) comes from one function,
:func:`render_live`, and ten lines of inline JavaScript fetch it again every 1.5 s while the
run is going, so nothing is loaded from anywhere else. ``/api/state`` is the same state as
JSON. The run log is opened read-only for each request, in one read transaction (WAL gives a
consistent snapshot while the ServerApp writes); a missing file or table means the run has
not started yet, never an error page.
"""

from __future__ import annotations

import html
import json
import math
import re
import sqlite3
import threading
import time
import tomllib
from collections import defaultdict, deque
from contextlib import contextmanager
from pathlib import Path

from fedrad.common.errors import FedradError
from fedrad.server.runlog import RUNLOG

__all__ = ["create_app", "read_state", "render_live", "line_chart", "DashboardServer", "DashboardError",
           "dashboard_beside"]

REPORT = "report.html"
RESULTS = "results.json"
STUDY = "study.toml"
#: how often the page asks again while a run is going (and, slower, once it has ended)
POLL_MS, IDLE_POLL_MS = 1500, 5000
#: rounds the page lists (newest first); /api/state has them all
ROUNDS_SHOWN = 40
#: a site's own refusal by its privacy guard: "<site>: privacy guard: ..." (client/privacy.py)
_PRIVACY = re.compile(r"^([\w.-]+): privacy guard\b")
_RUNNING = "running"
#: how RunLog.pending words a pending exchange: "waiting for its reply to <message type>"
_WAITING = "waiting for its reply to "


class DashboardError(FedradError):
    """The dashboard could not be served (the port is taken, or the server did not start)."""


# --------------------------------------------------------------------------------------------- state

def _rows(db: sqlite3.Connection, sql: str, args: tuple = ()) -> list[dict]:
    """Rows as dicts; a table that does not exist yet (the run log is being created) has none."""
    try:
        cursor = db.execute(sql, args)
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]


def _read_log(path: Path) -> dict[str, list[dict]] | None:
    """The latest run's rows of every table, or None when there is no run log (yet)."""
    if not path.is_file():
        return None
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5, isolation_level=None)
    try:
        db.execute("BEGIN")  # one snapshot for all tables
        runs = _rows(db, "SELECT rowid AS seq, * FROM runs ORDER BY rowid")
        if not runs:
            return {"runs": []}
        run_id = runs[-1]["run_id"]
        log = {"runs": runs}
        for table in ("stages", "rounds", "exchanges", "figures", "series"):
            log[table] = _rows(db, f"SELECT rowid AS seq, * FROM {table} WHERE run_id=? ORDER BY rowid", (run_id,))
        db.execute("COMMIT")
        return log
    finally:
        db.close()


def _study_settings(run_dir: Path) -> dict:
    """Planned stages, min_count and the ε budget from the run directory's study.toml (defaults if unreadable)."""
    from fedrad.common.study import STAGES, StudyInfo

    try:
        data = tomllib.loads((run_dir / STUDY).read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        data = {}
    stages = data.get("study", {}).get("stages", list(StudyInfo().stages))
    return {"stages": [s for s in STAGES if s in stages and s != "package"],  # package writes files, no rounds
            "min_count": data.get("privacy", {}).get("min_count", 5),
            "epsilon_budget": data.get("cnn", {}).get("privacy", {}).get("epsilon_budget")}


def _finite(value):
    return None if value is None or (isinstance(value, float) and not math.isfinite(value)) else value


def _stages(rows: list[dict], planned: list[str], running: bool, now: float) -> list[dict]:
    stages = []
    for row in rows:
        going = row["status"] == _RUNNING and running  # a stage left 'running' by a stopped run has no end
        end = row["ended"] if row["ended"] is not None else (now if going else None)
        stages.append({"stage": row["stage"], "status": row["status"], "started": row["started"],
                       "ended": row["ended"], "seconds": None if end is None else round(end - row["started"], 1),
                       "rounds": row["rounds"], "detail": row["detail"] or ""})
    logged = {s["stage"] for s in stages}
    stages += [{"stage": s, "status": "waiting" if running else "not run", "started": None, "ended": None,
                "seconds": None, "rounds": 0, "detail": ""} for s in planned if s not in logged]
    return stages


def _rounds(exchanges: list[dict], rounds: list[dict], running: bool) -> list[dict]:
    """Rounds in the order they happened, each with every site's exchange.

    A round's exchanges are consecutive rows of one (stage, round); a site seen twice starts the next
    round (round numbers restart within a stage, e.g. per model in `fit`). The k-th such group of a
    (stage, round) is the k-th ``rounds`` row of it; a group without one is still going.
    """
    groups: list[dict] = []
    for row in exchanges:
        group = groups[-1] if groups else None
        if group is None or (group["stage"], group["round"]) != (row["stage"], row["round"]) \
                or row["site"] in {s["site"] for s in group["sites"]}:
            group = {"stage": row["stage"], "round": row["round"], "sites": []}
            groups.append(group)
        status = row["status"] if row["status"] != "pending" or running else "unanswered"
        group["sites"].append({"site": row["site"], "status": status, "reason": row["reason"] or "",
                               "bytes_out": int(row["bytes_out"] or 0), "bytes_in": int(row["bytes_in"] or 0),
                               "seconds": _finite(row["seconds"])})
    ended: dict[tuple, deque] = defaultdict(deque)
    for row in rounds:
        if row["asked"]:
            ended[(row["stage"], row["round"])].append(row)
    out = []
    for group in groups:
        queue = ended[(group["stage"], group["round"])]
        done = queue.popleft() if queue else None
        counts = {k: sum(s["status"] == k for s in group["sites"]) for k in ("answered", "failed", "pending")}
        waiting = [s["reason"][len(_WAITING):] for s in group["sites"] if s["reason"].startswith(_WAITING)]
        out.append({"stage": group["stage"], "round": group["round"],
                    "message_type": done["message_type"] if done else (waiting[0] if waiting else ""),
                    "status": "done" if done and not counts["pending"] else "in progress",
                    "seconds": round(done["ended"] - done["started"], 1) if done else None,
                    "asked": len(group["sites"]), **counts, "sites": group["sites"]})
    return out


def _sites(exchanges: list[dict], running: bool) -> list[dict]:
    sites: dict[str, dict] = {}
    for row in exchanges:
        site = sites.setdefault(row["site"], {"site": row["site"], "answered": 0, "failed": 0, "pending": 0,
                                              "bytes_out": 0, "bytes_in": 0})
        status = row["status"] if row["status"] in ("answered", "failed") else "pending"
        if status == "pending" and not running:
            status = "failed"
        site[status] += 1
        site["bytes_out"] += int(row["bytes_out"] or 0)
        site["bytes_in"] += int(row["bytes_in"] or 0)
    return list(sites.values())


def _series(rows: list[dict], stage: str) -> dict[str, dict[str, list[list[float]]]]:
    """{name: {part or site: [[round, value], ...]}}; a round number that does not increase starts the line
    again (a model refitted without a dropped site), so each line is its latest attempt."""
    out: dict[str, dict[str, list]] = defaultdict(dict)
    for row in rows:
        if row["stage"] != stage:
            continue
        key = row["part"] or row["site"] or "all"
        line = out[row["name"]].setdefault(key, [])
        if line and row["round"] <= line[-1][0]:
            line.clear()
        line.append([row["round"], _finite(row["value"])])
    return {name: dict(lines) for name, lines in out.items()}


def _privacy(exchanges: list[dict], cnn: dict, settings: dict) -> dict:
    refusals = []
    for row in exchanges:
        match = _PRIVACY.match(row["reason"] or "") if row["status"] == "failed" else None
        if match:
            refusals.append({"stage": row["stage"], "round": row["round"], "site": match.group(1),
                             "reason": row["reason"]})
    epsilon = {site: line[-1][1] for site, line in cnn.get("dp_epsilon", {}).items() if line}
    return {"min_count": settings["min_count"], "refusals": refusals, "epsilon": epsilon,
            "epsilon_budget": settings["epsilon_budget"]}


def _empty_state(run_dir: Path, now: float) -> dict:
    report = run_dir / REPORT
    modified = report.stat().st_mtime if report.is_file() else None
    return {"run_dir": str(run_dir), "now": now, "phase": "waiting", "message": "waiting for the run to start",
            "run": None, "runs": 0, "planned": [], "stages": [], "rounds": [], "sites": [], "newton": {}, "cnn": {},
            "privacy": {"min_count": None, "refusals": [], "epsilon": {}, "epsilon_budget": None},
            "report": {"exists": modified is not None, "url": "report", "modified": modified}}


def read_state(run_dir: Path, *, now: float | None = None) -> dict:
    """Everything the page shows, as JSON-able data (``/api/state``).

    ``phase`` is ``waiting`` (no run log or no run yet), ``unreadable`` (the log could not be read just
    now; the next poll tries again) or the latest run's status (``running``, ``completed``, ``failed``,
    ``interrupted``).
    """
    run_dir = Path(run_dir)
    now = time.time() if now is None else now
    state = _empty_state(run_dir, now)
    try:
        log = _read_log(run_dir / RUNLOG)
    except sqlite3.Error as exc:  # being created, locked past the timeout...: say so, try again next poll
        return {**state, "phase": "unreadable", "message": f"the run log could not be read just now ({exc}); "
                                                           "trying again"}
    if not log or not log["runs"]:
        return state
    settings = _study_settings(run_dir)
    run = log["runs"][-1]
    running = run["status"] == _RUNNING
    end = run["ended"] if run["ended"] is not None else now
    cnn = _series(log["series"], "train_cnn")
    state.update(
        phase=run["status"], message=f"study '{run['study']}': {run['status']}",
        run={"run_id": run["run_id"], "study": run["study"], "status": run["status"], "started": run["started"],
             "ended": run["ended"], "seconds": round(end - run["started"], 1), "detail": run["detail"] or ""},
        runs=len(log["runs"]),
        planned=settings["stages"],
        stages=_stages(log["stages"], settings["stages"], running, now),
        rounds=_rounds(log["exchanges"], log["rounds"], running),
        sites=_sites(log["exchanges"], running),
        newton=_newton(_series(log["series"], "fit")),
        cnn=cnn,
        privacy=_privacy(log["exchanges"], cnn, settings),
    )
    return state


def _newton(fit: dict) -> dict[str, dict]:
    """{model: {"loglik": [[evaluation, value], ...], "step": [...]}}."""
    models: dict[str, dict] = {}
    for name in ("loglik", "step"):
        for model, line in fit.get(name, {}).items():
            models.setdefault(model, {"loglik": [], "step": []})[name] = line
    return models


# --------------------------------------------------------------------------------------------- charts

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2")


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if high <= low:
        return [low]
    raw = (high - low) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _label(value: float) -> str:
    return f"{value:.4g}"


def line_chart(chart_id: str, title: str, lines: dict[str, list], *, x_label: str = "round", y_label: str = "",
               log_y: bool = False) -> str:
    """An inline SVG line chart: one line per key of ``lines`` (``[[x, y], ...]``; None/NaN points and, with
    ``log_y``, non-positive ones are left out). Every point is a ``<circle>`` with ``data-series``,
    ``data-x`` and ``data-y`` (the value as drawn from), so tests and readers can count and check them."""
    keep = {k: [(x, y) for x, y in pts if y is not None and math.isfinite(y) and (y > 0 or not log_y)]
            for k, pts in lines.items()}
    keep = {k: pts for k, pts in keep.items() if pts}
    head = f'<figure class="chart" id="{html.escape(chart_id)}"><figcaption>{html.escape(title)}</figcaption>'
    if not keep:
        return head + '<p class="note">no points yet</p></figure>'
    width, height, left, right, top, bottom = 470, 230, 62, 120, 10, 38
    xs = [x for pts in keep.values() for x, _ in pts]
    ys = [math.log10(y) if log_y else y for pts in keep.values() for _, y in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        pad = abs(y0) * 0.05 or 1.0
        y0, y1 = y0 - pad, y1 + pad
    plot_w, plot_h = width - left - right, height - top - bottom

    def px(x):
        return left + (x - x0) / (x1 - x0) * plot_w

    def py(y):
        return top + plot_h - ((math.log10(y) if log_y else y) - y0) / (y1 - y0) * plot_h

    parts = [f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
             f'aria-label="{html.escape(title)}">',
             f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fafbfc" stroke="#bbb"/>']
    x_ticks = [t for t in _ticks(x0, x1, 6) if float(t).is_integer()] or [x0, x1]
    for t in x_ticks:
        parts.append(f'<line x1="{px(t):.1f}" x2="{px(t):.1f}" y1="{top + plot_h}" y2="{top + plot_h + 4}" '
                     f'stroke="#888"/><text x="{px(t):.1f}" y="{top + plot_h + 16}" text-anchor="middle">'
                     f'{int(t)}</text>')
    if log_y:
        y_ticks = [10.0 ** e for e in range(math.ceil(y0), math.floor(y1) + 1)] or [10 ** y0, 10 ** y1]
        y_ticks = y_ticks[::max(1, len(y_ticks) // 6)]
    else:
        y_ticks = _ticks(y0, y1)
    for t in y_ticks:
        y = py(t)
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e3e6ea"/>'
                     f'<text x="{left - 5}" y="{y + 4:.1f}" text-anchor="end">{_label(t)}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.0f}" y="{height - 4}" text-anchor="middle">'
                 f'{html.escape(x_label)}</text>')
    if y_label:
        parts.append(f'<text transform="translate(12 {top + plot_h / 2:.0f}) rotate(-90)" text-anchor="middle">'
                     f'{html.escape(y_label)}{" (log scale)" if log_y else ""}</text>')
    for i, (key, pts) in enumerate(keep.items()):
        colour, name = PALETTE[i % len(PALETTE)], html.escape(str(key))
        path = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.8"/>')
        parts += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{colour}" data-series="{name}" '
                  f'data-x="{x}" data-y="{y!r}"><title>{name}: {x_label} {x}, {_label(y)}</title></circle>'
                  for x, y in pts]
        ly = top + 12 + 16 * i
        parts.append(f'<line x1="{left + plot_w + 10}" x2="{left + plot_w + 26}" y1="{ly - 4}" y2="{ly - 4}" '
                     f'stroke="{colour}" stroke-width="2"/><text x="{left + plot_w + 30}" y="{ly}">{name}</text>')
    return head + "".join(parts) + "</svg></figure>"


# --------------------------------------------------------------------------------------------- HTML

STYLE = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 1.2em auto; max-width: 1200px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.4em; border-bottom: 2px solid #345; margin-bottom: 0.3em; }
h2 { font-size: 1.1em; margin-top: 1.4em; border-bottom: 1px solid #bbb; }
table { border-collapse: collapse; font-size: 0.86em; margin: 0.4em 0; }
th, td { border: 1px solid #d5d9de; padding: 2px 7px; text-align: left; vertical-align: top; }
th { background: #eef2f5; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.note { color: #666; font-size: 0.88em; } .charts { display: flex; flex-wrap: wrap; gap: 1em; }
figure.chart { margin: 0; } figcaption { font-size: 0.9em; font-weight: 600; }
svg text { font-size: 10px; fill: #333; }
.status-running, .status-in-progress, .status-pending, .status-waiting { color: #b35900; font-weight: 600; }
.status-done, .status-completed, .status-answered { color: #1a7f37; }
.status-failed, .status-interrupted, .status-unanswered { color: #c62828; font-weight: 600; }
.status-skipped, .status-not-run { color: #666; }
.phase { display: inline-block; padding: 1px 8px; border-radius: 3px; background: #eef2f5; }
.cell-site { white-space: nowrap; } .reason { color: #c62828; }
.rounds { max-height: 420px; overflow-y: auto; display: inline-block; }
"""

SCRIPT = """
(function () {
  var live = document.getElementById("live"), conn = document.getElementById("conn"), last = null;
  function tick() {
    fetch("fragment", {cache: "no-store"}).then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (text) { if (text !== last) { live.innerHTML = text; last = text; } conn.textContent = ""; })
      .catch(function () { conn.textContent = "the dashboard server does not answer; trying again"; })
      .then(function () {
        var phase = (live.querySelector("[data-phase]") || {dataset: {}}).dataset.phase;
        setTimeout(tick, phase === "running" || phase === "waiting" || phase === "unreadable" ? %d : %d);
      });
  }
  setTimeout(tick, %d);
})();
""" % (POLL_MS, IDLE_POLL_MS, POLL_MS)


def _e(value) -> str:
    return html.escape("" if value is None else str(value))


def _css(status: str) -> str:
    return "status-" + re.sub(r"[^a-z]+", "-", str(status).lower().split(":")[0]).strip("-")


def _bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n} B"


def _seconds(s) -> str:
    if s is None:
        return ""
    return f"{s:.1f} s" if s < 120 else f"{int(s // 60)} min {s % 60:04.1f} s"


def _clock(t) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t)) if t else ""


def _header(state: dict) -> str:
    run = state["run"]
    phase = f'<span class="phase {_css(state["phase"])}" id="phase">{_e(state["phase"])}</span>'
    if run is None:
        return (f'<p data-phase="{_e(state["phase"])}">{phase} {_e(state["message"])} '
                f'(run directory {_e(state["run_dir"])}).</p>')
    earlier = f"; {state['runs'] - 1} earlier run(s) in this directory" if state["runs"] > 1 else ""
    detail = f'<p class="reason">{_e(run["detail"])}</p>' if run["detail"] else ""
    return (f'<p data-phase="{_e(state["phase"])}">Study <b>{_e(run["study"])}</b>, Flower run {_e(run["run_id"])}: '
            f'{phase}, started {_clock(run["started"])}, {_seconds(run["seconds"])} so far'
            f'{" (ended " + _clock(run["ended"]) + ")" if run["ended"] else ""}{earlier}.</p>{detail}')


def _report_link(state: dict) -> str:
    report = state["report"]
    if not report["exists"]:
        when = "when the run ends" if state["phase"] in ("running", "waiting") else "at the end of a run"
        return f'<p id="report" class="note">No report yet: report.html is written to the run directory {when}.</p>'
    older = " (from an earlier run: this one is still going)" if state["phase"] == "running" else ""
    return (f'<p id="report"><a id="report-link" href="{_e(report["url"])}" target="_blank">Study report</a>'
            f'{older}, written {_clock(report["modified"])}; results.json is beside it in the run directory.</p>')


def _stages_table(stages: list[dict]) -> str:
    if not stages:
        return '<p class="note">no stage has started yet</p>'
    rows = "".join(
        f'<tr data-stage="{_e(s["stage"])}" data-status="{_e(s["status"])}"><td>{_e(s["stage"])}</td>'
        f'<td class="status {_css(s["status"])}">{_e(s["status"])}</td>'
        f'<td class="num duration" data-seconds="{_e(s["seconds"])}">{_seconds(s["seconds"])}</td>'
        f'<td class="num">{_e(s["rounds"] or "")}</td><td>{_e(s["detail"])}</td></tr>' for s in stages)
    return ('<table id="stages"><tr><th>stage</th><th>status</th><th>duration</th><th>round trips</th>'
            f'<th>detail</th></tr>{rows}</table>')


def _sites_table(sites: list[dict]) -> str:
    if not sites:
        return '<p class="note">no message has been sent yet</p>'
    rows = "".join(
        f'<tr data-site="{_e(s["site"])}"><td>{_e(s["site"])}</td><td class="num">{s["answered"]}</td>'
        f'<td class="num">{s["failed"]}</td><td class="num">{s["pending"]}</td>'
        f'<td class="num bytes-out" data-bytes="{s["bytes_out"]}" title="{s["bytes_out"]} bytes">'
        f'{_bytes(s["bytes_out"])}</td>'
        f'<td class="num bytes-in" data-bytes="{s["bytes_in"]}" title="{s["bytes_in"]} bytes">'
        f'{_bytes(s["bytes_in"])}</td></tr>' for s in sites)
    return ('<table id="sites"><tr><th>site</th><th>answered</th><th>failed</th><th>pending</th>'
            f'<th>bytes to site</th><th>bytes from site</th></tr>{rows}</table>'
            '<p class="note">A site is named by its Flower node until the census has learnt its name.</p>')


def _site_cell(s: dict) -> str:
    mark = {"answered": "✓", "failed": "✗", "pending": "…", "unanswered": "✗"}.get(s["status"], "?")
    took = f", {_seconds(s['seconds'])}" if s["seconds"] is not None and s["status"] != "pending" else ""
    reason = f'<br><span class="reason">{_e(s["reason"])}</span>' if s["status"] in ("failed", "unanswered") \
        else ""
    return (f'<div class="cell-site" data-site="{_e(s["site"])}" data-status="{_e(s["status"])}">'
            f'<span class="{_css(s["status"])}">{mark} {_e(s["site"])}</span> '
            f'<span class="note">{_bytes(s["bytes_out"])} ↓ {_bytes(s["bytes_in"])} ↑{took}</span>{reason}</div>')


def _rounds_table(rounds: list[dict]) -> str:
    if not rounds:
        return '<p class="note">no round has started yet</p>'
    shown = rounds[::-1][:ROUNDS_SHOWN]
    rows = "".join(
        f'<tr data-stage="{_e(r["stage"])}" data-round="{r["round"]}" data-status="{_e(r["status"])}">'
        f'<td>{_e(r["stage"])}</td><td class="num">{r["round"]}</td><td>{_e(r["message_type"])}</td>'
        f'<td class="{_css(r["status"])}">{_e(r["status"])}</td><td class="num">{_seconds(r["seconds"])}</td>'
        f'<td class="num">{r["answered"]}/{r["asked"]}</td><td>{"".join(_site_cell(s) for s in r["sites"])}</td>'
        f'</tr>' for r in shown)
    more = f'<p class="note">the latest {ROUNDS_SHOWN} of {len(rounds)} rounds; all are in api/state</p>' \
        if len(rounds) > ROUNDS_SHOWN else ""
    return ('<div class="rounds"><table id="rounds"><tr><th>stage</th><th>round</th><th>message</th><th>status</th>'
            '<th>took</th><th>answered</th><th>sites (↓ to site, ↑ from site)</th></tr>'
            f'{rows}</table></div>{more}')


def _newton_section(newton: dict) -> str:
    if not newton:
        return '<p class="note">no Newton iteration yet (stage fit)</p>'
    loglik = {m: v["loglik"] for m, v in newton.items()}
    step = {m: v["step"] for m, v in newton.items()}
    counts = ", ".join(f"{_e(m)}: {len(v['loglik'])}" for m, v in newton.items())
    charts = [line_chart("newton-loglik", "Log-likelihood per Newton iteration", loglik, x_label="iteration",
                         y_label="log-likelihood"),
              line_chart("newton-step", "Largest |Δβ| per Newton iteration", step, x_label="iteration",
                         y_label="max |Δβ|", log_y=True)]
    return (f'<div class="charts">{"".join(charts)}</div><p class="note">Iterations (one round trip each) per '
            f'model: {counts}. Each model is fitted in turn; a model refitted after a site dropped out shows its '
            'latest attempt.</p>')


def _cnn_section(cnn: dict) -> str:
    if not set(cnn) - {"dp_epsilon"}:
        return '<p class="note">no CNN round yet (stage train_cnn)</p>'
    val_loss = {**cnn.get("val_loss", {}), "case-weighted mean": cnn.get("val_loss_mean", {}).get("all", [])}
    charts = [line_chart("cnn-loss", "Training loss per site", cnn.get("loss", {}), y_label="loss"),
              line_chart("cnn-val-loss", "Validation loss of the global model", val_loss, y_label="loss"),
              line_chart("cnn-c-index", "Validation C-index per site", cnn.get("val_c_index", {}), y_label="C-index")]
    return f'<div class="charts">{"".join(charts)}</div>'


def _privacy_section(privacy: dict, cnn: dict) -> str:
    parts = [f'<p>Every site refuses a reply computed from fewer than min_count = {_e(privacy["min_count"])} cases '
             '(or with a smaller subgroup); a refusal never states the count.</p>']
    if privacy["refusals"]:
        rows = "".join(f'<tr data-site="{_e(r["site"])}"><td>{_e(r["site"])}</td><td>{_e(r["stage"])}</td>'
                       f'<td class="num">{r["round"]}</td><td>{_e(r["reason"])}</td></tr>' for r in privacy["refusals"])
        parts.append('<table id="refusals"><tr><th>site</th><th>stage</th><th>round</th><th>refusal</th></tr>'
                     f'{rows}</table>')
    else:
        parts.append('<p class="note" id="refusals">no refusal so far</p>')
    if privacy["epsilon"]:
        budget = privacy["epsilon_budget"]
        rows = "".join(f'<tr data-site="{_e(s)}"><td>{_e(s)}</td><td class="num">{_label(e)}</td></tr>'
                       for s, e in privacy["epsilon"].items())
        parts.append(f'<table id="epsilon"><tr><th>site</th><th>ε spent (DP-SGD)</th></tr>{rows}</table>'
                     f'<p class="note">budget: {"none set" if budget is None else "ε = " + _label(budget)}</p>')
        parts.append(line_chart("cnn-epsilon", "ε spent per site", cnn.get("dp_epsilon", {}), y_label="ε"))
    else:
        parts.append('<p class="note">no differentially private training in this run (no ε to account)</p>')
    return "".join(parts)


def render_live(state: dict) -> str:
    """The page's live part (``/fragment``; the page embeds it and the script swaps it)."""
    if state["run"] is None:
        return _header(state) + _report_link(state)
    parts = [_header(state), _report_link(state),
             "<h2>Stages</h2>", _stages_table(state["stages"]),
             "<h2>Sites</h2>", _sites_table(state["sites"]),
             "<h2>Rounds</h2>", _rounds_table(state["rounds"])]
    if state["newton"] or "fit" in state["planned"]:
        parts += ["<h2>Newton convergence</h2>", _newton_section(state["newton"])]
    if set(state["cnn"]) - {"dp_epsilon"} or "train_cnn" in state["planned"]:
        parts += ["<h2>CNN training</h2>", _cnn_section(state["cnn"])]
    parts += ["<h2>Privacy</h2>", _privacy_section(state["privacy"], state["cnn"])]
    return "".join(parts)


def render_page(state: dict) -> str:
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>fedrad dashboard: {_e(Path(state['run_dir']).name)}</title><style>{STYLE}</style></head><body>"
            f"<h1>fedrad dashboard</h1><p class='note'>Run directory {_e(state['run_dir'])}; refreshed every "
            f"{POLL_MS / 1000:g} s while a run is going. <span id='conn' class='reason'></span></p>"
            f"<div id='live'>{render_live(state)}</div>"
            "<noscript><p class='note'>JavaScript is off: reload the page to update it.</p></noscript>"
            f"<script>{SCRIPT}</script></body></html>")


# --------------------------------------------------------------------------------------------- app

def create_app(run_dir: Path):
    """The dashboard of ``run_dir``: ``/`` (page), ``/fragment`` (its live part), ``/api/state`` (JSON),
    ``/report`` (report.html, or 404 with a sentence)."""
    from fastapi import FastAPI
    from fastapi.responses import FileResponse, HTMLResponse, Response

    run_dir = Path(run_dir).absolute()
    app = FastAPI(title="fedrad dashboard", docs_url=None, redoc_url=None, openapi_url=None)
    no_store = {"Cache-Control": "no-store"}

    def state() -> dict:
        try:
            return read_state(run_dir)
        except Exception as exc:  # noqa: BLE001 - a half-written log must not take the page down; say what broke
            return {**_empty_state(run_dir, time.time()), "phase": "unreadable",
                    "message": f"the run log could not be shown just now ({exc!r}); trying again"}

    @app.get("/", response_class=HTMLResponse)
    def page():
        return HTMLResponse(render_page(state()), headers=no_store)

    @app.get("/fragment", response_class=HTMLResponse)
    def fragment():
        return HTMLResponse(render_live(state()), headers=no_store)

    @app.get("/api/state")
    def api_state():
        return Response(json.dumps(state(), allow_nan=False), media_type="application/json", headers=no_store)

    @app.get("/report")
    def report():
        path = run_dir / REPORT
        if not path.is_file():
            return HTMLResponse(f"<p>No report yet: {REPORT} is written to {html.escape(str(run_dir))} when a run "
                                "ends.</p>", status_code=404, headers=no_store)
        return FileResponse(path, media_type="text/html", headers=no_store)

    return app


class DashboardServer:
    """The dashboard served by uvicorn in a daemon thread (beside `fedrad local`, or in tests).

    ``port=0`` takes a free port; :attr:`url` is the address it listens on once :meth:`start` returns.
    """

    def __init__(self, run_dir: Path, *, host: str = "127.0.0.1", port: int = 8765):
        import uvicorn

        self.host = host
        config = uvicorn.Config(create_app(run_dir), host=host, port=port, log_level="warning", lifespan="off",
                                access_log=False)
        self.server = uvicorn.Server(config)
        self.thread: threading.Thread | None = None

    def start(self, timeout_s: float = 15) -> "DashboardServer":
        self.thread = threading.Thread(target=self._serve, name="fedrad-dashboard", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise DashboardError(f"the dashboard could not listen on {self.host}:{self.server.config.port} "
                                     "(is the port taken? choose another with --dashboard-port / --port)")
            time.sleep(0.05)
        return self

    def _serve(self) -> None:
        try:
            self.server.run()
        except SystemExit:  # uvicorn exits when it cannot bind; start() reports it
            pass

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)

    def __enter__(self) -> "DashboardServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextmanager
def dashboard_beside(run_dir: Path, port: int, echo=print):
    """Serve the dashboard of ``run_dir`` on loopback for the duration of a `with` block."""
    with DashboardServer(run_dir, port=port) as server:
        echo(f"dashboard: {server.url} (stops when this command ends; `fedrad dashboard --run-dir {run_dir}` "
             "serves it again)")
        yield server
