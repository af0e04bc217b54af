"""The warm site runtime: Flower's own SuperExec task loop, with each ClientApp task forked from a
process that has already imported flwr and fedrad's ClientApp.

Flower 1.41 starts a fresh ``flwr-clientapp`` interpreter for every message (~1.3 CPU-s of Flower
imports plus ~2.5 CPU-s of fedrad's own, before any work), and its SuperNode sleeps 3 s after every
empty pull. On two cores that is most of a federated study's wall time. This module keeps every
message in its own process with the SuperNode's context, as Flower does, but

* ``fedrad-superexec`` is Flower's ``flower-superexec`` (same arguments, same task loop, same
  Runtime API and token handling) with its executor swapped for :class:`ForkExecutor`, which hands
  each ClientApp task to a *fork server*: a child interpreter that imported the ClientApp module
  once and forks one process per task. The fork server is single-threaded and never imports torch
  (forking after OpenMP threads start is unsafe); the CNN handlers import it in the forked child.
  If the fork server dies, the next task restarts it (and says so in the log);
* ``fedrad-supernode`` is Flower's ``flower-supernode`` with its hard-coded polling sleeps
  (3 s after an empty pull, 0.5 s while waiting for a reply) shortened to ``FEDRAD_NODE_POLL_S``
  (default 0.2 s) and ``FEDRAD_REPLY_POLL_S`` (default 0.05 s). The SuperNode runs with
  ``--isolation process``: the site's supervisor (``fedrad site join`` or `fedrad local`) starts
  ``fedrad-superexec`` beside it.

Both rely on flwr 1.41 internals, named in :data:`FLOWER_INTERNALS`; tests/federation/test_warm_runtime.py
fails loudly if any of them changes. ``--runtime stock`` keeps Flower's own processes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import traceback

from fedrad.client.flower_process import flower_bin

RUNTIMES = ("warm", "stock")
#: what the fork server imports before it forks: the ClientApp and the maths its handlers use, never torch.
PRELOAD = ("flwr.supernode.cli.flwr_clientapp", "fedrad.client.site_app", "fedrad.common.survival_metrics",
           "fedrad.common.logistic", "pyarrow.parquet", "httpx", "httpcore")  # httpcore: each task's first request
#: (module, attribute) of flwr 1.41 that this module patches or reuses.
FLOWER_INTERNALS = (
    ("flwr.supercore.superexec.run_superexec", "get_executor"),
    ("flwr.supercore.superexec.executor.subprocess_executor", "SubprocessExecutor"),
    ("flwr.supercore.cli.flower_superexec", "flower_superexec"),
    ("flwr.supernode.start_client_internal", "time"),
    ("flwr.supernode.cli.flower_supernode", "flower_supernode"),
    ("flwr.supernode.cli.flwr_clientapp", "flwr_clientapp"),
    ("flwr.supercore.inflatable.inflatable_utils", "pull_and_inflate_object_from_tree"),
    ("flwr.supercore.inflatable.inflatable_utils", "pull_objects"),
)
NODE_POLL_ENV, REPLY_POLL_ENV = "FEDRAD_NODE_POLL_S", "FEDRAD_REPLY_POLL_S"
#: Flower's first wait (s) when a task asks its SuperNode for a message whose objects have not arrived yet, and
#: fedrad's. The SuperNode queues the message before it pulls the objects, so a task forked at once always
#: waits: 1-3 s per message with Flower's backoff (1 s, doubling, capped at 10), measured with cProfile.
FLOWER_OBJECT_BACKOFF_S, OBJECT_BACKOFF_S, OBJECT_BACKOFF_CAP_S = 1, 0.02, 0.5
#: seconds a fork server may take to say it forked a task before it is taken for stuck and replaced
FORK_ACK_S = 30.0
#: a folder: each forked task writes its cProfile there (task-<pid>.prof)
PROFILE_ENV = "FEDRAD_PROFILE_DIR"
#: Flower's hard-coded sleeps in supernode/start_client_internal.py (empty pull, waiting for a reply).
FLOWER_NODE_SLEEP_S, FLOWER_REPLY_SLEEP_S = 3, 0.5


def _log(text: str) -> None:
    print(f"fedrad warm runtime: {text}", file=sys.stderr, flush=True)


# --- the fork server (a child interpreter of fedrad-superexec) ----------------------------------------------

def serve_forks(requests=None) -> None:
    """Read one JSON argument list per line; fork a ``flwr-clientapp`` with it for each and say so ("forked
    PID" on stdout: the SuperExec waits for it, so a request never vanishes with a dying server). Ends at
    EOF (the SuperExec that feeds it has gone)."""
    import importlib

    requests = requests or sys.stdin
    for name in PRELOAD:
        importlib.import_module(name)
    short_object_backoff()
    if "torch" in sys.modules:  # a preloaded module pulled it in: forking would copy its thread pools
        raise RuntimeError("the fork server imported torch; forked ClientApps would share its OpenMP state")
    signal.signal(signal.SIGCHLD, lambda *_: _reap())
    acks = os.fdopen(os.dup(1), "w", encoding="utf-8")
    print("ready", file=acks, flush=True)
    os.dup2(2, 1)  # tasks print to the SuperExec's stderr (its log), never into a pipe nobody reads
    for line in requests:
        if line.strip():
            print(f"forked {_fork_clientapp(json.loads(line), acks.fileno())}", file=acks, flush=True)
    _reap()


def short_object_backoff() -> None:
    """Pull a message's objects retrying every 20 ms, then up to every 0.5 s, rather than after 1 s, 2 s,
    4 s...; the same patience in all (Flower's 2 h limit), no tries limit. For a task (its SuperNode's
    message), the SuperNode (the SuperLink's) and the ServerApp (the sites' replies): each side marks a
    message as there before its objects are."""
    from flwr.supercore.inflatable import inflatable_utils

    for function in (inflatable_utils.pull_and_inflate_object_from_tree, inflatable_utils.pull_objects):
        function.__kwdefaults__.update(initial_backoff=OBJECT_BACKOFF_S, backoff_cap=OBJECT_BACKOFF_CAP_S,
                                       max_tries_per_object=None)


def _reap() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def _fork_clientapp(argv: list[str], acks_fd: int) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        os.close(acks_fd)  # only the server acknowledges
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        os.close(0)
        os.open(os.devnull, os.O_RDONLY)  # the task must not read the server's request pipe
        from flwr.supernode.cli.flwr_clientapp import flwr_clientapp

        sys.argv = ["flwr-clientapp", *argv]
        profile_dir = os.environ.get(PROFILE_ENV)
        if profile_dir:  # where a task's time goes (FEDRAD_PROFILE_DIR=folder); off unless asked for
            import cProfile

            cProfile.runctx("flwr_clientapp()", globals(), {"flwr_clientapp": flwr_clientapp},
                            os.path.join(profile_dir, f"task-{os.getpid()}.prof"))
        else:
            flwr_clientapp()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - a forked task must never return into the server's loop
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class ForkServer:
    """The fork server process, restarted when it has died."""

    def __init__(self) -> None:
        self.restarts = 0
        self._process = None
        self._start()

    def _start(self) -> None:
        self._process = subprocess.Popen([sys.executable, "-m", "fedrad.client.warm_runtime", "--fork-server"],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, encoding="utf-8")
        ready = self._process.stdout.readline().strip()
        if ready != "ready":
            self._process.kill()
            raise RuntimeError(f"the fork server did not start (it said {ready[:200]!r}, exit {self._process.wait()})")

    @property
    def pid(self) -> int:
        return self._process.pid

    def launch(self, argv: list[str], attempts: int = 3) -> int:
        """Fork a task; the server's "forked PID" says it happened. A server that died (or hangs) is restarted
        and the same request given to the new one, so no task is lost with it."""
        if self._process.poll() is not None:
            self.restarts += 1
            _log(f"the fork server (pid {self._process.pid}) died with exit {self._process.returncode}; "
                 f"restarting it (restart {self.restarts})")
            self._start()
        try:
            self._process.stdin.write(json.dumps(argv) + "\n")
            self._process.stdin.flush()
            ack = self._ack()
        except BrokenPipeError:
            ack = None
        if ack is not None:
            return ack
        if self._process.poll() is None:  # alive but silent: stuck, never to fork this task
            _log(f"the fork server (pid {self._process.pid}) did not fork a task within {FORK_ACK_S:g} s; "
                 "stopping it")
            self._process.kill()
        self._process.wait()
        if attempts <= 1:
            raise RuntimeError("the fork server failed to fork the task three times")
        return self.launch(argv, attempts - 1)

    def _ack(self) -> int | None:
        import select

        ready, _, _ = select.select([self._process.stdout], [], [], FORK_ACK_S)
        line = self._process.stdout.readline() if ready else ""
        return int(line.split()[1]) if line.startswith("forked ") else None

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.stdin.close()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()


def fork_executor_class():
    """:class:`ForkExecutor`, built on Flower's SubprocessExecutor (imported here: only the SuperExec needs it)."""
    from flwr.supercore.constant import TASK_TYPE_TO_APPIO_API_ADDRESS_ARG, TaskType
    from flwr.supercore.superexec.executor import LaunchResult
    from flwr.supercore.superexec.executor.subprocess_executor import SubprocessExecutor

    class ForkExecutor(SubprocessExecutor):
        """ClientApp tasks go to the fork server with the arguments Flower gives ``flwr-clientapp``; any other
        task type is Flower's own subprocess launch."""

        def __init__(self, node_pid: int | None = None) -> None:
            self.node_pid = node_pid
            self.server = ForkServer()
            _log(f"fork server pid {self.server.pid} ready")

        def launch(self, spec):
            if spec.task_type != TaskType.CLIENT_APP:
                return super().launch(spec)
            argv = [TASK_TYPE_TO_APPIO_API_ADDRESS_ARG[spec.task_type], spec.runtime_api_address, "--token", spec.token]
            if spec.insecure:
                argv.append("--insecure")
            elif spec.root_certificates_path is not None:
                argv += ["--root-certificates", spec.root_certificates_path]
            parent = self.node_pid or spec.parent_pid  # the SuperNode's: a task outlives a SuperExec restart
            if parent is not None:
                argv += ["--parent-pid", str(parent)]
            if spec.runtime_dependency_install:
                argv.append("--allow-runtime-dependency-installation")
            try:
                self.server.launch(argv)
            except (OSError, RuntimeError) as exc:
                return LaunchResult.failed(f"fork server: {exc}")
            return LaunchResult.accepted()

        def close(self) -> None:
            self.server.close()

    return ForkExecutor


def superexec_main() -> None:
    """``fedrad-superexec``: ``flower-superexec`` with the fork executor."""
    from flwr.supercore.cli.flower_superexec import flower_superexec
    from flwr.supercore.superexec import run_superexec

    executor = fork_executor_class()
    node_pid = _parent_pid_argument(sys.argv)
    run_superexec.get_executor = lambda *args, **kwargs: executor(node_pid)
    os.environ.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.05")
    flower_superexec()


def _parent_pid_argument(argv: list[str]) -> int | None:
    """The ``--parent-pid`` this SuperExec was started with: the SuperNode's, which its tasks are tied to
    instead of the SuperExec's own (a task in flight when the SuperExec dies then still answers)."""
    for i, arg in enumerate(argv):
        if arg == "--parent-pid" and i + 1 < len(argv):
            return int(argv[i + 1])
        if arg.startswith("--parent-pid="):
            return int(arg.split("=", 1)[1])
    return None


class _ShortSleeps:
    """Stands in for the ``time`` module inside flwr's SuperNode loop: its fixed sleeps become short polls."""

    def __init__(self, node_poll_s: float, reply_poll_s: float) -> None:
        self._map = {FLOWER_NODE_SLEEP_S: node_poll_s, FLOWER_REPLY_SLEEP_S: reply_poll_s}

    def sleep(self, seconds: float) -> None:
        time.sleep(self._map.get(seconds, seconds))

    def __getattr__(self, name):
        return getattr(time, name)


def supernode_main() -> None:
    """``fedrad-supernode``: ``flower-supernode`` polling every FEDRAD_NODE_POLL_S seconds."""
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    start_client_internal.time = _ShortSleeps(float(os.environ.get(NODE_POLL_ENV, 0.2)),
                                              float(os.environ.get(REPLY_POLL_ENV, 0.05)))
    short_object_backoff()
    flower_supernode()


def supernode_command(runtime: str) -> list[str]:
    """The SuperNode command of a runtime (its arguments follow)."""
    if runtime == "stock":
        return [flower_bin("flower-supernode")]
    return [flower_bin("fedrad-supernode"), "--isolation", "process"]


def superexec_command(runtime_api_address: str, parent_pid: int | None = None) -> list[str]:
    """The warm SuperExec beside a ``--isolation process`` SuperNode: it serves the SuperNode's Runtime API
    (loopback, no TLS, as Flower's own SuperExec does) and ends with the SuperNode (``--parent-pid``)."""
    command = [flower_bin("fedrad-superexec"), "--insecure", "--runtime-api-address", runtime_api_address]
    return command + (["--parent-pid", str(parent_pid)] if parent_pid else [])


#: a SuperExec that dies this many times, each within a minute of its start, is not started again: the site
#: stops (non-zero) so that its service manager and its IT see it, rather than a node online with no runtime.
FAST_FAILURES = 5


def supervise_site(supernode: list[str], env: dict[str, str], runtime_api_address: str, echo=print,
                   poll_s: float = 1.0) -> int:
    """Run a ``--isolation process`` SuperNode and the warm SuperExec beside it until the SuperNode ends;
    a SuperExec that dies is reported and started again. Returns the SuperNode's exit status (a service
    manager restarts the whole site on a non-zero one: deploy/systemd, deploy/compose)."""
    stopping, running = [], []

    def stop(*_):
        stopping.append(True)
        for proc in running:
            if proc.poll() is None:
                proc.terminate()

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        node = subprocess.Popen(supernode, env=env)
        running.append(node)
        executor, started, fast = None, 0.0, 0
        while node.poll() is None and not stopping:
            if executor is None or executor.poll() is not None:
                if executor is not None:
                    fast = fast + 1 if time.monotonic() - started < 60 else 1
                    echo(f"the site's warm SuperExec (pid {executor.pid}) exited with {executor.returncode}; "
                         + ("starting it again" if fast < FAST_FAILURES else
                            f"it failed {fast} times within a minute of starting: stopping the site"))
                    if fast >= FAST_FAILURES:
                        return 1
                executor, started = subprocess.Popen(superexec_command(runtime_api_address, node.pid), env=env), \
                    time.monotonic()
                running.append(executor)
            time.sleep(poll_s)
        return node.wait() if not stopping else 0
    finally:
        stop()
        for proc in running:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    if sys.argv[1:] == ["--fork-server"]:
        serve_forks()
    else:
        sys.exit(f"usage: {sys.argv[0]} --fork-server (started by fedrad-superexec)")
