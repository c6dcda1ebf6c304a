"""The study's MLflow parent run and the child runs of its trials.

The process that creates the study creates its parent run (the definition as params,
the study file and resolved definition as artifacts) and stores its id in the study's user
attrs, so workers on any host nest their child runs under that one parent. Each child run is
tagged with the trial number, parameters, repeat and worker, and ends with `optuna.state`
(COMPLETE / PRUNED / FAIL) and the reason; the trial's user attrs hold the child run id.
"""

from __future__ import annotations

import json
import time

from mlflow.entities import Metric, Param
from optuna import Study

import ptxlab
from ptxlab import tracking
from ptxlab.sweep.study_file import Dimension, StudyFile

PARENT_ATTR = "mlflow.parent_run_id"  # study user attr: the id of its MLflow parent run


def child_run_ids(parent_run_id: str, trial_number: int) -> list[str]:
    """Child runs of the study's parent run made for one trial number."""
    client = tracking.configure()
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs(
        [experiment_id],
        f"tags.`mlflow.parentRunId` = '{parent_run_id}' and "
        f"tags.`optuna.trial_number` = '{trial_number}'")
    return [run.info.run_id for run in runs]


def finish_child_run(parent_run_id: str, trial_number: int, state: str, reason: str | None,
                     status: str | None = None) -> None:
    """Tag a trial's child run(s) with the trial's final state and why; optionally set status."""
    client = tracking.configure()
    for run_id in child_run_ids(parent_run_id, trial_number):
        client.set_tag(run_id, "optuna.state", state)
        if reason:
            client.set_tag(run_id, "ptxlab.trial_reason", reason[:4000])
        if status and client.get_run(run_id).info.status != status:
            client.set_terminated(run_id, status)


def create_parent_run(loaded: StudyFile, definition: dict, experiment: str,
                      masked_storage: str) -> str:
    """The study's one parent run: definition as params, study file and definition as artifacts,
    `masked_storage` (the storage URL without its password) as a tag and param. It stays RUNNING
    while the study has work; the last worker out marks it FINISHED."""
    spec = loaded.spec
    client = tracking.configure()
    experiment_id = tracking.ensure_experiment(client, experiment)
    run = client.create_run(experiment_id, run_name=spec.name, tags={
        "ptxlab.version": ptxlab.__version__, "mlflow.source.git.commit": tracking.git_commit(),
        "ptxlab.study": spec.name, "ptxlab.role": "study", "optuna.storage": masked_storage,
        "mlflow.note.content": spec.description or f"Optuna study {spec.name}",
    })
    run_id = run.info.run_id
    params = {"study.name": spec.name, "study.mode": spec.mode, "study.repeats": spec.repeats,
              "study.objective": f"best_val_{spec.objective.metric}",
              "study.direction": spec.objective.direction,
              "study.grid_size": definition["grid_size"], "study.storage": masked_storage,
              "sampler.type": spec.sampler.type, "sampler.seed": spec.sampler.seed}
    if spec.cv:
        params["study.cv_folds"] = spec.cv.folds
    params.update({f"pruner.{k}": v for k, v in spec.pruner.model_dump().items()})
    params.update({f"space.{name}": _dimension_text(dim) for name, dim in spec.space.items()})
    params.update({f"set.{key}": json.dumps(value) for key, value in spec.overrides.items()})
    if definition["source_runs"]:
        params["study.source_runs"] = ",".join(definition["source_runs"])
    client.log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])
    client.log_text(run_id, loaded.text, f"study/{loaded.path.name}")
    client.log_dict(run_id, definition, "study/definition.json")
    return run_id


def _dimension_text(dim: Dimension) -> str:
    if dim.type == "categorical":
        text = f"categorical{dim.labels()}"
    else:
        step = f" step {dim.step:g}" if dim.step else ""
        text = f"{dim.type}[{dim.low:g}, {dim.high:g}]{step}"
    return text + (f" when {json.dumps(dim.when)}" if dim.when else "")


def set_parent_status(parent_run_id: str, status: str) -> None:
    client = tracking.configure()
    if client.get_run(parent_run_id).info.status != status:
        if status == "RUNNING":
            client.update_run(parent_run_id, status="RUNNING")
        else:
            client.set_terminated(parent_run_id, status)


def record_best_trial(parent_run_id: str, study: Study) -> None:
    """Put the best trial so far on the parent run: its best_val_* metrics (the objective among
    them) and its number, so that studies compare side by side like runs do."""
    best = study.best_trial
    now = int(time.time() * 1000)
    metrics = [Metric(f"best_val_{key}", float(value), now, 0)
               for key, value in best.user_attrs.get("metrics", {}).items() if value is not None]
    client = tracking.configure()
    client.log_batch(parent_run_id, metrics=metrics)
    client.set_tag(parent_run_id, "ptxlab.best_trial", str(best.number))


def parent_link(parent_run_id: str) -> str:
    """The UI address of the study's experiment (ML view), where its parent run expands."""
    client = tracking.configure()
    return tracking.ui_link(client.get_run(parent_run_id).info.experiment_id)
