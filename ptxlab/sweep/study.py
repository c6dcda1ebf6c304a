"""Studies: create or join one (definition, fingerprint, grid queue), open one for reading,
its sampler and pruner, and its trials tallied by state.

Trials and repeats. A configuration is one assignment of the space; it is trained `repeats`
times with seeds `seed + r` (trial user attr `repeat`), so the report can set effects against
seed noise. Under `cv: {folds: K}` it is trained K x `repeats` times: repeat r is fold r % K
(user attr `fold`) with seed `seed + r // K`. A grid study enqueues every (configuration, repeat) once, when the study is created
(repeat by repeat, each round shuffled by the sampler seed); workers only take trials from that
queue, which both storages hand out atomically, so no grid point runs twice however many workers
there are, and a drained queue ends the workers cleanly. TPE and random studies sample a
configuration and enqueue its other repeats, which the next free workers take.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import optuna
from optuna.exceptions import DuplicatedStudyError
from optuna.trial import FrozenTrial, TrialState

from ptxlab import tracking
from ptxlab.config import Config
from ptxlab.sweep.runs import PARENT_ATTR, create_parent_run
from ptxlab.sweep.source_runs import resolve_source_runs
from ptxlab.sweep.storage import existing_storage, make_storage, masked, resolve_storage
from ptxlab.sweep.study_file import (
    HeartbeatSpec,
    Label,
    PrunerSpec,
    SamplerSpec,
    StudyFile,
    StudySpec,
    build_config,
    load_study_file,
)

# Study user attrs, besides `runs.PARENT_ATTR`.
DEFINITION_ATTR = "ptxlab.definition"
FINGERPRINT_ATTR = "ptxlab.fingerprint"
EXPERIMENT_ATTR = "mlflow.experiment"
READY_ATTR = "ptxlab.ready"
READY_WAIT_S = 120
# Trial user attrs of a mode train study, besides `repeat`: what identifies the trial's
# training (`StudySpec.training_key`) and whether the trial trains it or scores its maps.
TRAINING_ATTR = "ptxlab.training"
ROLE_ATTR = "ptxlab.role"
TRAIN, SCORE = "train", "score"


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

    def trial_config(self, params: dict[str, Label], repeat: int, run_name: str | None = None,
                     where: str = "trial") -> Config:
        """The run config of a configuration's repeat (mode train): the stored base config,
        the study's and the configuration's overrides, the repeat's seed (and fold)."""
        base = self.base_config
        fixed = self.spec.overrides_for(params)
        # Repeats vary the training seed on one validation split: the base config's, unless
        # the study sets data.split_seed itself; under cv they also choose the fold of it.
        split_seed = fixed.get("data.split_seed", base["data"]["split_seed"])
        overrides = {**fixed, **self.spec.cv_overrides(repeat),
                     "seed": base["seed"] + self.spec.repeat_seed_offset(repeat),
                     "data.split_seed": base["seed"] if split_seed is None else split_seed,
                     "tracking.experiment": self.experiment}
        if run_name:
            overrides["tracking.run_name"] = run_name
        return build_config(base, overrides, where)


def _fingerprint(definition: dict) -> str:
    """What must agree between the processes that join a study: the study file's space, fixed
    overrides, sampler, ... (not hypotheses, budgets or heartbeats). Trials always use the base
    config stored at creation, so a changed base file or new config defaults cannot split a
    study; `open_study` warns when the local one differs."""
    spec = {k: v for k, v in definition["spec"].items()
            if k not in ("description", "hypotheses", "heartbeat", "n_trials")}
    if spec.get("share_trainings", True):  # the default, and studies made before it existed
        spec.pop("share_trainings", None)
    if spec.get("cv") is None:  # likewise for studies without cross-validation
        spec.pop("cv", None)
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
    study.sampler = _build_sampler(spec.sampler, spec.sampler.seed + seed_offset)
    study.pruner = _build_pruner(spec.pruner)
    return StudyHandle(study, storage, url, spec, definition, parent_run_id,
                       study.user_attrs[EXPERIMENT_ATTR])


def _definition(loaded: StudyFile, source_runs: list[str]) -> dict[str, Any]:
    spec = loaded.spec
    grid = (len(spec.configurations()) * spec.total_repeats if spec.sampler.type == "grid"
            else None)
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
    parent_run_id = create_parent_run(loaded, definition, experiment, masked(url))
    study.set_user_attr(DEFINITION_ATTR, definition)
    study.set_user_attr(FINGERPRINT_ATTR, _fingerprint(definition))
    study.set_user_attr(PARENT_ATTR, parent_run_id)
    study.set_user_attr(EXPERIMENT_ATTR, experiment)
    if spec.sampler.type == "grid":
        shuffle = random.Random(spec.sampler.seed)
        configurations = spec.configurations()
        trained: set[tuple[str, int]] = set()
        for repeat in range(spec.total_repeats):
            for params in shuffle.sample(configurations, len(configurations)):
                attrs: dict[str, Any] = {"repeat": repeat}
                if spec.mode == "train":  # the first of a training's trials trains it
                    key = spec.training_key(params)
                    attrs.update({TRAINING_ATTR: key,
                                  ROLE_ATTR: SCORE if (key, repeat) in trained else TRAIN})
                    trained.add((key, repeat))
                study.enqueue_trial(params, user_attrs=attrs)
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
                         study.user_attrs[EXPERIMENT_ATTR])
    return handle, loaded


def _build_sampler(spec: SamplerSpec, seed: int) -> optuna.samplers.BaseSampler:
    """TPE or random with this seed. Grid studies run only enqueued trials, whose parameters
    are fixed, so their sampler never draws; random is set for them."""
    if spec.type == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=spec.n_startup_trials)
    return optuna.samplers.RandomSampler(seed=seed)


def _build_pruner(spec: PrunerSpec) -> optuna.pruners.BasePruner:
    if spec.type == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=spec.n_startup_trials,
                                           n_warmup_steps=spec.n_warmup_steps)
    if spec.type == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=spec.min_resource,
                                              max_resource=spec.max_resource or "auto",
                                              reduction_factor=spec.reduction_factor)
    return optuna.pruners.NopPruner()


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
