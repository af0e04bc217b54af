"""`fedrad dashboard`: a live view of one run directory, read from its run log.

The page shows what the coordinator's run log (``RUN_DIR/runlog.sqlite``, server/runlog.py)
holds for the latest run in the directory: its stages with status and duration, every round
with each site's part in it (answered, failed with the reason, or still pending), bytes each
way per site, Newton convergence per model (log-likelihood and max |Δβ| per iteration), the
CNN's loss and validation C-index per round, privacy events (the sites' min-count refusals,
ε spent per site under DP-SGD) and a link to ``report.html`` once the run has written it. Once a run
has ended, the sites a stage finished without (its ``results.json``, server/summary.py's rule).

Server-rendered: the HTML comes from one function, :func:`render_live`, filling the autoescaped
Jinja2 templates in templates/ (dashboard_live.html; charts are inline SVG whose geometry is
computed here and drawn by chart.html), and ten lines of inline JavaScript in the page
(dashboard.html) fetch it again every 1.5 s while the run is going, so nothing is loaded from
anywhere else. ``/api/state`` is the same state as
JSON. The run log is opened read-only for each request, in one read transaction (WAL gives a
consistent snapshot while the ServerApp writes); a missing file or table means the run has
not started yet, never an error page.
"""

from __future__ import annotations

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

from markupsafe import Markup

from fedrad.client.report import template_environment
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
            "report": {"exists": modified is not None, "url": "report", "modified": modified}, "left_out": []}


def _left_out(run_dir: Path, run_id) -> list[str]:
    """The sites a stage of this (ended) run finished without, from its results.json (server/summary.py's rule)."""
    from fedrad.server.summary import left_out_lines

    try:
        results = json.loads((run_dir / RESULTS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return left_out_lines(results) if str(results.get("run_id")) == str(run_id) else []


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
        left_out=[] if running else _left_out(run_dir, run["run_id"]),
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
               log_y: bool = False) -> Markup:
    """An inline SVG line chart: one line per key of ``lines`` (``[[x, y], ...]``; None/NaN points and, with
    ``log_y``, non-positive ones are left out). Every point is a ``<circle>`` with ``data-series``,
    ``data-x`` and ``data-y`` (the value as drawn from), so tests and readers can count and check them.

    The geometry is computed here; templates/chart.html draws it, escaping every label."""
    keep = {k: [(x, y) for x, y in pts if y is not None and math.isfinite(y) and (y > 0 or not log_y)]
            for k, pts in lines.items()}
    keep = {k: pts for k, pts in keep.items() if pts}
    if not keep:
        return Markup(_TEMPLATES.get_template("chart.html").render(chart_id=chart_id, title=title, series=[]))
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

    x_ticks = [t for t in _ticks(x0, x1, 6) if float(t).is_integer()] or [x0, x1]
    if log_y:
        y_ticks = [10.0 ** e for e in range(math.ceil(y0), math.floor(y1) + 1)] or [10 ** y0, 10 ** y1]
        y_ticks = y_ticks[::max(1, len(y_ticks) // 6)]
    else:
        y_ticks = _ticks(y0, y1)
    series = [{"name": str(key), "colour": PALETTE[i % len(PALETTE)], "legend_y": top + 12 + 16 * i,
               "points": " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts),
               "circles": [(px(x), py(y), x, y) for x, y in pts]} for i, (key, pts) in enumerate(keep.items())]
    return Markup(_TEMPLATES.get_template("chart.html").render(
        chart_id=chart_id, title=title, x_label=x_label, y_label=y_label, log_y=log_y, width=width, height=height,
        left=left, top=top, plot_w=plot_w, plot_h=plot_h, series=series,
        x_ticks=[(px(t), int(t)) for t in x_ticks], y_ticks=[(py(t), t) for t in y_ticks]))


# --------------------------------------------------------------------------------------------- HTML

#: a site's part in a round, as the rounds table marks it
MARKS = {"answered": "✓", "failed": "✗", "pending": "…", "unanswered": "✗"}


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


#: the page, its live part and the charts: templates/dashboard*.html and chart.html, autoescaped
_TEMPLATES = template_environment(Path(__file__).with_name("templates"))
_TEMPLATES.filters.update(css=_css, size=_bytes, seconds=_seconds, clock=_clock, label=_label)
_TEMPLATES.globals.update(MARKS=MARKS, POLL_MS=POLL_MS, IDLE_POLL_MS=IDLE_POLL_MS, ROUNDS_SHOWN=ROUNDS_SHOWN)


def _charts(state: dict) -> dict:
    """The live part's charts (none for a part with no points: the template says so instead)."""
    newton, cnn = state["newton"], state["cnn"]
    charts = {"newton": [], "cnn": [], "epsilon": None}
    if newton:
        charts["newton"] = [
            line_chart("newton-loglik", "Log-likelihood per Newton iteration",
                       {m: v["loglik"] for m, v in newton.items()}, x_label="iteration", y_label="log-likelihood"),
            line_chart("newton-step", "Largest |Δβ| per Newton iteration", {m: v["step"] for m, v in newton.items()},
                       x_label="iteration", y_label="max |Δβ|", log_y=True)]
    if set(cnn) - {"dp_epsilon"}:
        val_loss = {**cnn.get("val_loss", {}), "case-weighted mean": cnn.get("val_loss_mean", {}).get("all", [])}
        charts["cnn"] = [
            line_chart("cnn-loss", "Training loss per site", cnn.get("loss", {}), y_label="loss"),
            line_chart("cnn-val-loss", "Validation loss of the global model", val_loss, y_label="loss"),
            line_chart("cnn-c-index", "Validation C-index per site", cnn.get("val_c_index", {}), y_label="C-index")]
    if state["privacy"]["epsilon"]:
        charts["epsilon"] = line_chart("cnn-epsilon", "ε spent per site", cnn.get("dp_epsilon", {}), y_label="ε")
    return charts


def render_live(state: dict) -> str:
    """The page's live part (``/fragment``; the page embeds it and the script swaps it)."""
    return _TEMPLATES.get_template("dashboard_live.html").render(state=state, charts=_charts(state))


def render_page(state: dict) -> str:
    return _TEMPLATES.get_template("dashboard.html").render(state=state, charts=_charts(state),
                                                            run_name=Path(state["run_dir"]).name)


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
            return HTMLResponse(_TEMPLATES.get_template("dashboard_no_report.html").render(report=REPORT,
                                                                                           run_dir=run_dir),
                                status_code=404, headers=no_store)
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
