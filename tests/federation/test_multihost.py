"""A consortium across network namespaces: the deployment commands with TLS and node authentication
(issue 7, part 3). Root only; it creates network namespaces with `ip netns` (see tests/federation/netns.py).

The coordinator's namespace runs ``fedrad coordinator start`` on 0.0.0.0 and registers three sites'
keys; siteA, siteB and siteC, each in a namespace of its own, run ``fedrad site join`` against the
coordinator's address (10.77.0.1), and the coordinator submits a census + ComBat study whose
harmonised values must equal pooled neuroCombat. An ``outsider`` namespace holds the SuperNodes
that must fail (a key generated but never registered, a site without the consortium's CA, a site
with another CA); they start with the sites, so they fail while the study runs and would show up
in its census if they were let in. Teardown stops every process in the namespaces and deletes
them, also on failure, Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.federation import netns

REASON = netns.unavailable()
if REASON is None and not (shutil.which("openssl") and shutil.which("ssh-keygen")):
    REASON = "needs openssl and ssh-keygen (deploy/make-credentials.sh)"
if REASON:
    pytest.skip(REASON, allow_module_level=True)

from fedrad.client.flower_process import QUIET_ENV, flower_bin  # noqa: E402
from tests.federation.cohort import hospital_rows, write_stores  # noqa: E402
from tests.federation.conftest import aligned, read_site_outputs, write_study  # noqa: E402
from tests.oracles import neurocombat  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
SITES = ["siteA", "siteB", "siteC"]
PORT = 9092  # the namespaces are private to this run, so a fixed port cannot clash
SUPERLINK = f"{netns.COORDINATOR}:{PORT}"
FEATURES = [f"original_firstorder_F{j:02d}" for j in range(12)]
STORE_FEATURES = [f"table__{f}" for f in FEATURES]
#: the whole study; zscore off saves a round trip (test_harmonise_exact covers the z-scoring)
STUDY = '[study]\nname = "multihost"\nstages = ["census", "harmonise"]\n[harmonise]\nbatch = "site"\nzscore = false\n'
#: how long a SuperNode that must fail may take to do so (it exits within ~2 s here)
FAIL_WITHIN_S = 60


def _env() -> dict:
    bin_dir = str(Path(sys.executable).parent)
    return {**os.environ, **QUIET_ENV, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def _tail(path: Path, lines: int = 25) -> str:
    text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else "(no log)"
    return "\n".join(text.splitlines()[-lines:])


class Consortium:
    """What the fixture built: the namespaces, credentials, stores, node ids and the failing SuperNodes."""

    def __init__(self, net: netns.Testbed, root: Path, credentials: Path, stores: dict, table: pd.DataFrame):
        self.net, self.root, self.credentials, self.stores, self.table = net, root, credentials, stores, table
        self.logs = root / "logs"
        self.node_ids: dict[str, int] = {}
        self.failing: dict[str, subprocess.Popen] = {}
        self.failing_since = 0.0
        self.fedrad = flower_bin("fedrad")

    def key(self, site: str) -> Path:
        return self.credentials / "sites" / site / f"{site}.key"

    def join(self, site: str, *extra, key: Path | None = None, store: Path | None = None,
             port: int = 9094) -> list[str]:
        """``fedrad site join`` as ``site`` (with its key and store unless given)."""
        return [self.fedrad, "site", "join", "--superlink", SUPERLINK, "--store", store or self.stores[site],
                "--name", site, "--key", key or self.key(site), "--port", str(port), *extra]

    def start_failures(self, env: dict) -> None:
        """From the outsider's namespace, the SuperNodes that must fail; started with the sites, so that
        they fail while the study runs (and would show up in it if they were let in)."""
        outsider = self.stores["outsider"]
        commands = {
            # a key made with the others but never registered
            "unregistered": self.join("outsider", "--ca", self.credentials / "ca.crt", key=self.key("rogue"),
                                      store=outsider, port=9095),
            # no CA given to `fedrad site join`
            "no-ca": self.join("outsider", store=outsider, port=9096),
            # a registered site's key, but another CA (Flower's handshake fails before the key is used)
            "wrong-ca": self.join("siteC", "--ca", self.root / "wrong-ca" / "ca.crt", store=outsider, port=9097),
            # flower-supernode itself without --root-certificates: Flower then trusts the system's CAs
            "system-store": [flower_bin("flower-supernode"), "--superlink", SUPERLINK, "--port", "9098",
                             "--auth-supernode-private-key", self.key("siteC"), "--node-config",
                             f'store="{outsider}" site-name="siteC"'],
        }
        self.failing_since = time.monotonic()
        for name, command in commands.items():
            self.failing[name] = self.net.spawn("outsider", command, log=self.logs / f"{name}.log",
                                                env={**env, "FLWR_HOME": str(self.root / "flwr" / name)})

    def failed(self, name: str) -> tuple[int, str]:
        """Exit code and output of a failing SuperNode; the test fails if it runs past FAIL_WITHIN_S."""
        proc, log = self.failing[name], self.logs / f"{name}.log"
        try:
            proc.wait(timeout=max(0.1, self.failing_since + FAIL_WITHIN_S - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"{name}: still running {FAIL_WITHIN_S} s after its start:\n{_tail(log)}")
        return proc.returncode, log.read_text(encoding="utf-8", errors="replace")


@pytest.fixture(scope="module")
def consortium(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    credentials = root / "credentials"
    made = subprocess.run(["bash", ROOT / "deploy" / "make-credentials.sh", credentials, "--host", netns.COORDINATOR,
                           "--host", "localhost", *[a for s in [*SITES, "rogue"] for a in ("--site", s)]],
                          capture_output=True, text=True, timeout=120, encoding="utf-8")
    assert made.returncode == 0, made.stdout + made.stderr
    wrong = root / "wrong-ca"
    wrong.mkdir()
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384", "-nodes",
                    "-keyout", wrong / "ca.key", "-out", wrong / "ca.crt", "-subj", "/CN=some other CA", "-days", "2"],
                   check=True, capture_output=True, timeout=60)
    table = hospital_rows()
    stores = write_stores(root / "stores", table)
    stores["outsider"] = shutil.copytree(stores["siteC"], root / "stores" / "outsider")  # a valid store, no key

    net = netns.Testbed([*SITES, "outsider"])
    # a SIGTERM (a CI timeout) would end pytest without teardown, leaving namespaces and Flower running
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if main_thread else None
    try:
        try:
            net.up()
        except netns.NetnsError as exc:
            if "netns add" in str(exc):
                pytest.skip(f"needs root and `ip netns`: creates network namespaces ({exc})")
            raise
        c = Consortium(net, root, credentials, stores, table)
        env = _env()
        start = time.monotonic()
        superlink = net.spawn("coord", [c.fedrad, "coordinator", "start", "--credentials", credentials,
                                        "--database", root / "superlink" / "state.db", "--host", "0.0.0.0",
                                        "--port", str(PORT)], log=c.logs / "superlink.log", env=env)
        state = net.reach("coord", "127.0.0.1", PORT, wait=90)
        assert state == "open" and superlink.poll() is None, \
            f"SuperLink not up ({state}):\n{_tail(c.logs / 'superlink.log')}"
        superlink_up = time.monotonic() - start
        registering = {site: net.spawn("coord", [c.fedrad, "coordinator", "register", site,
                                                 credentials / "sites" / site / f"{site}.pub",
                                                 "--superlink", f"127.0.0.1:{PORT}", "--ca", credentials / "ca.crt"],
                                       log=c.logs / f"register-{site}.log", env=env) for site in SITES}
        for site, proc in registering.items():
            proc.wait(timeout=180)
            text = (c.logs / f"register-{site}.log").read_text(encoding="utf-8")
            found = re.search(r"node id (\d+)", text)
            assert proc.returncode == 0 and found, f"register {site} (exit {proc.returncode}):\n{text}"
            c.node_ids[site] = int(found.group(1))
        for site in SITES:
            net.spawn(site, c.join(site, "--ca", credentials / "ca.crt"), log=c.logs / f"{site}.log", env=env)
        c.start_failures(env)
        print(f"consortium up in {time.monotonic() - start:.1f} s (SuperLink {superlink_up:.1f} s): "
              f"SuperLink {SUPERLINK} in {net.names['coord']}, sites {c.node_ids}; logs in {c.logs}")
        yield c
    finally:
        try:
            net.close()
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)


def test_sites_reach_the_coordinator_and_not_each_other(consortium):
    net = consortium.net
    for site in SITES:
        assert net.reach(site, netns.COORDINATOR, PORT) == "open", site
    # siteB's address answers the coordinator (a closed port is refused: the packet arrived) ...
    assert net.reach("coord", net.address["siteB"], 9) == "refused"
    # ... but from siteA the packet never arrives: the coordinator does not forward between sites
    from_a = net.reach("siteA", net.address["siteB"], 9)
    assert from_a == "timeout" or from_a.startswith("unreachable"), from_a
    # and a site's own loopback is its own: the SuperLink is not on siteA's 127.0.0.1
    assert net.reach("siteA", "127.0.0.1", PORT) == "refused"


def test_study_across_namespaces_equals_pooled_neurocombat(consortium):
    c = consortium
    study = write_study(c.root / "study.toml", STUDY)
    run_dir = c.root / "run"
    out = c.net.run("coord", [c.fedrad, "coordinator", "run", "--study", study, "--superlink", SUPERLINK,
                              "--out", run_dir, "--sites", "3", "--root-certificates", c.credentials / "ca.crt"],
                    timeout=900, env=_env(), log=c.logs / "coordinator-run.log")
    assert out.returncode == 0, out.stdout[-4000:]
    results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    assert results["status"] == "completed", results.get("error")
    assert sorted(results["census"]["sites"]) == SITES and results["census"]["refused"] == {}
    assert results["harmonise"]["sites"] == SITES

    table = c.table
    expected = neurocombat(table[FEATURES].to_numpy(), pd.DataFrame({"batch": table["site"].to_numpy()}))
    got = aligned(read_site_outputs(c.stores, "harmonised.parquet", SITES), table["patient_id"], STORE_FEATURES)
    assert np.abs(got - expected).max() <= 1e-8

    listed = c.net.run("coord", [c.fedrad, "coordinator", "sites", "--json", "--superlink", f"127.0.0.1:{PORT}",
                                 "--ca", c.credentials / "ca.crt"], timeout=120, env=_env())
    assert listed.returncode == 0, listed.stdout
    rows, _ = json.JSONDecoder().raw_decode(listed.stdout[listed.stdout.index("[\n"):])  # stdout and stderr
    assert {r["site"]: (r["node_id"], r["status"]) for r in rows} == \
        {s: (c.node_ids[s], "online") for s in SITES}


def test_unregistered_key_is_refused(consortium):
    code, log = consortium.failed("unregistered")
    assert code == 1, log
    assert "[code: 2004] Failed to activate SuperNode." in log
    assert "Exit Code: 305" in log
    # the coordinator saw the attempt too: TLS worked, the key is unknown
    assert "[ApiError:2004] Attempted to register SuperNode with public key" in \
        (consortium.logs / "superlink.log").read_text(encoding="utf-8")


def test_site_without_the_ca_is_refused_before_connecting(consortium):
    code, log = consortium.failed("no-ca")
    assert code == 2, log
    assert "give --ca" in log and "starting:" not in log  # flower-supernode was never started


@pytest.mark.parametrize("trust", ["wrong-ca", "system-store"])
def test_site_that_does_not_trust_the_coordinator_fails_tls(consortium, trust):
    """With another CA, or none (Flower then uses the system's trust store), the TLS handshake fails
    and the SuperNode exits at once; the key it holds (a registered site's) is never presented."""
    code, log = consortium.failed(trust)
    assert code == 1, log
    assert "SSL/TLS handshake error detected" in log
    assert "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed" in log
    assert "Exit Code: 305" in log
    if trust == "system-store":
        assert "Using system certificates for TLS connection" in log
