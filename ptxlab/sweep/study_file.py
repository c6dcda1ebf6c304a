"""The study file: schema (`StudySpec`), loading and validation, and the run configs and
post-processing rules its configurations resolve to.

A study file (YAML) names a base run config plus fixed overrides (`set`), a search space over
config keys, a sampler, a pruner, the objective and `repeats`:

    name: smoke
    base: ../default.yaml                 # relative to the study file; omitted = the defaults
    set: {train.epochs: 4, model.encoder_weights: null}
    space:
      optim.lr: {type: log_float, low: 1.0e-4, high: 1.0e-2}
      train.batch_size: {type: categorical, choices: [4, 8, 16]}
      augment.strength: {type: float, low: 0.25, high: 1.0, step: 0.25,
                         when: {augment.preset: [light, paper]}}
      schedule:                           # a named bundle: each choice sets several keys
        type: categorical
        choices:
          fixed-epochs: {train.epochs: 15, train.max_steps: null}
          fixed-updates: {train.max_steps: 300}
    repeats: 3                            # seeds per configuration: seed, seed + 1, ...
                                          # (one validation split: data.split_seed)
    cv: {folds: 5}                        # optional: cross-validation (see `CvSpec`)
    sampler: {type: grid, seed: 0}        # grid | tpe | random
    pruner: {type: median, n_warmup_steps: 2}    # none | median | hyperband, on val_iou
    objective: {metric: pooled_iou, direction: maximize}    # best_val_<metric> of the run
    hypotheses: [...]                     # read by `ptxlab report` (see `Hypothesis`)

Dimension types: `categorical` (`choices`: a list of values, or a mapping label -> overrides),
`int` and `float` (`low`, `high`, optional `step`), `log_float` (`low`, `high`). `when` makes a
dimension active only for some values of an earlier categorical one. A grid needs every active
dimension enumerable (categorical, int, float with a step).

Mode `postprocess` (threshold studies) trains nothing: the space is over `PostProcessing` fields
and each repeat evaluates the rule on the stored validation maps of one finished run (`source`).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from optuna.trial import Trial
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ptxlab.config import (
    Config,
    ConfigError,
    describe_error,
    evaluation_only,
    load_config,
    parse_override,
    read_yaml_mapping,
    set_dotted,
    validate,
)
from ptxlab.metrics import METRIC_KEYS
from ptxlab.postprocess import PostProcessing

OBJECTIVE_METRICS = tuple(k for k in METRIC_KEYS if not k.startswith("n_"))
POSTPROCESS_FIELDS = tuple(f.name for f in dataclasses.fields(PostProcessing))

Label = str | int | float | bool | None


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def _label(value: Any) -> Label:
    """A choice as Optuna stores it: scalars as they are, anything else as its JSON text."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return json.dumps(value, sort_keys=True)


def _as_labels(allowed: Any) -> list[Label]:
    """A condition's accepted values: one value, or a list of values."""
    return [_label(v) for v in allowed] if isinstance(allowed, list) else [_label(allowed)]


def matches(params: dict[str, Label], condition: dict[str, Any]) -> bool:
    """Whether the parameters take one of the accepted values for every key of `condition`."""
    return all(params.get(key) in _as_labels(allowed) for key, allowed in condition.items())


def _metric_key(name: str) -> str:
    """`pooled_iou` or `best_val_pooled_iou` -> `pooled_iou`; anything else is refused."""
    key = name.removeprefix("best_val_")
    if key not in OBJECTIVE_METRICS:
        raise ValueError(f"metric {name!r}: expected one of {', '.join(OBJECTIVE_METRICS)} "
                         "(optionally prefixed best_val_)")
    return key


