"""`fedrad prepare`: manifest -> checked cases -> pyradiomics features -> feature store.

Cases run in parallel worker processes with a progress bar. A case that fails any
check is quarantined with the reason and the rest go on; a finished case is cached
under a hash of its input files and settings, so an interrupted run resumes and a
re-run only redoes what changed. With ``segment`` (a federated segmentation model), rows
without a mask get one from the model first (`fedrad.client.auto_segment`); the store marks those
cases ``mask_source = "automatic"``.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import radiomics
import SimpleITK as sitk
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fedrad.client import extraction, imaging, store
from fedrad.client.manifest import Case, check_manifest, read_manifest
from fedrad.common import schemas
from fedrad.common.errors import CaseError


@dataclass
class PrepareReport:
    """What a prepare run did, for the CLI summary and the benchmark."""

    store: Path
    n_cases: int
    n_events: int
    n_quarantined: int
    n_features: int
    n_cached: int
    problems: list[CaseError]
    notices: list[str]
    timings: dict = field(default_factory=dict)  # summed seconds: read, resample, extract
    wall_seconds: float = 0.0
    n_automatic: int = 0  # accepted cases whose mask the segmentation model drew

    @property
    def clean(self) -> bool:
        return not self.problems and not self.notices


def prepare_from_manifest(
    manifest: Path,
    out: Path,
    *,
    params_path: Path | None = None,
    jobs: int | None = None,
    phases: list[str] | None = None,
    label: int | None = None,
    min_voxels: int = 10,
    required_clinical: list[str] = (),
    show_progress: bool = True,
    use_cache: bool = True,
    segment: Path | None = None,
) -> PrepareReport:
    started = datetime.now(timezone.utc)
    manifest = Path(manifest).resolve()
    out = Path(out)
    params, params_text = extraction.load_params(params_path)
    phash = extraction.params_hash(params)
    frame, source_manifest, automatic, auto_meta, problems = read_manifest(manifest), manifest, set(), None, []
    if segment is not None:
        frame, manifest, automatic, auto_meta, problems = _segment_missing(frame, manifest, out, segment,
                                                                          show_progress)
    checked = check_manifest(frame, manifest.parent, phases=phases, required_clinical=list(required_clinical))
    problems += list(checked.problems)
    results: dict[str, dict] = {}
    keys = {case.patient_id: _case_key(case, phash, label, min_voxels) for case in checked.cases}
    todo = []
    for case in checked.cases:
        cached = store.cache_get(out, keys[case.patient_id]) if use_cache else None
        if cached is not None:
            results[case.patient_id] = cached
        else:
            todo.append(case)
    n_cached = len(results)
    jobs = max(1, jobs or os.cpu_count() or 1)

    with _progress(show_progress) as progress:
        task = progress.add_task("extracting", total=len(checked.cases), completed=n_cached, quarantined=0)
        for case, outcome in _run_all(todo, params, label, min_voxels, jobs):
            if "error" in outcome:
                problems.append(CaseError(case.patient_id, outcome["error"]["field"], outcome["error"]["reason"]))
            else:
                results[case.patient_id] = outcome
                if use_cache:
                    store.cache_put(out, keys[case.patient_id], outcome)
            progress.update(task, advance=1, quarantined=len({p.patient_id for p in problems}))

    rows, repeat_rows, feature_names = [], [], []
    timings = {"read": 0.0, "resample": 0.0, "extract": 0.0}
    for case in checked.cases:  # manifest order, whatever order workers finished in
        outcome = results.get(case.patient_id)
        if outcome is None:
            continue
        if not feature_names:
            feature_names = list(outcome["features"])
        if list(outcome["features"]) != feature_names:
            problems.append(CaseError(case.patient_id, "features", "extracted feature set differs from the other cases"))
            continue
        rows.append({schemas.ID: case.patient_id, **case.row, **outcome["features"],
                     store.MASK_SOURCE: "automatic" if case.patient_id in automatic else "manual"})
        if outcome["repeat"] is not None:
            repeat_rows.append({schemas.ID: case.patient_id, **outcome["repeat"]})
        for step in timings:
            timings[step] += outcome["timings"][step]

    has_scanner = any(case.row.get(schemas.SCANNER) for case in checked.cases)
    meta = store.write_store(
        out,
        rows=rows,
        repeat_rows=repeat_rows,
        problems=problems,
        columns={"scanner": schemas.SCANNER if has_scanner else None, "mask_source": store.MASK_SOURCE,
                 "clinical": [c for c in checked.clinical if c != store.MASK_SOURCE], "features": feature_names},
        meta={
            "source": "manifest",
            "manifest": str(manifest),
            "source_manifest": str(source_manifest),
            "n_automatic_masks": sum(row[store.MASK_SOURCE] == "automatic" for row in rows),
            "segmentation_model": auto_meta,
            "params_hash": phash,
            "phases": checked.phases,
            "label": label,
            "min_voxels": min_voxels,
            "notices": checked.notices,
            "created": started.isoformat(timespec="seconds"),
            "versions": {"pyradiomics": radiomics.__version__, "SimpleITK": sitk.Version_VersionString()},
        },
        params_text=params_text,
    )
    return PrepareReport(
        store=out,
        n_cases=meta["n_cases"],
        n_events=meta["n_events"],
        n_quarantined=meta["n_quarantined"],
        n_features=len(feature_names),
        n_cached=n_cached,
        problems=problems,
        notices=checked.notices,
        timings=timings,
        wall_seconds=(datetime.now(timezone.utc) - started).total_seconds(),
        n_automatic=meta["n_automatic_masks"],
    )


def _segment_missing(frame, manifest: Path, out: Path, model: Path, show_progress: bool):
    """Automatic masks for rows without one; the manifest as used is kept in the store (later stages
    read images and masks through it)."""
    from fedrad.client.auto_segment import MANIFEST_USED, segment_missing

    out.mkdir(parents=True, exist_ok=True)
    with _progress(show_progress) as progress:
        done = segment_missing(frame, manifest.parent, out, model, progress=progress)
    used = out / MANIFEST_USED
    store._atomic(used, lambda p: done.frame.to_csv(p, index=False))
    return done.frame, used.resolve(), done.automatic, {**done.model, "reused": done.reused}, list(done.problems)


def _case_key(case: Case, phash: str, label, min_voxels) -> str:
    """Hash of everything that determines a case's features: input bytes and settings."""
    parts = {"v": extraction.EXTRACTION_VERSION, "params": phash, "label": label, "min_voxels": min_voxels,
             "id": case.patient_id, "pyradiomics": radiomics.__version__, "sitk": sitk.Version_VersionString()}
    paths = {f"image_{p}": path for p, path in case.images.items()}
    paths["mask"] = case.mask
    if case.mask_repeat is not None:
        paths["mask_repeat"] = case.mask_repeat
    for name, path in paths.items():
        parts[name] = imaging.file_digest(path) if Path(path).exists() else f"missing:{path}"
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def _run_all(cases: list[Case], params, label, min_voxels, jobs):
    """Yield (case, outcome) as cases finish; one process per job, or in-process for jobs=1."""
    if jobs == 1 or len(cases) <= 1:
        for case in cases:
            yield case, _run_case(case, params, label, min_voxels)
        return
    threads = max(1, (os.cpu_count() or 1) // jobs)
    orphans = []
    with ProcessPoolExecutor(max_workers=jobs, initializer=_init_worker, initargs=(threads,)) as pool:
        futures = {pool.submit(_run_case, case, params, label, min_voxels): case for case in cases}
        for future in as_completed(futures):
            try:
                yield futures[future], future.result()
            except BrokenProcessPool:  # a worker died (e.g. out of memory): every pending case fails with it
                orphans.append(futures[future])
    # Redo the orphans one process each, so only the case that kills its process is quarantined.
    for case in orphans:
        with ProcessPoolExecutor(max_workers=1, initializer=_init_worker, initargs=(threads,)) as pool:
            try:
                yield case, pool.submit(_run_case, case, params, label, min_voxels).result()
            except BrokenProcessPool:
                yield case, {"error": {"field": "extraction",
                                       "reason": "the extraction process died on this case (out of memory?)"}}


def _init_worker(threads: int) -> None:
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _run_case(case: Case, params, label, min_voxels) -> dict:
    try:
        return extraction.extract_case(case, params, label=label, min_voxels=min_voxels)
    except CaseError as exc:
        return {"error": {"field": exc.field, "reason": exc.reason}}
    except Exception as exc:  # unexpected: still only this case is lost, and it is named
        return {"error": {"field": "extraction", "reason": f"unexpected {type(exc).__name__}: {exc}"}}


def _progress(show: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("quarantined: {task.fields[quarantined]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not show,
    )
