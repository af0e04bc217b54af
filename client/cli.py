"""The `fedrad` command: one entry point with a subcommand per job."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from common.errors import FedradError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_show_locals=False,
                  help="Federated radiomics: build and validate prognosis models across hospitals.")
# Logs (CI, `make demo > log`) are not terminals; give tables room rather than rich's 80 columns.
console = Console(stderr=True, soft_wrap=True, width=None if sys.stderr.isatty() else 140)

#: `fedrad prepare` exit status when the store was written but some cases were quarantined
#: or some manifest columns were left out (0: every case accepted).
EXIT_QUARANTINED = 3


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
    from client.synth import generate_cohort

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
):
    """Check every case and build the site's feature store (exit 3 if any case was quarantined)."""
    from client.prepare import prepare_from_manifest
    from client.table_import import prepare_from_table

    if (manifest is None) == (table is None):
        raise typer.BadParameter("give exactly one of --manifest or --table")
    if segment is not None and manifest is None:
        raise typer.BadParameter("--segment needs --manifest (a feature table has no images to segment)")
    try:
        if manifest is not None:
            report = prepare_from_manifest(
                manifest, out, params_path=params, jobs=jobs, phases=_split(phases) or None, label=label,
                min_voxels=min_voxels, required_clinical=_split(require), show_progress=not quiet, segment=segment,
            )
        else:
            report = prepare_from_table(
                table, out, id_col=id_col, time_col=time_col, event_col=event_col, scanner_col=scanner_col,
                clinical_cols=_split(clinical_cols), required_clinical=_split(require), params_path=params,
                phase=table_phase,
            )
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
    if report.problems:
        table = Table("patient_id", "field", "reason", title="quarantined (also in quarantine.csv)")
        for problem in report.problems:
            table.add_row(problem.patient_id, problem.field, problem.reason)
        console.print(table)


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
    from client.demo import run_demo

    try:
        run_demo(out, n_sites=sites, n_patients=patients, seed=seed, jobs=jobs, full_params=full_params,
                 console=console)
    except FedradError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)


@app.command()
def validate(
    package: Path = typer.Option(..., "--package", help="A model package (RUN_DIR/package of a finished study)."),
    store: Path = typer.Option(..., "--store", help="This hospital's feature store (`fedrad prepare`)."),
    out: Path = typer.Option(Path("validation-out"), "--out"),
):
    """Validate a finished model package on this hospital's store, offline: harmonise, score, metrics."""
    from client.validate import metrics_table, validate as run_validation
    from server.cli import table_of

    try:
        report = run_validation(package, store, out)
    except FedradError as exc:
        console.print(f"[red]error:[/red] {exc}")
        raise typer.Exit(2)
    from server.report import write_validation_report

    console.print(table_of(metrics_table(report), f"validation of study '{report['study']}' on {store}"))
    console.print(f"per-case predictions: {out / 'predictions.csv'} (they stay here); metrics: {out / 'metrics.json'}")
    console.print(f"report: {write_validation_report(out, report)}")


# Federation commands live with the coordinator code; one `fedrad` command serves both roles.
from server import cli as _server_cli  # noqa: E402

app.command("local")(_server_cli.local)
app.command("status")(_server_cli.status)
app.command("dashboard")(_server_cli.dashboard)
app.command("ledger")(_server_cli.ledger)
app.command("package")(_server_cli.package)
app.add_typer(_server_cli.site_app, name="site")
app.add_typer(_server_cli.coordinator_app, name="coordinator")


if __name__ == "__main__":
    sys.exit(app())
