"""The deployment path through the reverse proxy, with real processes: deploy/make-credentials.sh,
`fedrad coordinator start` (TLS, SuperNode authentication, SQLite) on loopback, nginx from the shipped
deploy/nginx template on a second port, `fedrad coordinator register`, and `fedrad site join` pointed at
nginx. The hospitals' side must pass the Fleet API (signed node requests included) and refuse the
Control API, which answers on loopback only."""

from __future__ import annotations

import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from fedrad.server.local import free_port, stop_processes
from tests.conftest import ROOT
from tests.federation.cohort import hospital_rows, write_stores

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()),
                                      None)
assert NGINX and shutil.which("openssl") and shutil.which("ssh-keygen"), \
    "needs nginx, openssl and ssh-keygen: `make test` installs nginx (apt-get install nginx-light)"
TEMPLATE = ROOT / "deploy" / "nginx" / "fedrad-superlink.conf"
PROTOBUF = {"content-type": "application/protobuf"}
STUDY = '[study]\nname="proxy"\nstages=["census"]\n[federation]\nmin_sites=2\n'


def raw_status(address: str, path: str, ca: Path) -> int:
    """Status of ``POST path`` sent over TLS exactly as written (httpx would normalise the path)."""
    host, port = address.rsplit(":", 1)
    request = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\ncontent-type: application/protobuf\r\n"
               "content-length: 0\r\nconnection: close\r\n\r\n")
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection((host, int(port)), timeout=30) as raw, \
            context.wrap_socket(raw, server_hostname=host) as tls:
        tls.sendall(request.encode("ascii"))
        return int(tls.makefile("rb").readline().split()[1])


