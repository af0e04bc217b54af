"""The study file (`study.toml`): what a consortium agreed to compute, validated before anything runs.

Every section refuses unknown keys, so a typo (``min_cout = 3``) is an error naming the key,
not a silently ignored setting. Example::

    [study]
    name = "sarcoma-rfs"
    stages = ["census", "harmonise"]

    [outcome]
    time = "time"
    event = "event"

    [features]
    include = ["venous__original_*"]      # globs over store feature columns
    exclude = ["*_shape_*"]

    [harmonise]
    batch = "scanner"                     # "site" (default) or any store column
    categorical = ["sex"]                 # biological covariates ComBat preserves
    continuous = ["age"]
    eb = true
    parametric = true
    mean_only = false
    zscore = true

    [privacy]
    min_count = 5

    [federation]
    min_sites = 2
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fedrad.common.errors import FedradError

__all__ = ["Study", "StudyError", "load_study", "parse_study", "select_features", "STAGES", "SITE_BATCH", "SELECTED",
           "model_references"]

#: stages in the order a study runs them (later issues add select, evaluate, package).
STAGES = ("census", "train_seg", "harmonise", "train_cnn", "select", "fit", "evaluate", "package")
#: the model feature entry that stands for the `select` stage's result.
SELECTED = "@select"
#: the batch name meaning "each site is its own batch".
SITE_BATCH = "site"


class StudyError(FedradError):
    """The study file is missing, unreadable or invalid."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StudyInfo(_Section):
    name: str = "study"
    stages: tuple[str, ...] = ("census", "harmonise")

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, stages):
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; choose from {list(STAGES)}")
        if len(set(stages)) != len(stages):
            raise ValueError("a stage is listed twice")
        if stages and stages[0] != "census":
            raise ValueError("'census' must come first: it is the roll call every later stage relies on")
        return tuple(sorted(stages, key=STAGES.index))


class Outcome(_Section):
    time: str = "time"
    event: str = "event"
    #: times (in the units of ``time``) at which Cox models report survival and nomograms show it
    horizons: tuple[float, ...] = ()

    @field_validator("horizons")
    @classmethod
    def _positive_increasing(cls, horizons):
        if any(h <= 0 for h in horizons) or list(horizons) != sorted(set(horizons)):
            raise ValueError("horizons must be positive and increasing")
        return horizons


class Features(_Section):
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()


class Harmonise(_Section):
    batch: str = SITE_BATCH
    categorical: tuple[str, ...] = ()
    continuous: tuple[str, ...] = ()
    eb: bool = True
    parametric: bool = True
    mean_only: bool = False
    zscore: bool = True

    @model_validator(mode="after")
    def _covariates_distinct(self):
        both = set(self.categorical) & set(self.continuous)
        if both:
            raise ValueError(f"covariate(s) {sorted(both)} are listed as both categorical and continuous")
        if self.batch in set(self.categorical) | set(self.continuous):
            raise ValueError(f"'{self.batch}' is the batch; it cannot also be a covariate")
        return self


class Select(_Section):
    """The `select` stage: ICC filter, univariate screen with FDR control, mRMR."""

    features: tuple[str, ...] = ("*",)      # candidate globs over the store's features
    exclude: tuple[str, ...] = ()
    icc_threshold: float = Field(0.8, ge=-1, le=1)
    icc_kind: Literal["3,1", "2,1"] = "3,1"
    fdr: float = Field(0.05, gt=0, le=1)
    max_features: int = Field(20, ge=1)
    outcome: Literal["cox", "logistic"] = "cox"
    binary_outcome: str = ""


class Model(_Section):
    """One model of the `fit` stage (a Rad-score, a clinical model, a nomogram...)."""

    name: str
    kind: Literal["cox", "logistic"] = "cox"
    features: tuple[str, ...] = ()          # globs over the store's feature columns, or "@select"
    clinical: tuple[str, ...] = ()          # numeric clinical columns, or "@<model>": that model's independent factors
    scores: tuple[str, ...] = ()            # an earlier model's linear predictor, or a DL score (STORE/scores.parquet)
    selection: Literal["none", "univariate"] = "none"  # univariate screen, then one multivariable fit
    univariate_p: float = Field(0.05, gt=0, le=1)      # enters the multivariable fit below this Wald p
    multivariable_p: float = Field(0.05, gt=0, le=1)   # "independent factor" below this Wald p
    nomogram: bool = False                  # draw this model's nomogram (points scale)
    binary_outcome: str = ""                # logistic: a 0/1 column (default: [outcome].event)
    penalty: Literal["none", "elasticnet"] = "none"
    l1_ratio: float = Field(1.0, gt=0, le=1)
    n_alphas: int = Field(30, ge=2)
    alpha_min_ratio: float = Field(0.01, gt=0, lt=1)
    cv_folds: int = Field(5, ge=2)
    rule: Literal["min", "1se"] = "1se"
    ties: Literal["efron", "breslow"] = "efron"
    share_event_times: bool = False         # cox: one baseline hazard, exact; discloses event times (opt-in)
    ridge: float = Field(0.0, ge=0)
    seed: int = 0

    @field_validator("name")
    @classmethod
    def _identifier(cls, name):
        if not name.replace("_", "").replace("-", "").isalnum():
            raise ValueError(f"model name '{name}' may hold only letters, digits, '_' and '-'")
        return name

    @model_validator(mode="after")
    def _has_columns(self):
        if not self.features and not self.clinical and not self.scores:
            raise ValueError(f"model '{self.name}' has neither features, clinical columns nor scores")
        if self.selection != "none" and self.penalty != "none":
            raise ValueError(f"model '{self.name}': selection = \"univariate\" is for unpenalised models "
                             "(an elastic net selects by itself)")
        if self.share_event_times and (self.kind != "cox" or self.penalty != "none"):
            raise ValueError(f"model '{self.name}': share_event_times applies to unpenalised Cox models only")
        return self


