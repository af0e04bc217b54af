"""The privacy guard every outgoing reply passes before it leaves the site.

The guard does not trust the handler that built the reply: it inspects the reply itself.

* No per-patient array: an array (or a list in a record) with an axis as long as the
  number of cases the reply was computed from is refused.
* Small cells: the reply declares every group an aggregate was computed over (the whole
  site, each batch level); a group with fewer than ``min_count`` cases is refused.
* Two-valued columns: every column the sums are taken over that takes exactly two values at
  the site (a 0/1 clinical column) splits the cases into two groups; its column sum counts one
  of them and its gradient/Hessian entries are sums over it, so a value held by fewer than
  ``min_count`` cases is refused (per set of rows the sums cover: the site, each CV fold).
* Designs: a design (model columns, ComBat's batch + covariates) whose per-site Newton terms or
  cross-products leave must have fewer columns than the site's rows minus ``min_count``; with
  p ≥ n − min_count those sums (at the coordinator's chosen points) can determine the rows.
* No identifiers: no text in the reply may contain a patient identifier of the site.
* Only numbers in arrays: object and text arrays are refused.

A refusal is sent to the coordinator instead of the reply, scrubbed of identifiers, and is
itself recorded on the egress ledger.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from flwr.app import RecordDict

from fedrad.common.errors import FedradError

__all__ = ["Disclosure", "PrivacyRefusal", "check_reply", "scrub", "two_valued"]


class PrivacyRefusal(FedradError):
    """The reply would disclose more than the privacy rules allow; it is not sent.

    The message goes to the coordinator and so never states a count below the minimum;
    ``detail`` (with the counts) goes to the site's own log only.
    """

    def __init__(self, message: str, detail: str = ""):
        super().__init__(message)
        self.detail = detail or message


@dataclass(frozen=True)
class Disclosure:
    """What a reply was computed from, declared by the handler and checked by the guard.

    n_cases : cases the reply's aggregates were computed from.
    groups : size of every subgroup an aggregate was computed over, e.g. ``{"batch 'GE-A'": 12}``.
    identifiers : the site's patient identifiers; no text leaving the site may contain one.
    """

    n_cases: int
    groups: dict[str, int] = field(default_factory=dict)
    identifiers: frozenset[str] = frozenset()
    #: lengths of axes the handler vouches are not per-case (features, λ points, folds): an array
    #: axis as long as the number of cases is accepted only if its length is declared here.
    shared_axes: frozenset[int] = frozenset()
    #: columns taking exactly two values in the rows some sums cover, with the cases holding each value
    #: (:func:`two_valued`): ``{"column 'x'": {"value 0": 20, "value 1": 4}}``.
    values: dict[str, dict[str, int]] = field(default_factory=dict)
    #: designs whose per-site Newton terms or cross-products the reply carries: ``{"model 'm'": (columns, rows)}``.
    designs: dict[str, tuple[int, int]] = field(default_factory=dict)


def two_valued(labels, X) -> dict[str, dict[str, int]]:
    """The columns of ``X`` (one label each) that take exactly two values in its rows, with the number of
    cases holding each value: ``value 0``/``value 1`` for a 0/1 column, else its lower/higher value (never
    the value itself). A column with one value or with three or more is not listed."""
    X = np.asarray(X, dtype=float).reshape(len(X), -1)
    out = {}
    for label, column in zip(labels, X.T):
        values = np.unique(column[np.isfinite(column)])
        if len(values) != 2:
            continue
        names = ("value 0", "value 1") if (values[0], values[1]) == (0, 1) else ("its lower value", "its higher value")
        out[label] = {names[0]: int(np.sum(column == values[0])), names[1]: int(np.sum(column == values[1]))}
    return out


def check_reply(content: RecordDict, disclosure: Disclosure, min_count: int) -> None:
    """Raise PrivacyRefusal if ``content`` breaks a rule; return None if it may leave."""
    n = disclosure.n_cases
    if n < min_count:
        raise PrivacyRefusal(f"the site has fewer cases than min_count={min_count}",
                             detail=f"the reply would be computed from {n} case(s); min_count is {min_count}")
    small = {name: size for name, size in disclosure.groups.items() if 0 < size < min_count}
    if small:
        raise PrivacyRefusal(f"aggregate over fewer than min_count={min_count} cases: {', '.join(small)}",
                             detail=", ".join(f"{name} has {size}" for name, size in small.items()))
    rare = {f"{label}: {value}": size for label, held in disclosure.values.items()
            for value, size in held.items() if 0 < size < min_count}
    if rare:
        raise PrivacyRefusal("; ".join(f"{name} held by fewer than min_count={min_count} cases" for name in rare),
                             detail=", ".join(f"{name} held by {size}" for name, size in rare.items()))
    for name, (columns, rows) in disclosure.designs.items():
        if columns >= rows - min_count:
            against = f"{rows} cases" if rows >= min_count else f"fewer than min_count={min_count} cases"
            raise PrivacyRefusal(
                f"{name}: {columns} design column(s) against {against} at this site; with at least n - min_count "
                "columns its per-site sums could determine patients' rows (use fewer columns than the site's "
                "cases minus min_count, or leave the site out)",
                detail=f"{name}: {columns} column(s), {rows} row(s), min_count {min_count}")
    for record_name, record in content.array_records.items():
        for key, array in record.items():
            name = f"{record_name}.{key}"
            if np.dtype(array.dtype).kind not in "biuf":
                raise PrivacyRefusal(f"array '{name}' has dtype {array.dtype}; only numbers may leave the site")
            if n > 1 and n in tuple(array.shape) and n not in disclosure.shared_axes:
                raise PrivacyRefusal(
                    f"array '{name}' has shape {tuple(array.shape)}: an axis as long as the number of cases "
                    f"({n}) is a per-patient array")
    for kind, records in (("metrics", content.metric_records), ("config", content.config_records)):
        for record_name, record in records.items():
            for key, value in record.items():
                name = f"{record_name}.{key}"
                if _per_case_list(value, n):
                    raise PrivacyRefusal(f"{kind} '{name}' is a list of {n} values, one per case: per-patient data")
                _check_text(name, value, disclosure.identifiers)


def _per_case_list(value, n: int) -> bool:
    """A list as long as the number of cases. Text lists count only if they repeat a value:
    distinct names (features, levels) that happen to number n are not per-patient."""
    if not isinstance(value, list) or n <= 1 or len(value) != n:
        return False
    if value and isinstance(value[0], (str, bytes)):
        return len(set(value)) < len(value)
    return True


def _check_text(name: str, value, identifiers: frozenset[str]) -> None:
    texts = value if isinstance(value, list) else [value]
    for text in texts:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        if isinstance(text, str) and identifiers and _pattern(identifiers).search(text):
            raise PrivacyRefusal(f"'{name}' contains a patient identifier")


@lru_cache(maxsize=8)
def _pattern(identifiers: frozenset[str]) -> re.Pattern:
    """Identifiers as whole tokens: id '12' must not match inside a hash ('a12b'), a version ('0.12.0')
    or a label ('12-bit', '1.5T'); a sentence's full stop after an id still matches ('case 12.')."""
    alternatives = "|".join(re.escape(pid) for pid in sorted(identifiers, key=len, reverse=True) if pid)
    return re.compile(rf"(?<![A-Za-z0-9_.-])(?:{alternatives})(?![A-Za-z0-9_-])(?!\.[A-Za-z0-9])")


def scrub(text: str, identifiers: frozenset[str]) -> str:
    """Replace every patient identifier in an error message before it leaves the site."""
    return _pattern(identifiers).sub("<case>", text) if identifiers else text
