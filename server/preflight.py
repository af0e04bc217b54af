"""Checks of a `fedrad local` run before any Flower process starts (they took 15-26 s to fail otherwise).

The study file (TOML and every setting, common/study.py), each site's store (a fedrad feature store,
its columns read from ``store.json`` and the parquet footer only), and the study against every
store: each feature glob ([features] include, the models' and [select]'s) matches a feature column
there, and each column the study names (outcome, binary outcomes, the models' clinical columns,
[harmonise] batch and covariates, external scores) is there. ``[sites] validation`` must name sites
of the run. Every problem is listed at once, each with its site and store. A real consortium's
stores are at the hospitals: there the census does the same checks (server/census.py).
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path

import typer

from fedrad.common.errors import FedradError
from fedrad.common.schemas import DEEP_PREFIX
from fedrad.common.study import SELECTED, SITE_BATCH, Study, load_study, select_features

__all__ = ["PreflightError", "preflight", "preflight_or_exit", "store_problems"]

STORE_META = "store.json"
STORE_FEATURES = "features.parquet"
STORE_SCORES = "scores.parquet"  # client/site_fit.py: external scores (the DL-score) at a site


class PreflightError(FedradError):
    """The study cannot run on these stores; nothing was started."""


def preflight(study_path: Path, sites: dict[str, Path]) -> Study:
    """The study, once it and every store pass; else PreflightError (StudyError for the file itself)."""
    study = load_study(study_path)
    problems = []
    unknown = [s for s in study.sites.validation if s not in sites]
    if unknown:
        problems.append(f"[sites] validation names {_names(unknown)}, not a site of this run (sites: "
                        f"{_names(sites)})")
    for name, store in sites.items():
        problems += [f"site '{name}' ({store}): {p}" for p in store_problems(study, Path(store))]
    if problems:
        raise PreflightError(f"study '{study_path}' cannot run on these stores (no process was started):\n"
                             + "\n".join(f"  {p}" for p in problems))
    return study


def preflight_or_exit(study_path: Path, sites: dict[str, Path]) -> Study:
    """:func:`preflight` for the CLI: a refusal is printed and the command exits with status 2."""
    from rich.markup import escape

    from fedrad.client.cli import console

    try:
        return preflight(study_path, sites)
    except FedradError as exc:  # escaped: "[features]" is a study section, not markup
        console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(2)


def _columns(store: Path) -> tuple[list[str], list[str]]:
    """(every column, the feature columns) of a store, without reading its rows."""
    import pyarrow.parquet as pq

    if not (store / STORE_META).is_file():
        raise PreflightError(f"not a fedrad feature store (no {STORE_META}); run `fedrad prepare --out {store}` "
                             "first" if store.is_dir() else "the store does not exist")
    try:
        meta = json.loads((store / STORE_META).read_text(encoding="utf-8"))
        features = list(meta["columns"]["features"])
        columns = pq.read_schema(store / STORE_FEATURES).names
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PreflightError(f"the store is damaged ({type(exc).__name__}: {exc}); run `fedrad prepare` again") \
            from None
    return columns, features


def store_problems(study: Study, store: Path) -> list[str]:
    """What this store lacks for the study (empty: it can take part)."""
    try:
        columns, features = _columns(store)
    except PreflightError as exc:
        return [str(exc)]
    problems = []
    for glob in study.features.include:
        if not any(fnmatch.fnmatchcase(c, glob) for c in features):
            problems.append(f"[features] include '{glob}' matches no feature column")
    chosen = select_features(features, study.features)
    if not chosen:
        problems.append("[features] selects no feature column")
    later = "train_cnn" in study.study.stages  # deep features and the DL-score are made by the study itself

    def check_globs(where: str, globs) -> None:
        for glob in globs:
            if glob != SELECTED and not (later and glob.startswith(DEEP_PREFIX)) \
                    and not any(fnmatch.fnmatchcase(c, glob) for c in chosen):
                problems.append(f"{where} feature '{glob}' matches no feature column selected by [features]")

    if "select" in study.study.stages:
        check_globs("[select]", study.select.features)
    needed: dict[str, str] = {study.outcome.time: "[outcome] time", study.outcome.event: "[outcome] event"}
    if "select" in study.study.stages and study.select.binary_outcome:
        needed.setdefault(study.select.binary_outcome, "[select] binary_outcome")
    if "harmonise" in study.study.stages:
        if study.harmonise.batch != SITE_BATCH:
            needed.setdefault(study.harmonise.batch, "[harmonise] batch")
        for name in study.harmonise.categorical + study.harmonise.continuous:
            needed.setdefault(name, "[harmonise] covariate")
    fitted = {m.name for m in study.models}
    external = set()
    for model in study.models if "fit" in study.study.stages else ():
        check_globs(f"model '{model.name}'", model.features)
        for name in model.clinical:
            if not name.startswith("@"):
                needed.setdefault(name, f"model '{model.name}' clinical")
        if model.binary_outcome:
            needed.setdefault(model.binary_outcome, f"model '{model.name}' binary_outcome")
        external |= {s for s in model.scores if s not in fitted and not (later and s == "dl_score")}
    problems += [f"{role} column '{name}' is not a column of the store" for name, role in needed.items()
                 if name not in columns]
    if external:
        problems += _score_problems(store, sorted(external))
    return problems


def _score_problems(store: Path, scores: list[str]) -> list[str]:
    import pyarrow.parquet as pq

    if not (store / STORE_SCORES).is_file():
        return [f"the models use score(s) {_names(scores)}, but the store has no {STORE_SCORES}"]
    present = pq.read_schema(store / STORE_SCORES).names
    return [f"score '{s}' is not a column of {STORE_SCORES}" for s in scores if s not in present]


def _names(names) -> str:
    return ", ".join(f"'{n}'" for n in names)
