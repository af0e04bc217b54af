"""Load: the harmonise stage and a Cox fit with 3, 10 and 30 SuperNodes on one machine, each N with
the sites' stock Flower runtime and with fedrad's warm runtime side by side (``--runtime``).

One SuperLink and N SuperNodes on loopback (`fedrad.server.local.LocalFederation`), small stores
(``--cases`` per site, ``--features`` radiomics-like columns, batch = site), one study:
census, harmonise (ComBat + z-scoring), fit (one Cox model stratified by site, 3 features).
The study waits for all N sites. While it runs, a thread samples every 0.25 s the RSS
(/proc/PID/status VmRSS) of the SuperLink, its flower-superexec and the flwr-serverapp it
starts, and of every SuperNode with its flower-superexec and flwr-clientapp processes, and
notes when each flwr-clientapp process starts (/proc/PID/stat) and was last seen.

Printed, per N: wall time, startup, seconds and round trips per stage, peak memory and the
load average; then per N and stage, where a round trip goes, from the run log and the
process samples:

- ``to_app_s``: round start -> the site's flwr-clientapp process starts (the SuperNode's 3 s
  poll for messages, then its SuperExec's 1 s poll for tasks, then the spawn)
- ``app_s``: the flwr-clientapp process's lifetime (interpreter + imports, the handler, exit),
  ``app_cpu_s`` its CPU seconds
- ``after_app_s``: the process has exited -> the ServerApp has the reply (the SuperNode's
  0.5 s reply poll and push, the ServerApp's 0.5 s pull)
- ``spread_s``: slowest minus fastest site reply within a round (stragglers)
- ``between_s``: stage time outside round trips, per round (the coordinator's own work)

The SuperLink keeps its state in memory here (``--state memory``, Flower's default), not in
the SQLite file `fedrad local` gives it (``--state file``): with 30 SuperNodes on this machine
that file was locked for longer than Flower's 5 s busy timeout ("database is locked" on
/v1/fleet/push-messages, HTTP 500); the SuperNode then drops its reply without retrying, and the
round waits for ``round_timeout_s`` and goes on without that site (harmonise restarts without
it). The run shows those as replies_dropped / db_locked. Absolute times depend on what else the
machine runs (see the load columns). Usage:

In the warm runtime (fedrad/client/warm_runtime.py) a site's "flwr-clientapp process" is a fork of its fork
server (the same accounting: its start, lifetime and CPU seconds); the fixed import cost below is what the fork
skips.

    .venv/bin/python bench/scale.py [--sites 3 10 30] [--runtime stock warm] [--cases 36] [--features 8] [--state memory file]
                                    [--site-nice 0] [--round-timeout-s 300]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' cohort builder

from fedrad.server.local import LocalFederation  # noqa: E402
from fedrad.server.runlog import read_runlog  # noqa: E402
from tests.federation.cohort import hospital_rows, write_stores  # noqa: E402

STUDY = """
[study]
name = "bench-scale"
stages = ["census", "harmonise", "fit"]

[harmonise]
batch = "site"

[[models]]
name = "cox"
kind = "cox"
features = ["table__original_firstorder_F00", "table__original_firstorder_F03", "table__original_firstorder_F05"]

