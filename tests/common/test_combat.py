"""Distributed ComBat equals pooled neuroCombat, whatever the split of rows into sites.

Oracles: neuroCombat 0.2.12 run here on the pooled data (its default path; its ref_batch
path breaks under numpy 2), and the R / Python / Matlab outputs stored in
../shared/data/combat/reference_outputs (see its PROVENANCE.md: 200 features x 10 scans,
batch 1-5 / 6-10, gender covariate [1,2,...]).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from fedrad.common.combat import (
    DesignSpec,
    FederatedComBat,
    combine_combat_moments,
    design_matrix,
    site_combat_moments,
    update_combat_fit,
    site_combat_residuals,
)
from tests.oracles import neurocombat

MODES = {  # name -> (eb, parametric, mean_only)
    "parametric": (True, True, False),
    "nonparametric": (True, False, False),
    "noeb": (False, True, False),
    "meanonly": (True, True, True),
    "nonparametric_meanonly": (True, False, True),
    "noeb_meanonly": (False, True, True),
}


@pytest.fixture(scope="module")
def testdata(shared_data):
    y = pd.read_csv(shared_data / "combat" / "testdata.csv").to_numpy().T  # (10 scans, 200 features)
    batch = np.array(["1"] * 5 + ["2"] * 5)
    gender = np.array(["1", "2"] * 5)
    return y, batch, gender


def _reference_file(shared_data, mode, adjusted, language):
    eb, parametric, mean_only = MODES[mode]
    name = "testdata_combat_" + ("parametric" if parametric else "nonparametric")
    name += "_adjusted" if adjusted else "_unadjusted"
    name += ("_noeb" if not eb else "") + ("_meanonly" if mean_only else "")
    path = shared_data / "combat" / "reference_outputs" / f"{name}_{language}.csv"
    return pd.read_csv(path, header=0 if language == "r" else None).to_numpy().T


@pytest.mark.parametrize("language", ["python", "r"])
@pytest.mark.parametrize("adjusted", [False, True], ids=["unadjusted", "adjusted"])
@pytest.mark.parametrize("mode", ["parametric", "nonparametric", "noeb", "meanonly", "noeb_meanonly",
                                  "nonparametric_meanonly"])
def test_matches_stored_reference_outputs(testdata, shared_data, mode, adjusted, language):
    y, batch, gender = testdata
    eb, parametric, mean_only = MODES[mode]
    sites = np.array(["A", "B", "C", "A", "B", "C", "A", "B", "C", "A"])  # each batch spans three sites
    got = FederatedComBat(eb=eb, parametric=parametric, mean_only=mean_only,
                          categorical=("gender",) if adjusted else ()).fit_transform(
        y, batch=batch, covariates={"gender": gender}, site=sites)
    np.testing.assert_allclose(got, _reference_file(shared_data, mode, adjusted, language), rtol=0, atol=1e-12)


def test_matlab_nonparametric_reference(testdata, shared_data):
    """Matlab's parametric outputs stop its EB iteration differently (1e-4 apart); non-parametric agrees."""
    y, batch, gender = testdata
    got = FederatedComBat(parametric=False).fit_transform(y, batch=batch)
    np.testing.assert_allclose(got, _reference_file(shared_data, "nonparametric", False, "matlab"), atol=1e-12)


def _hospitals(effect_scale: float):
    """Three hospitals, a scanner model shared by two of them, age and sex to preserve.

    Scanner shifts are ``effect_scale`` x each feature's spread (radiomics features differ in scale by
    orders of magnitude)."""
    rng = np.random.default_rng(42)
    n_per_site = (30, 24, 36)
    site = np.repeat(["siteA", "siteB", "siteC"], n_per_site)
    scanner = np.where(site == "siteA", rng.choice(["GE", "Siemens"], size=len(site)),
                       np.where(site == "siteB", "Philips", "GE"))
    age = np.round(rng.normal(58, 12, size=len(site)))  # float32-representable (neuroCombat casts to float32)
    sex = rng.choice(["F", "M"], size=len(site))
    spread = rng.uniform(1, 50, size=40)
    centre = rng.uniform(-500, 2000, size=40)
    truth = rng.normal(size=(len(site), 40)) + 0.05 * (age[:, None] - 58) + 0.5 * (sex == "M")[:, None]
    gain = {"GE": 1.1, "Siemens": 0.9, "Philips": 1.3}
    shift = {"GE": 0.2, "Siemens": -0.35, "Philips": 0.6}
    y = np.array([(truth[i] * gain[s] + effect_scale * shift[s]) * spread + centre for i, s in enumerate(scanner)])
    return y, site, scanner, age, sex


@pytest.fixture(scope="module")
def radiomics_like():
    return _hospitals(effect_scale=1.0)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("batch_by", ["site", "scanner"])
def test_federated_equals_pooled_neurocombat(radiomics_like, mode, batch_by):
    """(a) batch = site, (b) a scanner batch spanning sites, (c) covariates, (d) every EB mode."""
    y, site, scanner, age, sex = radiomics_like
    batch = site if batch_by == "site" else scanner
    eb, parametric, mean_only = MODES[mode]
    covars = pd.DataFrame({"batch": batch, "sex": sex, "age": age})
    reference = neurocombat(y, covars, categorical=["sex"], continuous=["age"], eb=eb, parametric=parametric,
                             mean_only=mean_only)
    got = FederatedComBat(eb=eb, parametric=parametric, mean_only=mean_only, categorical=("sex",),
                          continuous=("age",)).fit_transform(y, batch=batch, covariates={"sex": sex, "age": age},
                                                             site=site)
    assert np.abs(got - reference).max() <= 1e-8 * max(1.0, np.abs(reference).max() / 1e3)
    np.testing.assert_allclose(got, reference, rtol=1e-10, atol=1e-8)


