"""deploy/ without a federation: the credentials script, the nginx template (`nginx -t`), and the
compose, Kubernetes and systemd files (parsed and checked; they cannot run here)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import ROOT

DEPLOY = ROOT / "deploy"
SCRIPT = DEPLOY / "make-credentials.sh"
FEDRAD = str(Path(sys.executable).parent / "fedrad")
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()),
                                      None)
assert shutil.which("openssl") and shutil.which("ssh-keygen") and shutil.which("kubectl"), \
    "needs openssl, ssh-keygen and kubectl: `make test` installs them (apt-get install openssl openssh-client " \
    "kubernetes-client)"


def make_credentials(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), str(out), *args], capture_output=True, text=True, timeout=120, encoding="utf-8")


def sans(cert: Path) -> str:
    return subprocess.run(["openssl", "x509", "-in", str(cert), "-noout", "-ext", "subjectAltName"],
                          capture_output=True, text=True, check=True, encoding="utf-8").stdout


@pytest.fixture(scope="module")
def credentials(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("credentials") / "consortium"
    made = make_credentials(out, "--host", "10.77.0.1", "--host", "localhost", "--host", "coord.example.org",
                            "--site", "siteA", "--site", "siteB")
    assert made.returncode == 0, made.stderr
    return out


def test_credentials_layout_modes_and_names(credentials):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    c = credentials
    for private in ("ca.key", "superlink.key", "sites/siteA/siteA.key", "sites/siteB/siteB.key"):
        assert (c / private).stat().st_mode & 0o777 == 0o600, private
    for public in ("ca.crt", "superlink.pem", "sites/siteA/siteA.pub"):
        assert (c / public).stat().st_mode & 0o777 == 0o644, public
    subprocess.run(["openssl", "verify", "-CAfile", str(c / "ca.crt"), str(c / "superlink.pem")], check=True,
                   capture_output=True)
    names = sans(c / "superlink.pem")
    for name in ("DNS:localhost", "IP Address:127.0.0.1", "IP Address:0:0:0:0:0:0:0:1", "IP Address:10.77.0.1",
                 "DNS:coord.example.org"):
        assert name in names
    assert names.count("localhost") == 1
    for site in ("siteA", "siteB"):
        public = load_ssh_public_key((c / "sites" / site / f"{site}.pub").read_bytes())
        private = load_ssh_private_key((c / "sites" / site / f"{site}.key").read_bytes(), password=None)
        assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp384r1"
        assert private.public_key().public_numbers() == public.public_numbers()
        assert (c / "sites" / site / f"{site}.pub").read_text(encoding="utf-8").split()[-1] == site  # the comment names the site


def test_credentials_hold_a_package_signing_key_pair_fedrad_signs_and_verifies_with(credentials, tmp_path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from fedrad.common.package import read_package
    from fedrad.common.signing import key_id, load_public_key
    from fedrad.common.study import parse_study
    from fedrad.server.package import load_signing_key, write_package
    from tests.server.test_package_signing import RESULTS, STUDY  # a hand-written finished run

    c = credentials
    assert (c / "package-signing.key").stat().st_mode & 0o777 == 0o600
    assert (c / "package-signing.pub").stat().st_mode & 0o777 == 0o644
    private, public = load_signing_key(c / "package-signing.key"), load_public_key(c / "package-signing.pub")
    assert isinstance(public, Ed25519PublicKey) and key_id(private.public_key()) == key_id(public)
    package = write_package(tmp_path / "run", RESULTS, parse_study(STUDY), sign_key=c / "package-signing.key")
    assert read_package(package, public)["run_id"] == RESULTS["run_id"]
    made = make_credentials(tmp_path / "fresh")
    assert "package signing: created" in made.stdout and "--sign-key" in made.stdout and "--trust" in made.stdout


def test_credentials_rerun_keeps_the_ca_and_site_keys(tmp_path):
    out = tmp_path / "c"
    assert make_credentials(out, "--host", "a.example.org", "--site", "siteA").returncode == 0
    before = {p: (out / p).read_bytes() for p in ("ca.key", "ca.crt", "superlink.pem", "sites/siteA/siteA.key",
                                                  "package-signing.key", "package-signing.pub")}
    again = make_credentials(out, "--host", "a.example.org", "--site", "siteA", "--site", "siteB")
    assert again.returncode == 0 and "keeping" in again.stdout
    assert "package signing: keeping" in again.stdout
    assert {p: (out / p).read_bytes() for p in before} == before  # nothing replaced
    assert (out / "sites" / "siteB" / "siteB.key").is_file()
    moved = make_credentials(out, "--host", "b.example.org")  # a new host name: a new server certificate, same CA
    assert moved.returncode == 0
    assert (out / "ca.key").read_bytes() == before["ca.key"]
    assert "DNS:b.example.org" in sans(out / "superlink.pem") and "a.example.org" not in sans(out / "superlink.pem")
    (out / "ca.key").rename(tmp_path / "ca.key.offline")  # the CA key kept offline: sites can still be added
    offline = make_credentials(out, "--site", "siteC")
    assert offline.returncode == 0 and (out / "sites" / "siteC" / "siteC.key").is_file(), offline.stderr
    assert not (out / "ca.key").exists() and (out / "ca.crt").read_bytes() == before["ca.crt"]
    refused = make_credentials(out, "--host", "c.example.org")  # but no certificate can be issued
    assert refused.returncode == 2 and "ca.key is not here" in refused.stderr, refused.stderr
    (tmp_path / "ca.key.offline").rename(out / "ca.key")
    fresh = make_credentials(out, "--new-ca")
    assert fresh.returncode == 0 and (out / "ca.key").read_bytes() != before["ca.key"]
    assert (out / "sites" / "siteA" / "siteA.key").read_bytes() == before["sites/siteA/siteA.key"]
    assert (out / "package-signing.key").read_bytes() == before["package-signing.key"]  # hospitals hold its .pub
    (out / "package-signing.pub").unlink()  # a lost public half is made again from the key
    assert make_credentials(out).returncode == 0
    assert (out / "package-signing.pub").read_bytes() == before["package-signing.pub"]
    subprocess.run(["openssl", "verify", "-CAfile", str(out / "ca.crt"), str(out / "superlink.pem")], check=True,
                   capture_output=True)


@pytest.mark.parametrize("args, message", [
    (["--site", "bad name"], "site name 'bad name'"),
    (["--host", "a b"], "host 'a b'"),
    (["--days", "0"], "--days must be a positive number"),
    (["--frobnicate"], "unknown option '--frobnicate'"),
])
def test_credentials_refuse_bad_arguments(tmp_path, args, message):
    made = make_credentials(tmp_path / "c", *args)
    assert made.returncode == 2 and message in made.stderr, made.stderr


def render(template: str, **values) -> str:
    for name, value in values.items():
        template = template.replace("${%s}" % name, str(value))
    return template


def test_nginx_template_is_accepted_by_nginx(credentials, tmp_path):
    template = (DEPLOY / "nginx" / "fedrad-superlink.conf").read_text(encoding="utf-8")
    placeholders = set(re.findall(r"\$\{(FEDRAD_[A-Z_]+)\}", template))
    assert placeholders == {"FEDRAD_PUBLIC_PORT", "FEDRAD_SERVER_NAME", "FEDRAD_SUPERLINK", "FEDRAD_CERT",
                            "FEDRAD_KEY", "FEDRAD_CA"}
    conf = render(template, FEDRAD_PUBLIC_PORT=18443, FEDRAD_SERVER_NAME="coord.example.org",
                  FEDRAD_SUPERLINK="127.0.0.1:9092", FEDRAD_CERT=credentials / "superlink.pem",
                  FEDRAD_KEY=credentials / "superlink.key", FEDRAD_CA=credentials / "ca.crt")
    (tmp_path / "fedrad.conf").write_text(conf, encoding="utf-8")
    temp = "".join(f"{kind}_temp_path {tmp_path / kind}; "
                   for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path / 'nginx.pid'}; error_log {tmp_path / 'error.log'};\nevents {{}}\n"
        f"http {{ access_log off; {temp}include {tmp_path / 'fedrad.conf'}; }}\n", encoding="utf-8")
    checked = subprocess.run([NGINX, "-t", "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path)],
                             capture_output=True, text=True, timeout=60, encoding="utf-8")
    assert checked.returncode == 0, checked.stderr


def test_k8s_configmap_is_the_shipped_template():
    configmap = yaml.safe_load((DEPLOY / "k8s" / "nginx-configmap.yaml").read_text(encoding="utf-8"))
    template = (DEPLOY / "nginx" / "fedrad-superlink.conf").read_text(encoding="utf-8")
    assert configmap["data"]["fedrad-superlink.conf.template"] == template


def test_k8s_manifests():
    docs = [d for path in sorted((DEPLOY / "k8s").glob("*.yaml")) for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    kinds = {d["kind"]: d for d in docs}
    assert {"Kustomization", "ConfigMap", "PersistentVolumeClaim", "Deployment", "Service"} <= set(kinds)
    service = kinds["Service"]
    assert [p["port"] for p in service["spec"]["ports"]] == [443]  # only nginx faces the hospitals
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    superlink = containers["superlink"]["args"]
    assert superlink[superlink.index("--host") + 1] == "127.0.0.1"  # the Control API stays inside the pod
    assert "ports" not in containers["superlink"]
    env = {e["name"]: e["value"] for e in containers["proxy"]["env"]}
    assert env["FEDRAD_SUPERLINK"] == f"127.0.0.1:{superlink[superlink.index('--port') + 1]}"
    assert {v["name"] for v in pod["volumes"]} == {"credentials", "nginx-template", "data"}


def test_k8s_kustomization_renders(tmp_path):
    shutil.copytree(DEPLOY / "k8s", tmp_path / "k8s")
    (tmp_path / "k8s" / "credentials").mkdir()
    for name in ("ca.crt", "superlink.pem", "superlink.key", "package-signing.key"):
        (tmp_path / "k8s" / "credentials" / name).write_text("placeholder\n", encoding="utf-8")
    rendered = subprocess.run(["kubectl", "kustomize", str(tmp_path / "k8s")], capture_output=True, text=True,
                              timeout=120, encoding="utf-8")
    assert rendered.returncode == 0, rendered.stderr
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(rendered.stdout))
    assert kinds == ["ConfigMap", "Deployment", "PersistentVolumeClaim", "Secret", "Service"]


def test_compose_file():
    compose = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text(encoding="utf-8"))
    services = compose["services"]
    assert {s: services[s]["profiles"] for s in services} == {
        "superlink": ["coordinator"], "proxy": ["coordinator"], "supernode": ["site"]}
    assert services["superlink"]["ports"] == ["127.0.0.1:9092:9092"]  # the host's loopback only
    assert services["proxy"]["ports"] == ["443:443"]
    assert "ports" not in services["supernode"]  # a site connects out and listens on nothing
    assert any(v.startswith("../nginx/fedrad-superlink.conf:/etc/nginx/templates/")
               for v in services["proxy"]["volumes"])
    assert services["proxy"]["environment"]["FEDRAD_SUPERLINK"] == "superlink:9092"
    # the commands parse as fedrad commands (typer rejects an unknown option even with --help)
    for name in ("superlink", "supernode"):
        args = [re.sub(r"\$\{[^}]+\}", "x", str(a)) for a in services[name]["command"]]
        assert subprocess.run([FEDRAD, *args, "--help"], capture_output=True, timeout=120).returncode == 0, name


def _exec_start(unit: Path) -> list[str]:
    text = unit.read_text(encoding="utf-8").replace("\\\n", " ")
    line = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    return shlex.split(line.removeprefix("ExecStart="))


@pytest.mark.parametrize("unit", ["fedrad-superlink.service", "fedrad-supernode@.service"])
def test_systemd_units(unit, tmp_path):
    path = DEPLOY / "systemd" / unit
    command = _exec_start(path)
    assert command[0] == "/opt/fedrad/.venv/bin/fedrad"
    args = [re.sub(r"\$\{[^}]+\}|%i", "x", a) for a in command[1:]]
    assert subprocess.run([FEDRAD, *args, "--help"], capture_output=True, timeout=120).returncode == 0
    if unit == "fedrad-superlink.service":
        assert args[args.index("--host") + 1] == "127.0.0.1"
    if shutil.which("systemd-analyze") is None:
        return
    local = tmp_path / unit.replace("@.", "@siteA.")
    local.write_text(path.read_text(encoding="utf-8").replace("/opt/fedrad/.venv/bin/fedrad", FEDRAD), encoding="utf-8")
    verified = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=120, encoding="utf-8")
    assert verified.returncode == 0 and not verified.stderr.strip(), verified.stderr


def test_coordinator_start_refuses_missing_credentials(tmp_path):
    out = subprocess.run([FEDRAD, "coordinator", "start", "--credentials", str(tmp_path / "none"), "--database",
                          str(tmp_path / "db" / "state.db")], capture_output=True, text=True, timeout=120, encoding="utf-8")
    assert out.returncode == 2 and "ca.crt' does not exist" in out.stderr
    assert not (tmp_path / "db").exists()  # nothing was started or written


@pytest.mark.parametrize("ca, key", [("--ca", "--key"), ("--root-certificates", "--auth-key")])
def test_site_join_takes_both_spellings(ca, key):
    parsed = subprocess.run([FEDRAD, "site", "join", "--store", "s", "--superlink", "h:1", ca, "c", key, "k", "--help"],
                            capture_output=True, timeout=120)
    assert parsed.returncode == 0