[federation]
min_sites = 2
wait_for_sites_s = {wait_s}
round_timeout_s = {round_s}
"""
STAGES = ("census", "harmonise", "fit")
SAMPLE_S = 0.25
TICK = os.sysconf("SC_CLK_TCK")
BOOT = time.time() - float(Path("/proc/uptime").read_text(encoding="utf-8").split()[0])  # epoch of boot, ~10 ms


def _stat(pid: int) -> tuple[int, float, float] | None:
    """(parent pid, start epoch, CPU seconds) of a process; None once it is gone or a zombie
    (exited, not yet reaped by its parent)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] == "Z":
        return None
    return int(fields[1]), BOOT + int(fields[19]) / TICK, (int(fields[11]) + int(fields[12])) / TICK


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _pss_mb(pid: int) -> float:
    """Proportional set size: shared pages divided among the processes that share them."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text(encoding="utf-8").splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@dataclass
class AppProcess:
    """One flwr-clientapp process (one message at one site)."""

    site: str
    start: float
    last_seen: float
    cpu_s: float = 0.0
    rss_mb: float = 0.0


@dataclass
class Sampler:
    """Samples the federation's processes in a thread until ``stop()``."""

    superlink: int
    supernodes: dict[int, str]
    peak: dict[str, float] = field(default_factory=dict)
    apps: dict[tuple[int, float], AppProcess] = field(default_factory=dict)
    load: list[float] = field(default_factory=list)
    most_apps: int = 0
    samples: int = 0

    def __post_init__(self):
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._kinds: dict[tuple[int, float], str] = {}

    def start(self) -> "Sampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(SAMPLE_S)

    def _kind(self, key: tuple[int, float], ppid: int = 0) -> str:
        if key not in self._kinds:
            cmd = _cmdline(key[0])
            # the warm runtime's tasks are forks of its fork server: same command line, the fork server as parent
            forked_task = "--fork-server" in cmd and "--fork-server" in _cmdline(ppid)
            self._kinds[key] = ("serverapp" if "flwr-serverapp" in cmd
                                else "clientapp" if "flwr-clientapp" in cmd or forked_task
                                else "superexec" if "superexec" in cmd else "other")
        return self._kinds[key]

    def sample(self) -> None:
        now = time.time()
        stats = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and (st := _stat(int(entry.name))) is not None:
                stats[int(entry.name)] = st
        children: dict[int, list[int]] = {}
        for pid, (ppid, _, _) in stats.items():
            children.setdefault(ppid, []).append(pid)

        def below(root: int) -> list[int]:
            found, todo = [], [root]
            while todo:
                for child in children.get(todo.pop(), []):
                    found.append(child)
                    todo.append(child)
            return found

        mb = {"superlink": _rss_mb(self.superlink), "superlink_superexec": 0.0, "serverapp": 0.0, "sites": 0.0}
        for pid in below(self.superlink):
            kind = self._kind((pid, stats[pid][1]))
            mb["serverapp" if kind == "serverapp" else "superlink_superexec"] += _rss_mb(pid)
        mb["coordinator"] = mb["superlink"] + mb["superlink_superexec"] + mb["serverapp"]
        running = 0
        for node, site in self.supernodes.items():
            mb["sites"] += _rss_mb(node)
            for pid in below(node):
                rss = _rss_mb(pid)
                mb["sites"] += rss
                key = (pid, stats[pid][1])
                if self._kind(key, stats[pid][0]) == "clientapp":
                    running += 1
                    app = self.apps.setdefault(key, AppProcess(site, stats[pid][1], now))
                    app.last_seen, app.cpu_s, app.rss_mb = now, stats[pid][2], max(app.rss_mb, rss)
        self.most_apps = max(self.most_apps, running)
        if self.samples % 4 == 0:  # PSS once a second: smaps_rollup walks each process's page tables
            coordinator = [self.superlink] + below(self.superlink)
            sites = [p for node in self.supernodes for p in [node] + below(node)]
            mb["coordinator_pss"] = sum(map(_pss_mb, coordinator))
            mb["sites_pss"] = sum(map(_pss_mb, sites))
        self.samples += 1
        for name, value in mb.items():
            self.peak[name] = max(self.peak.get(name, 0.0), value)
        self.load.append(os.getloadavg()[0])


def import_cost(repeats: int = 3) -> tuple[float, float]:
    """Median wall and CPU seconds of a fresh interpreter importing what every flwr-clientapp
    process imports (the CPU figure does not depend on the machine's load; the wall one does)."""
    import resource

    code = "from flwr.supernode.cli import flwr_clientapp; import fedrad.client.site_app"
    walls, cpus = [], []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return statistics.median(walls), statistics.median(cpus)


