"""Optuna studies over run configurations; each trial is a child MLflow run of one parent run.

A study file (YAML, schema `StudySpec`) names a base run config plus fixed overrides (`set`), a
search space over config keys, a sampler, a pruner, the objective and `repeats`:

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
    sampler: {type: grid, seed: 0}        # grid | tpe | random
    pruner: {type: median, n_warmup_steps: 2}    # none | median | hyperband, on val_iou
    objective: {metric: pooled_iou, direction: maximize}    # best_val_<metric> of the run
    hypotheses: [...]                     # read by `ptxlab report` (see `Hypothesis`)

Dimension types: `categorical` (`choices`: a list of values, or a mapping label -> overrides),
`int` and `float` (`low`, `high`, optional `step`), `log_float` (`low`, `high`). `when` makes a
dimension active only for some values of an earlier categorical one. A grid needs every active
dimension enumerable (categorical, int, float with a step).

Trials and repeats. A configuration is one assignment of the space; it is trained `repeats`
times with seeds `seed + r` (trial user attr `repeat`), so the report can set effects against
seed noise. A grid study enqueues every (configuration, repeat) once, when the study is created
(repeat by repeat, each round shuffled by the sampler seed); workers only take trials from that
queue, which both storages hand out atomically, so no grid point runs twice however many workers
there are, and a drained queue ends the workers cleanly. TPE and random studies sample a
configuration and enqueue its other repeats, which the next free workers take.

Mode `postprocess` (threshold studies) trains nothing: the space is over `PostProcessing` fields
and each repeat evaluates the rule on the stored validation maps of one finished run (`source`).

Storage: `--storage URL` or $OPTUNA_STORAGE (an RDB URL such as
`postgresql+psycopg2://user@host/db`, for workers on several hosts: the same command on each host
joins the study), else a journal file `mlruns/optuna/<study>.journal` (Optuna's journal file
storage, safe for several worker processes on one host). Both keep heartbeats: a RUNNING trial
whose heartbeat is older than the grace period is failed by the next worker that looks, its child
run is marked KILLED with the reason, and it is re-queued with the same parameters (at most
`heartbeat.max_retry` times). Workers wait for trials still running elsewhere, so a killed
worker's trial is finished by the others, or by running the command again, which resumes the
study where it stands.

MLflow: the process that creates the study creates its parent run (the definition as params,
the study file and resolved definition as artifacts) and stores its id in the study's user
attrs, so workers on any host nest their child runs under that one parent. Each child run is
tagged with the trial number, parameters, repeat and worker, and ends with `optuna.state`
(COMPLETE / PRUNED / FAIL) and the reason; the trial's user attrs hold the child run id.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import mlflow
import numpy as np
import optuna
import yaml
from mlflow.entities import Param
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.exceptions import DuplicatedStudyError, ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials

# Optuna's extension point for storages with heartbeats (RDBStorage implements it the same way).
from optuna.storages._heartbeat import BaseHeartbeat
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import FrozenTrial, Trial, TrialState
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

import ptxlab
from ptxlab import tracking
from ptxlab.config import Config, ConfigError, load_config
from ptxlab.metrics import METRIC_KEYS
from ptxlab.postprocess import PostProcessing
from ptxlab.train import StopTraining, TrainingCallbacks

OBJECTIVE_METRICS = tuple(k for k in METRIC_KEYS if not k.startswith("n_"))
POSTPROCESS_FIELDS = tuple(f.name for f in dataclasses.fields(PostProcessing))
MAPS_ARTIFACT = "validation/val_probabilities.npz"
WORKER_ENV = "PTXLAB_SWEEP_WORKER"  # set for the worker processes `--workers N` spawns

# Study user attrs.
DEFINITION_ATTR = "ptxlab.definition"
FINGERPRINT_ATTR = "ptxlab.fingerprint"
PARENT_ATTR = "mlflow.parent_run_id"
EXPERIMENT_ATTR = "mlflow.experiment"
READY_ATTR = "ptxlab.ready"
HEARTBEAT_ATTR = "ptxlab.heartbeat"  # trial system attr of the journal storage
READY_WAIT_S = 120

Label = str | int | float | bool | None


# --- the study file ------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


def label(value: Any) -> Label:
    """A choice as Optuna stores it: scalars as they are, anything else as its JSON text."""
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return json.dumps(value, sort_keys=True)


def as_labels(allowed: Any) -> list[Label]:
    """A condition's accepted values: one value, or a list of values."""
    return [label(v) for v in allowed] if isinstance(allowed, list) else [label(allowed)]


def matches(params: dict[str, Label], condition: dict[str, Any]) -> bool:
    """Whether the parameters take one of the accepted values for every key of `condition`."""
    return all(params.get(key) in as_labels(allowed) for key, allowed in condition.items())


