"""Optuna studies over run configurations; each trial is a child MLflow run of one parent run.

`study_file` (the YAML schema and loading), `storage` (journal or RDB, with heartbeats), `runs`
(the MLflow parent and child runs), `source_runs` (what a `postprocess` study scores), `study`
(create, join or read a study), `worker` (take and run trials), `runner` (`run_sweep`).
"""

from ptxlab.sweep.runner import run_sweep
from ptxlab.sweep.runs import PARENT_ATTR
from ptxlab.sweep.storage import masked, resolve_storage
from ptxlab.sweep.study import StudyHandle, load_existing, open_study, tally
from ptxlab.sweep.study_file import (
    Dimension,
    Hypothesis,
    Label,
    StudySpec,
    load_study_file,
    matches,
)

__all__ = [
    "PARENT_ATTR",
    "Dimension",
    "Hypothesis",
    "Label",
    "StudyHandle",
    "StudySpec",
    "load_existing",
    "load_study_file",
    "masked",
    "matches",
    "open_study",
    "resolve_storage",
    "run_sweep",
    "tally",
]
