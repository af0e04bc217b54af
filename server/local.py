"""`fedrad local`: a whole federation on one machine, with Flower's real processes.

Starts one ``flower-superlink`` and one ``flower-supernode`` per site on loopback (free
ports, a private FLWR_HOME each, runtime dependency installation off), submits the study
with ``flwr run --stream``, and stops every process it started, by process group, also on
failure or Ctrl-C. Consortia use it to rehearse a study; tests and `make demo` use it too.

Run directory layout (``--out DIR``)::

    study.toml  results.json  runlog.sqlite  reference/   (the study's, see server/study_app.py)
    app/pyproject.toml                                     the Flower app (code: installed fedrad)
    flwr/<process>/                                        FLWR_HOME of each process, SuperLink DB
    logs/<process>.log                                     every process's output
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx

from fedrad import common
from fedrad.client.flower_process import flower_bin, flower_env
from fedrad.client.warm_runtime import RUNTIMES, superexec_command, supernode_command
from fedrad.common.errors import FedradError
from fedrad.common.study import load_study
from fedrad.server.study_app import RESULTS, STUDY

APP_PYPROJECT = """\
# Written by fedrad: the Flower app of a fedrad study. The code it names comes from the
# fedrad installed at the coordinator and at every site, so a FAB carries no code.
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedrad-study"
version = "{version}"
description = "fedrad study: ServerApp fedrad.server.study_app, ClientApp fedrad.client.site_app (fedrad {version})"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedrad"

[tool.flwr.app.components]
serverapp = "fedrad.server.study_app:app"
clientapp = "fedrad.client.site_app:app"

[tool.flwr.app.config]
run-dir = ""
expected-sites = 0
"""

CONNECTION = "fedrad"
ANSI = re.compile(r"\x1b\[[0-9;]*m")
RESULTS_WAIT_S = 30.0  # after `flwr run` returns, for the ServerApp to write results.json
class FederationError(FedradError):
    """A Flower process could not be started or the run could not be submitted."""


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free loopback port that this process has not handed out before. The processes that get
    the ports bind them seconds later, so the OS may offer a port twice meanwhile (two of 30
    SuperNodes got the same one, and the second died: 'address already in use')."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def write_app(folder: Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    version = common.__version__ if common.__version__[0].isdigit() else "0.0.0"
    (folder / "pyproject.toml").write_text(APP_PYPROJECT.format(version=version), encoding="utf-8")
    return folder


def write_connection(home: Path, address: str, *, insecure: bool = True, root_certificates: Path | None = None) -> None:
    """$FLWR_HOME/config.toml with one connection, the way `flwr run` reads it in 1.41."""
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]", f"address = {json.dumps(address)}"]
    lines.append("insecure = true" if insecure else f"root-certificates = {json.dumps(str(root_certificates))}")
    (home / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")


def prepare_run_dir(run_dir: Path, study_path: Path, expected_sites: int) -> Path:
    """Copy the study in (checked first), write the app and its run config; return the run-config file."""
    load_study(study_path)  # refuse a bad study before any process starts
    run_dir = Path(run_dir).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    if Path(study_path).absolute() != run_dir / STUDY:
        shutil.copyfile(study_path, run_dir / STUDY)
    write_app(run_dir / "app")
    run_config = run_dir / "app" / "run-config.toml"
    run_config.write_text(f"run-dir = {json.dumps(str(run_dir))}\nexpected-sites = {int(expected_sites)}\n", encoding="utf-8")
    return run_config


def submit(run_dir: Path, run_config: Path, cli_home: Path, echo) -> dict:
    """``flwr run --stream``; echo the ServerApp's log lines; return results.json."""
    run_dir = Path(run_dir).absolute()
    results_path = run_dir / RESULTS
    if results_path.exists():
        results_path.unlink()
    command = [flower_bin("flwr"), "run", str(run_dir / "app"), CONNECTION, "--stream", "--run-config", str(run_config)]
    env = flower_env(cli_home)
    # UTF-8 whatever the locale: Flower's and fedrad's messages hold non-ASCII (—, ≥), and CI may run with LANG=C.
    with open(run_dir / "logs" / "flwr-run.log", "a", encoding="utf-8") as log_file, \
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding="utf-8",
                             errors="replace", start_new_session=True) as proc:
        try:
            for line in proc.stdout:
                log_file.write(line)
                line = ANSI.sub("", line).rstrip()
                if line and not line.endswith(":"):  # Flower ends its stream with an empty "INFO :" line
                    echo(line)
        except BaseException:
            os.killpg(proc.pid, signal.SIGTERM)
            raise
    if not _appears(results_path, RESULTS_WAIT_S):
        raise FederationError(f"the study run ended without {RESULTS} (flwr run exit {proc.returncode}, waited "
                              f"{RESULTS_WAIT_S:g} s for the ServerApp); see {run_dir / 'logs'}")
    return json.loads(results_path.read_text(encoding="utf-8"))