def metric_key(name: str) -> str:
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
        return list(self.choices) if self.is_bundle else [label(c) for c in self.choices]

    def distribution(self) -> BaseDistribution:
        if self.type == "categorical":
            return CategoricalDistribution(self.labels())
        if self.type == "int":
            return IntDistribution(int(self.low), int(self.high), step=int(self.step or 1))
        if self.type == "log_float":
            return FloatDistribution(self.low, self.high, log=True)
        return FloatDistribution(self.low, self.high, step=self.step)

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

    _known = field_validator("metric")(metric_key)


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

    _known = field_validator("metric")(metric_key)

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
    repeats: int = Field(1, ge=1)
    sampler: SamplerSpec = SamplerSpec()
    pruner: PrunerSpec = PrunerSpec()
    objective: ObjectiveSpec = ObjectiveSpec()
    n_trials: int | None = Field(None, ge=1, description="default: the grid's size")
    source: SourceSpec | None = None
    heartbeat: HeartbeatSpec = HeartbeatSpec()
    hypotheses: list[Hypothesis] = Field(default_factory=list)

    @model_validator(mode="after")
    def _coherent(self) -> StudySpec:
        names = list(self.space)
        for index, (name, dim) in enumerate(self.space.items()):
            for parent, allowed in dim.when.items():
                if parent not in names[:index] or self.space[parent].type != "categorical":
                    raise ValueError(f"space.{name}.when: {parent!r} is not an earlier "
                                     "categorical dimension")
                unknown = set(as_labels(allowed)) - set(self.space[parent].labels())
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
        for hypothesis in self.hypotheses:
            keys = {*hypothesis.compare, *hypothesis.against, *hypothesis.where}
            if keys - set(self.space):
                raise ValueError(f"hypothesis {hypothesis.name!r}: {sorted(keys - set(names))} "
                                 "are not dimensions of the space")
        return self

    def configurations(self) -> list[dict[str, Label]]:
        """Every grid configuration (only active dimensions), in the order of the space."""
        points: list[dict[str, Label]] = [{}]
        for name, dim in self.space.items():
            points = [expanded for point in points for expanded in (
                [{**point, name: value} for value in dim.grid()] if dim.active(point) else [point])]
        return points

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


def load_study_file(path: Path | str, name: str | None = None) -> StudyFile:
    """Read and validate a study file (name: its `name`, else `name` argument, else file stem)."""
    path = Path(path)
    try:
        text = path.read_text()
        tree = yaml.safe_load(text) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such study file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})".replace("\n", " ")) from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    tree.setdefault("name", path.stem)
    if name:
        tree["name"] = name
    try:
        spec = StudySpec.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(f"{path}: {_first_error(error)}") from None
    base_config = None
    if spec.mode == "train":
        base = path.parent / spec.base if spec.base else None
        base_config = build_config(load_config(base).model_dump(mode="json"),
                                   spec.overrides, f"{path}: set").model_dump(mode="json")
        for params in _validation_points(spec):
            build_config(base_config, spec.overrides_for(params), f"{path}: {params}")
    else:
        for params in _validation_points(spec):
            _postprocessing(spec.overrides_for(params), resolution=512, where=f"{path}: {params}")
    return StudyFile(path, text, spec, base_config)


def _first_error(error: ValidationError) -> str:
    first = error.errors()[0]
    message = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
    message = message.removeprefix("Value error, ")
    where = ".".join(str(p) for p in first["loc"])
    return f"{where}: {message}" if where else message


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
        node = tree
        *sections, leaf = key.split(".")
        for section in sections:
            node = node.setdefault(section, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{where}: {key!r}: {section!r} is a value, not a section")
        node[leaf] = copy.deepcopy(value)
    try:
        return Config.model_validate(tree)
    except ValidationError as error:
        raise ConfigError(f"{where}: {_first_error(error)}") from None


def _postprocessing(fields: dict[str, Any], resolution: int, where: str) -> PostProcessing:
    try:
        return PostProcessing(**{"resolution": resolution, **fields})
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where}: {error}") from None


# --- storage -------------------------------------------------------------------------------


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's journal storage with heartbeats, kept as a trial system attr (one clock: one
    host, which is what a journal file is for)."""

    def __init__(self, backend: JournalFileBackend, heartbeat_interval: int, grace_period: int,
                 stale_trial_callback: Callable[[optuna.Study, FrozenTrial], None]):
        super().__init__(backend)
        self._heartbeat_interval = heartbeat_interval
        self._grace_period = grace_period
        self._stale_trial_callback = stale_trial_callback

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            self.set_trial_system_attr(trial_id, HEARTBEAT_ATTR, time.time())
        except UpdateFinishedTrialError:
            pass  # another worker declared the trial stale meanwhile

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        now = time.time()
        stale = []
        for trial in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            started = trial.datetime_start.timestamp() if trial.datetime_start else 0.0
            if now - max(trial.system_attrs.get(HEARTBEAT_ATTR, 0.0), started) > self._grace_period:
                stale.append(self.get_trial_id_from_study_id_trial_number(study_id, trial.number))
        return stale

    def get_heartbeat_interval(self) -> int:
        return self._heartbeat_interval

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None]:
        return self._stale_trial_callback


def resolve_storage(option: str | None, study_name: str) -> str:
    """--storage, else $OPTUNA_STORAGE, else the study's journal file under ./mlruns/optuna/."""
    return (option or os.environ.get("OPTUNA_STORAGE")
            or str(tracking.local_store() / "optuna" / f"{study_name}.journal"))


