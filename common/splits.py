"""Site-local held-out splits fixed by the case identifiers alone.

A case's side of the split depends only on ``sha256(f"{seed}:{id}")``, so it is the same in
every round, in every process (Flower starts a fresh one per message), after a site adds
cases (old cases keep their side) and at every site without any coordination. No random
state is involved and no identifier leaves the site.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

__all__ = ["held_out", "held_out_share", "unit_hash"]


def unit_hash(identifier, seed: int = 0) -> float:
    """``sha256(f"{seed}:{identifier}")`` mapped to [0, 1) (first 8 bytes as an unsigned integer / 2**64)."""
    digest = hashlib.sha256(f"{seed}:{identifier}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def held_out(ids: Iterable, fraction: float, seed: int = 0) -> set:
    """The identifiers whose hash is below ``fraction``: the held-out side of the split.

    With two or more (distinct) ids both sides are non-empty: if no id falls below ``fraction``
    the one with the smallest hash is held out, and if every id does, the one with the largest
    hash is kept for training. A single id is never held out (training needs it more than a
    figure from one case). ``fraction`` 0 holds out nothing whatever the count.

    Parameters
    ----------
    ids : iterable of hashable
        Case identifiers (compared as given; ``str(id)`` is hashed).
    fraction : float in [0, 1]
        Expected share of cases held out.
    seed : int
        Another seed gives another, independent split.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    unique = list(dict.fromkeys(ids))
    if fraction == 0.0 or len(unique) < 2:
        return set()
    scores = {i: unit_hash(i, seed) for i in unique}
    held = {i for i, u in scores.items() if u < fraction}
    if not held:
        held = {min(unique, key=scores.__getitem__)}
    elif len(held) == len(unique):
        held.discard(max(unique, key=scores.__getitem__))
    return held


def held_out_share(ids: Iterable, fraction: float, seed: int = 0) -> set:
    """The ``round(fraction · n)`` identifiers with the smallest hashes (at least one, never all, when n ≥ 2).

    Unlike `held_out`, the share is exact, which matters at a site with a handful of cases (8 cases
    at 0.4 give 3, where a threshold on the hash can give anything from 0 to 8); the price is that
    adding cases can move an old case to the other side.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    unique = list(dict.fromkeys(ids))
    if fraction == 0.0 or len(unique) < 2:
        return set()
    size = min(max(round(fraction * len(unique)), 1), len(unique) - 1)
    return set(sorted(unique, key=lambda i: unit_hash(i, seed))[:size])
