"""The worker: takes the study's trials one at a time, keeps each one's heartbeat, and trains
(or scores stored maps) and records it as a child run of the study's parent run."""

from __future__ import annotations

import math
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import mlflow
import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import fail_stale_trials
from optuna.trial import FrozenTrial, Trial, TrialState

from ptxlab import tracking
from ptxlab.config import Config
from ptxlab.experiment import evaluate_validation, run_experiment, score_test_set
from ptxlab.metrics import score
from ptxlab.sweep.runs import finish_child_run, record_best_trial, set_parent_status
from ptxlab.sweep.source_runs import validation_predictions
from ptxlab.sweep.storage import StaleTrialHandler
from ptxlab.sweep.study import (
    ROLE_ATTR,
    SCORE,
    TRAINING_ATTR,
    StudyHandle,
    Tally,
    tally,
)
from ptxlab.sweep.study_file import Label, build_postprocessing
from ptxlab.sweep.trainings import ready, role_of_new, training_of
from ptxlab.train import StopTraining, TrainingCallbacks


@contextmanager
def _heartbeat(storage: optuna.storages.BaseStorage, trial_id: int, interval: int,
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


class _TrialReporter(TrainingCallbacks):
    """Stores the child run id, reports the pruning metric each epoch, stops pruned trials.

    A trial that has reached its last planned epoch is complete: it is not pruned then, so
    its result counts instead of being thrown away when nothing is left to save.
    """

    def __init__(self, trial: Trial, metric: str):
        self.trial = trial
        self.metric = metric
        self.epochs = 0
        self.epochs_planned = 0
        self.pruned: str | None = None

    def on_train_start(self, info: dict) -> None:
        self.trial.set_user_attr("mlflow_run_id", mlflow.active_run().info.run_id)
        self.epochs_planned = info["epochs_planned"]

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        self.epochs = epoch + 1
        value = metrics.get(self.metric, math.nan)
        if not math.isfinite(value):
            return
        self.trial.report(value, epoch)
        if self.epochs < self.epochs_planned and self.trial.should_prune():
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
        set_parent_status(self.handle.parent_run_id, "RUNNING")
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
            if not counts.running and (not counts.waiting or counts.finished >= self.budget):
                reason = "done"
                break
            # Trials elsewhere may still fail and need a retry; queued arms wait for their
            # training's maps (or for a killed training's retry to be queued).
            time.sleep(self.poll_s)
        counts = tally(study.get_trials(deepcopy=False))
        if not counts.running:
            set_parent_status(self.handle.parent_run_id, "FINISHED")
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
        if self.spec.sampler.type != "grid" and pending + self.spec.total_repeats <= self.budget:
            with warnings.catch_warnings():  # this loop keeps the heartbeats, not optimize()
                warnings.filterwarnings("ignore", "Heartbeat of storage", UserWarning)
                return self.handle.study.ask()
        return None

    def _pop_waiting(self) -> int | None:
        """Atomically claim the first WAITING trial that can start now (the storage lets one
        worker win); an arm whose training is still pending is left for later."""
        storage = self.handle.storage
        trials = self.handle.study.get_trials(deepcopy=False)
        for frozen in trials:
            if frozen.state != TrialState.WAITING or not ready(frozen, trials,
                                                                self.spec.heartbeat):
                continue
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
        with _heartbeat(handle.storage, trial_id, self.spec.heartbeat.interval, self.log):
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
        finish_child_run(handle.parent_run_id, trial.number, state.name, reason,
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
            for name, value in self._new_trial_attrs(params, 0, started=True).items():
                trial.set_user_attr(name, value)
            for other in range(1, self.spec.total_repeats):
                self.handle.study.enqueue_trial(
                    params, user_attrs=self._new_trial_attrs(params, other, started=False))
        trial.set_user_attr("worker", self.name)
        fold = self.spec.repeat_fold(repeat)
        if fold is not None:
            trial.set_user_attr("fold", fold)
        system_attrs = self.handle.storage.get_trial(self.handle.trial_id(trial.number)).system_attrs
        tags = {"ptxlab.study": self.spec.name, "optuna.study": self.spec.name,
                "optuna.trial_number": str(trial.number), "ptxlab.repeat": str(repeat),
                "ptxlab.worker": self.name,
                **{f"optuna.param.{k}": str(v) for k, v in params.items()}}
        if fold is not None:
            tags["ptxlab.fold"] = str(fold)
        if "failed_trial" in system_attrs:
            tags["ptxlab.retry_of_trial"] = str(system_attrs["retry_history"][-1])
        run_name = f"{self.spec.name}-{trial.number:04d}"
        if self.spec.mode == "postprocess":
            return self._postprocess(trial, params, repeat, tags, run_name)
        role = trial.user_attrs.get(ROLE_ATTR)
        if role:
            tags["ptxlab.trial_role"] = role
        config = self.handle.trial_config(params, repeat, run_name, f"trial {trial.number}")
        if role == SCORE:
            return self._score_maps(trial, config, tags)
        return self._train(trial, config, tags)

    def _new_trial_attrs(self, params: dict[str, Label], repeat: int,
                         started: bool) -> dict[str, object]:
        """User attrs of a sampled configuration's trial for `repeat`: with its training and
        role in a mode train study."""
        if self.spec.mode != "train":
            return {"repeat": repeat}
        key = self.spec.training_key(params)
        trials = self.handle.study.get_trials(deepcopy=False)
        role = role_of_new(trials, key, repeat, self.spec.heartbeat, started)
        return {"repeat": repeat, TRAINING_ATTR: key, ROLE_ATTR: role}

    def _train(self, trial: Trial, config: Config, tags: dict[str, str]) -> float:
        trial.set_user_attr("seed", config.seed)
        reporter = _TrialReporter(trial, self.spec.pruner.metric)
        summary = run_experiment(config, parent_run_id=self.handle.parent_run_id, tags=tags,
                                 extra_callbacks=reporter, progress=False)
        trial.set_user_attr("epochs_trained", reporter.epochs)
        trial.set_user_attr("stopped_by", summary.stopped_by)
        if summary.metrics:
            trial.set_user_attr("metrics", _finite(summary.metrics))
        if summary.test_metrics:
            trial.set_user_attr("test_metrics", _finite(summary.test_metrics))
        if reporter.pruned:
            raise optuna.TrialPruned(reporter.pruned)
        return self._score(summary.metrics)

    def _score_maps(self, trial: Trial, config: Config, tags: dict[str, str]) -> float:
        """An evaluation arm: the post-processing of `config` chosen and scored on the stored
        validation maps of its training, which another trial ran, then that training's model
        scored with it on the test set (if the config has one) into the arm's own run."""
        training = training_of(self.handle.study.get_trials(deepcopy=False),
                               trial.user_attrs[TRAINING_ATTR], trial.user_attrs["repeat"],
                               self.spec.heartbeat)
        source = training.trial
        if training.state != "done":
            why = (source.user_attrs.get("fail_reason", "killed, no retries left") if source
                   else "no trial trains it")
            raise RuntimeError(f"its training failed ({why})" + (
                f" in trial {source.number}" if source else ""))
        run_id = source.user_attrs["mlflow_run_id"]
        predictions, _ = validation_predictions(run_id)
        with tracking.open_run(self.handle.experiment, config.tracking.run_name,
                               parent_run_id=self.handle.parent_run_id,
                               tags={**tags, "ptxlab.training_run": run_id,
                                     "ptxlab.training_trial": str(source.number)},
                               system_metrics=False) as run:
            trial.set_user_attr("mlflow_run_id", run.info.run_id)
            tracking.log_params(config.flat())
            metrics, chosen = evaluate_validation(config, predictions)
            test_metrics = score_test_set(run_id, config, chosen, log_into=run.info.run_id)
        for step, value in sorted(source.intermediate_values.items()):
            trial.report(value, step)  # the curve of the training these maps come from
        for name in ("seed", "epochs_trained", "stopped_by"):
            if name in source.user_attrs:
                trial.set_user_attr(name, source.user_attrs[name])
        trial.set_user_attr("training_trial", source.number)
        trial.set_user_attr("metrics", _finite(metrics))
        if test_metrics:
            trial.set_user_attr("test_metrics", _finite(test_metrics))
        if source.state == TrialState.PRUNED:
            raise optuna.TrialPruned(f"its training (trial {source.number}) was pruned after "
                                     f"epoch {source.user_attrs.get('epochs_trained')}")
        return self._score(metrics)

    def _postprocess(self, trial: Trial, params: dict[str, Label], repeat: int,
                     tags: dict[str, str], run_name: str) -> float:
        source = self.handle.definition["source_runs"][repeat]
        predictions, resolution = validation_predictions(source)
        rule = build_postprocessing(self.spec.overrides_for(params), resolution,
                                    f"trial {trial.number}")
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
            record_best_trial(self.handle.parent_run_id, self.handle.study)
