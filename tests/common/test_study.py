"""study.toml validation: unknown keys and bad values are named; feature globs select columns."""

from __future__ import annotations

import pytest

from fedrad.common.study import Features, StudyError, load_study, parse_study, select_features


def test_defaults_are_a_site_batch_harmonisation():
    study = parse_study({})
    assert study.study.stages == ("census", "harmonise")
    assert study.harmonise.batch == "site" and study.privacy.min_count == 5


def test_unknown_key_and_bad_value_are_named(tmp_path):
    path = tmp_path / "study.toml"
    path.write_text('[privacy]\nmin_cout = 3\n[harmonise]\nparametric = "maybe"\n[study]\nstages = ["harmonise"]\n', encoding="utf-8")
    with pytest.raises(StudyError) as info:
        load_study(path)
    text = str(info.value)
    assert "privacy.min_cout: unknown key" in text
    assert "harmonise.parametric" in text
    assert "'census' must come first" in text


def test_covariate_cannot_be_batch_or_both_kinds():
    with pytest.raises(StudyError, match="both categorical and continuous"):
        parse_study({"harmonise": {"categorical": ["age"], "continuous": ["age"]}})
    with pytest.raises(StudyError, match="is the batch"):
        parse_study({"harmonise": {"batch": "scanner", "categorical": ["scanner"]}})
    with pytest.raises(StudyError, match="greater than or equal to 1"):
        parse_study({"privacy": {"min_count": 0}})


def test_missing_and_invalid_toml_files(tmp_path):
    with pytest.raises(StudyError, match="does not exist"):
        load_study(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("[study\n", encoding="utf-8")
    with pytest.raises(StudyError, match="not valid TOML"):
        load_study(tmp_path / "bad.toml")


def test_feature_globs_keep_store_order():
    columns = ["venous__original_shape_MeshVolume", "venous__original_firstorder_Mean", "arterial__original_glcm_Idm"]
    chosen = select_features(columns, Features(include=("venous__*", "*glcm*"), exclude=("*_shape_*",)))
    assert chosen == ["venous__original_firstorder_Mean", "arterial__original_glcm_Idm"]


def _models(*models, **extra):
    return {"study": {"stages": ["census", "fit"]}, "models": list(models), **extra}


def test_model_references_must_point_back_to_a_selecting_model():
    rad = {"name": "rad", "features": ["*"]}
    clinical = {"name": "clin", "clinical": ["age", "grade"], "selection": "univariate"}
    nomogram = {"name": "nomo", "scores": ["rad"], "clinical": ["@clin"], "nomogram": True}
    study = parse_study(_models(rad, clinical, nomogram, outcome={"horizons": [12, 36]}))
    assert study.models[2].scores == ("rad",)
    with pytest.raises(StudyError, match="'nomo' uses \"@clin\", which is not a model listed before it"):
        parse_study(_models(rad, nomogram, clinical, outcome={"horizons": [12]}))
    with pytest.raises(StudyError, match="model 'rad' has no selection"):
        parse_study(_models(rad, {"name": "nomo", "scores": ["rad"], "clinical": ["@rad"]}))
    with pytest.raises(StudyError, match="uses the score of model 'later', which comes after it"):
        parse_study(_models({"name": "first", "scores": ["later"]}, {"name": "later", "features": ["*"]}))


def test_cox_nomogram_needs_horizons_and_selection_needs_no_penalty():
    with pytest.raises(StudyError, match="a Cox nomogram shows survival at \\[outcome\\] horizons"):
        parse_study(_models({"name": "nomo", "features": ["*"], "nomogram": True}))
    with pytest.raises(StudyError, match="selection = \"univariate\" is for unpenalised models"):
        parse_study(_models({"name": "m", "features": ["*"], "selection": "univariate", "penalty": "elasticnet"}))
    with pytest.raises(StudyError, match="horizons must be positive and increasing"):
        parse_study({"outcome": {"horizons": [36, 12]}})
