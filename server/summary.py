"""What a finished study prints: its stages, census and harmonisation, as tables (`fedrad local`, the demo);
and the rule for a study that finished without a site that started a stage (the summary, report.html and the
dashboard say so; `fedrad local` and `fedrad coordinator run` exit with :data:`EXIT_WITHOUT_SITES`)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fedrad.client.cli import EXIT_QUARANTINED, console, table_of

#: exit status of a study that completed without a site that started one of its stages: the same
#: "done, with exceptions" status as `fedrad prepare` with quarantined cases (0: every site throughout)
EXIT_WITHOUT_SITES = EXIT_QUARANTINED


def sites_left_out(results: dict) -> list[dict]:
    """Each site the census accepted that a stage then went on without (lost, silent, or refusing mid-stage):
    ``{"stage", "part", "site", "reason"}``, in stage order. Sites refused at the census are not here (the
    census lists them); nor are sites a stage excluded before it started (harmonise's eligibility)."""
    accepted = set((results.get("census") or {}).get("sites", {}))
    found: list[tuple[str, str, dict]] = []
    seg, cnn, harmonise, select = (results.get(k) or {} for k in ("segmentation", "cnn", "harmonise", "select"))
    found.append(("train_seg", "", seg.get("failed") or {}))
    for attempt in harmonise.get("restarts") or []:
        found.append(("harmonise", "the reference", attempt.get("failed") or {}))
    found.append(("harmonise", "validation sites", (harmonise.get("validation") or {}).get("failed") or {}))
    found.append(("train_cnn", "", cnn.get("failed") or {}))
    found.append(("select", "", select.get("left_out") or {}))
    for name, model in (results.get("models") or {}).items():
        found.append(("fit", f"model '{name}'", model.get("left_out") or {}))
    found.append(("evaluate", "", (results.get("evaluation_settings") or {}).get("failed") or {}))
    out, seen = [], set()
    for stage, part, failures in found:
        for site, reason in failures.items():
            if site in accepted and (stage, part, site) not in seen:
                seen.add((stage, part, site))
                out.append({"stage": stage, "part": part, "site": site, "reason": str(reason)})
    return out


def left_out_lines(results: dict) -> list[str]:
    """One sentence per site a stage finished without (empty when every site took part throughout)."""
    return [f"{e['stage']}{' (' + e['part'] + ')' if e['part'] else ''}: finished without {e['site']}: {e['reason']}"
            for e in sites_left_out(results)]


def status_phrase(results: dict) -> str:
    """``completed``, or ``completed without siteB, siteC`` when a stage went on without a site."""
    status = str(results.get("status", "?"))
    missing = sorted({e["site"] for e in sites_left_out(results)})
    return f"{status} without {', '.join(missing)}" if status == "completed" and missing else status


def exit_status(results: dict) -> int:
    """0: completed with every site; EXIT_WITHOUT_SITES: completed without a site that started a stage; 1: failed."""
    if results.get("status") != "completed":
        return 1
    return EXIT_WITHOUT_SITES if sites_left_out(results) else 0


def package_lines(package: Path) -> list[str]:
    """Where the signed package is, the public key beside it, and the command a new site runs."""
    from fedrad.common.signing import KeyFileError, key_id, load_public_key
    from fedrad.server.package import trust_file

    package, public = Path(package), trust_file(package)
    try:
        signed = f"signed with key {key_id(load_public_key(public))}"
    except KeyFileError as exc:
        signed = f"its public key cannot be read: {exc}"
    return [f"model package: {package} ({signed}); public key: {public}",
            f"a new site validates it with: fedrad validate --package {package} --trust {public} --store STORE "
            "(send the public key by a channel the site trusts, not with the package)"]


def print_results(results: dict, run_dir: Path) -> None:
    stages = pd.DataFrame([{"stage": k, **v} for k, v in results.get("stages", {}).items()])
    if len(stages):
        console.print(table_of(stages, f"study '{results.get('study', '?')}': {status_phrase(results)}"))
    census = results.get("census")
    if census:
        rows = [{"site": name, "cases": i["cases"], "events": i["events"], "quarantined": i["quarantined"],
                 "features": i["features_selected"], "min_count": i.get("min_count"),
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
    lines = left_out_lines(results)
    if lines:
        console.print(f"[yellow]warning:[/] the study finished without site(s) that started a stage; its results "
                      f"do not include them (exit status {EXIT_WITHOUT_SITES}):")
        for line in lines:
            console.print(f"  {line}", markup=False, highlight=False)
    if results.get("package"):
        for line in package_lines(Path(results["package"])):
            console.print(line, markup=False, highlight=False)
    console.print(f"results: {Path(run_dir) / 'results.json'}; run log: `fedrad status {run_dir}`")