def is_rdb(url: str) -> bool:
    return "://" in url


def masked(url: str) -> str:
    """The storage URL without its password, for logs and params."""
    if not is_rdb(url) or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    return f"{scheme}://{credentials.split(':', 1)[0]}:***@{host}" if ":" in credentials else url


def make_storage(url: str, heartbeat: HeartbeatSpec) -> optuna.storages.BaseStorage:
    """RDB storage for a URL, journal-file storage for a path; both with heartbeats."""
    callback = StaleTrialHandler(heartbeat.max_retry)
    if not is_rdb(url):
        path = Path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        return HeartbeatJournalStorage(JournalFileBackend(str(path)), heartbeat.interval,
                                       heartbeat.grace_period, callback)
    try:
        with warnings.catch_warnings():  # stable in practice; Optuna still labels it
            warnings.simplefilter("ignore", ExperimentalWarning)
            return RDBStorage(url, engine_kwargs={"pool_pre_ping": True},
                              heartbeat_interval=heartbeat.interval,
                              grace_period=heartbeat.grace_period,
                              heartbeat_stale_trial_callback=callback)
    except Exception as error:  # the driver's own error types: connection, auth, unknown DB
        message = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise RuntimeError(f"cannot open the Optuna storage {masked(url)}: {message}") from None


def existing_storage(url: str, heartbeat: HeartbeatSpec) -> optuna.storages.BaseStorage:
    """The storage of a study that must already exist (a journal file is not created)."""
    if not is_rdb(url) and not Path(url).is_file():
        raise FileNotFoundError(f"{url}: no study journal here (pass --storage or set "
                                "OPTUNA_STORAGE for a database)")
    return make_storage(url, heartbeat)


# --- MLflow --------------------------------------------------------------------------------


def _child_run_ids(parent_run_id: str, trial_number: int) -> list[str]:
    """Child runs of the study's parent run made for one trial number."""
    client = tracking.configure()
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs(
        [experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent_run_id}' and "
        f"tags.`optuna.trial_number` = '{trial_number}'")
    return [run.info.run_id for run in runs]


def _finish_child_run(parent_run_id: str, trial_number: int, state: str, reason: str | None,
                      status: str | None = None) -> None:
    """Tag a trial's child run(s) with the trial's final state and why; optionally set status."""
    client = tracking.configure()
    for run_id in _child_run_ids(parent_run_id, trial_number):
        client.set_tag(run_id, "optuna.state", state)
        if reason:
            client.set_tag(run_id, "ptxlab.trial_reason", reason[:4000])
        if status and client.get_run(run_id).info.status != status:
            client.set_terminated(run_id, status)


def _create_parent_run(loaded: StudyFile, definition: dict, experiment: str, storage: str) -> str:
    """The study's one parent run: definition as params, study file and definition as artifacts.
    It stays RUNNING while the study has work; the last worker out marks it FINISHED."""
    spec = loaded.spec
    client = tracking.configure()
    experiment_id = tracking.ensure_experiment(client, experiment)
    run = client.create_run(experiment_id, run_name=spec.name, tags={
        "ptxlab.version": ptxlab.__version__, "mlflow.source.git.commit": tracking.git_commit(),
        "ptxlab.study": spec.name, "ptxlab.role": "study", "optuna.storage": masked(storage),
        "mlflow.note.content": spec.description or f"Optuna study {spec.name}",
    })
    run_id = run.info.run_id
    params = {"study.name": spec.name, "study.mode": spec.mode, "study.repeats": spec.repeats,
              "study.objective": f"best_val_{spec.objective.metric}",
              "study.direction": spec.objective.direction,
              "study.grid_size": definition["grid_size"], "study.storage": masked(storage),
              "sampler.type": spec.sampler.type, "sampler.seed": spec.sampler.seed}
    params.update({f"pruner.{k}": v for k, v in spec.pruner.model_dump().items()})
    params.update({f"space.{name}": _describe(dim) for name, dim in spec.space.items()})
    params.update({f"set.{key}": json.dumps(value) for key, value in spec.overrides.items()})
    if definition["source_runs"]:
        params["study.source_runs"] = ",".join(definition["source_runs"])
    client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    client.log_text(run_id, loaded.text, f"study/{loaded.path.name}")
    client.log_dict(run_id, definition, "study/definition.json")
    return run_id


def _describe(dim: Dimension) -> str:
    if dim.type == "categorical":
        text = f"categorical{dim.labels()}"
    else:
        step = f" step {dim.step:g}" if dim.step else ""
        text = f"{dim.type}[{dim.low:g}, {dim.high:g}]{step}"
    return text + (f" when {json.dumps(dim.when)}" if dim.when else "")


def _set_parent_status(parent_run_id: str, status: str) -> None:
    client = tracking.configure()
    if client.get_run(parent_run_id).info.status != status:
        if status == "RUNNING":
            client.update_run(parent_run_id, status="RUNNING")
        else:
            client.set_terminated(parent_run_id, status)