class Sites(_Section):
    """Roles: a validation site takes no part in harmonisation fitting, selection or training; it is
    harmonised to the training reference and returns metrics only."""

    validation: tuple[str, ...] = ()


class Evaluate(_Section):
    """The `evaluate` stage: every model at every site (training and validation)."""

    horizon: float = Field(0, ge=0, description="binary endpoint of Cox models: event by this time "
                                                "(0: the first [outcome] horizon)")
    cutoff: float | Literal["youden"] = "youden"   # on predicted risk; Youden's J on the pooled training sites
    bootstrap: int = Field(200, ge=0, description="resamples for per-site confidence intervals (0: none)")
    km_points: int = Field(12, ge=2, description="time grid points of the shared Kaplan-Meier tables")
    seed: int = 0

    @field_validator("cutoff")
    @classmethod
    def _probability(cls, cutoff):
        if cutoff != "youden" and not 0 < cutoff < 1:
            raise ValueError("cutoff is a predicted risk strictly between 0 and 1, or \"youden\"")
        return cutoff


class CnnPrivacy(_Section):
    """Opacus DP-SGD at every site: per-sample gradient clipping to ``max_grad_norm`` and Gaussian noise of
    ``noise_multiplier`` × that norm; (ε, δ) accounted per site over all rounds. ``epsilon_budget`` stops training
    before a round that would take any site past it."""

    noise_multiplier: float = Field(0.0, ge=0, description="0: DP-SGD off")
    max_grad_norm: float = Field(1.0, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    epsilon_budget: float | None = Field(None, gt=0)


class Cnn(_Section):
    """The `train_cnn` stage: a MONAI network trained by federated averaging (FedProx when proximal_mu > 0);
    afterwards each site writes the DL-score (``dl_score`` in STORE/scores.parquet, usable as a model score)
    and the penultimate-layer deep features (STORE/deep_features.parquet) of its cases."""

    phases: tuple[str, ...] = ("venous",)
    architecture: Literal["resnet18", "densenet121"] = "resnet18"
    norm: Literal["group", "batch"] = Field("group", description=(
        "normalisation layers: GroupNorm (per case; DP-SGD needs it) or MONAI's BatchNorm, whose running "
        "statistics FedAvg averages across sites"))
    dims: Literal[2, 3] = 2
    box: tuple[int, int, int] = (48, 48, 16)
    spacing: tuple[float, float, float] = (1.0, 1.0, 3.0)
    window: tuple[float, float] = (-200.0, 300.0)
    endpoint: Literal["cox", "binary"] = "cox"
    rounds: int = Field(5, ge=1)
    local_epochs: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(8, ge=2)
    proximal_mu: float = Field(0.0, ge=0)
    seed: int = 0
    validation_fraction: float = Field(0.2, ge=0, lt=1, description=(
        "share of each site's cases held out (by a hash of the case id) for the per-round validation loss and "
        "C-index; 0: none (no early stopping)"))
    patience: int = Field(0, ge=0, description=(
        "stop when the case-weighted validation loss has not improved for this many rounds and keep the best "
        "round's weights; 0: train all rounds"))
    pretrained: str | None = Field(None, description=(
        "a local weights file (.pt/.pth state dict or .npz) the coordinator starts from, matched by tensor name "
        "and shape (2D kernels inflated for a 3D network; RGB input averaged over the phases)"))
    gradcam_cases: int = Field(3, ge=0, description="Grad-CAM maps each site saves for its own review (never sent)")
    workers: int = Field(0, ge=0, description="DataLoader worker processes at a site (0: load in the main process)")
    privacy: CnnPrivacy = CnnPrivacy()


class Segment(_Section):
    """The `train_seg` stage: MONAI SegResNet trained by FedAvg with a Dice loss on the sites' delineated cases;
    Dice per site on held-out cases; the final model is what ``fedrad prepare --segment`` uses for cases with
    no mask."""

    phase: str = "venous"
    spacing: tuple[float, float, float] = (1.0, 1.0, 3.0)
    box: tuple[int, int, int] = (48, 48, 16)
    window: tuple[float, float] = (-200.0, 300.0)
    init_filters: int = Field(8, ge=1)
    rounds: int = Field(3, ge=1)
    local_epochs: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    batch_size: int = Field(2, ge=1)
    validation_fraction: float = Field(0.25, gt=0, lt=1)
    seed: int = 0


class Privacy(_Section):
    min_count: int = Field(5, ge=1, description="smallest number of cases any aggregate may come from")


class Federation(_Section):
    min_sites: int = Field(2, ge=1, description="a stage fails unless at least this many sites answer")
    expected_sites: int = Field(0, ge=0, description="wait for this many sites before starting (0: min_sites)")
    wait_for_sites_s: float = Field(120, gt=0)
    round_timeout_s: float = Field(900, gt=0, description="longest wait for one round's replies")
    resend_after_s: float = Field(120, gt=0, description="ask a site that has not answered a query again after "
                                                        "this long (at most twice; its reply may have been lost)")


class Study(_Section):
    study: StudyInfo = StudyInfo()
    outcome: Outcome = Outcome()
    features: Features = Features()
    harmonise: Harmonise = Harmonise()
    privacy: Privacy = Privacy()
    federation: Federation = Federation()
    select: Select = Select()
    models: tuple[Model, ...] = ()
    sites: Sites = Sites()
    evaluate: Evaluate = Evaluate()
    cnn: Cnn = Cnn()
    segment: Segment = Segment()

    @model_validator(mode="after")
    def _models_for_fit(self):
        if "fit" in self.study.stages and not self.models:
            raise ValueError("stage 'fit' needs at least one [[models]] entry")
        for m in self.models:
            if SELECTED in m.features and "select" not in self.study.stages:
                raise ValueError(f"model '{m.name}' uses \"{SELECTED}\" but the study has no 'select' stage")
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError("two [[models]] have the same name")
        if "package" in self.study.stages and "evaluate" not in self.study.stages:
            raise ValueError("stage 'package' needs the 'evaluate' stage (the package carries its cut-offs, "
                             "calibration and metrics)")
        if "evaluate" in self.study.stages:
            if "fit" not in self.study.stages:
                raise ValueError("stage 'evaluate' needs the 'fit' stage (it evaluates the fitted models)")
            if any(m.kind == "cox" for m in self.models) and not (self.evaluate.horizon or self.outcome.horizons):
                raise ValueError("evaluating Cox models needs [outcome] horizons (time-dependent AUC, Brier, "
                                 "the binary endpoint by the first horizon)")
        for i, m in enumerate(self.models):
            if m.nomogram and m.kind == "cox" and not self.outcome.horizons:
                raise ValueError(f"model '{m.name}': a Cox nomogram shows survival at [outcome] horizons; set them "
                                 "(e.g. horizons = [12, 36] in the units of the time column)")
            earlier = {e.name: e for e in self.models[:i]}
            for ref in model_references(m):
                if ref not in earlier:
                    raise ValueError(f"model '{m.name}' uses \"@{ref}\", which is not a model listed before it")
                if earlier[ref].selection == "none":
                    raise ValueError(f"model '{m.name}' uses \"@{ref}\": model '{ref}' has no "
                                     "selection = \"univariate\", so it names no independent factors")
            for score in m.scores:
                if score in names and score not in earlier:
                    raise ValueError(f"model '{m.name}' uses the score of model '{score}', which comes after it")
        return self

    def section_hash(self, *sections: str) -> str:
        """sha256 of the named sections: a finished stage is reused only if its inputs are unchanged."""
        data = {s: _dump(getattr(self, s)) for s in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _dump(section):
    return [m.model_dump(mode="json") for m in section] if isinstance(section, tuple) else section.model_dump(mode="json")


def parse_study(data: dict, source: str = "study") -> Study:
    try:
        return Study.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "(top level)"
            message = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            problems.append(f"  {where}: {message}")
        raise StudyError(f"{source} is invalid:\n" + "\n".join(problems)) from None


def load_study(path: Path) -> Study:
    path = Path(path)
    if not path.is_file():
        raise StudyError(f"study file '{path}' does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise StudyError(f"study file '{path}' is not valid TOML: {exc}") from None
    return parse_study(data, source=f"study file '{path}'")


def model_references(model: Model) -> list[str]:
    """Models whose independent factors ``model`` takes as clinical columns (``"@name"`` entries)."""
    return [c[1:] for c in model.clinical if c.startswith("@")]


def select_features(columns: list[str], features: Features) -> list[str]:
    """Store feature columns matching ``include`` and not ``exclude``, in store order."""
    return [c for c in columns
            if any(fnmatch.fnmatchcase(c, g) for g in features.include)
            and not any(fnmatch.fnmatchcase(c, g) for g in features.exclude)]
