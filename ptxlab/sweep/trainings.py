"""Shared trainings: which trial trains a (training configuration, repeat), and whether the maps
that its evaluation arms score are there yet (see the design in `ptxlab.sweep`).

Everything here reads the study's trials as the shared storage holds them; nothing is kept in
a worker, so any worker on any host reaches the same answer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

from optuna.trial import FrozenTrial, TrialState

from ptxlab.sweep.study import ROLE_ATTR, SCORE, TRAIN, TRAINING_ATTR
from ptxlab.sweep.study_file import HeartbeatSpec


@dataclass(frozen=True)
class Training:
    """Where the training of one (training configuration, repeat) stands.

    `done`: a trial trained it and stored its maps (COMPLETE or PRUNED); `trial` is that one.
    `pending`: it is queued, running, or its killed attempt is about to be re-queued.
    `failed`: every attempt failed for good (an error, or no retries left); `trial` is the last.
    """

    state: Literal["done", "pending", "failed"]
    trial: FrozenTrial | None = None


def _attempts(trial: FrozenTrial) -> int:
    return len(trial.system_attrs.get("retry_history", [])) + 1


def _failed_for_good(trial: FrozenTrial, heartbeat: HeartbeatSpec, superseded: set[int]) -> bool:
    """A failed attempt that no retry will follow: it raised, it has used up its retries, or
    (killed) no retry appeared within a grace period after it was declared stale."""
    if trial.number in superseded:
        return True
    if "fail_reason" in trial.user_attrs or _attempts(trial) > heartbeat.max_retry:
        return True
    ended = trial.datetime_complete.timestamp() if trial.datetime_complete else 0.0
    return time.time() - ended > heartbeat.grace_period


def training_of(trials: list[FrozenTrial], key: str, repeat: int,
                heartbeat: HeartbeatSpec) -> Training:
    """The state of the training `key` for `repeat`, from the trials that train it."""
    attempts = [t for t in trials if t.user_attrs.get(ROLE_ATTR) == TRAIN
                and t.user_attrs.get(TRAINING_ATTR) == key and t.user_attrs.get("repeat") == repeat]
    done = [t for t in attempts if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            and "mlflow_run_id" in t.user_attrs]
    if done:
        return Training("done", min(done, key=lambda t: t.number))
    superseded = {n for t in attempts for n in t.system_attrs.get("retry_history", [])}
    if any(t.state in (TrialState.WAITING, TrialState.RUNNING) for t in attempts) or any(
            t.state == TrialState.FAIL and not _failed_for_good(t, heartbeat, superseded)
            for t in attempts):
        return Training("pending")
    return Training("failed", max(attempts, key=lambda t: t.number) if attempts else None)


def ready(trial: FrozenTrial, trials: list[FrozenTrial], heartbeat: HeartbeatSpec) -> bool:
    """Whether a queued trial can start now: anything but an arm whose training is pending."""
    if trial.user_attrs.get(ROLE_ATTR) != SCORE:
        return True
    return training_of(trials, trial.user_attrs[TRAINING_ATTR], trial.user_attrs["repeat"],
                       heartbeat).state != "pending"


def role_of_new(trials: list[FrozenTrial], key: str, repeat: int, heartbeat: HeartbeatSpec,
                started: bool) -> str:
    """The role of a sampled configuration's trial (TPE, random): it scores the maps of an
    existing training of the same configuration and repeat, else it trains. A trial that has
    already `started` cannot wait in the queue, so it scores only a training that is done."""
    state = training_of(trials, key, repeat, heartbeat).state
    return SCORE if state == "done" or (state == "pending" and not started) else TRAIN