def round_breakdown(log: dict[str, pd.DataFrame], apps: list[AppProcess]) -> pd.DataFrame:
    """Per stage: round trips, seconds per round trip, straggling, and the split of a site's reply time."""
    rounds = log["rounds"].assign(seconds=lambda r: r["ended"] - r["started"])
    exchanges = log["exchanges"].merge(rounds[["stage", "round", "started"]], on=["stage", "round"])
    by_site: dict[str, list[AppProcess]] = {}
    for app in apps:
        by_site.setdefault(app.site, []).append(app)
    split = []
    for ex in exchanges.itertuples():
        # this exchange's process: the site's flwr-clientapp that started while the site's reply was awaited
        match = [a for a in by_site.get(ex.site, []) if ex.started - 0.05 <= a.start <= ex.started + ex.seconds]
        if ex.status == "answered" and match:
            app = min(match, key=lambda a: a.start)
            split.append({"stage": ex.stage, "to_app_s": app.start - ex.started, "app_s": app.last_seen - app.start,
                          "app_cpu_s": app.cpu_s, "after_app_s": ex.seconds - (app.last_seen - ex.started)})
    split = pd.DataFrame(split, columns=["stage", "to_app_s", "app_s", "app_cpu_s", "after_app_s"])
    stages = log["stages"].set_index("stage")
    rows = []
    for stage in STAGES:
        r = rounds[rounds["stage"] == stage]
        if r.empty:
            continue
        answered = exchanges[(exchanges["stage"] == stage) & (exchanges["status"] == "answered")]
        spread = answered.groupby("round")["seconds"].agg(lambda s: s.max() - s.min())
        stage_s = stages.loc[stage, "ended"] - stages.loc[stage, "started"]
        s = split[split["stage"] == stage]
        rows.append({
            "stage": stage, "round_trips": len(r), "s_per_round": r["seconds"].mean(),
            "fastest_reply_s": answered.groupby("round")["seconds"].min().mean(),
            "spread_s": spread.mean(), "spread_max_s": spread.max(),
            "to_app_s": s["to_app_s"].mean(), "app_s": s["app_s"].mean(), "app_cpu_s": s["app_cpu_s"].mean(),
            "after_app_s": s["after_app_s"].mean(), "between_s": (stage_s - r["seconds"].sum()) / len(r),
            "matched": f"{len(s)}/{len(answered)}",
        })
    return pd.DataFrame(rows)


