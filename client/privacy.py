"""The privacy guard every outgoing reply passes before it leaves the site.

The guard does not trust the handler that built the reply: it inspects the reply itself.

* No per-patient array: an array (or a list in a record) with an axis as long as the
  number of cases the reply was computed from is refused.
* Small cells: the reply declares every group an aggregate was computed over (the whole
  site, each batch level); a group with fewer than ``min_count`` cases is refused.
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

__all__ = ["Disclosure", "PrivacyRefusal", "check_reply", "scrub"]


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
