"""The warm site runtime (fedrad/client/warm_runtime.py): Flower's internals it relies on, the same results as
Flower's stock processes, and a site that loses its warm processes mid-stage and carries on.
"""

from __future__ import annotations

import inspect
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import fedrad.client.warm_runtime as warm
from fedrad.server.local import LocalFederation, _alive, descendants
from tests.federation.cohort import hospital_rows, write_stores
from tests.federation.conftest import aligned, read_site_outputs, when_stage_runs, write_study
from tests.oracles import neurocombat

FEATURES = [f"original_firstorder_F{j:02d}" for j in range(12)]
STORE_FEATURES = [f"table__{f}" for f in FEATURES]
STUDY = '[study]\nname = "warm"\n[harmonise]\nbatch = "scanner"\ncategorical = ["sex"]\ncontinuous = ["age"]\n'


# --- Flower internals: fail loudly when flwr changes under us ------------------------------------------------

def test_flwr_is_the_pinned_version_and_every_internal_the_runtime_patches_is_there():
    import importlib
    from importlib.metadata import version

    assert version("flwr") == "1.41.0", "fedrad's warm runtime patches flwr 1.41 internals: re-check them"
    for module, attribute in warm.FLOWER_INTERNALS:
        assert hasattr(importlib.import_module(module), attribute), f"flwr changed: {module}.{attribute} is gone"


def test_the_supernode_loop_still_sleeps_the_seconds_the_runtime_shortens():
    from flwr.supernode import start_client_internal

    source = inspect.getsource(start_client_internal)
    assert f"time.sleep({warm.FLOWER_NODE_SLEEP_S})" in source and f"time.sleep({warm.FLOWER_REPLY_SLEEP_S})" in source
    short = warm._ShortSleeps(0.01, 0.001)
    began = time.monotonic()
    short.sleep(3)
    short.sleep(0.5)
    assert time.monotonic() - began < 1.0
    assert short.monotonic is time.monotonic  # everything else is the real time module


def test_a_task_pulls_its_message_with_the_short_backoff_and_flowers_default_is_what_was_measured():
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supernode.runtime import run_clientapp

    function = inflatable_utils.pull_and_inflate_object_from_tree
    assert run_clientapp.pull_and_inflate_object_from_tree is function  # the task's call goes through it
    assert "pull_and_inflate_object_from_tree(" in inspect.getsource(run_clientapp.pull_task_input)
    before = dict(function.__kwdefaults__)
    assert before["initial_backoff"] == warm.FLOWER_OBJECT_BACKOFF_S
    try:
        warm.short_object_backoff()
        assert function.__kwdefaults__["initial_backoff"] == warm.OBJECT_BACKOFF_S
        assert function.__kwdefaults__["max_tries_per_object"] is None and function.__kwdefaults__["max_time"] == 7200
    finally:
        function.__kwdefaults__.update(before)


def test_a_fork_server_that_dies_or_hangs_is_replaced_and_the_task_still_forked(monkeypatch):
    """The SuperExec waits for the server's "forked PID": a request written to a server that is dying, or
    stuck, is given to a fresh server instead of vanishing (its SuperNode would wait for ever)."""
    monkeypatch.setattr(warm, "FORK_ACK_S", 2.0)
    server = warm.ForkServer()
    try:
        assert server.launch(["--help"]) > 0 and server.restarts == 0  # flwr-clientapp --help: forks, exits
        os.kill(server.pid, signal.SIGKILL)
        assert server.launch(["--help"]) > 0 and server.restarts == 1
        stuck = server.pid
        os.kill(stuck, signal.SIGSTOP)
        assert server.launch(["--help"]) > 0 and server.pid != stuck and server.restarts == 2
        assert not _alive(stuck)
    finally:
        server.close()


