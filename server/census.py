"""Stage 1, census: who is here, how many cases and events, which features, which settings.

Always runs, also when a study is resumed: it is the roll call that maps Flower node ids to
site names, and its fingerprint tells whether finished stages are still valid. A site whose
pyradiomics settings differ from the others' is refused (features from different settings
are not comparable, and ComBat cannot fix that). A study whose ``[sites] validation`` names a site
that is not in the federation is stopped here, before any later stage, naming the sites present.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from logging import INFO, WARNING

from flwr.common.logger import log

from fedrad.common.messages import CENSUS, request
from fedrad.common.study import Study
from fedrad.server.federation import Federation, StageFailed, StageTraffic


def run_census(fed: Federation, study: Study) -> dict:
    traffic = StageTraffic()
    targets = {f"node {n}": n for n in sorted(fed.online())}
    plan = {"study": study.model_dump(mode="json")}
    outcome = fed.ask("census", 1, CENSUS, {label: request(plan) for label in targets}, targets, traffic)
    sites: dict[str, dict] = {}
    refused: dict[str, str] = {}
    for label, content in sorted(outcome.replies.items()):
        info = _site_info(content)
        if info["name"] in sites:
            raise StageFailed(f"two SuperNodes call themselves '{info['name']}'; give each site its own site-name")
        sites[info["name"]] = info
        fed.sites[info["name"]] = targets[label]
        fed.runlog.rename_site("census", label, info["name"])
        for counter in (traffic.bytes_out, traffic.bytes_in):
            counter[info["name"]] = counter.pop(label)
    for label, reason in outcome.failures.items():
        named = _site_named_in(reason) if label in outcome.refused_by_site else None
        refused[named or label] = reason
    _refuse_unknown_validation_sites(study, set(sites) | set(refused))
    params_hash = _refuse_odd_settings(sites, refused)
    for name in refused:
        fed.sites.pop(name, None)
    fed.store_hashes = {name: sites[name]["store_sha256"] for name in fed.sites}
    accepted = {name: info for name, info in sites.items() if name not in refused}
    if len(accepted) < study.federation.min_sites:
        raise StageFailed(f"census: {len(accepted)} site(s) usable, the study needs min_sites="
                          f"{study.federation.min_sites}; refused: {_listing(refused)}")
    features = [f for f in next(iter(accepted.values()))["features"]
                if all(f in set(info["features"]) for info in accepted.values())]
    if not features:
        raise StageFailed("census: no feature column matches the study's [features] at every site")
    not_everywhere = sorted({f for info in accepted.values() for f in info["features"]} - set(features))
    batch_totals: Counter = Counter()
    for info in accepted.values():
        batch_totals.update(info["batch_counts"])
    result = {
        "sites": {name: _public(info) for name, info in sorted(accepted.items())},
        "refused": refused,
        "params_hash": params_hash,
        "params_yaml": next((i["params_yaml"] for i in accepted.values() if i["params_hash"] == params_hash), ""),
        "features": features,
        "n_features": len(features),
        "features_not_at_every_site": not_everywhere,
        "totals": {"sites": len(accepted), "cases": sum(i["cases"] for i in accepted.values()),
                   "events": sum(i["events"] for i in accepted.values())},
        "batch_levels": dict(sorted(batch_totals.items())),
        "traffic": traffic.summary(),
    }
    result["fingerprint"] = _fingerprint(accepted, features)
    log(INFO, "census: %d site(s), %d cases, %d events, %d features", len(accepted), result["totals"]["cases"],
        result["totals"]["events"], len(features))
    for name, reason in refused.items():
        log(WARNING, "census: %s refused: %s", name, reason)
    return result


def roll_call(fed: Federation, study: Study, census: dict, before: str) -> dict[str, str]:
    """Find census sites whose SuperNode went away and came back under a new node id (a restart
    without node authentication gives a new id), so that a site lost in one stage takes part in
    the next. Newcomers answer a census; one that names a lost site and brings the store the
    census saw takes its place. Returns {site: what happened} for results.json."""
    online = fed.online()
    lost = [s for s in census["sites"] if fed.sites.get(s) not in online]
    newcomers = {f"node {n}": n for n in sorted(online - set(fed.sites.values()))}
    if not lost or not newcomers:
        return {}
    rounds = int(fed.runlog.count_rounds("census"))
    plan = {"study": study.model_dump(mode="json")}
    outcome = fed.ask("census", rounds + 1, CENSUS, {label: request(plan) for label in newcomers}, newcomers)
    events: dict[str, str] = {}
    for label, content in outcome.replies.items():
        info = _site_info(content)
        name = info["name"]
        fed.runlog.rename_site("census", label, name)
        if name not in lost:
            continue
        if info["store_sha256"] != fed.store_hashes.get(name):
            events[name] = (f"rejoined before {before} with a store that differs from the census "
                            f"({fed.store_hashes.get(name, '')[:12]} → {info['store_sha256'][:12]}): left out")
            log(WARNING, "%s: %s", name, events[name])
            continue
        fed.sites[name] = newcomers[label]
        events[name] = f"rejoined before {before} as node {newcomers[label]}"
        log(INFO, "%s: %s", name, events[name])
    return events


def _site_named_in(reason: str) -> str | None:
    """A site's own refusal starts with its name ("siteB: ..."); Flower's errors do not."""
    match = re.match(r"^([\w.-]+): ", reason)
    return match.group(1) if match else None


def _site_info(content) -> dict:
    site, counts = content["site"], content["counts"]
    levels = list(site["batch_levels"])
    return {
        "name": str(site["name"]),
        "fedrad_version": str(site["fedrad_version"]),
        "params_hash": str(site["params_hash"]),
        "params_yaml": str(site["params_yaml"]) if "params_yaml" in site else "",
        "features": list(site["features"]),
        "batch_counts": dict(zip(levels, (int(c) for c in counts["batch_counts"]))),
        "small_batch_levels": list(site["small_batch_levels"]),
        "problems": list(site["problems"]),
        "harmonised_reference": str(site["harmonised_reference"]),
        "store_sha256": str(site["store_sha256"]),
        "categorical_levels": {k.split(":", 1)[1]: list(v) for k, v in site.items() if k.startswith("levels:")},
        "cases": int(counts["cases"]),
        "events": int(counts["events"]),
        "quarantined": int(counts["quarantined"]),
        "repeat_cases": int(counts["repeat_cases"]),
        "features_in_store": int(counts["features_in_store"]),
        "min_count": int(counts["min_count"]),
    }


def _public(info: dict) -> dict:
    """What results.json shows of a site (feature names are listed once, for the study)."""
    shown = {k: v for k, v in info.items() if k not in ("features", "name", "store_sha256", "params_yaml")}
    shown["features_selected"] = len(info["features"])
    return shown


def _refuse_unknown_validation_sites(study: Study, present: set[str]) -> None:
    """A `[sites] validation` name that no site of the federation answers to stops the study: a misspelt
    hold-out site would otherwise be trained on under its real name. ``present``: the sites that answered
    the census (accepted or refused) and the labels of the SuperNodes that did not."""
    unknown = [s for s in study.sites.validation if s not in present]
    if unknown:
        names = sorted(present)
        raise StageFailed(f"census: [sites] validation names {_quoted(unknown)}, not a site of this federation "
                          f"(present: {_quoted(names) or 'none'}); correct the study's [sites] validation")


def _quoted(names) -> str:
    return ", ".join(f"'{n}'" for n in names)


def _refuse_odd_settings(sites: dict[str, dict], refused: dict[str, str]) -> str:
    """Keep the sites with the most common settings hash; refuse the others, naming both hashes."""
    if not sites:
        return ""
    counts = Counter(info["params_hash"] for info in sites.values())
    (common, top), *rest = counts.most_common()
    if rest and rest[0][1] == top:
        raise StageFailed("census: sites disagree on extraction settings and no setting has a majority: "
                          + ", ".join(f"{n} uses {i['params_hash'][:12] or 'none'}" for n, i in sorted(sites.items())))
    for name, info in sites.items():
        if info["params_hash"] != common:
            refused[name] = (f"its pyradiomics settings (params hash {info['params_hash'][:12] or 'none'}) differ "
                             f"from the other sites' ({common[:12]}); re-run `fedrad prepare` with the study's "
                             "params YAML")
    return common


def _fingerprint(accepted: dict[str, dict], features: list[str]) -> str:
    data = {name: [i["cases"], i["events"], i["params_hash"], i["store_sha256"]] for name, i in accepted.items()}
    return hashlib.sha256(json.dumps([data, features], sort_keys=True).encode()).hexdigest()


def _listing(refused: dict[str, str]) -> str:
    return "; ".join(f"{name}: {reason}" for name, reason in refused.items()) or "none"