class Dimension(_Strict):
    """One axis of the search space."""

    type: Literal["categorical", "int", "float", "log_float"]
    choices: list[Any] | dict[str, dict[str, Any]] | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    when: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> Dimension:
        if self.type == "categorical":
            if not self.choices or self.low is not None or self.high is not None or self.step:
                raise ValueError("categorical takes a non-empty `choices` and no low/high/step")
            labels = self.labels()
            if len({json.dumps(v) for v in labels}) != len(labels):
                raise ValueError(f"duplicate choices in {labels}")
            return self
        if self.choices is not None or self.low is None or self.high is None:
            raise ValueError(f"{self.type} takes `low` and `high` (and no `choices`)")
        if self.low >= self.high:
            raise ValueError(f"low {self.low} must be < high {self.high}")
        if self.type == "int" and not all(
                float(v).is_integer() for v in (self.low, self.high, self.step or 1)):
            raise ValueError("int takes integer low, high and step")
        if self.type == "log_float" and (self.low <= 0 or self.step is not None):
            raise ValueError("log_float takes low > 0 and no step")
        if self.step is not None and self.step <= 0:
            raise ValueError("step must be > 0")
        return self

    @property
    def is_bundle(self) -> bool:
        """Choices are labels of override sets, not values of one key."""
        return isinstance(self.choices, dict)

    def labels(self) -> list[Label]:
        return list(self.choices) if self.is_bundle else [_label(c) for c in self.choices]

    def grid(self) -> list[Label]:
        """Every value, for a grid; continuous dimensions have none."""
        if self.type == "categorical":
            return self.labels()
        if self.type == "int":
            return list(range(int(self.low), int(self.high) + 1, int(self.step or 1)))
        if self.type == "float" and self.step:
            count = math.floor((self.high - self.low) / self.step + 1e-9) + 1
            return [round(self.low + k * self.step, 10) for k in range(count)]
        raise ValueError(f"{self.type} without a step has no grid; use categorical choices")

    def suggest(self, trial: Trial, name: str) -> Label:
        if self.type == "categorical":
            return trial.suggest_categorical(name, self.labels())
        if self.type == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1))
        return trial.suggest_float(name, self.low, self.high, step=self.step,
                                   log=self.type == "log_float")

    def overrides(self, name: str, value: Label) -> dict[str, Any]:
        """Config keys (or post-processing fields) this dimension sets when it takes `value`."""
        if self.is_bundle:
            return dict(self.choices[value])
        if self.type == "categorical":
            return {name: self.choices[self.labels().index(value)]}
        return {name: value}

    def active(self, params: dict[str, Label]) -> bool:
        return matches(params, self.when)

    def keys(self, name: str) -> set[str]:
        """Every config key (or post-processing field) this dimension can set."""
        if self.is_bundle:
            return {key for choice in self.choices.values() for key in choice}
        return {name}


class SamplerSpec(_Strict):
    type: Literal["grid", "tpe", "random"] = "grid"
    seed: int = 0
    n_startup_trials: int = Field(10, ge=0, description="TPE: random trials before modelling")


class PrunerSpec(_Strict):
    """Prunes on a per-epoch validation metric, reported after every epoch."""

    type: Literal["none", "median", "hyperband"] = "none"
    metric: Literal["val_iou", "val_dice", "val_mean_dice", "val_auc"] = "val_iou"
    n_startup_trials: int = Field(2, ge=0, description="median: complete trials before pruning")
    n_warmup_steps: int = Field(1, ge=0, description="median: epochs before a trial is judged")
    min_resource: int = Field(1, ge=1, description="hyperband: epochs of the first rung")
    max_resource: int | None = Field(None, ge=1, description="hyperband: default the epochs")
    reduction_factor: int = Field(3, ge=2)


class ObjectiveSpec(_Strict):
    """The run's `best_val_<metric>` (post-processed validation result), to maximize or not."""

    metric: str = "pooled_iou"
    direction: Literal["maximize", "minimize"] = "maximize"

    _known = field_validator("metric")(_metric_key)