def test_a_forked_task_gets_exactly_the_arguments_flowers_own_executor_gives_flwr_clientapp(monkeypatch):
    from flwr.supercore.constant import TaskType
    from flwr.supercore.superexec.executor import ExecutionSpec
    from flwr.supercore.superexec.executor import subprocess_executor

    spec = ExecutionSpec(task_type=TaskType.CLIENT_APP, runtime_api_address="127.0.0.1:9094", token="t0k",
                         insecure=False, root_certificates_path="/ca.crt", runtime_dependency_install=True,
                         parent_pid=42, suppress_output=False, task_id=7)
    stock = []
    monkeypatch.setattr(subprocess_executor.subprocess, "Popen", lambda args, **_: stock.append(args))
    subprocess_executor.SubprocessExecutor().launch(spec)

    forked = []
    monkeypatch.setattr(warm, "ForkServer", lambda: type("Server", (), {"launch": forked.append, "pid": 0})())
    assert warm.fork_executor_class()().launch(spec).status == "accepted"
    assert stock[0][0] == "flwr-clientapp" and forked == [stock[0][1:]]
    # beside a SuperNode, a task is tied to the SuperNode's pid rather than the SuperExec's
    warm.fork_executor_class()(node_pid=4242).launch(spec)
    assert forked[1] == [("4242" if arg == "42" else arg) for arg in stock[0][1:]]
    assert warm._parent_pid_argument(["--insecure", "--parent-pid", "4242"]) == 4242


def test_the_fork_server_never_holds_torch():
    probe = ("import sys, fedrad.client.warm_runtime as w, importlib\n"
             "[importlib.import_module(m) for m in w.PRELOAD]\nprint('torch' in sys.modules)")
    shown = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, encoding="utf-8")
    assert shown.stdout.strip() == "False"


# --- studies ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("warm")
    table = hospital_rows()
    return root, table, write_stores(root / "stores", table)


def _expected(table: pd.DataFrame) -> np.ndarray:
    covars = pd.DataFrame({"batch": table["scanner"].to_numpy(), "sex": table["sex"].to_numpy(),
                           "age": table["age"].to_numpy()})
    return neurocombat(table[FEATURES].to_numpy(), covars, categorical=["sex"], continuous=["age"], eb=True,
                       parametric=True, mean_only=False)


def test_a_site_whose_warm_processes_die_mid_stage_carries_on_and_the_stock_runtime_agrees(cohort):
    root, table, stores = cohort
    study = write_study(root / "study.toml", STUDY)
    kills = []
    with LocalFederation(root / "warm-fed", stores, echo=print, runtime="warm") as fed:
        def kill_warm_processes():
            fork_server = _wait_for_child(fed.processes["exec-siteA"].pid, "--fork-server")  # siteA: the warm
                                                                                            # interpreter only
            os.kill(fork_server, signal.SIGKILL)
            os.kill(fed.processes["exec-siteB"].pid, signal.SIGKILL)  # siteB: its whole SuperExec
            kills.append(fork_server)

        watcher = when_stage_runs(root / "warm-run", "harmonise", 2, kill_warm_processes)
        results = fed.run_study(study, root / "warm-run")
        watcher.join(1)
        logs = {site: fed.log_tail(f"exec-{site}", 400) for site in ("siteA", "siteB")}
    assert kills, "the stage ended before the warm processes could be killed"
    assert results["status"] == "completed", results.get("error")
    assert sorted(results["harmonise"]["sites"]) == ["siteA", "siteB", "siteC"] and not results["harmonise"]["left_out"]
    assert "fork server" in logs["siteA"] and "restarting it" in logs["siteA"]
    assert logs["siteB"].count("Starting Flower SuperExec") == 2  # started again by the site's supervisor
    warm_harmonised = aligned(read_site_outputs(stores, "harmonised.parquet"), table["patient_id"], STORE_FEATURES)
    assert np.abs(warm_harmonised - _expected(table)).max() <= 1e-8

    with LocalFederation(root / "stock-fed", stores, echo=print, runtime="stock") as fed:
        results = fed.run_study(study, root / "stock-run")
        assert not any(name.startswith("exec-") for name in fed.processes)
    assert results["status"] == "completed", results.get("error")
    stock_harmonised = aligned(read_site_outputs(stores, "harmonised.parquet"), table["patient_id"], STORE_FEATURES)
    assert np.abs(stock_harmonised - warm_harmonised).max() <= 1e-9  # the same sums, added in reply order


