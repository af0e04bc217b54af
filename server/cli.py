"""Coordinator and federation commands of `fedrad` (registered on the one `fedrad` app)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import pandas as pd
import typer
from rich.console import Console
from rich.table import Table

from common.errors import FedradError

console = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 140)


def table_of(frame: pd.DataFrame, title: str) -> Table:
    table = Table(*[str(c) for c in frame.columns], title=title)
    for row in frame.itertuples(index=False):
        table.add_row(*("" if v is None or (isinstance(v, float) and v != v) else str(v) for v in row))
    return table


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
):
    """Run a study on a local federation: a real SuperLink and one SuperNode per site, on loopback."""
    from contextlib import nullcontext

    from server.local import LocalFederation

    sites = parse_sites(site)
    echo = lambda line: console.print(line, markup=False, highlight=False)  # noqa: E731
    try:
        if dashboard:
            from server.dashboard import dashboard_beside

            beside = dashboard_beside(out.absolute(), dashboard_port, echo=echo)
        else:
            beside = nullcontext()
        with beside, LocalFederation(out, sites, echo=echo, allow_event_times=allow_event_times) as fed:
            results = fed.run_study(study, out)
    except KeyboardInterrupt:
        console.print("[red]interrupted: every Flower process started for this run has been stopped")
        raise typer.Exit(130)
    except FedradError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2)
    print_results(results, out)
    raise typer.Exit(0 if results["status"] == "completed" else 1)


def print_results(results: dict, run_dir: Path) -> None:
    stages = pd.DataFrame([{"stage": k, **v} for k, v in results.get("stages", {}).items()])
    if len(stages):
        console.print(table_of(stages, f"study '{results.get('study', '?')}': {results['status']}"))
    census = results.get("census")
    if census:
        rows = [{"site": name, "cases": i["cases"], "events": i["events"], "quarantined": i["quarantined"],
                 "features": i["features_selected"],
                 "batches": " ".join(f"{k}:{v}" for k, v in i["batch_counts"].items()),
                 "problems": "; ".join(i["problems"])} for name, i in census["sites"].items()]
        rows += [{"site": name, "problems": f"refused: {reason}"} for name, reason in census["refused"].items()]
        console.print(table_of(pd.DataFrame(rows), "census"))
    harmonise = results.get("harmonise")
    if harmonise:
        traffic = harmonise["traffic"]
        rows = [{"site": s, "bytes to site": traffic["bytes_to_site"].get(s, 0),
                 "bytes from site": traffic["bytes_from_site"].get(s, 0),
                 "status": "harmonised" if s in harmonise["sites"] else f"left out: {harmonise['left_out'].get(s)}"}
                for s in sorted(set(traffic["bytes_to_site"]) | set(harmonise["left_out"]))]
        console.print(table_of(pd.DataFrame(rows), f"harmonise: ComBat by '{harmonise['batch']}' over "
                                                    f"{len(harmonise['batches'])} batch level(s), "
                                                    f"{harmonise['n_features']} features, "
                                                    f"{traffic['rounds']} round trip(s), {traffic['seconds']} s"))
    if results.get("error"):
        console.print(f"[red]study failed:[/] {results['error']}")
    console.print(f"results: {Path(run_dir) / 'results.json'}; run log: `fedrad status {run_dir}`")


def _read_or_exit(read, path: Path):
    """``read(path)``, or a one-line error and exit status 2 for a missing or damaged file."""
    try:
        return read(path)
    except (FileNotFoundError, ValueError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2)


def status(run_dir: Path = typer.Argument(..., help="A run directory (holds runlog.sqlite).")):
    """Print a run directory's log: runs, stages, rounds, and each site's exchanges."""
    from server.runlog import read_runlog

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

    from server.dashboard import create_app

    if host not in ("127.0.0.1", "localhost", "::1"):
        console.print(f"[yellow]warning:[/] the dashboard has no login; on {host} anyone who can reach port {port} "
                      "can read this run's log")
    console.print(f"dashboard of {run_dir.absolute()}: http://{host}:{port}/ (Ctrl-C stops it)", highlight=False)
    uvicorn.run(create_app(run_dir), host=host, port=port, log_level="warning")


def ledger(store: Path = typer.Argument(..., help="A site's feature store.")):
    """Print a site's egress ledger: every message that left the site, with totals."""
    from client.ledger import read_ledger

    entries = _read_or_exit(read_ledger, store)
    if entries["dp_epsilon"].isna().all():  # the column only for a site that trained with DP-SGD
        entries = entries.drop(columns=["dp_epsilon"])
    console.print(table_of(entries, f"egress ledger of {store}"))
    totals = entries.groupby(["run", "stage", "status"], as_index=False).agg(messages=("bytes", "size"),
                                                                           bytes=("bytes", "sum"))
    console.print(table_of(totals, "totals"))
    console.print(f"{len(entries)} message(s), {int(entries['bytes'].sum()) if len(entries) else 0} bytes in all")


