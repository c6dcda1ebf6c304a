"""Optuna studies over run configurations; each trial is a child MLflow run of one parent run.

`study_file` (the YAML schema and loading), `storage` (journal or RDB, with heartbeats), `runs`
(the MLflow parent and child runs), `source_runs` (stored maps: what a `postprocess` study and an
evaluation arm score), `study` (create, join or read a study), `trainings` (which trial trains
what), `worker` (take and run trials), `runner` (`run_sweep`), `plan` (`--plan`: the cost), `oof` (a
cross-validation study's out-of-fold post-processing on its pooled folds).

Shared trainings (mode train, `share_trainings: true`, the default). A config key is
evaluation-only when the config schema marks it so (`config.evaluation_only`: post-processing
but its threshold, which picks the best checkpoint; the image-level gate); a dimension is when
all its keys are. A configuration's training key is its values of the other dimensions, so the
levels of evaluation-only dimensions share one training per (training key, repeat):

* Every (configuration, repeat) is still its own trial and child run. The trial that trains
  (user attrs `ptxlab.role: train`, `ptxlab.training: <key>`) is an ordinary run that stores its
  validation maps; the others (`ptxlab.role: score`) are arms: they choose and score their own
  post-processing on those maps (`experiment.evaluate_validation`, what the training itself
  ends with), log the full resolved config as params, copy the training's seed, epochs and
  per-epoch curve, and tag their run `ptxlab.training_run` / `ptxlab.training_trial`.
* Roles are fixed when trials are queued: a grid's creator marks the first queued trial of each
  (training key, repeat) as the trainer. Workers take only queued trials that are ready (the
  storage hands each to one worker); an arm is ready once its training is done (COMPLETE or
  PRUNED, maps stored) or has failed for good. Until then workers take other work, or wait
  while trials run elsewhere. So no arm runs before its maps exist and no worker blocks in a
  trial.
* A killed trainer goes stale like any trial, is failed and re-queued with its attrs (at most
  `heartbeat.max_retry` times); its arms stay queued meanwhile and score the retry's maps. A
  trainer that raised, or ran out of retries, fails its arms with that reason. A killed arm is
  re-queued like any trial. Nothing is kept in a worker, so re-running the command, more
  workers or more hosts pick up where the storage stands.
* TPE and random: a sampled configuration whose training (same key and repeat) is done scores
  its maps; otherwise it trains. Its other repeats are queued as arms of a training that exists
  (queued or running) and as trainers otherwise. Two workers sampling the same new training at
  the same instant may both train it (the arms use the first); grids never do.
* `share_trainings: false` trains every trial (the benchmark's baseline). Mode postprocess
  scores finished runs and has no roles.
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
