"""The hospital's commands of `fedrad`: synth, prepare, validate, ledger, site join.

They need nothing of the coordinator's code; the coordinator's root command (`fedrad.server.cli`)
mounts them beside its own."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import pandas as pd
import typer
from rich.console import Console
from rich.table import Table

from fedrad.common.errors import FedradError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Commands a hospital runs on its own data.")
# Logs (CI, `make demo > log`) are not terminals; give tables room rather than rich's 80 columns.
console = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 140)

#: `fedrad prepare` exit status when the store was written but some cases were quarantined
#: or some manifest columns were left out (0: every case accepted).
EXIT_QUARANTINED = 3


def table_of(frame: pd.DataFrame, title: str) -> Table:
    table = Table(*[str(c) for c in frame.columns], title=title)
    for row in frame.itertuples(index=False):
        table.add_row(*("" if v is None or (isinstance(v, float) and v != v) else str(v) for v in row))
    return table


def _split(text: Optional[str]) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()] if text else []


@app.command()
def synth(
    out: Path = typer.Option(..., "--out", help="Folder for the cohort: <site>/manifest.csv, images, truth.csv."),
    sites: int = typer.Option(3, "--sites", min=1, max=26),
    patients: int = typer.Option(60, "--patients", min=5, help="Patients per site."),
    seed: int = typer.Option(0, "--seed"),
    phases: str = typer.Option("arterial,venous,delayed", "--phases", help="Comma-separated CT phases."),
    shape: str = typer.Option("64,64,32", "--shape", help="Voxel grid nx,ny,nz."),
    repeat_fraction: float = typer.Option(0.25, "--repeat-fraction", min=0, max=1,
                                          help="Share of patients with a second delineation (ICC)."),
):
    """Write a synthetic multi-centre sarcoma CT cohort with known ground truth."""
    from fedrad.client.synth import generate_cohort

    grid = tuple(int(v) for v in _split(shape))
    if len(grid) != 3:
        raise typer.BadParameter("--shape needs three integers, e.g. 64,64,32")
    truth = generate_cohort(out, n_sites=sites, n_patients=patients, seed=seed, phases=tuple(_split(phases)),
                            shape=grid, repeat_fraction=repeat_fraction, show_progress=True)
    console.print(f"wrote {len(truth)} patients at {sites} sites to {out} (truth in {out / 'truth.csv'})")


@app.command()
def prepare(
    out: Path = typer.Option(..., "--out", help="Feature store folder to write."),
    manifest: Optional[Path] = typer.Option(None, "--manifest", help="Site manifest CSV (images + masks)."),
    params: Optional[Path] = typer.Option(None, "--params", help="pyradiomics parameter YAML (default: shipped default.yaml)."),
    jobs: Optional[int] = typer.Option(None, "--jobs", min=1, help="Parallel cases (default: number of cores)."),
    phases: Optional[str] = typer.Option(None, "--phases", help="Phases to extract (default: every image_* column)."),
    label: Optional[int] = typer.Option(None, "--label", help="Mask label of the tumour (default: the mask's only label)."),
    min_voxels: int = typer.Option(10, "--min-voxels", min=1, help="Smallest accepted tumour, in voxels."),
    require: Optional[str] = typer.Option(None, "--require", help="Clinical columns that must be filled."),
    table: Optional[Path] = typer.Option(None, "--table", help="Ready feature table instead of a manifest."),
    id_col: str = typer.Option("patient_id", "--id-col"),
    time_col: str = typer.Option("time", "--time-col"),
    event_col: str = typer.Option("event", "--event-col"),
    scanner_col: Optional[str] = typer.Option(None, "--scanner-col"),
    clinical_cols: Optional[str] = typer.Option(None, "--clinical-cols", help="Table columns that are clinical, not features."),
    table_phase: str = typer.Option("table", "--table-phase", help="Prefix for table features without '<phase>__'."),
    segment: Optional[Path] = typer.Option(
        None, "--segment", help="Segmentation model (a study's RUN_DIR/segmentation folder or its model.npz): "
                                "rows with an empty mask get an automatic mask (marked in the store)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bar."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a store in --out that was built from "
                                                             "another manifest or table."),
):
    """Check every case and build the site's feature store (exit 3 if any case was quarantined)."""
    from fedrad.client.prepare import PrepareInterrupted, prepare_from_manifest
    from fedrad.client.table_import import prepare_from_table

    if (manifest is None) == (table is None):
        raise typer.BadParameter("give exactly one of --manifest or --table")
    if segment is not None and manifest is None:
        raise typer.BadParameter("--segment needs --manifest (a feature table has no images to segment)")
    try:
        if manifest is not None:
            report = prepare_from_manifest(
                manifest, out, params_path=params, jobs=jobs, phases=_split(phases) or None, label=label,
                min_voxels=min_voxels, required_clinical=_split(require), show_progress=not quiet, segment=segment,
                overwrite=overwrite,
            )
        else:
            report = prepare_from_table(
                table, out, id_col=id_col, time_col=time_col, event_col=event_col, scanner_col=scanner_col,
                clinical_cols=_split(clinical_cols), required_clinical=_split(require), params_path=params,
                phase=table_phase, overwrite=overwrite,
            )
    except PrepareInterrupted as exc:
        console.print(f"[yellow]{exc}[/yellow]")
        raise typer.Exit(130)
    except FedradError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)
    _print_report(report)
    if report.n_cases == 0:
        console.print("[red]error:[/red] no case was accepted; see quarantine.csv")
        raise typer.Exit(2)
    if not report.clean:
        raise typer.Exit(EXIT_QUARANTINED)


