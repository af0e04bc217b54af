"""Draw a fitted model's nomogram (points scale) as a PNG, in the layout clinicians know
from R's ``rms::nomogram``: a Points ruler, one axis per predictor, Total points, and the
outcome (survival at each horizon for Cox, probability of the event for logistic)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from fedrad.common.nomogram import Axis, Nomogram, linear_predictor_for_survival  # noqa: E402

OUTCOME_TICKS = np.array([0.01, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99])


def nomogram_from_dict(data: dict) -> Nomogram:
    return Nomogram(axes=tuple(Axis(a["name"], a["coef"], a["low"], a["high"], a["binary"], a.get("integer", False))
                               for a in data["axes"]),
                    intercept=data["intercept"], scale=data["scale"])


def outcome_axes(nomogram: Nomogram, kind: str, horizons, cumhaz) -> list[tuple[str, np.ndarray, list[str]]]:
    """(label, total points of each tick, tick labels) for the outcome rows."""
    rows = []
    if kind == "logistic":
        lp = np.log(OUTCOME_TICKS / (1 - OUTCOME_TICKS))
        rows.append(("Probability of event", nomogram.points_for_linear_predictor(lp), OUTCOME_TICKS))
    else:
        for t, h in zip(horizons, cumhaz or []):
            if h:
                lp = linear_predictor_for_survival(OUTCOME_TICKS, h)
                rows.append((f"Survival at t = {t:g}", nomogram.points_for_linear_predictor(lp), OUTCOME_TICKS))
    return [(label, pts, [f"{v:g}" for v in values]) for label, pts, values in rows]


def _thinned(positions, labels, min_gap=4.0):
    """Drop a tick that would print over its neighbour (crowded survival ticks)."""
    keep, last = [], -np.inf
    for x, text in zip(positions, labels):
        if x - last >= min_gap:
            keep.append((x, text))
            last = x
    return [k[0] for k in keep], [k[1] for k in keep]


def _ruler(ax, y, positions, labels, name, x_scale, extent=None):
    positions = np.asarray(positions, dtype=float) * x_scale
    ends = positions if extent is None else np.asarray(extent, dtype=float) * x_scale
    order = np.argsort(positions)
    positions, labels = _thinned(positions[order], [labels[i] for i in order])
    ax.plot([ends.min(), ends.max()], [y, y], color="black", lw=1)
    for x, text in zip(positions, labels):
        ax.plot([x, x], [y, y + 0.12], color="black", lw=1)
        ax.text(x, y + 0.18, text, ha="center", va="bottom", fontsize=7)
    ax.text(-4, y, name, ha="right", va="center", fontsize=9)


def plot_nomogram(model: dict, name: str, horizons, out_dir) -> Path:
    data = model["nomogram"]
    nomogram = nomogram_from_dict(data)
    total_max = nomogram.max_total()
    outcomes = outcome_axes(nomogram, data["kind"], horizons, data.get("cumhaz"))
    rows = 2 + len(nomogram.axes) + len(outcomes)
    fig, ax = plt.subplots(figsize=(9, 0.62 * rows + 0.8))
    y = rows
    _ruler(ax, y, np.arange(0, 101, 10), [str(v) for v in range(0, 101, 10)], "Points", 1.0)
    for axis in nomogram.axes:
        y -= 1
        values = np.array([0.0, 1.0]) if axis.binary else \
            MaxNLocator(6, integer=axis.integer).tick_values(axis.low, axis.high)
        values = values[(values >= axis.low - 1e-12) & (values <= axis.high + 1e-12)]
        _ruler(ax, y, nomogram.points(axis.name, values), [f"{v:g}" for v in values], axis.name, 1.0,
               extent=nomogram.points(axis.name, [axis.low, axis.high]))
    y -= 1
    totals = MaxNLocator(8, integer=True).tick_values(0, total_max)
    totals = totals[totals <= total_max + 1e-9]
    x_scale = 100.0 / max(total_max, 1e-12)
    _ruler(ax, y, totals, [f"{v:g}" for v in totals], "Total points", x_scale)
    for label, points, texts in outcomes:
        y -= 1
        inside = (points >= 0) & (points <= total_max)
        if inside.sum() >= 2:
            _ruler(ax, y, points[inside], [t for t, i in zip(texts, inside) if i], label, x_scale)
        else:
            ax.text(50, y, f"{label}: outside the range of total points", ha="center", fontsize=8)
    ax.set_xlim(-45, 105)
    ax.set_ylim(y - 0.6, rows + 0.8)
    ax.axis("off")
    ax.set_title(f"Nomogram, model '{name}'", fontsize=11)
    path = Path(out_dir) / f"nomogram_{name}.png"
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)
    return path
