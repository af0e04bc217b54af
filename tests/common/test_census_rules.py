"""Coordinator-side census rules that need no network: settings agreement, eligibility."""

from __future__ import annotations

import pytest

from fedrad.common.study import parse_study
from fedrad.server.census import _refuse_odd_settings, _site_named_in
from fedrad.server.federation import StageFailed
from fedrad.server.harmonise import design_for, eligible_sites


def test_site_with_other_extraction_settings_is_refused_by_name():
    sites = {"siteA": {"params_hash": "aaa" * 10}, "siteB": {"params_hash": "aaa" * 10},
             "siteC": {"params_hash": "ccc" * 10}}
    refused = {}
    assert _refuse_odd_settings(sites, refused) == "aaa" * 10
    assert list(refused) == ["siteC"] and "differ from the other sites'" in refused["siteC"]


def test_settings_without_a_majority_stop_the_study():
    with pytest.raises(StageFailed, match="no setting has a majority"):
        _refuse_odd_settings({"siteA": {"params_hash": "a"}, "siteB": {"params_hash": "b"}}, {})


def test_refusal_reasons_name_their_site_and_flower_errors_do_not():
    assert _site_named_in("siteB: privacy guard: ...") == "siteB"
    assert _site_named_in("its SuperNode stopped responding mid-round (Flower: ...)") is None


def test_small_batch_levels_and_problems_exclude_a_site_with_the_reason():
    study = parse_study({"harmonise": {"batch": "scanner", "categorical": ["sex"]}})
    census = {"sites": {
        "siteA": {"problems": [], "small_batch_levels": ["Canon"], "batch_counts": {"GE": 20},
                  "categorical_levels": {"sex": ["F", "M"]}},
        "siteB": {"problems": ["covariate 'sex' is missing for some cases"], "small_batch_levels": [],
                  "batch_counts": {"GE": 9}, "categorical_levels": {"sex": ["F"]}},
        "siteC": {"problems": [], "small_batch_levels": [], "batch_counts": {"GE": 9, "Philips": 12},
                  "categorical_levels": {"sex": ["M", "X"]}},
    }}
    sites, excluded = eligible_sites(census, study)
    assert sites == ["siteC"]
    assert "Canon" in excluded["siteA"] and "min_count=5" in excluded["siteA"]
    assert "missing" in excluded["siteB"]
    assert design_for(census, ["siteA", "siteC"], study) == {
        "batch_levels": ["GE", "Philips"], "categorical": {"sex": ["F", "M", "X"]}, "continuous": []}