def render_nginx(prefix: Path, **values: str) -> Path:
    """The shipped template with its ${FEDRAD_*} placeholders filled, inside a minimal main config
    that keeps pid, logs and temporary files under ``prefix`` (no /var, no daemon)."""
    text = TEMPLATE.read_text(encoding="utf-8")
    for name, value in values.items():
        text = text.replace("${%s}" % name, str(value))
    assert "${" not in text, "a placeholder of deploy/nginx/fedrad-superlink.conf was left unfilled"
    prefix.mkdir(parents=True, exist_ok=True)
    (prefix / "fedrad-superlink.conf").write_text(text, encoding="utf-8")
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must read the test's private tmp folders
    temp = "".join(f"    {kind}_temp_path {prefix / kind};\n"
                   for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (prefix / "nginx.conf").write_text(
        f"{user}worker_processes 1;\npid {prefix / 'nginx.pid'};\nerror_log {prefix / 'error.log'} info;\n"
        f"events {{ worker_connections 256; }}\n"
        f"http {{\n    access_log {prefix / 'access.log'};\n{temp}"
        f"    include {prefix / 'fedrad-superlink.conf'};\n}}\n", encoding="utf-8")
    return prefix / "nginx.conf"


class Coordinator:
    """Every process of the test, each in its own session; `close` stops them and their children."""

    def __init__(self, root: Path):
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.fedrad = str(Path(sys.executable).parent / "fedrad")
        self.processes: dict[str, subprocess.Popen] = {}
        self.credentials = root / "credentials"
        self.ca = self.credentials / "ca.crt"
        self.link_port, self.proxy_port = free_port(), free_port()
        self.stores: dict[str, Path] = {}

    @property
    def loopback(self) -> str:
        return f"127.0.0.1:{self.link_port}"

    @property
    def public(self) -> str:
        return f"127.0.0.1:{self.proxy_port}"

    def spawn(self, name: str, command: list) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "w", encoding="utf-8") as log:
            proc = subprocess.Popen([str(c) for c in command], stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True, env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"})
        self.processes[name] = proc
        return proc

    def run(self, command: list, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}, encoding="utf-8")

    def log(self, name: str, lines: int = 40) -> str:
        path = self.logs / f"{name}.log"
        return "\n".join(path.read_text(errors="replace", encoding="utf-8").splitlines()[-lines:]) if path.exists() else ""

    def client(self) -> httpx.Client:
        return httpx.Client(verify=ssl.create_default_context(cafile=str(self.ca)), timeout=30)

    def wait_healthy(self, name: str, url: str, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        with self.client() as client:
            while time.monotonic() < deadline:
                assert self.processes[name].poll() is None, f"{name} exited at start:\n{self.log(name)}"
                try:
                    if client.get(url).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
        raise AssertionError(f"{name} did not answer {url} within {timeout_s} s:\n{self.log(name)}")

    def nodes(self) -> dict[str, str]:
        """{site name: status} from the Control API on loopback."""
        from flwr.proto.control_pb2 import ListNodesRequest, ListNodesResponse

        with self.client() as client:
            response = client.post(f"https://{self.loopback}/v1/control/list-nodes",
                                   content=ListNodesRequest().SerializeToString(), headers=PROTOBUF)
        response.raise_for_status()
        return {n.name: n.status for n in ListNodesResponse.FromString(response.content).nodes_info}

    def join(self, site: str, key: Path, port: int) -> subprocess.Popen:
        return self.spawn(f"site-{site}", [self.fedrad, "site", "join", "--superlink", self.public, "--ca", self.ca,
                                           "--key", key, "--store", self.stores[site], "--port", port])

    def close(self) -> None:
        stop_processes(self.processes.values(), grace_s=20)


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    c = Coordinator(tmp_path_factory.mktemp("deploy-proxy"))
    try:
        made = c.run(["bash", ROOT / "deploy" / "make-credentials.sh", c.credentials, "--host", "localhost",
                      "--site", "siteA", "--site", "siteB", "--site", "outsider"], timeout=120)
        assert made.returncode == 0, made.stdout + made.stderr
        c.stores = write_stores(c.root / "stores", hospital_rows(sizes={"siteA": 30, "siteB": 24, "outsider": 20}))
        c.spawn("superlink", [c.fedrad, "coordinator", "start", "--credentials", c.credentials,
                              "--database", c.root / "coordinator" / "state.db", "--port", c.link_port])
        conf = render_nginx(c.root / "nginx", FEDRAD_PUBLIC_PORT=c.proxy_port, FEDRAD_SERVER_NAME="_",
                            FEDRAD_SUPERLINK=c.loopback, FEDRAD_CERT=c.credentials / "superlink.pem",
                            FEDRAD_KEY=c.credentials / "superlink.key", FEDRAD_CA=c.ca)
        c.spawn("nginx", [NGINX, "-c", conf, "-p", conf.parent, "-g", "daemon off;"])
        c.wait_healthy("superlink", f"https://{c.loopback}/health")
        c.wait_healthy("nginx", f"https://{c.public}/health")
        for site in ("siteA", "siteB"):
            out = c.run([c.fedrad, "coordinator", "register", site, c.credentials / "sites" / site / f"{site}.pub",
                         "--superlink", c.loopback, "--ca", c.ca], timeout=180)
            assert out.returncode == 0 and out.stdout.strip().isdigit(), out.stdout + out.stderr
        for site in ("siteA", "siteB"):
            c.join(site, c.credentials / "sites" / site / f"{site}.key", free_port())
        yield c
    finally:
        c.close()


def test_registered_sites_come_online_through_the_proxy(coordinator):
    c = coordinator
    deadline, nodes = time.monotonic() + 120, {}
    while time.monotonic() < deadline:
        nodes = c.nodes()
        if all(nodes.get(site) == "online" for site in ("siteA", "siteB")):
            break
        time.sleep(1)
    assert nodes == {"siteA": "online", "siteB": "online"}, (nodes, c.log("site-siteA"), c.log("site-siteB"))
    # the sites' signed Fleet calls went through nginx (the SuperNodes know no other address)
    access = (c.root / "nginx" / "access.log").read_text(encoding="utf-8")
    assert '"POST /v1/fleet/activate-node HTTP/1.1" 200' in access
    assert '"POST /v1/fleet/pull-messages HTTP/1.1" 200' in access
    listed = c.run([c.fedrad, "coordinator", "sites", "--json", "--superlink", c.loopback, "--ca", c.ca])
    assert {r["site"]: r["status"] for r in json.loads(listed.stdout)} == nodes


def test_control_api_is_refused_on_the_public_side(coordinator):
    from flwr.proto.control_pb2 import ListRunsRequest, ListRunsResponse

    c = coordinator
    body = ListRunsRequest().SerializeToString()
    with c.client() as client:
        public = client.post(f"https://{c.public}/v1/control/list-runs", content=body, headers=PROTOBUF)
        local = client.post(f"https://{c.loopback}/v1/control/list-runs", content=body, headers=PROTOBUF)
        assert public.status_code == 403
        assert local.status_code == 200
        ListRunsResponse.FromString(local.content)  # a real answer on loopback
        refused = {path: client.post(f"https://{c.public}{path}", content=body, headers=PROTOBUF).status_code
                   for path in ("/v1/control/register-node", "/v1/control/start-run", "/v1/runtime/get-nodes",
                                "/v1/runtime/responses", "/docs", "/openapi.json", "/v1/fleet/get-run?x=1",
                                "/v1/fleet/get-run/", "/v1/FLEET/get-run")}
        assert set(refused.values()) == {403}, refused
        assert client.get(f"https://{c.public}/openapi.json").status_code == 403
        assert client.get(f"https://{c.public}/v1/fleet/get-run").status_code == 403  # Fleet is POST only
        # an unsigned Fleet call does reach the SuperLink, which refuses it: node authentication is its job
        unsigned = client.post(f"https://{c.public}/v1/fleet/get-run", content=b"", headers=PROTOBUF)
        assert unsigned.status_code == 401 and "SuperNode authentication" in unsigned.text
    # dot segments and escapes: nginx normalises the path for matching, so send raw request lines too
    for raw in ("/v1/fleet/../control/list-runs", "/v1/fleet/%2e%2e/control/list-runs",
                "/v1/fleet/..%2fcontrol/list-runs", "//v1/control/list-runs", "/v1/fleet/%70ull-messages"):
        assert raw_status(c.public, raw, c.ca) == 403, raw
    assert raw_status(c.loopback, "/v1/control/list-runs", c.ca) == 200  # the same raw request, on loopback


def test_register_refuses_bad_keys_and_is_idempotent(coordinator):
    c = coordinator
    site_a = c.credentials / "sites" / "siteA"
    again = c.run([c.fedrad, "coordinator", "register", "siteA", site_a / "siteA.pub", "--superlink", c.loopback,
                   "--ca", c.ca])
    assert again.returncode == 0 and "registered already" in again.stderr, again.stderr
    other = c.run([c.fedrad, "coordinator", "register", "siteZ", site_a / "siteA.pub", "--superlink", c.loopback,
                   "--ca", c.ca])
    assert other.returncode == 2 and "named 'siteA', not 'siteZ'" in other.stderr, other.stderr
    private = c.run([c.fedrad, "coordinator", "register", "siteA", site_a / "siteA.key", "--superlink", c.loopback,
                     "--ca", c.ca])
    assert private.returncode == 2 and "is a private key" in private.stderr, private.stderr
    down = c.run([c.fedrad, "coordinator", "register", "siteZ", c.credentials / "sites" / "outsider" / "outsider.pub",
                  "--superlink", f"127.0.0.1:{free_port()}", "--ca", c.ca])
    assert down.returncode == 2 and "cannot reach the SuperLink" in down.stderr, down.stderr


def test_unregistered_key_is_refused(coordinator):
    c = coordinator
    proc = c.join("outsider", c.credentials / "sites" / "outsider" / "outsider.key", free_port())
    try:
        proc.wait(timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail("a SuperNode with an unregistered key kept running:\n" + c.log("site-outsider"))
    assert proc.returncode != 0
    assert "Failed to activate SuperNode" in c.log("site-outsider"), c.log("site-outsider")
    assert "outsider" not in c.nodes()


def test_census_study_runs_through_the_proxy(coordinator):
    c = coordinator
    study = c.root / "study.toml"
    study.write_text(STUDY, encoding="utf-8")
    out = c.run([c.fedrad, "coordinator", "run", "--study", study, "--superlink", c.loopback,
                 "--root-certificates", c.ca, "--sites", "2", "--out", c.root / "run"], timeout=900)
    assert out.returncode == 0, out.stdout + out.stderr[-4000:]
    results = json.loads((c.root / "run" / "results.json").read_text(encoding="utf-8"))
    assert results["status"] == "completed"
    assert sorted(results["census"]["sites"]) == ["siteA", "siteB"]
    assert {s: i["cases"] for s, i in results["census"]["sites"].items()} == {"siteA": 30, "siteB": 24}
    access = (c.root / "nginx" / "access.log").read_text(encoding="utf-8")
    assert access.count('"POST /v1/fleet/push-messages HTTP/1.1" 200') >= 2  # both replies came through nginx