def resolve_source_runs(source: SourceSpec, count: int) -> list[str]:
    """The listed runs, or the newest `count` finished runs of the experiment with maps."""
    client = tracking.configure()
    if source.runs:
        for run_id in source.runs:
            if not _has_maps(client, run_id):
                raise FileNotFoundError(f"run {run_id} has no {MAPS_ARTIFACT}")
        return list(source.runs)
    experiment = client.get_experiment_by_name(source.experiment)
    if experiment is None:
        raise ValueError(f"source.experiment {source.experiment!r} does not exist")
    query = "attributes.status = 'FINISHED'" + (f" and {source.filter}" if source.filter else "")
    found = []
    for run in client.search_runs([experiment.experiment_id], query,
                                  order_by=["attributes.start_time DESC"], max_results=200):
        if _has_maps(client, run.info.run_id):
            found.append(run.info.run_id)
        if len(found) == count:
            return found
    raise ValueError(f"source: {len(found)} finished runs with validation maps in experiment "
                     f"{source.experiment!r}, the study needs repeats={count}")


def _has_maps(client, run_id: str) -> bool:
    return any(item.path == MAPS_ARTIFACT for item in client.list_artifacts(run_id, "validation"))


@lru_cache(maxsize=1)  # a grid's queue runs repeat by repeat: one source run after another
def validation_predictions(run_id: str):
    """A finished run's stored validation maps, the truths of its validation split (rebuilt from
    its resolved config and checked against the stored ids) and its post-processing resolution."""
    from ptxlab.experiment import RESOLVED_CONFIG_ARTIFACT, prepare_data
    from ptxlab.inference import Predictions
    from ptxlab.postprocess import load_probability_maps

    with tempfile.TemporaryDirectory(prefix="ptxlab-maps-") as workdir:
        ids, probs = load_probability_maps(
            tracking.download_artifact(run_id, MAPS_ARTIFACT, Path(workdir)))
        config = load_config(
            tracking.download_artifact(run_id, RESOLVED_CONFIG_ARTIFACT, Path(workdir)))
    data = prepare_data(config, progress=False)
    if [case.case_id for case in data.val.cases] != ids:
        raise RuntimeError(f"run {run_id}: its validation split no longer matches its stored "
                           "maps (has the data changed?)")
    truths = np.stack([data.val[i][1][0].numpy().astype(bool) for i in range(len(data.val))])
    return Predictions(ids, probs, truths, None), config.postprocess.resolution


# --- studies -------------------------------------------------------------------------------


@dataclass
class StudyHandle:
    """An open study with what every worker needs to run its trials."""

    study: optuna.Study
    storage: optuna.storages.BaseStorage
    url: str
    spec: StudySpec
    definition: dict[str, Any]
    parent_run_id: str
    experiment: str
    created: bool

    @property
    def study_id(self) -> int:
        return self.storage.get_study_id_from_name(self.spec.name)

    def trial_id(self, number: int) -> int:
        return self.storage.get_trial_id_from_study_id_trial_number(self.study_id, number)

    @property
    def base_config(self) -> dict[str, Any] | None:
        return self.definition["base_config"]

    @property
    def grid_size(self) -> int | None:
        return self.definition["grid_size"]