def test_one_site_equals_many_sites(radiomics_like):
    y, site, scanner, age, sex = radiomics_like
    kwargs = dict(batch=scanner, covariates={"sex": sex, "age": age})
    combat = FederatedComBat(categorical=("sex",), continuous=("age",))
    one = combat.fit_transform(y, **kwargs)
    many = combat.fit_transform(y, site=site, **kwargs)
    assert combat.n_sites_ == 3
    np.testing.assert_allclose(many, one, rtol=1e-12, atol=1e-9)


def test_sites_send_only_aggregates(radiomics_like):
    """Every array a site sends has no per-patient dimension."""
    y, site, scanner, age, sex = radiomics_like
    spec = DesignSpec(batch_levels=("GE", "Philips", "Siemens"), categorical={"sex": ("F", "M")},
                      continuous=("age",))
    designs = {s: design_matrix(scanner[site == s], {"sex": sex[site == s], "age": age[site == s]}, spec)
               for s in ("siteA", "siteB", "siteC")}
    all_moments = {s: site_combat_moments(y[site == s], X, spec) for s, X in designs.items()}
    fit = update_combat_fit(combine_combat_moments(list(all_moments.values())), spec)
    rows = site == "siteA"
    moments = all_moments["siteA"]
    residuals = site_combat_residuals(y[rows], designs["siteA"], fit)
    shapes = [a.shape for a in (moments.xtx, moments.xty, moments.n_batch, residuals.ss_resid, residuals.sum_r,
                                residuals.sum_r2)]
    assert shapes == [(5, 5), (5, 40), (3,), (40,), (3, 40), (3, 40)]
    assert rows.sum() not in {dim for shape in shapes for dim in shape}


def test_nonparametric_refuses_where_neurocombat_returns_nan():
    y, site, scanner, _, _ = _hospitals(effect_scale=1.0)
    offsets = np.linspace(-200, 200, y.shape[1]) * y.std(axis=0)  # Philips shifts each feature very differently
    y = y + np.where(scanner == "Philips", 1.0, 0.0)[:, None] * offsets
    covars = pd.DataFrame({"batch": scanner})
    with np.errstate(all="ignore"):
        reference = neurocombat(y, covars, eb=True, parametric=False, mean_only=False)
    assert np.isnan(reference).any()
    with pytest.raises(ValueError, match=r"non-parametric EB is undefined: every likelihood underflows for "
                                         r"batch '\w+' \(n=\d+\)"):
        FederatedComBat(parametric=False).fit(y, batch=scanner, site=site)


def test_zero_variance_feature_is_refused(testdata):
    y, batch, _ = testdata
    y = y.copy()
    y[:, 7] = 3.0
    with pytest.raises(ValueError, match=r"1 feature\(s\) have zero residual variance \(e\.g\. 7\)"):
        FederatedComBat().fit(y, batch=batch)


def test_unknown_batch_level_is_named():
    spec = DesignSpec(batch_levels=("GE", "Philips"))
    with pytest.raises(ValueError, match=r"batch level\(s\) Canon not in the study's levels"):
        design_matrix(np.array(["GE", "Canon"]), None, spec)


def test_parametric_iteration_counts_are_reported(testdata):
    y, batch, _ = testdata
    combat = FederatedComBat().fit(y, batch=batch)
    assert len(combat.estimates_.eb_iterations) == 2 and min(combat.estimates_.eb_iterations) >= 2


@pytest.mark.parametrize("mode", list(MODES))
def test_a_batch_harmonised_as_new_against_the_reference_equals_neurocombat(radiomics_like, mode):
    """A validation site estimates its own γ*, δ* against the stored reference. Check: treating a
    training batch as new reproduces neuroCombat's adjusted rows for that batch (the same sums,
    priors and EB), so the new-batch arithmetic is ComBat's."""
    from fedrad.common.combat import design_matrix, site_combat_new_batch

    y, site, scanner, age, sex = radiomics_like
    eb, parametric, mean_only = MODES[mode]
    covariates = {"sex": sex, "age": age}
    reference = neurocombat(y, pd.DataFrame({"batch": scanner, "sex": sex, "age": age}), categorical=["sex"],
                            continuous=["age"], eb=eb, parametric=parametric, mean_only=mean_only)
    combat = FederatedComBat(eb=eb, parametric=parametric, mean_only=mean_only, categorical=("sex",),
                             continuous=("age",)).fit(y, batch=scanner, covariates=covariates)
    spec = combat.estimates_.fit.spec
    for level in spec.batch_levels:
        rows = scanner == level
        design = design_matrix(scanner[rows], {k: v[rows] for k, v in covariates.items()}, spec)
        adjusted, own = site_combat_new_batch(y[rows], design[:, spec.n_batch:], combat.estimates_, eb=eb,
                                              parametric=parametric, mean_only=mean_only, level=level)
        np.testing.assert_allclose(adjusted, reference[rows], rtol=1e-10, atol=1e-8)
        k = spec.batch_levels.index(level)
        np.testing.assert_allclose(own["gamma_star"], combat.estimates_.gamma_star[k], rtol=1e-9, atol=1e-12)
