"""`fedrad prepare`: manifest -> checked cases -> pyradiomics features -> feature store.

Cases run in parallel worker processes with a progress bar. A case that fails any
check is quarantined with the reason and the rest go on; a finished case is cached
under a hash of its input files and settings, so an interrupted run resumes and a
re-run only redoes what changed. A Ctrl-C stops the workers at once and says how much is
cached. The store is locked for the run (`fedrad.client.store.writing`); a store made from
another manifest is only replaced with ``overwrite``, and when the features change, whatever the
study stages derived from the old ones is deleted (`fedrad.client.site_data.DERIVED`). With
``segment`` (a federated segmentation model), rows without a mask get one from the model first
(`fedrad.client.auto_segment`); the store marks those cases ``mask_source = "automatic"``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import radiomics
import SimpleITK as sitk
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from fedrad.client import extraction, imaging, site_data, store
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
    info: list[str] = field(default_factory=list)  # what the run adjusted or removed; not a data problem

    @property
    def clean(self) -> bool:
        return not self.problems and not self.notices


class PrepareInterrupted(KeyboardInterrupt):
    """Ctrl-C during extraction: the workers are stopped, and the finished cases are cached for a re-run."""

    def __init__(self, out: Path, n_cached: int, n_cases: int):
        self.n_cached, self.n_cases = n_cached, n_cases
        super().__init__(f"interrupted: {n_cached} of {n_cases} case(s) are cached in {Path(out) / store.CACHE}; "
                         "run the same command again to resume (cached cases are not extracted again)")


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
    overwrite: bool = False,
) -> PrepareReport:
    manifest = Path(manifest).resolve()
    params_and_text = extraction.load_params(params_path)
    frame = read_manifest(manifest)
    with store.writing(out, manifest, overwrite=overwrite):
        return _prepare(frame, manifest, Path(out), params_and_text, jobs=jobs, phases=phases, label=label,
                        min_voxels=min_voxels, required_clinical=required_clinical, show_progress=show_progress,
                        use_cache=use_cache, segment=segment)


def _prepare(frame, manifest: Path, out: Path, params_and_text, *, jobs, phases, label, min_voxels,
             required_clinical, show_progress, use_cache, segment) -> PrepareReport:
    started = datetime.now(timezone.utc)
    params, params_text = params_and_text
    phash = extraction.params_hash(params)
    source_manifest, automatic, auto_meta, problems = manifest, set(), None, []
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
    jobs, info = _worker_count(jobs, len(todo))
    run = partial(_run_case, params=params, label=label, min_voxels=min_voxels)
    with _progress(show_progress) as progress:
        task = progress.add_task("extracting", total=len(checked.cases), completed=n_cached, quarantined=0)
        runner = _run_all(todo, run, jobs)
        try:
            for case, outcome in runner:
                if "error" in outcome:
                    problems.append(CaseError(case.patient_id, outcome["error"]["field"], outcome["error"]["reason"]))
                else:
                    results[case.patient_id] = outcome
                    if use_cache:
                        store.cache_put(out, keys[case.patient_id], outcome)
                progress.update(task, advance=1, quarantined=len({p.patient_id for p in problems}))
        except KeyboardInterrupt:
            runner.close()  # stops the workers now, not after every queued case
            raise PrepareInterrupted(out, len(results) if use_cache else 0, len(checked.cases)) from None

    rows, repeat_rows, feature_names, timings = _rows(checked.cases, results, automatic, problems)
    has_scanner = any(case.row.get(schemas.SCANNER) for case in checked.cases)
    meta, removed = write_features(
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
        info=info + removed,
    )


def _rows(cases: list[Case], results: dict, automatic: set, problems: list) -> tuple[list, list, list, dict]:
    """(rows, repeat rows, feature names, summed timings) in manifest order, whatever order workers
    finished in; a case whose feature set differs from the first one's is added to ``problems``."""
    rows, repeat_rows, feature_names = [], [], []
    timings = {"read": 0.0, "resample": 0.0, "extract": 0.0}
    for case in cases:
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
    return rows, repeat_rows, feature_names, timings


def write_features(out: Path, **store_args) -> tuple[dict, list[str]]:
    """`store.write_store`, then, when the features changed, delete what was derived from the old ones:
    a harmonised.parquet left beside new features is what the next study would read. Returns the
    metadata and a note naming what was deleted."""
    before = store.recorded_features_sha256(out)
    meta = store.write_store(out, **store_args)
    removed = site_data.remove_derived(out) if meta["features_sha256"] != before else []
    return meta, [f"the features changed: removed {', '.join(removed)} (made from the old ones)"] if removed else []


def _worker_count(requested: int | None, n_todo: int) -> tuple[int, list[str]]:
    """Workers for ``n_todo`` cases, and a note when ``requested`` was lowered: each worker is a forked
    process, so more than cases or cores only costs (``--jobs 1000`` forked for minutes)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cap = max(1, min(n_todo, cores))
    if not requested:
        return cap, []
    if requested <= cap:
        return requested, []
    return cap, [f"--jobs {requested} lowered to {cap}: {n_todo} case(s) to extract, {cores} core(s)"]


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


def _run_all(cases: list[Case], run, jobs):
    """Yield (case, run(case)) as cases finish; one process per job, or in-process for jobs=1."""
    if jobs == 1 or len(cases) <= 1:
        for case in cases:
            yield case, run(case)
        return
    threads = max(1, (os.cpu_count() or 1) // jobs)
    orphans = []
    with _pool(jobs, threads) as pool:
        futures = {pool.submit(run, case): case for case in cases}
        for future in as_completed(futures):
            try:
                yield futures[future], future.result()
            except BrokenProcessPool:  # a worker died (e.g. out of memory): every pending case fails with it
                orphans.append(futures[future])
    # Redo the orphans one process each, so only the case that kills its process is quarantined.
    for case in orphans:
        with _pool(1, threads) as pool:
            try:
                yield case, pool.submit(run, case).result()
            except BrokenProcessPool:
                yield case, {"error": {"field": "extraction",
                                       "reason": "the extraction process died on this case (out of memory?)"}}


@contextmanager
def _pool(jobs: int, threads: int):
    """A process pool that, when left by an exception (Ctrl-C, or the caller closing the generator),
    kills its workers instead of waiting for every queued case, as ``with ProcessPoolExecutor`` does."""
    pool = ProcessPoolExecutor(max_workers=jobs, initializer=_init_worker, initargs=(threads,))
    try:
        yield pool
    except BaseException:
        _stop_now(pool)
        raise
    pool.shutdown()


def _stop_now(pool: ProcessPoolExecutor) -> None:
    workers = list((pool._processes or {}).values())  # Python < 3.14 has no public terminate_workers()
    pool.shutdown(wait=False, cancel_futures=True)
    for worker in workers:
        worker.terminate()
    for worker in workers:
        worker.join(timeout=5)
        if worker.is_alive():
            worker.kill()


def _init_worker(threads: int) -> None:
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group; the parent handles it


def _run_case(case: Case, *, params, label, min_voxels) -> dict:
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