def _fingerprint(definition: dict) -> str:
    """What must agree between the processes that join a study: the study file's space, fixed
    overrides, sampler, ... (not hypotheses, budgets or heartbeats). Trials always use the base
    config stored at creation, so a changed base file or new config defaults cannot split a
    study; `open_study` warns when the local one differs."""
    spec = {k: v for k, v in definition["spec"].items()
            if k not in ("description", "hypotheses", "heartbeat", "n_trials")}
    payload = json.dumps(spec, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def open_study(loaded: StudyFile, url: str, seed_offset: int | None = None) -> StudyHandle:
    """Create the study (with its parent run and, for a grid, its queue) or join it.

    Creation is race-free: the storage lets one process create a study name; the others load
    it and wait until the creator has stored the parent run id and queued the grid.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    spec = loaded.spec
    storage = make_storage(url, spec.heartbeat)
    try:
        study = optuna.create_study(storage=storage, study_name=spec.name,
                                    direction=spec.objective.direction)
        created = True
    except DuplicatedStudyError:
        study = optuna.load_study(study_name=spec.name, storage=storage)
        created = False
    if created:
        definition = _initialise(study, loaded, url)
    else:
        definition = _await_definition(study, spec.name)
        definition_here = _definition(loaded, definition["source_runs"])
        if _fingerprint(definition_here) != study.user_attrs[FINGERPRINT_ATTR]:
            raise ValueError(f"study {spec.name!r} already exists in {masked(url)} with another "
                             "definition (space, set, sampler, ...): use another name")
        if definition_here["base_config"] != definition["base_config"]:
            warnings.warn(f"study {spec.name!r}: the base config resolved here differs from the "
                          "one stored when the study was created; trials use the stored one",
                          stacklevel=2)
    parent_run_id = study.user_attrs[PARENT_ATTR]
    try:
        tracking.configure().get_run(parent_run_id)
    except mlflow.exceptions.MlflowException:
        raise RuntimeError(f"study {spec.name!r}: its MLflow parent run {parent_run_id} is not in "
                           f"the tracking store {tracking.tracking_uri()}; set "
                           "MLFLOW_TRACKING_URI to the store the study was created with") from None
    if seed_offset is None:
        seed_offset = 0 if created else zlib.crc32(f"{socket.gethostname()}:{os.getpid()}".encode())
    study.sampler = build_sampler(spec.sampler, spec.sampler.seed + seed_offset)
    study.pruner = build_pruner(spec.pruner)
    return StudyHandle(study, storage, url, spec, definition, parent_run_id,
                       study.user_attrs[EXPERIMENT_ATTR], created)


def _definition(loaded: StudyFile, source_runs: list[str]) -> dict[str, Any]:
    spec = loaded.spec
    grid = len(spec.configurations()) * spec.repeats if spec.sampler.type == "grid" else None
    return {"spec": spec.model_dump(mode="json", by_alias=True), "base_config": loaded.base_config,
            "source_runs": source_runs, "grid_size": grid}


def _initialise(study: optuna.Study, loaded: StudyFile, url: str) -> dict[str, Any]:
    spec = loaded.spec
    source_runs = (resolve_source_runs(spec.source, spec.repeats)
                   if spec.mode == "postprocess" else [])
    definition = _definition(loaded, source_runs)
    experiment = spec.experiment or (
        loaded.base_config["tracking"]["experiment"] if loaded.base_config
        else spec.source.experiment)
    parent_run_id = _create_parent_run(loaded, definition, experiment, url)
    study.set_user_attr(DEFINITION_ATTR, definition)
    study.set_user_attr(FINGERPRINT_ATTR, _fingerprint(definition))
    study.set_user_attr(PARENT_ATTR, parent_run_id)
    study.set_user_attr(EXPERIMENT_ATTR, experiment)
    if spec.sampler.type == "grid":
        shuffle = random.Random(spec.sampler.seed)
        configurations = spec.configurations()
        for repeat in range(spec.repeats):
            for params in shuffle.sample(configurations, len(configurations)):
                study.enqueue_trial(params, user_attrs={"repeat": repeat})
    study.set_user_attr(READY_ATTR, True)
    return definition


def _await_definition(study: optuna.Study, name: str) -> dict[str, Any]:
    deadline = time.monotonic() + READY_WAIT_S
    while not study.user_attrs.get(READY_ATTR):
        if time.monotonic() > deadline:
            raise RuntimeError(f"study {name!r} exists but its creator never finished setting it "
                               f"up (parent run, queue); delete it (optuna delete-study) or use "
                               "another name")
        time.sleep(1.0)
    return study.user_attrs[DEFINITION_ATTR]


def load_existing(target: str, storage: str | None) -> tuple[StudyHandle, StudyFile | None]:
    """A study by study file (its name; its hypotheses take precedence) or by name, for reading."""
    loaded = None
    name = target
    if target.endswith((".yaml", ".yml")) or Path(target).is_file():
        loaded = load_study_file(target)
        name = loaded.spec.name
    url = resolve_storage(storage, name)
    store = existing_storage(url, loaded.spec.heartbeat if loaded else HeartbeatSpec())
    try:
        study = optuna.load_study(study_name=name, storage=store)
    except KeyError:
        raise ValueError(f"no study {name!r} in {masked(url)}") from None
    if not study.user_attrs.get(READY_ATTR):
        raise ValueError(f"study {name!r} in {masked(url)} was not made by `ptxlab sweep`")
    definition = study.user_attrs[DEFINITION_ATTR]
    spec = StudySpec.model_validate(definition["spec"])
    if loaded is not None:
        spec = spec.model_copy(update={"hypotheses": loaded.spec.hypotheses})
    handle = StudyHandle(study, store, url, spec, definition, study.user_attrs[PARENT_ATTR],
                         study.user_attrs[EXPERIMENT_ATTR], created=False)
    return handle, loaded


def build_sampler(spec: SamplerSpec, seed: int) -> optuna.samplers.BaseSampler:
    """TPE or random with this seed. Grid studies run only enqueued trials, whose parameters
    are fixed, so their sampler never draws; random is set for them."""
    if spec.type == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.n_startup_trials)
    return optuna.samplers.RandomSampler(seed=seed)


def build_pruner(spec: PrunerSpec) -> optuna.pruners.BasePruner:
    if spec.type == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=spec.n_startup_trials,
                                           n_warmup_steps=spec.n_warmup_steps)
    if spec.type == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=spec.min_resource,
                                              max_resource=spec.max_resource or "auto",
                                              reduction_factor=spec.reduction_factor)
    return optuna.pruners.NopPruner()


# --- heartbeats, stale trials, tallies -----------------------------------------------------


class StaleTrialHandler:
    """Called by Optuna for a trial whose heartbeat went stale (its worker was killed or lost)
    and by a worker for its own interrupted trial: marks the child run KILLED with the reason
    and re-queues the trial with the same parameters, at most `max_retry` times."""

    def __init__(self, max_retry: int):
        self.max_retry = max_retry
        with warnings.catch_warnings():  # stable in practice; Optuna still labels it
            warnings.simplefilter("ignore", ExperimentalWarning)
            self.retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def __call__(self, study: optuna.Study, trial: FrozenTrial,
                 cause: str = "its worker stopped sending heartbeats (killed or lost)") -> None:
        attempts = len(trial.system_attrs.get("retry_history", [])) + 1
        retried = attempts <= self.max_retry
        self.retry(study, trial)
        outcome = "re-queued" if retried else f"not re-queued (max_retry={self.max_retry})"
        _finish_child_run(study.user_attrs[PARENT_ATTR], trial.number, "FAIL",
                          f"{cause}; {outcome}", status="KILLED")


@contextmanager
def heartbeat(storage: optuna.storages.BaseStorage, trial_id: int, interval: int,
              log: Callable[[str], None]) -> Iterator[None]:
    """Record the trial's heartbeat every `interval` seconds from a thread while it runs."""
    stop = threading.Event()

    def beat() -> None:
        while True:
            try:
                storage.record_heartbeat(trial_id)
            except Exception as error:  # a storage hiccup must not end the heartbeats
                log(f"heartbeat of trial id {trial_id} not recorded: {error}")
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial_id}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@dataclass
class Tally:
    """Trials by state; failed trials superseded by a retry are counted as `retried`."""

    complete: int = 0
    pruned: int = 0
    failed: int = 0
    retried: int = 0
    running: int = 0
    waiting: int = 0

    @property
    def finished(self) -> int:
        """Trials with a final outcome: what a trial budget counts."""
        return self.complete + self.pruned + self.failed