def test_a_site_silent_past_resend_after_s_is_asked_again_answers_twice_and_the_study_is_unchanged(cohort):
    """A SuperNode frozen mid-round (SIGSTOP) stands for a reply lost on its way: the coordinator asks
    again after resend_after_s; the site, thawed, answers both copies identically (both on its ledger),
    the first is taken, and the harmonised rows still equal neuroCombat."""
    from fedrad.client.ledger import read_ledger

    root, table, stores = cohort
    study = write_study(root / "resend.toml", STUDY + "[federation]\nresend_after_s = 4\n")
    with LocalFederation(root / "resend-fed", stores, echo=print) as fed:
        node = fed.processes["site-siteA"].pid

        def freeze_then_thaw():
            os.kill(node, signal.SIGSTOP)
            time.sleep(6)  # past resend_after_s, before a second copy would go
            os.kill(node, signal.SIGCONT)

        watcher = when_stage_runs(root / "resend-run", "harmonise", 1, freeze_then_thaw)  # round 1 or 2 waits
        results = fed.run_study(study, root / "resend-run")
        watcher.join(10)
    assert results["status"] == "completed", results.get("error")
    assert sorted(results["harmonise"]["sites"]) == ["siteA", "siteB", "siteC"]
    ledgers = {site: (lambda t: t[t["run"] == results["run_id"]])(read_ledger(stores[site])) for site in stores}
    counts = {site: ledger["message_type"].value_counts() for site, ledger in ledgers.items()}
    frozen = [t for t in counts["siteA"].index if counts["siteA"][t] == 2]
    assert len(frozen) == 1 and frozen[0].startswith("query.combat"), counts["siteA"]  # the round it froze in
    assert all((c == 1).all() for site, c in counts.items() if site != "siteA")
    twice = ledgers["siteA"][ledgers["siteA"]["message_type"] == frozen[0]]
    assert twice["sha256"].nunique() == 1  # the same answer, byte for byte
    harmonised = aligned(read_site_outputs(stores, "harmonised.parquet"), table["patient_id"], STORE_FEATURES)
    assert np.abs(harmonised - _expected(table)).max() <= 1e-8


def test_site_join_supervises_its_superexec_and_stops_both(cohort, tmp_path):
    _, _, stores = cohort
    from fedrad.server.local import free_port

    join = subprocess.Popen([str(Path(sys.executable).parent / "fedrad"), "site", "join", "--store", str(stores["siteC"]), "--insecure",
                             "--superlink", f"127.0.0.1:{free_port()}", "--port", str(free_port())],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True, encoding="utf-8")
    try:
        executor = _wait_for_child(join.pid, "fedrad-superexec")
        node = _wait_for_child(join.pid, "fedrad-supernode")
        os.kill(executor, signal.SIGKILL)
        again = _wait_for_child(join.pid, "fedrad-superexec", other_than=executor)
        assert again != executor
        join.send_signal(signal.SIGTERM)
        output, _ = join.communicate(timeout=30)
    finally:
        if join.poll() is None:
            os.killpg(join.pid, signal.SIGKILL)
    assert "warm SuperExec" in output and "starting it again" in output
    assert not _alive(node) and not _alive(again)  # both ended with the supervisor


def _wait_for_child(parent: int, command: str, other_than: int | None = None, timeout_s: float = 60) -> int:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for pid in descendants(parent):
            try:
                cmdline = open(f"/proc/{pid}/cmdline", encoding="utf-8").read()
            except FileNotFoundError:
                continue
            if command in cmdline and pid != other_than and _alive(pid):
                return pid
        time.sleep(0.2)
    raise AssertionError(f"no {command} under pid {parent} within {timeout_s} s")