class SourceSpec(_Strict):
    """Finished runs whose validation maps a `postprocess` study evaluates, one per repeat:
    the listed `runs`, or the newest runs of `experiment` (matching `filter`, an MLflow
    search filter) that stored validation maps."""

    runs: list[str] = Field(default_factory=list)
    experiment: str = "ptxlab"
    filter: str | None = None


class HeartbeatSpec(_Strict):
    interval: int = Field(10, ge=1, description="seconds between heartbeats of a running trial")
    grace_period: int = Field(60, ge=2, description="seconds without one before it is stale")
    max_retry: int = Field(2, ge=0, description="re-runs of a trial whose worker died")

    @model_validator(mode="after")
    def _grace_exceeds_interval(self) -> HeartbeatSpec:
        if self.grace_period <= self.interval:
            raise ValueError("grace_period must exceed interval")
        return self


class CvSpec(_Strict):
    """Cross-validation: the repeats of a configuration are the `folds` folds of one stratified
    split (`data.folds`, `data.fold`; the split seed fixed as always), times `repeats` seeds.
    Repeat r trains fold r % folds with seed `seed` + r // folds, so every image is validated
    exactly once per configuration and seed."""

    folds: int

    @field_validator("folds")
    @classmethod
    def _at_least_two(cls, folds: int) -> int:
        if folds < 2:
            raise ValueError(f"cross-validation needs at least 2 folds, got {folds}")
        return folds


CV_KEYS = ("data.folds", "data.fold")  # what `cv` sets per trial; a study may not set them


class Hypothesis(_Strict):
    """A claim the report tests: trials matching `compare` against those matching `against`
    (both within `where`), on `metric`, as the difference of per-repeat means with a 95 % CI.

    `aggregate: best` compares the best configuration of each side instead of the mean over
    all matching configurations. `expect`: `greater` (A - B > margin), `less` (A - B < -margin)
    or `equal` (|A - B| < margin, which needs a margin > 0).
    """

    name: str
    metric: str = "pooled_iou"
    compare: dict[str, Any]
    against: dict[str, Any]
    where: dict[str, Any] = Field(default_factory=dict)
    aggregate: Literal["mean", "best"] = "mean"
    expect: Literal["greater", "less", "equal"] = "greater"
    margin: float = Field(0.0, ge=0.0)
    min_effect: float | None = Field(
        None, gt=0.0, description="smallest effect worth detecting, for the repeats an "
                                  "inconclusive verdict would need (default: the margin)")

    _known = field_validator("metric")(_metric_key)

    @model_validator(mode="after")
    def _margin_for_equal(self) -> Hypothesis:
        if self.expect == "equal" and self.margin <= 0:
            raise ValueError(f"hypothesis {self.name!r}: expect equal needs a margin > 0")
        return self


class StudySpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    description: str = ""
    mode: Literal["train", "postprocess"] = "train"
    base: str | None = None
    overrides: dict[str, Any] = Field(default_factory=dict, alias="set")
    experiment: str | None = Field(None, description="MLflow experiment of the parent and trials")
    space: dict[str, Dimension] = Field(min_length=1)
    repeats: int = Field(1, ge=1, description="seeds per configuration (per fold under cv)")
    cv: CvSpec | None = None
    sampler: SamplerSpec = SamplerSpec()
    pruner: PrunerSpec = PrunerSpec()
    objective: ObjectiveSpec = ObjectiveSpec()
    n_trials: int | None = Field(None, ge=1, description="default: the grid's size")
    source: SourceSpec | None = None
    heartbeat: HeartbeatSpec = HeartbeatSpec()
    share_trainings: bool = Field(
        True, description="mode train: evaluation-only factors score one training's stored "
                          "maps per (training configuration, repeat); false trains every trial")
    hypotheses: list[Hypothesis] = Field(default_factory=list)

    @model_validator(mode="after")
    def _coherent(self) -> StudySpec:
        names = list(self.space)
        for index, (name, dim) in enumerate(self.space.items()):
            for parent, allowed in dim.when.items():
                if parent not in names[:index] or self.space[parent].type != "categorical":
                    raise ValueError(f"space.{name}.when: {parent!r} is not an earlier "
                                     "categorical dimension")
                unknown = set(_as_labels(allowed)) - set(self.space[parent].labels())
                if unknown:
                    raise ValueError(f"space.{name}.when: {sorted(map(str, unknown))} are not "
                                     f"choices of {parent}")
        if "seed" in self.space:
            raise ValueError("space.seed: seeds come from `repeats`, not from the space")
        if self.sampler.type == "grid":
            for name, dim in self.space.items():
                try:
                    dim.grid()
                except ValueError as error:
                    raise ValueError(f"space.{name}: {error}") from None
        if self.mode == "postprocess":
            if self.base is not None or self.pruner.type != "none":
                raise ValueError("mode postprocess trains nothing: no `base`, pruner none")
            fields = [k for d in self.space.values() if d.is_bundle for c in d.choices.values()
                      for k in c]
            fields += [n for n, d in self.space.items() if not d.is_bundle] + list(self.overrides)
            unknown = sorted(set(fields) - set(POSTPROCESS_FIELDS))
            if unknown:
                raise ValueError(f"mode postprocess: {unknown} are not post-processing fields "
                                 f"({', '.join(POSTPROCESS_FIELDS)})")
            self.source = self.source or SourceSpec()
            if self.source.runs and len(self.source.runs) != self.repeats:
                raise ValueError(f"source.runs lists {len(self.source.runs)} runs for "
                                 f"repeats={self.repeats}")
        elif self.source is not None:
            raise ValueError("`source` is for mode postprocess")
        self._cv_coherent()
        for hypothesis in self.hypotheses:
            keys = {*hypothesis.compare, *hypothesis.against, *hypothesis.where}
            if keys - set(self.space):
                raise ValueError(f"hypothesis {hypothesis.name!r}: {sorted(keys - set(names))} "
                                 "are not dimensions of the space")
        return self

    def _cv_coherent(self) -> None:
        """`cv` trains folds: refused in mode postprocess and where the study sets the fold
        keys itself (data.split random is refused on the resolved configs, see
        `load_study_file`)."""
        if self.cv is None:
            return
        if self.mode == "postprocess":
            raise ValueError("mode postprocess trains nothing: it takes no `cv`")
        keys = set(self.overrides) | {k for n, d in self.space.items() for k in d.keys(n)}
        taken = sorted(keys & set(CV_KEYS))
        if taken:
            raise ValueError(f"cv sets {' and '.join(CV_KEYS)} per trial: remove {taken} from "
                             "`set`/`space`")

    @property
    def total_repeats(self) -> int:
        """Trials per configuration: `repeats` seeds, times the folds under cv."""
        return self.repeats * (self.cv.folds if self.cv else 1)

    def repeat_fold(self, repeat: int) -> int | None:
        """The fold that repeat index `repeat` trains (None without cv)."""
        return repeat % self.cv.folds if self.cv else None

    def repeat_seed_offset(self, repeat: int) -> int:
        """What repeat index `repeat` adds to the base seed: r // folds under cv, else r."""
        return repeat // self.cv.folds if self.cv else repeat

    def cv_overrides(self, repeat: int) -> dict[str, Any]:
        """The fold keys of repeat index `repeat` (none without cv)."""
        if self.cv is None:
            return {}
        return {"data.folds": self.cv.folds, "data.fold": self.repeat_fold(repeat)}

    def configurations(self) -> list[dict[str, Label]]:
        """Every grid configuration (only active dimensions), in the order of the space."""
        points: list[dict[str, Label]] = [{}]
        for name, dim in self.space.items():
            points = [expanded for point in points for expanded in (
                [{**point, name: value} for value in dim.grid()] if dim.active(point) else [point])]
        return points

    def evaluation_dimensions(self) -> list[str]:
        """Dimensions whose every key only affects evaluation (`config.evaluation_only`): their
        levels are scored on the stored maps of one training. None unless trainings are shared
        in a mode train study."""
        if self.mode != "train" or not self.share_trainings:
            return []
        return [name for name, dim in self.space.items()
                if all(evaluation_only(key) for key in dim.keys(name))]

    def training_key(self, params: dict[str, Label]) -> str:
        """What identifies a configuration's training: its values of the training dimensions
        (every dimension when trainings are not shared)."""
        evaluation = set(self.evaluation_dimensions())
        return json.dumps({k: v for k, v in params.items() if k not in evaluation},
                          sort_keys=True)

    def overrides_for(self, params: dict[str, Label]) -> dict[str, Any]:
        """Fixed overrides, then those of each parameter, in the order of the space."""
        values = dict(self.overrides)
        for name, value in params.items():
            values.update(self.space[name].overrides(name, value))
        return values


