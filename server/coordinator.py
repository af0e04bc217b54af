"""`fedrad coordinator start | register | sites`: the coordinator's SuperLink for a real consortium.

``start`` replaces itself with ``flower-superlink``: TLS with the consortium's certificate
(``deploy/make-credentials.sh``), SuperNode authentication on, state in SQLite, no runtime
dependency installation. It listens on the coordinator's loopback by default: Flower's Control
API (submit runs, register nodes) has no authentication in the open-source build and shares the
port with the Fleet API the hospitals use, so hospitals reach the SuperLink through the reverse
proxy in ``deploy/nginx/``, which passes the Fleet API only.

``register`` and ``sites`` talk to the Control API on loopback: ``register`` wraps
``flwr supernode register`` and prints the site's node id; ``sites`` lists registered nodes with
their names and whether they are online.
"""

from __future__ import annotations

import ipaddress
import json
import os
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

console = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 140)

#: the SuperLink's port on the coordinator's loopback (Flower's old Fleet API port; the proxy's
#: public port is 443 in deploy/nginx, and Flower's own default, 8000, is often taken by web apps)
DEFAULT_PORT = 9092
DEFAULT_SUPERLINK = f"127.0.0.1:{DEFAULT_PORT}"


def _fail(message: str, code: int = 2):
    console.print(f"[red]error:[/] {escape(message)}", highlight=False)
    raise typer.Exit(code)


def _credential(path: Optional[Path], credentials: Optional[Path], name: str, option: str) -> Path:
    """An explicit ``--ca/--cert/--key`` path, else ``CREDENTIALS/<name>``; it must exist."""
    if path is None:
        if credentials is None:
            _fail(f"give --credentials DIR (from deploy/make-credentials.sh) or {option}")
        path = credentials / name
    if not path.is_file():
        _fail(f"{option}: '{path}' does not exist (run deploy/make-credentials.sh)")
    return path.absolute()


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def start(
    database: Path = typer.Option(..., "--database",
                                  help="SQLite file of the SuperLink's state (runs, registered sites)."),
    credentials: Optional[Path] = typer.Option(
        None, "--credentials", help="Folder from deploy/make-credentials.sh (ca.crt, superlink.pem/.key)."),
    ca: Optional[Path] = typer.Option(None, "--ca", help="CA certificate (default CREDENTIALS/ca.crt)."),
    cert: Optional[Path] = typer.Option(None, "--cert",
                                        help="SuperLink certificate (default CREDENTIALS/superlink.pem)."),
    key: Optional[Path] = typer.Option(None, "--key",
                                       help="SuperLink private key (default CREDENTIALS/superlink.key)."),
    host: str = typer.Option("127.0.0.1", "--host",
                             help="Address to listen on. Keep loopback and let deploy/nginx face the hospitals: "
                                  "the Control API on this port has no authentication."),
    port: int = typer.Option(DEFAULT_PORT, "--port", help="Port of the SuperLink (Fleet, Control and Runtime APIs)."),
    log_file: Optional[Path] = typer.Option(None, "--log-file", help="Also write the SuperLink's log here (rotated)."),
):
    """Start the consortium's SuperLink: TLS, SuperNode authentication, SQLite state (replaces this process)."""
    from fedrad.client.flower_process import flower_bin, flower_env

    ca, cert, key = (_credential(ca, credentials, "ca.crt", "--ca"),
                     _credential(cert, credentials, "superlink.pem", "--cert"),
                     _credential(key, credentials, "superlink.key", "--key"))
    database = database.absolute()
    database.parent.mkdir(parents=True, exist_ok=True)
    home = database.parent / f"{database.stem}.flwr"  # FLWR_HOME: SuperExec and ServerApp scratch, next to the state
    home.mkdir(parents=True, exist_ok=True)
    command = [flower_bin("flower-superlink"), "--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert),
               "--ssl-keyfile", str(key), "--enable-supernode-auth", "--database", str(database),
               "--disable-runtime-dependency-installation", "--host", host, "--port", str(port)]
    if log_file is not None:
        command += ["--log-file", str(log_file.absolute())]
    if not _is_loopback(host):
        console.print(f"[yellow]warning:[/] listening on {host}: Flower's Control API (submit runs, register sites) "
                      "has no authentication and shares this port; firewall it so that only the reverse proxy "
                      "(deploy/nginx) and the coordinator reach it", highlight=False)
    console.print("starting: " + " ".join(command), markup=False, highlight=False)
    os.execvpe(command[0], command, flower_env(home))


def _ca_for_control(ca: Optional[Path], credentials: Optional[Path]) -> Path:
    return _credential(ca, credentials, "ca.crt", "--ca")


def _flwr(args: list[str], superlink: str, ca: Path) -> dict:
    """Run ``flwr <args> fedrad --format json`` against ``superlink`` from a private FLWR_HOME; its JSON answer."""
    from fedrad.client.flower_process import flower_bin, flower_env
    from fedrad.server.local import CONNECTION, write_connection

    with tempfile.TemporaryDirectory(prefix="fedrad-flwr-") as home:
        write_connection(Path(home), superlink, insecure=False, root_certificates=ca)
        proc = subprocess.run([flower_bin("flwr"), *args, CONNECTION, "--format", "json"], env=flower_env(Path(home)),
                              capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=300)
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError:
        detail = (proc.stdout + proc.stderr).strip()
        return {"success": False, "error-message": detail or f"flwr exited with status {proc.returncode}"}