def _appears(path: Path, seconds: float) -> bool:
    """``flwr run --stream`` can return before the ServerApp process has written its last file (an
    interrupted study writes results.json with status "interrupted" on its way out): wait for it."""
    deadline = time.monotonic() + seconds
    while not path.is_file():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


class LocalFederation:
    """SuperLink + one SuperNode per site on loopback; a context manager that always cleans up."""

    def __init__(self, workdir: Path, sites: dict[str, Path], *, echo=print, min_count: int | None = None,
                 allow_event_times: bool = False, runtime: str = "warm"):
        self.workdir = Path(workdir).absolute()
        self.sites = {name: Path(store).absolute() for name, store in sites.items()}
        self.echo = echo
        self.min_count = min_count
        self.allow_event_times = allow_event_times
        if runtime not in RUNTIMES:
            raise FederationError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        self.runtime = runtime
        self.processes: dict[str, subprocess.Popen] = {}
        self._runtime_ports: dict[str, int] = {}
        self._watchdog: threading.Thread | None = None
        self._stopping = threading.Event()
        self._sites_lock = threading.RLock()  # the watchdog never sees a site half started or half stopped
        self.port = 0

    def __enter__(self) -> "LocalFederation":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        for name, store in self.sites.items():
            if not (store / "store.json").is_file():
                raise FederationError(f"site '{name}': '{store}' is not a feature store (run `fedrad prepare`)")
        flwr_dir = self.workdir / "flwr"
        shutil.rmtree(flwr_dir, ignore_errors=True)  # a fresh SuperLink state per federation
        (self.workdir / "logs").mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.start_superlink()
        for name in self.sites:
            self.start_site(name)
        self.echo(f"federation up: SuperLink 127.0.0.1:{self.port}, {len(self.sites)} SuperNode(s) "
                  f"({', '.join(self.sites)}); logs in {self.workdir / 'logs'}")

    def start_superlink(self) -> None:
        """The SuperLink on this federation's port, its state in an SQLite file that outlives it."""
        self._spawn("superlink", [flower_bin("flower-superlink"), "--insecure", "--port", str(self.port),
                                  "--database", str(self.workdir / "flwr" / "superlink.db"),
                                  "--disable-runtime-dependency-installation"])
        self._wait_healthy()

    def start_site(self, name: str) -> None:
        """A site's SuperNode; also how a stopped site comes back (it gets a new node id)."""
        with self._sites_lock:
            self._start_site(name)

    def _start_site(self, name: str) -> None:
        node_config = f"store={json.dumps(str(self.sites[name]))} site-name={json.dumps(name)}"
        if self.min_count:
            node_config += f" min-count={int(self.min_count)}"
        if self.allow_event_times:
            node_config += " allow-event-times=true"
        runtime_port = free_port()
        self._spawn(f"site-{name}", [*supernode_command(self.runtime), "--insecure", "--superlink",
                                     f"127.0.0.1:{self.port}", "--port", str(runtime_port),
                                     "--node-config", node_config], threads=self._threads_per_site())
        if self.runtime == "warm":
            self._runtime_ports[name] = runtime_port
            self._start_superexec(name)
            if self._watchdog is None:
                self._watchdog = threading.Thread(target=self._restart_dead_superexecs, daemon=True)
                self._watchdog.start()

    def _start_superexec(self, name: str) -> None:
        self._spawn(f"exec-{name}", superexec_command(f"127.0.0.1:{self._runtime_ports[name]}",
                                                      self.processes[f"site-{name}"].pid),
                    threads=self._threads_per_site())

    def _restart_dead_superexecs(self, poll_s: float = 1.0) -> None:
        """What `fedrad site join` does at a site: a warm SuperExec that died beside a live SuperNode is
        reported and started again."""
        while not self._stopping.wait(poll_s):
            with self._sites_lock:
                for name in list(self._runtime_ports):
                    node, executor = self.processes.get(f"site-{name}"), self.processes.get(f"exec-{name}")
                    if node and executor and node.poll() is None and executor.poll() is not None \
                            and not self._stopping.is_set():
                        self.echo(f"site {name}: its warm SuperExec exited with {executor.returncode}; "
                                  "starting it again")
                        self._start_superexec(name)

    def restart_superlink(self, sig: int = signal.SIGKILL) -> None:
        """Stop the SuperLink (by default as a crash would) and start it again on the same port and
        database: runs, nodes and messages persist, and the SuperNodes reconnect by themselves."""
        proc = self.processes["superlink"]
        signal_group(proc.pid, sig)
        proc.wait()
        self.start_superlink()

    def _threads_per_site(self) -> int:
        """All sites share this machine's cores: each site's torch/BLAS gets its share (oversubscribed
        threads made the CNN stage several times slower), unless OMP_NUM_THREADS is set already."""
        return max(1, (os.cpu_count() or 1) // max(1, len(self.sites)))

    def _spawn(self, name: str, command: list[str], threads: int | None = None) -> None:
        home = self.workdir / "flwr" / name
        home.mkdir(parents=True, exist_ok=True)
        env = flower_env(home)
        if threads and "OMP_NUM_THREADS" not in os.environ:
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        with open(self.workdir / "logs" / f"{name}.log", "a", encoding="utf-8") as log_file:
            self.processes[name] = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                                    start_new_session=True)

    def _wait_healthy(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.processes["superlink"].poll() is not None:
                raise FederationError("flower-superlink exited at start:\n" + self.log_tail("superlink"))
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise FederationError(f"flower-superlink did not answer on port {self.port} within {timeout_s:.0f} s:\n"
                              + self.log_tail("superlink"))

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.workdir / "logs" / f"{name}.log"
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]) \
            if path.exists() else ""

    def run_study(self, study_path: Path, run_dir: Path | None = None) -> dict:
        run_dir = Path(run_dir or self.workdir).absolute()
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        run_config = prepare_run_dir(run_dir, study_path, expected_sites=len(self.sites))
        cli_home = self.workdir / "flwr" / "cli"
        write_connection(cli_home, f"127.0.0.1:{self.port}")
        return submit(run_dir, run_config, cli_home, self.echo)

    def stop_site(self, name: str, sig: int = signal.SIGTERM) -> None:
        """Stop one site's SuperNode (a site going down mid-study), and its warm SuperExec."""
        with self._sites_lock:
            self._runtime_ports.pop(name, None)  # not to be restarted: the site is down on purpose
            signal_group(self.processes[f"site-{name}"].pid, sig)
            if f"exec-{name}" in self.processes:
                signal_group(self.processes[f"exec-{name}"].pid, sig)

    def close(self) -> None:
        self._stopping.set()
        if self._watchdog is not None:
            self._watchdog.join()
        stop_processes(self.processes.values())
        self.processes.clear()


def stop_processes(processes, grace_s: float = 15) -> None:
    """SIGTERM Flower processes we started, then SIGKILL what is left after ``grace_s``. Flower starts
    flower-superexec in a session of its own, so signalling our process groups misses it and the
    ServerApp it runs: every descendant is collected first and stopped too."""
    processes = list(processes)
    stragglers = [pid for proc in processes for pid in descendants(proc.pid)]
    for proc in processes:
        signal_group(proc.pid, signal.SIGTERM)
    for pid in stragglers:
        signal_process(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for proc in processes:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            signal_group(proc.pid, signal.SIGKILL)
            proc.wait()
    while stragglers and time.monotonic() < deadline:
        stragglers = [pid for pid in stragglers if _alive(pid)]
        time.sleep(0.1)
    for pid in stragglers:
        signal_process(pid, signal.SIGKILL)


def signal_group(pid: int, sig: int) -> None:
    """Signal a process group we started (start_new_session) unless it has already gone."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (Linux /proc; elsewhere none are found)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = entry.read_text(encoding="utf-8").rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:
        return not stat.exists() or stat.read_text(encoding="utf-8").rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def signal_process(pid: int, sig: int) -> None:
    """Signal a process unless it has already gone."""
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