def tally(trials: list[FrozenTrial]) -> Tally:
    superseded = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    counts = Tally()
    for trial in trials:
        if trial.state == TrialState.COMPLETE:
            counts.complete += 1
        elif trial.state == TrialState.PRUNED:
            counts.pruned += 1
        elif trial.state == TrialState.FAIL:
            if trial.number in superseded:
                counts.retried += 1
            else:
                counts.failed += 1
        elif trial.state == TrialState.RUNNING:
            counts.running += 1
        elif trial.state == TrialState.WAITING:
            counts.waiting += 1
    return counts


# --- workers -------------------------------------------------------------------------------


class _TrialReporter(TrainingCallbacks):
    """Stores the child run id, reports the pruning metric each epoch, stops pruned trials."""

    def __init__(self, trial: Trial, metric: str):
        self.trial = trial
        self.metric = metric
        self.epochs = 0
        self.pruned: str | None = None

    def on_train_start(self, info: dict) -> None:
        self.trial.set_user_attr("mlflow_run_id", mlflow.active_run().info.run_id)

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self.epochs = epoch + 1
        value = metrics.get(self.metric, math.nan)
        if not math.isfinite(value):
            return
        self.trial.report(value, epoch)
        if self.trial.should_prune():
            self.pruned = f"pruned after epoch {epoch + 1}: {self.metric} {value:.4f}"
            raise StopTraining


def _finite(metrics: dict[str, float]) -> dict[str, float | None]:
    return {k: (float(v) if math.isfinite(v) else None) for k, v in metrics.items()}


