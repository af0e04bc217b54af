"""What a finished study prints: its stages, census and harmonisation, as tables (`fedrad local`, the demo)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from fedrad.client.cli import console, table_of


def print_results(results: dict, run_dir: Path) -> None:
    stages = pd.DataFrame([{"stage": k, **v} for k, v in results.get("stages", {}).items()])
    if len(stages):
        console.print(table_of(stages, f"study '{results.get('study', '?')}': {results['status']}"))
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
    console.print(f"results: {Path(run_dir) / 'results.json'}; run log: `fedrad status {run_dir}`")
