"""Nomogram scale: total points map back to the model's linear predictor exactly."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedrad.common.nomogram import (MAX_POINTS, axis_ranges, build_nomogram, linear_predictor_for_survival,
                             survival_at)


@pytest.fixture
def cohort():
    rng = np.random.default_rng(3)
    return pd.DataFrame({"rad_score": rng.normal(0.2, 0.8, 200), "age": rng.normal(55, 11, 200),
                         "grade3": rng.integers(0, 2, 200).astype(float)})


def test_axis_ranges_from_pooled_moments(cohort):
    X = cohort.to_numpy()
    binary = np.all((X == 0) | (X == 1), axis=0)
    ranges = axis_ranges(len(X), X.sum(axis=0), (X ** 2).sum(axis=0), binary)
    mean, sd = cohort.mean(), cohort.std(ddof=1)
    assert ranges[0] == pytest.approx((mean["rad_score"] - 2 * sd["rad_score"], mean["rad_score"] + 2 * sd["rad_score"],
                                       False, False), rel=1e-12)
    assert ranges[2] == (0.0, 1.0, True, True)
    grade = np.array([1.0, 2, 2, 3, 2, 1, 3, 2])
    low, high, _, whole = axis_ranges(len(grade), [grade.sum()], [(grade ** 2).sum()], [False], [True])[0]
    assert (low, high, whole) == (1.0, 3.0, True)  # 2 ± 2·0.76 = 0.49..3.51, rounded inward


def test_points_add_up_to_the_linear_predictor(cohort):
    coefficients = {"rad_score": 0.9, "age": -0.02, "grade3": 0.6}
    X = cohort.to_numpy()
    ranges = axis_ranges(len(X), X.sum(axis=0), (X ** 2).sum(axis=0), [False, False, True])
    nomogram = build_nomogram(coefficients, dict(zip(cohort.columns, ranges)), intercept=-1.5)
    total = nomogram.total_points({c: cohort[c].to_numpy() for c in cohort.columns})
    np.testing.assert_allclose(nomogram.linear_predictor(total), -1.5 + X @ np.array(list(coefficients.values())),
                               rtol=0, atol=1e-12)
    widths = {a.name: abs(a.coef) * (a.high - a.low) / nomogram.scale for a in nomogram.axes}
    assert max(widths.values()) == pytest.approx(MAX_POINTS)
    # every axis starts at 0 points at its low-risk end (age protects here: its high end scores 0)
    assert nomogram.points("age", ranges[1][1]) == pytest.approx(0.0, abs=1e-12)
    assert nomogram.points("grade3", 0.0) == 0.0 and nomogram.points("grade3", 1.0) > 0


def test_survival_axis_inverts():
    lp = np.linspace(-2, 2, 9)
    np.testing.assert_allclose(linear_predictor_for_survival(survival_at(lp, 0.3), 0.3), lp, atol=1e-12)


def test_zero_coefficients_get_no_axis():
    nomogram = build_nomogram({"a": 0.0, "b": 1.0}, {"a": (0, 1, True, True), "b": (-1, 1, False, False)})
    assert [a.name for a in nomogram.axes] == ["b"]
    with pytest.raises(ValueError, match="non-zero"):
        build_nomogram({"a": 0.0}, {"a": (0, 1, True, True)})