class BenchFederation(LocalFederation):
    """`LocalFederation`, optionally with the SuperLink's state in memory (Flower's default without
    ``--database``) rather than in an SQLite file, and the sites' processes at a lower CPU priority
    (``nice``), as if they ran on machines of their own rather than beside the coordinator."""

    def __init__(self, *args, memory_state: bool = False, site_nice: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.memory_state = memory_state
        self.site_nice = site_nice

    def _spawn(self, name: str, command: list[str], threads: int | None = None) -> None:
        if name == "superlink" and self.memory_state and "--database" in command:
            at = command.index("--database")
            command = command[:at] + command[at + 2:]
        if name.startswith(("site-", "exec-")) and self.site_nice:
            command = ["nice", "-n", str(self.site_nice)] + command  # nice execs: the pid is the SuperNode's
        super()._spawn(name, command, threads)


def bench(n_sites: int, cases: int, n_features: int, tmp: Path, wait_s: float, round_s: float,
          state: str, site_nice: int, runtime: str = "warm") -> tuple[dict, pd.DataFrame]:
    sizes = {f"site{i + 1:02d}": cases for i in range(n_sites)}
    stores = write_stores(tmp / f"stores{n_sites}", hospital_rows(seed=7, sizes=sizes, n_features=n_features))
    study = tmp / f"study{n_sites}.toml"
    study.write_text(STUDY.format(wait_s=wait_s, round_s=round_s), encoding="utf-8")
    run_dir = tmp / f"run{n_sites}"
    load_before = os.getloadavg()[0]
    started = time.time()
    sampler = None
    try:
        with BenchFederation(tmp / f"fed{n_sites}", stores, echo=lambda line: None, memory_state=state == "memory",
                             site_nice=site_nice, runtime=runtime) as fed:
            nodes = {fed.processes[f"{kind}-{s}"].pid: s for s in stores for kind in ("site", "exec")
                     if f"{kind}-{s}" in fed.processes}  # the warm runtime's SuperExec runs beside its SuperNode
            sampler = Sampler(fed.processes["superlink"].pid, nodes).start()
            spawned = time.time() - started
            results = fed.run_study(study, run_dir)
            sampler.stop()
    except Exception as exc:  # noqa: BLE001 - a failed size is a row of the table, not the end of the bench
        results = {"status": "failed", "error": f"{type(exc).__name__}: {exc}", "stages": {}}
        spawned = float("nan")
    finally:
        if sampler is not None and sampler._thread.is_alive():
            sampler.stop()
    wall = time.time() - started
    row = {"sites": n_sites, "runtime": runtime, "state": state, "nice": site_nice, "cases": n_sites * cases, "status": results["status"],
           "wall_s": wall, "spawn_s": spawned}
    breakdown = pd.DataFrame()
    try:
        log = read_runlog(run_dir)
    except FileNotFoundError:
        log = None
    if log is not None and not log["runs"].empty:
        run_start = log["runs"]["started"].iloc[0]
        census = log["stages"][log["stages"]["stage"] == "census"]
        row["submit_s"] = run_start - started - spawned
        if not census.empty:
            row["nodes_wait_s"] = census["started"].iloc[0] - run_start
            row["startup_s"] = census["started"].iloc[0] - started
        row["failed_exchanges"] = int((log["exchanges"]["status"] != "answered").sum())
        breakdown = round_breakdown(log, list(sampler.apps.values()) if sampler else [])
        breakdown.insert(0, "sites", n_sites)
        breakdown.insert(1, "state", state)
        breakdown.insert(2, "runtime", runtime)
    logs = tmp / f"fed{n_sites}" / "logs"
    # a SuperNode whose reply push fails (HTTP 500) drops the reply: the round then waits for its timeout
    row["replies_dropped"] = sum(p.read_text(errors="replace", encoding="utf-8").count("Failed to send message")
                                 for p in logs.glob("site-*.log"))
    row["db_locked"] = (logs / "superlink.log").read_text(errors="replace", encoding="utf-8").count("database is locked") \
        if (logs / "superlink.log").exists() else 0
    for stage in STAGES:
        info = results["stages"].get(stage, {})
        row[f"{stage}_s"] = info.get("seconds", np.nan)
        row[f"{stage}_rounds"] = info.get("rounds", np.nan)
    if sampler is not None:
        row.update({f"{k}_MB": sampler.peak.get(k, 0.0) for k in ("superlink", "superlink_superexec", "serverapp",
                                                                   "coordinator", "coordinator_pss", "sites",
                                                                   "sites_pss")})
        row["apps_at_once"] = sampler.most_apps
        row["load1_mean"] = float(np.mean(sampler.load)) if sampler.load else np.nan
    row["load1_before"] = load_before
    if results["status"] != "completed":
        row["error"] = str(results.get("error", ""))[:300]
    return row, breakdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, nargs="+", default=[3, 10, 30])
    parser.add_argument("--cases", type=int, default=36, help="cases per site")
    parser.add_argument("--features", type=int, default=8)
    parser.add_argument("--wait-for-sites-s", type=float, default=900, help="the study's [federation] wait_for_sites_s")
    parser.add_argument("--round-timeout-s", type=float, default=300, help="the study's [federation] round_timeout_s")
    parser.add_argument("--state", choices=["file", "memory"], nargs="+", default=["memory"],
                        help="SuperLink state: in memory, or an SQLite file as `fedrad local` runs it (with 30 "
                             "sites the file gets locked and replies are lost; see above)")
    parser.add_argument("--runtime", choices=["warm", "stock"], nargs="+", default=["stock", "warm"],
                        help="the sites' runtime (fedrad/client/warm_runtime.py), measured side by side")
    parser.add_argument("--site-nice", type=int, default=0,
                        help="nice value of the sites' processes (0: same priority as the coordinator's)")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    cost_wall, cost_cpu = import_cost()
    rows, breakdowns = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for state in args.state:
            for n in args.sites:
                for runtime in args.runtime:  # side by side at each N: the machine's load drifts less between them
                    row, breakdown = bench(n, args.cases, args.features, Path(tmp) / state / runtime,
                                           args.wait_for_sites_s, args.round_timeout_s, state, args.site_nice, runtime)
                    rows.append(row)
                    breakdowns.append(breakdown)
                    print(f"{n} sites, {runtime} runtime, {state} state: {row['status']} in {row['wall_s']:.0f} s",
                          flush=True)
    frame = pd.DataFrame(rows)
    errors = frame.pop("error") if "error" in frame else pd.Series([""] * len(frame))
    detail = pd.concat(breakdowns, ignore_index=True)
    memory = [c for c in frame if c.endswith("_MB") or c == "apps_at_once" or c.startswith("load")]
    with pd.option_context("display.width", 250, "display.max_columns", 60, "display.float_format", "{:.2f}".format):
        print(frame.drop(columns=memory).to_string(index=False))
        print()
        print(frame[["sites", "runtime", "state"] + memory].to_string(index=False))
        print()
        if not detail.empty:
            first = detail.groupby(["runtime", "state", "stage"])["s_per_round"].transform("first")
            detail.insert(5, "vs_first_N", detail["s_per_round"] / first)
            detail.insert(detail.columns.get_loc("app_cpu_s") + 1, "work_cpu_s", detail["app_cpu_s"] - cost_cpu)
            print(detail.to_string(index=False))
    for n, runtime, state, error in zip(frame["sites"], frame["runtime"], frame["state"], errors):
        if isinstance(error, str) and error:
            print(f"{n} sites, {runtime} runtime, {state} state, failed: {error}")
    print(f"fixed cost of one flwr-clientapp process: {cost_cpu:.2f} CPU s, {cost_wall:.2f} s wall (a fresh "
          "interpreter importing flwr.supernode.cli and fedrad.client.site_app, median of 3, measured before the "
          "federations started); work_cpu_s = app_cpu_s minus this: the site's work on one message (the sampler "
          "misses up to 0.25 s of a process's last CPU, so values near 0 come out negative); app_s runs to the "
          "process's exit, which can come after its reply has arrived (negative after_app_s)")
    print("startup_s: bench start -> census starts (all N SuperNodes online); spawn_s: SuperLink healthy and "
          "SuperNodes spawned; submit_s: `flwr run` -> ServerApp running; nodes_wait_s: ServerApp waiting for sites; "
          "replies_dropped: SuperNode log lines 'Failed to send message' (the reply is lost); db_locked: SuperLink "
          "log lines 'database is locked'")
    print("MB: peak RSS (VmRSS summed over processes: pages they share counted in each) and, _pss_MB, peak PSS "
          "(shared pages divided among their users: closer to the memory taken); coordinator = superlink + its "
          "superexec + serverapp; sites = all SuperNodes, their superexecs and flwr-clientapp processes; "
          "apps_at_once: most flwr-clientapp processes alive in one sample")
    if {"stock", "warm"} <= set(frame["runtime"]):
        paired = frame.pivot_table(index=["sites", "state"], columns="runtime", values="wall_s")
        for (n, state), wall in paired.iterrows():
            print(f"N={n}, {state} state: wall time stock {wall['stock']:.0f} s, warm {wall['warm']:.0f} s "
                  f"(warm/stock {wall['warm'] / wall['stock']:.2f})")
    for (runtime, state), d in detail.groupby(["runtime", "state"], sort=False) if not detail.empty else []:
        per_n = d.groupby("sites").apply(lambda g: np.average(g["s_per_round"], weights=g["round_trips"]),
                                         include_groups=False)
        growth = per_n.iloc[-1] / per_n.iloc[0]
        print(f"{runtime} runtime, {state} state, seconds per round trip (all stages): "
              + ", ".join(f"N={n}: {v:.1f}" for n, v in per_n.items())
              + f"; grows with N: {'yes' if growth > 1.25 else 'no'} ({growth:.1f}x from N={per_n.index[0]} "
              f"to N={per_n.index[-1]})")

if __name__ == "__main__":
    main()