class Worker:
    """Takes trials of one study until its budget is met, its queue is empty or time is up."""

    def __init__(self, handle: StudyHandle, budget: int, timeout: float | None,
                 log: Callable[[str], None]):
        self.handle = handle
        self.spec = handle.spec
        self.budget = budget
        self.deadline = time.monotonic() + timeout if timeout else None
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.log = log
        self.poll_s = min(self.spec.heartbeat.interval, 5)

    def run(self) -> str:
        """Work until done; returns why it stopped."""
        study = self.handle.study
        _set_parent_status(self.handle.parent_run_id, "RUNNING")
        while True:
            if self.deadline is not None and time.monotonic() > self.deadline:
                reason = "timeout"
                break
            with warnings.catch_warnings():  # stable in practice; Optuna still labels it
                warnings.simplefilter("ignore", ExperimentalWarning)
                fail_stale_trials(study)
            trial = self._next_trial(tally(study.get_trials(deepcopy=False)))
            if trial is not None:
                self._run_trial(trial)
                continue
            counts = tally(study.get_trials(deepcopy=False))
            if counts.running:
                time.sleep(self.poll_s)  # trials elsewhere may still fail and need a retry
            elif not counts.waiting or counts.finished >= self.budget:
                reason = "done"
                break
        counts = tally(study.get_trials(deepcopy=False))
        if not counts.running:
            _set_parent_status(self.handle.parent_run_id, "FINISHED")
        return reason

    def _next_trial(self, counts: Tally) -> Trial | None:
        """A queued trial (grid point, repeat, retry), else a freshly sampled configuration if
        all its repeats fit the budget; None when neither is possible now."""
        if counts.finished + counts.running >= self.budget:
            return None
        trial_id = self._pop_waiting()
        if trial_id is not None:
            return Trial(self.handle.study, trial_id)
        pending = counts.finished + counts.running + counts.waiting
        if self.spec.sampler.type != "grid" and pending + self.spec.repeats <= self.budget:
            with warnings.catch_warnings():  # this loop keeps the heartbeats, not optimize()
                warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
                return self.handle.study.ask()
        return None

    def _pop_waiting(self) -> int | None:
        """Atomically claim the first WAITING trial (the storage lets one worker win)."""
        storage = self.handle.storage
        for frozen in self.handle.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            trial_id = self.handle.trial_id(frozen.number)
            try:
                if storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                    return trial_id
            except UpdateFinishedTrialError:
                continue
        return None

    def _run_trial(self, trial: Trial) -> None:
        handle = self.handle
        started = time.monotonic()
        trial_id = handle.trial_id(trial.number)
        values, reason = None, None
        with heartbeat(handle.storage, trial_id, self.spec.heartbeat.interval, self.log):
            try:
                values = self._objective(trial)
                state = TrialState.COMPLETE
            except optuna.TrialPruned as pruned:
                state, reason = TrialState.PRUNED, str(pruned)
            except KeyboardInterrupt:
                frozen = handle.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                StaleTrialHandler(self.spec.heartbeat.max_retry)(
                    handle.study, frozen, cause=f"interrupted on worker {self.name}")
                raise
            except Exception as error:
                state, reason = TrialState.FAIL, f"{type(error).__name__}: {error}"
                trial.set_user_attr("fail_reason", reason[:4000])
        frozen = handle.study.tell(trial, values, state=state, skip_if_finished=True)
        if frozen.state != state:
            self.log(f"trial {trial.number} was declared stale while it ran; its result is "
                     "discarded (the retry stands)")
            return
        _finish_child_run(handle.parent_run_id, trial.number, state.name, reason,
                          status="FAILED" if state == TrialState.FAIL else None)
        self._log_progress(frozen, time.monotonic() - started, reason)

    def _objective(self, trial: Trial) -> float:
        """Suggest the active dimensions, then train (or post-process) and score."""
        params: dict[str, Label] = {}
        for name, dim in self.spec.space.items():
            if dim.active(params):
                params[name] = dim.suggest(trial, name)
        repeat = trial.user_attrs.get("repeat")
        if repeat is None:  # a freshly sampled configuration: queue its other repeats
            repeat = 0
            trial.set_user_attr("repeat", 0)
            for other in range(1, self.spec.repeats):
                self.handle.study.enqueue_trial(params, user_attrs={"repeat": other})
        trial.set_user_attr("worker", self.name)
        system_attrs = self.handle.storage.get_trial(self.handle.trial_id(trial.number)).system_attrs
        tags = {"ptxlab.study": self.spec.name, "optuna.study": self.spec.name,
                "optuna.trial_number": str(trial.number), "ptxlab.repeat": str(repeat),
                "ptxlab.worker": self.name,
                **{f"optuna.param.{k}": str(v) for k, v in params.items()}}
        if "failed_trial" in system_attrs:
            tags["ptxlab.retry_of_trial"] = str(system_attrs["retry_history"][-1])
        run_name = f"{self.spec.name}-{trial.number:04d}"
        if self.spec.mode == "postprocess":
            return self._postprocess(trial, params, repeat, tags, run_name)
        return self._train(trial, params, repeat, tags, run_name)

    def _train(self, trial: Trial, params: dict[str, Label], repeat: int, tags: dict[str, str],
               run_name: str) -> float:
        from ptxlab.experiment import run_experiment

        base = self.handle.base_config
        overrides = {**self.spec.overrides_for(params), "seed": base["seed"] + repeat,
                     "tracking.run_name": run_name, "tracking.experiment": self.handle.experiment}
        config = build_config(base, overrides, f"trial {trial.number}")
        trial.set_user_attr("seed", config.seed)
        reporter = _TrialReporter(trial, self.spec.pruner.metric)
        summary = run_experiment(config, parent_run_id=self.handle.parent_run_id, tags=tags,
                                 extra_callbacks=reporter, progress=False)
        trial.set_user_attr("epochs_trained", reporter.epochs)
        trial.set_user_attr("stopped_by", summary.stopped_by)
        if summary.metrics:
            trial.set_user_attr("metrics", _finite(summary.metrics))
        if reporter.pruned:
            raise optuna.TrialPruned(reporter.pruned)
        return self._score(summary.metrics)

    def _postprocess(self, trial: Trial, params: dict[str, Label], repeat: int,
                     tags: dict[str, str], run_name: str) -> float:
        from ptxlab.experiment import score

        source = self.handle.definition["source_runs"][repeat]
        predictions, resolution = validation_predictions(source)
        rule = _postprocessing(self.spec.overrides_for(params), resolution, f"trial {trial.number}")
        metrics = score(predictions, rule)
        with tracking.open_run(self.handle.experiment, run_name,
                               parent_run_id=self.handle.parent_run_id,
                               tags={**tags, "ptxlab.source_run": source},
                               system_metrics=False) as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            tracking.log_params({"source_run": source,
                                 **{f"postprocess.{k}": v for k, v in rule.to_dict().items()}})
            tracking.log_metrics({f"best_val_{k}": v for k, v in metrics.items()})
        trial.set_user_attr("source_run", source)
        trial.set_user_attr("metrics", _finite(metrics))
        return self._score(metrics)

    def _score(self, metrics: dict[str, float]) -> float:
        key = self.spec.objective.metric
        value = metrics.get(key, math.nan)
        if not math.isfinite(value):
            raise RuntimeError(f"objective best_val_{key} is undefined for this run ({value})")
        return float(value)

    def _log_progress(self, frozen: FrozenTrial, seconds: float, reason: str | None) -> None:
        params = ", ".join(f"{k}={v}" for k, v in frozen.params.items())
        outcome = (f"best_val_{self.spec.objective.metric}={frozen.value:.4f}"
                   if frozen.state == TrialState.COMPLETE else reason)
        self.log(f"trial {frozen.number} {frozen.state.name} in {seconds:.0f} s: {outcome} "
                 f"({params}; repeat {frozen.user_attrs.get('repeat')})")
        if frozen.state == TrialState.COMPLETE:
            client = tracking.configure()
            client.log_metric(self.handle.parent_run_id, f"trial_{self.spec.objective.metric}",
                              frozen.value, step=frozen.number)