@dataclass
class StudyFile:
    """A parsed study file: its text, its spec and (mode train) the resolved base config."""

    path: Path
    text: str
    spec: StudySpec
    base_config: dict[str, Any] | None


def load_study_file(path: Path | str, name: str | None = None,
                    overrides: list[str] | None = None) -> StudyFile:
    """Read and validate a study file (name: the `name` argument, else its `name`, else the file
    stem); `overrides` (`KEY=VALUE`, as `ptxlab sweep --set`) join its `set` and take
    precedence there."""
    path = Path(path)
    tree = read_yaml_mapping(path, "study")
    text = path.read_text()
    tree.setdefault("name", path.stem)
    if name:
        tree["name"] = name
    for override in overrides or []:
        keys, value = parse_override(override)
        tree.setdefault("set", {})[".".join(keys)] = value
    try:
        spec = StudySpec.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(describe_error(error, str(path))) from None
    base_config = None
    if spec.mode == "train":
        base = path.parent / spec.base if spec.base else None
        base_config = build_config(load_config(base).model_dump(mode="json"),
                                   spec.overrides, f"{path}: set").model_dump(mode="json")
        for params in _validation_points(spec):
            config = build_config(base_config, spec.overrides_for(params), f"{path}: {params}")
            if spec.cv and config.data.split == "random":
                raise ConfigError(f"{path}: cv needs data.split: stratified (the config of "
                                  f"{params or 'the base'} has data.split: random)")
    else:
        for params in _validation_points(spec):
            build_postprocessing(spec.overrides_for(params), resolution=512,
                                 where=f"{path}: {params}")
    return StudyFile(path, text, spec, base_config)


def _validation_points(spec: StudySpec) -> list[dict[str, Label]]:
    """Every grid configuration, or (other samplers) each dimension's extremes alone."""
    if spec.sampler.type == "grid":
        return spec.configurations()
    points = []
    for name, dim in spec.space.items():
        values = dim.labels() if dim.type == "categorical" else [dim.low, dim.high]
        if dim.type == "int":
            values = [int(v) for v in values]
        points += [{name: v} for v in values]
    return points


def build_config(tree: dict[str, Any], overrides: dict[str, Any], where: str) -> Config:
    """A validated Config from a full config tree with dotted-key overrides applied."""
    tree = copy.deepcopy(tree)
    for key, value in overrides.items():
        try:
            set_dotted(tree, key.split("."), copy.deepcopy(value))
        except ConfigError as error:
            raise ConfigError(f"{where}: {error}") from None
    return validate(tree, where)


def build_postprocessing(fields: dict[str, Any], resolution: int, where: str) -> PostProcessing:
    """A validated post-processing rule from the study's fields at this resolution."""
    try:
        return PostProcessing(**{"resolution": resolution, **fields})
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: {error}") from None