def _print_report(report) -> None:
    console.print(
        f"store {report.store}: {report.n_cases} cases ({report.n_events} events), "
        f"{report.n_features} features, {report.n_quarantined} quarantined"
        + (f", {report.n_cached} reused from cache" if report.n_cached else "")
        + (f", {report.n_automatic} with an automatic mask" if getattr(report, "n_automatic", 0) else "")
    )
    for notice in report.notices:
        console.print(f"[yellow]notice:[/yellow] {notice}")
    for note in getattr(report, "info", ()):
        console.print(f"note: {note}")
    if report.problems:
        table = Table("patient_id", "field", "reason", title="quarantined (also in quarantine.csv)")
        for problem in report.problems:
            table.add_row(problem.patient_id, problem.field, problem.reason)
        console.print(table)


@app.command()
def validate(
    package: Path = typer.Option(..., "--package", help="A model package (RUN_DIR/package of a finished study)."),
    store: Path = typer.Option(..., "--store", help="This hospital's feature store (`fedrad prepare`)."),
    trust: Path = typer.Option(..., "--trust", help="The coordinator's package-signing public key (PEM, "
                                                    "package-signing.pub); an unsigned or altered package is refused."),
    out: Path = typer.Option(Path("validation-out"), "--out"),
):
    """Validate a finished model package on this hospital's store, offline: harmonise, score, metrics."""
    from fedrad.client.validate import metrics_table, validate as run_validation

    try:
        report = run_validation(package, store, out, trust)
    except FedradError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)
    from fedrad.client.report import write_validation_report

    console.print(f"package signature verified: signed by key {report['signed_by']} ({trust})", highlight=False)
    console.print(table_of(metrics_table(report), f"validation of study '{report['study']}' on {store}"))
    console.print(f"per-case predictions: {out / 'predictions.csv'} (they stay here); metrics: {out / 'metrics.json'}")
    console.print(f"report: {write_validation_report(out, report)}")


def _read_or_exit(read, path: Path):
    """``read(path)``, or a one-line error and exit status 2 for a missing or damaged file."""
    try:
        return read(path)
    except (FileNotFoundError, ValueError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2)


@app.command()
def ledger(store: Path = typer.Argument(..., help="A site's feature store.")):
    """Print a site's egress ledger: every message that left the site, with totals."""
    from fedrad.client.ledger import read_ledger

    entries = _read_or_exit(read_ledger, store)
    if entries["dp_epsilon"].isna().all():  # the column only for a site that trained with DP-SGD
        entries = entries.drop(columns=["dp_epsilon"])
    console.print(table_of(entries, f"egress ledger of {store}"))
    totals = entries.groupby(["run", "stage", "status"], as_index=False).agg(messages=("bytes", "size"),
                                                                           bytes=("bytes", "sum"))
    console.print(table_of(totals, "totals"))
    console.print(f"{len(entries)} message(s), {int(entries['bytes'].sum()) if len(entries) else 0} bytes in all")


site_app = typer.Typer(no_args_is_help=True, help="Commands a hospital runs to take part in a consortium.")

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
    runtime: str = typer.Option("warm", "--runtime", help="warm: one forked process per message from a process "
                                "that has fedrad loaded, short polls (fedrad-supernode + fedrad-superexec, "
                                "supervised here); stock: Flower's flower-supernode as it ships."),
):
    """Join a consortium: run this site's SuperNode with its store until it stops."""
    from fedrad.client.store import open_store
    from fedrad.client.flower_process import flower_env
    from fedrad.client.warm_runtime import NODE_POLL_ENV, RUNTIMES, supervise_site, supernode_command

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
    if runtime not in RUNTIMES:
        raise typer.BadParameter(f"--runtime must be one of {', '.join(RUNTIMES)}")
    command = [*supernode_command(runtime), "--superlink", superlink, "--port", str(port),
               "--node-config", node_config]
    command += ["--insecure"] if insecure else ["--root-certificates", str(root_certificates)]
    if auth_key:
        command += ["--auth-supernode-private-key", str(auth_key)]
    console.print("starting: " + " ".join(command), markup=False)
    home = Path(store).absolute() / ".flwr"
    if runtime == "stock":
        os.execvpe(command[0], command, flower_env(home))
    echo = lambda line: console.print(line, markup=False, highlight=False)  # noqa: E731
    env = flower_env(home)
    env.setdefault(NODE_POLL_ENV, "1.0")  # a real consortium: N sites polling one SuperLink (`fedrad local`: 0.2 s)
    raise typer.Exit(supervise_site(command, env, f"127.0.0.1:{port}", echo=echo))
