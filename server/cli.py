"""The `fedrad` command: the coordinator's commands, with the hospital's (`fedrad.client.cli`) mounted beside them."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import pandas as pd
import typer

from fedrad.common.errors import FedradError

from fedrad.client import cli as site_cli
from fedrad.client.cli import _read_or_exit, console, table_of
from fedrad.server.preflight import preflight_or_exit
from fedrad.server.summary import exit_status, print_results

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Federated radiomics: build and validate prognosis models across hospitals.")


@app.callback()
def _readable_in_any_locale():
    """A hospital server may run under LANG=C without UTF-8: site names, "—" and "≥" must print, not crash."""
    for stream in (sys.stdout, sys.stderr):
        if (getattr(stream, "encoding", None) or "").lower().replace("-", "") != "utf8":
            stream.reconfigure(errors="backslashreplace")


def parse_sites(specs: list[str]) -> dict[str, Path]:
    sites = {}
    for spec in specs:
        name, sep, store = spec.partition("=")
        if not sep or not name or not store:
            raise typer.BadParameter(f"'{spec}': give each site as NAME=STORE, e.g. --site siteA=stores/siteA")
        if name in sites:
            raise typer.BadParameter(f"site '{name}' is given twice")
        sites[name] = Path(store)
    return sites


def local(
    site: list[str] = typer.Option(..., "--site", help="NAME=STORE, once per site."),
    study: Path = typer.Option(..., "--study", help="study.toml"),
    out: Path = typer.Option(..., "--out", help="Run directory (results.json, runlog.sqlite, reference/)."),
    allow_event_times: bool = typer.Option(False, "--allow-event-times",
                                           help="Every site consents to share event times (unstratified Cox)."),
    dashboard: bool = typer.Option(False, "--dashboard", help="Serve the live dashboard of this run on loopback "
                                                              "while it runs (`fedrad dashboard`)."),
    dashboard_port: int = typer.Option(8765, "--dashboard-port", help="Port of --dashboard (0: any free port)."),
    runtime: str = typer.Option("warm", "--runtime", help="warm: each site's messages run in processes forked "
                                "from one that has fedrad loaded, with short polls; stock: Flower's processes "
                                "as they ship (a fresh interpreter per message)."),
):
    """Run a study on a local federation: a real SuperLink and one SuperNode per site, on loopback."""
    preflight_or_exit(study, parse_sites(site))  # the study and every store, before any process starts
    from contextlib import nullcontext

    from fedrad.server.local import LocalFederation

    sites = parse_sites(site)
    echo = lambda line: console.print(line, markup=False, highlight=False)  # noqa: E731
    try:
        if dashboard:
            from fedrad.server.dashboard import dashboard_beside

            beside = dashboard_beside(out.absolute(), dashboard_port, echo=echo)
        else:
            beside = nullcontext()
        with beside, LocalFederation(out, sites, echo=echo, allow_event_times=allow_event_times,
                                     runtime=runtime) as fed:
            results = fed.run_study(study, out)
    except KeyboardInterrupt:
        console.print("[red]interrupted: every Flower process started for this run has been stopped")
        raise typer.Exit(130)
    except FedradError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2)
    print_results(results, out)
    raise typer.Exit(exit_status(results))


def status(run_dir: Path = typer.Argument(..., help="A run directory (holds runlog.sqlite).")):
    """Print a run directory's log: runs, stages, rounds, and each site's exchanges."""
    from fedrad.server.runlog import read_runlog

    log = _read_or_exit(read_runlog, run_dir)
    when = lambda s: pd.to_datetime(s, unit="s").dt.strftime("%H:%M:%S")  # noqa: E731
    runs = log["runs"].assign(started=lambda d: when(d.started), ended=lambda d: when(d.ended))
    console.print(table_of(runs, "runs"))
    stages = log["stages"].assign(seconds=lambda d: (d.ended - d.started).round(1), started=lambda d: when(d.started))
    console.print(table_of(stages.drop(columns=["ended"]), "stages"))
    rounds = log["rounds"].assign(seconds=lambda d: (d.ended - d.started).round(1), started=lambda d: when(d.started))
    console.print(table_of(rounds.drop(columns=["ended"]), "rounds"))
    ex = log["exchanges"]
    per_site = ex.groupby(["run_id", "site"], as_index=False).agg(
        messages=("round", "size"), failed=("status", lambda s: int((s == "failed").sum())),
        bytes_out=("bytes_out", "sum"), bytes_in=("bytes_in", "sum"))
    console.print(table_of(per_site, "per site (bytes out = coordinator to site)"))
    failures = ex[ex.status != "answered"][["run_id", "stage", "round", "site", "status", "reason"]]
    if len(failures):
        console.print(table_of(failures, "failures and pending replies"))
    if len(log["figures"]):
        console.print(table_of(log["figures"], "figures"))


def dashboard(
    run_dir: Path = typer.Option(..., "--run-dir", help="A run directory (runlog.sqlite; it may not exist yet)."),
    port: int = typer.Option(8765, "--port", help="Port to listen on."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback by default)."),
):
    """Serve a live view of a run: stages, rounds per site, bytes, convergence, privacy events, the report."""
    import uvicorn

    from fedrad.server.dashboard import create_app

    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning:[/] the dashboard has no login; on {host} anyone who can reach port {port} "
                      "can read this run's log")
    console.print(f"dashboard of {run_dir.absolute()}: http://{host}:{port}/ (Ctrl-C stops it)", highlight=False)
    uvicorn.run(create_app(run_dir), host=host, port=port, log_level="warning")


def package(run_dir: Path = typer.Argument(..., help="A finished run directory (results.json, study.toml)."),
            out: Optional[Path] = typer.Option(None, "--out", help="Where to write it (default RUN_DIR/package)."),
            sign_key: Optional[Path] = typer.Option(
                None, "--sign-key", help="The coordinator's package-signing key (PEM Ed25519, "
                                         "deploy/make-credentials.sh); default: the key the run's package stage "
                                         "used (RUN_DIR/signing-key.path, else RUN_DIR/package-signing.key).")):
    """Build and sign the model package a new site validates with (`fedrad validate`) from a finished run."""
    import json

    from fedrad.common.errors import FedradError
    from fedrad.common.study import load_study
    from fedrad.server.package import write_package
    from fedrad.server.summary import package_lines

    try:
        results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
        written = write_package(run_dir, results, load_study(run_dir / "study.toml"), out, sign_key=sign_key)
    except FileNotFoundError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2)
    except json.JSONDecodeError as exc:
        console.print(f"[red]error:[/] {run_dir / 'results.json'} is not valid JSON ({exc})", highlight=False)
        raise typer.Exit(2)
    except FedradError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2)
    for line in package_lines(written):
        console.print(line, markup=False, highlight=False)


coordinator_app = typer.Typer(no_args_is_help=True, help="Commands the coordinator runs.")

from fedrad.server import coordinator as _coordinator  # noqa: E402

coordinator_app.command("start")(_coordinator.start)
coordinator_app.command("register")(_coordinator.register)
coordinator_app.command("sites")(_coordinator.sites)


@coordinator_app.command("run")
def coordinator_run(
    study: Path = typer.Option(..., "--study"),
    superlink: str = typer.Option(..., "--superlink", help="SuperLink address host:port."),
    out: Path = typer.Option(..., "--out", help="Run directory."),
    sites: int = typer.Option(0, "--sites", help="Sites to wait for (default: the study's)."),
    root_certificates: Optional[Path] = typer.Option(None, "--root-certificates", "--ca",
                                                     help="The consortium's CA certificate, ca.crt (TLS)."),
    insecure: bool = typer.Option(False, "--insecure"),
    sign_key: Optional[Path] = typer.Option(
        None, "--sign-key", help="The consortium's package-signing key (package-signing.key from "
                                 "deploy/make-credentials.sh), read by the ServerApp: the package stage signs with "
                                 "it. Needed when the study has a package stage (with --insecure: a key made for "
                                 "this run directory)."),
):
    """Submit a study to a running SuperLink and follow it (`flwr run --stream`)."""
    from fedrad.common.study import load_study
    from fedrad.server.local import prepare_run_dir, submit, write_connection
    from fedrad.server.package import name_signing_key

    if not insecure and root_certificates is None:
        raise typer.BadParameter("give --ca (the consortium's ca.crt), or --insecure for a loopback rehearsal")
    out = out.absolute()
    try:
        if sign_key is None and not insecure and "package" in load_study(study).study.stages:
            raise typer.BadParameter("the study's package stage signs the model package: give --sign-key "
                                     "CREDENTIALS/package-signing.key (deploy/make-credentials.sh makes it)")
        out.mkdir(parents=True, exist_ok=True)
        name_signing_key(out, sign_key.absolute() if sign_key else None)
    except FedradError as exc:
        console.print(f"error: {exc}", markup=False, highlight=False)
        raise typer.Exit(2)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    run_config = prepare_run_dir(out, study, expected_sites=sites)
    home = out / "flwr" / "cli"
    # flwr reads the certificate path from config.toml and refuses a relative one
    write_connection(home, superlink, insecure=insecure,
                     root_certificates=Path(root_certificates).absolute() if root_certificates else None)
    try:
        results = submit(out, run_config, home, lambda line: console.print(line, markup=False, highlight=False))
    except FedradError as exc:
        console.print(f"error: {exc}", markup=False, highlight=False)
        raise typer.Exit(2)
    print_results(results, out)
    raise typer.Exit(exit_status(results))


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-out"), "--out"),
    sites: int = typer.Option(4, "--sites", min=1, help="The last site is the held-out validation site (3 or more)."),
    patients: int = typer.Option(60, "--patients", min=5),
    seed: int = typer.Option(0, "--seed"),
    jobs: Optional[int] = typer.Option(None, "--jobs", min=1),
    full_params: bool = typer.Option(False, "--full-params", help="Extract with default.yaml (original+LoG+wavelet)."),
):
    """The embedded default: synthesise a cohort, prepare every site, run the whole study on a local federation."""
    from fedrad.server.demo import run_demo

    try:
        run_demo(out, n_sites=sites, n_patients=patients, seed=seed, jobs=jobs, full_params=full_params,
                 console=console)
    except FedradError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)


# The hospital's commands, then the coordinator's: one `fedrad` serves both roles.
for _command in site_cli.app.registered_commands:
    app.registered_commands.append(_command)
app.add_typer(site_cli.site_app, name="site")
app.command("local")(local)
app.command("status")(status)
app.command("dashboard")(dashboard)
app.command("package")(package)
app.add_typer(coordinator_app, name="coordinator")


if __name__ == "__main__":
    sys.exit(app())
