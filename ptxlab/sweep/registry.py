"""`--register NAME`: the study's best trial's model into the MLflow Model Registry, as `@best`.

The best trial is the complete trial with the best objective value (the study's direction);
its child run's logged model becomes a new version of NAME, tagged with the study, the trial
and the objective, and the alias `best` moves to that version, so that
`ptxlab predict models:/NAME@best …` always uses the study's current best model.
"""

from __future__ import annotations

from dataclasses import dataclass

from optuna.trial import TrialState

from ptxlab import tracking
from ptxlab.sweep.runs import child_run_ids
from ptxlab.sweep.study import StudyHandle

ALIAS = "best"


@dataclass
class Registered:
    name: str
    version: int
    trial: int
    run_id: str

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{ALIAS}"


def register_best(handle: StudyHandle, name: str) -> Registered:
    """Register the best trial's model as a version of `name` and point `@best` at it."""
    spec = handle.spec
    if spec.mode == "postprocess":
        raise ValueError(f"--register: study {spec.name} post-processes stored validation maps; "
                         "it trains no model to register")
    complete = handle.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        raise ValueError(f"--register: study {spec.name} has no complete trial yet")
    pick = max if spec.objective.direction == "maximize" else min
    best = pick(complete, key=lambda trial: trial.value)
    run_ids = child_run_ids(handle.parent_run_id, best.number)
    if not run_ids:
        raise ValueError(f"--register: no MLflow run of trial {best.number} of study {spec.name}")
    metric = f"best_val_{spec.objective.metric}"
    tags = {"ptxlab.study": spec.name, "ptxlab.trial": str(best.number),
            "ptxlab.objective": metric, metric: f"{best.value:.6g}"}
    version = tracking.register_model(run_ids[0], name, tags, ALIAS)
    return Registered(name, version, best.number, run_ids[0])