def package(run_dir: Path = typer.Argument(..., help="A finished run directory (results.json, study.toml)."),
            out: Optional[Path] = typer.Option(None, "--out", help="Where to write it (default RUN_DIR/package).")):
    """Build the model package a new site validates with (`fedrad validate`) from a finished run."""
    import json

    from common.errors import FedradError
    from common.study import load_study
    from server.package import write_package

    try:
        results = json.loads((run_dir / "results.json").read_text())
        written = write_package(run_dir, results, load_study(run_dir / "study.toml"), out)
    except FileNotFoundError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2)
    except FedradError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2)
    console.print(f"model package: {written}")


site_app = typer.Typer(no_args_is_help=True, help="Commands a hospital runs to take part in a consortium.")
coordinator_app = typer.Typer(no_args_is_help=True, help="Commands the coordinator runs.")


@site_app.command("join")
def site_join(
    store: Path = typer.Option(..., "--store", help="This site's feature store (from `fedrad prepare`)."),
    superlink: str = typer.Option(..., "--superlink", help="The coordinator's SuperLink, host:port."),
    name: Optional[str] = typer.Option(None, "--name", help="This site's name in the consortium (default: "
                                                            "the store's site name, else its folder's name)."),
    root_certificates: Optional[Path] = typer.Option(None, "--ca", "--root-certificates",
                                                     help="The consortium's CA certificate, ca.crt (TLS)."),
    auth_key: Optional[Path] = typer.Option(None, "--key", "--auth-key",
                                            help="This site's private key, SITE.key (SuperNode authentication)."),
    insecure: bool = typer.Option(False, "--insecure", help="No TLS (loopback rehearsals only)."),
    port: int = typer.Option(9094, "--port", help="Local port of the SuperNode's own API."),
    min_count: Optional[int] = typer.Option(None, "--min-count", help="This site's minimum, if above the study's."),
    allow_event_times: bool = typer.Option(False, "--allow-event-times",
                                           help="Consent to share this site's event times (unstratified Cox)."),
):
    """Join a consortium: run flower-supernode with this site's store (replaces this process)."""
    from client.store import open_store
    from server.local import flower_bin, flower_env

    try:
        opened = open_store(store)  # refuse a missing or broken store before connecting
    except FedradError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2)
    if not insecure and root_certificates is None:
        raise typer.BadParameter("give --ca (the consortium's ca.crt), or --insecure for a loopback rehearsal")
    for given, option in ((root_certificates, "--ca"), (auth_key, "--key")):
        if given is not None and not Path(given).is_file():
            raise typer.BadParameter(f"{option}: '{given}' does not exist")
    root_certificates = Path(root_certificates).absolute() if root_certificates else None
    auth_key = Path(auth_key).absolute() if auth_key else None
    name = name or str(opened.meta.get("site_name") or Path(store).absolute().name)
    node_config = f'store="{Path(store).absolute()}" site-name="{name}"'
    if min_count:
        node_config += f" min-count={min_count}"
    if allow_event_times:
        node_config += " allow-event-times=true"
    command = [flower_bin("flower-supernode"), "--superlink", superlink, "--port", str(port), "--node-config",
               node_config]
    command += ["--insecure"] if insecure else ["--root-certificates", str(root_certificates)]
    if auth_key:
        command += ["--auth-supernode-private-key", str(auth_key)]
    console.print("starting: " + " ".join(command), markup=False)
    home = Path(store).absolute() / ".flwr"
    os.execvpe(command[0], command, flower_env(home))


from server import coordinator as _coordinator  # noqa: E402

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
):
    """Submit a study to a running SuperLink and follow it (`flwr run --stream`)."""
    from server.local import prepare_run_dir, submit, write_connection

    if not insecure and root_certificates is None:
        raise typer.BadParameter("give --ca (the consortium's ca.crt), or --insecure for a loopback rehearsal")
    out = out.absolute()
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
    raise typer.Exit(0 if results["status"] == "completed" else 1)