def budget(handle: StudyHandle, n_trials: int | None) -> int:
    """--n-trials, else the study file's n_trials, else the grid's size: finished trials wanted."""
    chosen = n_trials or handle.spec.n_trials or handle.grid_size
    if chosen is None:
        raise ValueError(f"study {handle.spec.name!r}: a {handle.spec.sampler.type} sampler needs "
                         "n_trials (in the study file or --n-trials)")
    return chosen


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """`docker stop` and friends end the current trial like Ctrl+C: marked and re-queued."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class SweepResult:
    name: str
    storage: str
    parent_run_id: str
    experiment: str
    counts: Tally
    budget: int
    best: FrozenTrial | None
    stopped: str  # done | timeout | workers done
    worker_failures: list[str]

    @property
    def unfinished(self) -> bool:
        """Trials are still queued or running (e.g. after a timeout or a lost worker)."""
        return bool(self.counts.waiting or self.counts.running)


def run_sweep(study_file: Path | str, storage: str | None = None, workers: int = 1,
              n_trials: int | None = None, timeout: float | None = None, name: str | None = None,
              log: Callable[[str], None] | None = None) -> SweepResult:
    """`ptxlab sweep`: create or join the study, then run it with one or `workers` processes."""
    loaded = load_study_file(study_file, name)
    url = resolve_storage(storage, loaded.spec.name)
    index = os.environ.get(WORKER_ENV)
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    handle = open_study(loaded, url, seed_offset=int(index) if index else None)
    wanted = budget(handle, n_trials)
    failures: list[str] = []
    if workers <= 1:
        prefix = f"[worker {index}] " if index else ""
        with _sigterm_as_interrupt():
            stopped = Worker(handle, wanted, timeout, lambda t: log(prefix + t)).run()
    else:
        log(f"study {loaded.spec.name}: {workers} workers on {masked(url)}; MLflow parent run "
            f"{handle.parent_run_id}")
        failures = _spawn_workers(loaded, url, workers, n_trials, timeout, name)
        stopped = "workers done"
    trials = handle.study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = None
    if complete:
        pick = max if loaded.spec.objective.direction == "maximize" else min
        best = pick(complete, key=lambda t: t.value)
    return SweepResult(loaded.spec.name, masked(url), handle.parent_run_id, handle.experiment,
                       tally(trials), wanted, best, stopped, failures)


def _spawn_workers(loaded: StudyFile, url: str, workers: int, n_trials: int | None,
                   timeout: float | None, name: str | None) -> list[str]:
    """N processes running this command with one worker each (their logs on stderr, their
    summaries dropped: the launcher prints one); their CPU threads split."""
    command = [sys.executable, "-m", "ptxlab", "sweep", str(loaded.path), "--workers", "1",
               "--name", loaded.spec.name]
    if n_trials:
        command += ["--n-trials", str(n_trials)]
    if timeout:
        command += ["--timeout", str(timeout)]
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    processes = []
    for index in range(1, workers + 1):
        env = {**os.environ, WORKER_ENV: str(index), "OPTUNA_STORAGE": url,
               "PTXLAB_PROGRESS": "0"}
        env.setdefault("OMP_NUM_THREADS", threads)
        processes.append(subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL))
    failures = []
    try:
        for index, process in enumerate(processes, start=1):
            code = process.wait()
            if code != 0:
                failures.append(f"worker {index} (pid {process.pid}) exited with {code}")
    except KeyboardInterrupt:
        for process in processes:
            process.wait()  # each marks and re-queues its own trial
        raise
    return failures