def _reason(answer: dict) -> str:
    """Flower's error message without its 'Using SuperLink: ...' preamble."""
    text = str(answer.get("error-message", "unknown error"))
    return "\n".join(line for line in text.splitlines() if line.strip() and not line.startswith("Using SuperLink"))


def _load_node_key(path: Path):
    """The site's public key as Flower needs it: OpenSSH, ECDSA on a NIST curve."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_public_key

    if not path.is_file():
        _fail(f"public key '{path}' does not exist")
    data = path.read_bytes()
    if b"PRIVATE KEY" in data:
        _fail(f"'{path}' is a private key: register the site's public key (SITE.pub); the private key "
              "stays at the hospital")
    try:
        key = load_ssh_public_key(data.strip())
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        _fail(f"'{path}' is not an OpenSSH public key ({exc}); make one with "
              "`ssh-keygen -t ecdsa -b 384 -N \"\" -f SITE -C SITE` (or deploy/make-credentials.sh --site SITE)")
    if not isinstance(key, ec.EllipticCurvePublicKey):
        _fail(f"'{path}' is a {data.split()[0].decode(errors='replace')} key; Flower's node authentication needs "
              "ECDSA on a NIST curve: `ssh-keygen -t ecdsa -b 384 ...`")
    return key


def list_nodes(superlink: str, ca: Path, timeout: float = 30) -> list:
    """Every node the SuperLink knows (``NodeInfo`` protobufs), from the Control API."""
    import httpx
    from flwr.proto.control_pb2 import ListNodesRequest, ListNodesResponse

    response = httpx.post(f"https://{superlink}/v1/control/list-nodes",
                          content=ListNodesRequest().SerializeToString(),
                          headers={"content-type": "application/protobuf"},
                          verify=ssl.create_default_context(cafile=str(ca)), timeout=timeout)
    response.raise_for_status()
    return list(ListNodesResponse.FromString(response.content).nodes_info)


def register(
    site: str = typer.Argument(..., help="The site's name in the consortium."),
    public_key: Path = typer.Argument(..., help="The site's OpenSSH ECDSA public key (SITE.pub)."),
    superlink: str = typer.Option(DEFAULT_SUPERLINK, "--superlink",
                                  help="The SuperLink's Control API, on the coordinator's loopback."),
    ca: Optional[Path] = typer.Option(None, "--ca", help="CA certificate (default CREDENTIALS/ca.crt)."),
    credentials: Optional[Path] = typer.Option(None, "--credentials", help="Folder from deploy/make-credentials.sh."),
):
    """Register a site's public key with the SuperLink; print its node id (fixed from now on)."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    ca = _ca_for_control(ca, credentials)
    key = _load_node_key(public_key)
    answer = _flwr(["supernode", "register", str(public_key.absolute()), "--name", site], superlink, ca)
    if answer.get("success"):
        node_id = int(answer["node-id"])
        console.print(f"site '{site}' registered: node id {node_id}", highlight=False)
        print(node_id)
        return
    reason = _reason(answer)
    if "already in use" in reason:  # registered before: find which node holds the key, for an idempotent re-run
        pem = key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        try:
            holders = [n for n in list_nodes(superlink, ca) if n.public_key.strip() == pem.strip()
                       and not n.unregistered_at]
        except Exception:  # noqa: BLE001 - the first answer already says what is wrong
            holders = []
        if holders and holders[0].name == site:
            console.print(f"site '{site}' was registered already: node id {holders[0].node_id}", highlight=False)
            print(holders[0].node_id)
            return
        if holders:
            _fail(f"this key is registered already, as node {holders[0].node_id} named '{holders[0].name}', "
                  f"not '{site}'; unregister that node first (`flwr supernode unregister`) or use the site's own key")
    if "unavailable" in reason.lower():
        _fail(f"cannot reach the SuperLink's Control API at {superlink}: is `fedrad coordinator start` running, "
              f"on this port, with this CA ({ca})? ({reason})")
    _fail(f"could not register site '{site}': {reason}")


def sites(
    superlink: str = typer.Option(DEFAULT_SUPERLINK, "--superlink", help="The SuperLink's Control API (loopback)."),
    ca: Optional[Path] = typer.Option(None, "--ca", help="CA certificate (default CREDENTIALS/ca.crt)."),
    credentials: Optional[Path] = typer.Option(None, "--credentials", help="Folder from deploy/make-credentials.sh."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON to stdout instead of a table."),
):
    """List the registered sites: name, node id, status (online, offline, registered) and since when."""
    import httpx

    ca = _ca_for_control(ca, credentials)
    try:
        nodes = list_nodes(superlink, ca)
    except (httpx.HTTPError, ssl.SSLError, OSError) as exc:
        _fail(f"cannot list sites at {superlink}: {exc}")
    rows = [{"site": n.name, "node_id": n.node_id, "status": n.status, "registered": n.registered_at[:19],
             "last_online": n.last_activated_at[:19], "last_offline": n.last_deactivated_at[:19]} for n in nodes]
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    table = Table("site", "node id", "status", "registered", "last online", "last offline",
                  title=f"sites registered at {superlink}")
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    console.print(table)
