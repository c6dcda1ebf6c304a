"""Out-of-fold post-processing of a cross-validation study (`cv: {folds: K}`), as nnU-Net
chooses its post-processing on cross-validation predictions.

For every configuration (its parameters, evaluation-only ones included) and seed whose K folds
are all complete, the folds' stored validation maps (`validation_predictions`; an evaluation
arm's are its training's) are pooled, so every image appears once; the configuration's own
post-processing (rule, search, objective, grid, gate) is chosen on the pooled maps with
`experiment.choose_postprocessing`, what a training ends with, and scored there: every metric
of `ptxlab.metrics`, with image-bootstrap 95 % intervals (`noise.image_bootstrap_intervals`)
for pooled IoU/Dice, per-image Dice and image AUC.

Logged to the study's parent run: the table (one row per configuration and seed) as
`artifacts.OUT_OF_FOLD`, and for the best configuration (by its out-of-fold objective, mean
over seeds) metrics `oof_<metric>` (mean over its seeds) and tags `ptxlab.oof_best` /
`ptxlab.oof_best_rule`. Doing it again gives the same numbers (a fixed bootstrap seed): the
table is overwritten and a metric is logged only when its value changed, so nothing repeats.
"""

from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from mlflow.entities import Metric
from optuna.trial import FrozenTrial, TrialState

from ptxlab import artifacts, tracking
from ptxlab.experiment import choose_postprocessing
from ptxlab.inference import Predictions
from ptxlab.metrics import (
    METRIC_KEYS,
    accumulate,
    dice_from_counts,
    iou_from_counts,
    weighted_roc_auc,
)
from ptxlab.noise import image_bootstrap_intervals
from ptxlab.sweep.source_runs import validation_predictions
from ptxlab.sweep.study import ROLE_ATTR, SCORE, StudyHandle
from ptxlab.sweep.study_file import Label

INTERVAL_METRICS = ("pooled_iou", "pooled_dice", "mean_dice", "auc")
BEST_TAG, BEST_RULE_TAG = "ptxlab.oof_best", "ptxlab.oof_best_rule"


@dataclass
class OofRow:
    """One configuration and seed, scored on its folds' pooled validation maps."""

    configuration: dict[str, Label]
    seed: int  # the seed index: repeats r with r // folds == seed
    trials: list[int]  # one per fold, fold 0 first
    rule: dict[str, object]  # the post-processing chosen on the pooled maps
    metrics: dict[str, float]
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.configuration.items()) or "base"

    @property
    def rule_text(self) -> str:
        return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in self.rule.items() if k != "resolution")


@dataclass
class OutOfFold:
    """A cv study's out-of-fold rows, its best configuration's rows, and what was left out."""

    folds: int
    objective: str
    rows: list[OofRow]
    best: list[OofRow]  # the best configuration's rows, one per seed
    incomplete: list[str]  # 'configuration (seed s): folds ... not complete'

    def mean(self, rows: list[OofRow], metric: str) -> float:
        values = [r.metrics[metric] for r in rows if math.isfinite(r.metrics.get(metric, math.nan))]
        return float(np.mean(values)) if values else math.nan


def out_of_fold(handle: StudyHandle, log: bool = True) -> OutOfFold | None:
    """The out-of-fold table of a cv study (None without cv); `log`: onto its parent run."""
    spec = handle.spec
    if spec.cv is None:
        return None
    trials = handle.study.get_trials(deepcopy=False)
    groups, incomplete = _fold_groups(trials, spec.cv.folds, spec.repeats)
    by_maps: dict[tuple[str, ...], list] = defaultdict(list)
    for (params, seed), folds in groups.items():
        by_maps[tuple(training_run(t, trials) for t in folds)].append((params, seed, folds))
    rows = []
    for runs, members in by_maps.items():  # each set of maps pooled once
        pooled = pool_predictions(runs)
        for params, seed, folds in members:
            rows.append(_score(handle, dict(params), seed, folds, pooled))
    rows.sort(key=lambda r: ([str(v) for v in r.configuration.values()], r.seed))
    result = OutOfFold(spec.cv.folds, spec.objective.metric, rows, [], incomplete)
    result.best = _best(result, spec.objective.direction == "maximize")
    if log:
        _log(handle.parent_run_id, result)
    return result


def _fold_groups(trials: list[FrozenTrial], folds: int, seeds: int
                 ) -> tuple[dict[tuple, list[FrozenTrial]], list[str]]:
    """Per (configuration, seed index): its complete trials, fold 0 first, when every fold
    has one (the first complete trial of each repeat); the others, said why."""
    found: dict[tuple, dict[int, FrozenTrial]] = defaultdict(dict)
    for trial in trials:
        if trial.state == TrialState.COMPLETE:
            repeat = int(trial.user_attrs.get("repeat", 0))
            found[(tuple(trial.params.items()), repeat // folds)].setdefault(repeat % folds,
                                                                              trial)
    configurations = {params for params, _ in found}
    groups, incomplete = {}, []
    for params in configurations:
        for seed in range(seeds):
            have = found.get((params, seed), {})
            if len(have) == folds:
                groups[(params, seed)] = [have[fold] for fold in range(folds)]
            else:
                missing = sorted(set(range(folds)) - set(have))
                label = ", ".join(f"{k}={v}" for k, v in params) or "base"
                incomplete.append(f"{label} (seed {seed}): folds {missing} not complete")
    return groups, sorted(incomplete)


def training_run(trial: FrozenTrial, trials: list[FrozenTrial]) -> str:
    """The run whose validation maps a trial scored: its own, or (an arm) its training's."""
    if trial.user_attrs.get(ROLE_ATTR) == SCORE:
        return trials[trial.user_attrs["training_trial"]].user_attrs["mlflow_run_id"]
    return trial.user_attrs["mlflow_run_id"]


def pool_predictions(run_ids: tuple[str, ...] | list[str]) -> Predictions:
    """The stored validation maps of the folds' runs, one after another; refused when an image
    is in two of them (they are not the folds of one split)."""
    parts = [validation_predictions(run_id)[0] for run_id in run_ids]
    ids = [case for part in parts for case in part.ids]
    if len(set(ids)) != len(ids):
        twice = sorted({case for case in ids if ids.count(case) > 1})
        raise ValueError(f"runs {', '.join(run_ids)} validate {twice[:5]} more than once: "
                         "they are not the folds of one split")
    heads = [part.class_probs for part in parts]
    return Predictions(ids, np.concatenate([p.probs for p in parts]),
                       np.concatenate([p.truths for p in parts]),
                       None if any(h is None for h in heads) else np.concatenate(heads))


def _score(handle: StudyHandle, params: dict[str, Label], seed: int,
           folds: list[FrozenTrial], pooled: Predictions) -> OofRow:
    """Choose the configuration's post-processing on the pooled maps and score it there."""
    repeat = seed * len(folds)  # fold 0 of the seed: the config of every fold but its fold
    config = handle.trial_config(params, repeat, where=f"out-of-fold {params} seed {seed}")
    rule = choose_postprocessing(config, pooled).rule
    scored = accumulate(pooled, rule)
    metrics = scored.compute()
    return OofRow(params, seed, [t.number for t in folds], rule.to_dict(), metrics,
                  image_bootstrap_intervals(_statistics(scored.per_image()), len(pooled.ids)))


def _statistics(images: dict[str, np.ndarray]) -> dict[str, Callable[[np.ndarray], np.ndarray]]:
    """The interval metrics as functions of bootstrap weights (resamples x images)."""
    tp, fp, fn = (images[k].astype(np.float64) for k in ("tp", "fp", "fn"))
    dice = dice_from_counts(tp, fp, fn)
    positive = (tp + fn) > 0
    return {
        "pooled_iou": lambda w: iou_from_counts(w @ tp, w @ fp, w @ fn),
        "pooled_dice": lambda w: dice_from_counts(w @ tp, w @ fp, w @ fn),
        "mean_dice": lambda w: (w @ dice) / w.sum(axis=1),
        "auc": lambda w: weighted_roc_auc(images["score"], positive, w),
    }


def _best(result: OutOfFold, maximize: bool) -> list[OofRow]:
    """The rows of the configuration with the best out-of-fold objective (mean over seeds)."""
    by_label: dict[str, list[OofRow]] = defaultdict(list)
    for row in result.rows:
        by_label[row.label].append(row)
    scored = [(result.mean(rows, result.objective), rows) for rows in by_label.values()]
    scored = [(value, rows) for value, rows in scored if math.isfinite(value)]
    if not scored:
        return []
    return (max if maximize else min)(scored, key=lambda item: item[0])[1]


def table(result: OutOfFold) -> dict[str, list]:
    """The logged table: `columns` and one list of values per row (`data`); `postprocess` is
    the rule as `PostProcessing.to_dict` (what a fold ensemble of the configuration uses)."""
    columns = ["configuration", "seed", "trials", "images", "rule", *METRIC_KEYS,
               *[f"{k}_{end}" for k in INTERVAL_METRICS for end in ("low", "high")],
               "postprocess"]
    data = [[row.label, row.seed, row.trials, int(row.metrics["n_images"]), row.rule_text,
             *[_finite(row.metrics[k]) for k in METRIC_KEYS],
             *[_finite(row.intervals[k][i]) for k in INTERVAL_METRICS for i in (0, 1)],
             row.rule]
            for row in result.rows]
    return {"folds": result.folds, "objective": result.objective, "columns": columns,
            "data": data, "incomplete": result.incomplete}


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _log(parent_run_id: str, result: OutOfFold) -> None:
    """The table (overwritten) and the best configuration's metrics (those that changed)."""
    client = tracking.configure()
    client.log_dict(parent_run_id, table(result), artifacts.OUT_OF_FOLD)
    if not result.best:
        return
    logged = client.get_run(parent_run_id).data.metrics
    now = int(time.time() * 1000)
    values = {f"oof_{k}": result.mean(result.best, k) for k in METRIC_KEYS}
    changed = [Metric(key, value, now, 0) for key, value in values.items()
               if math.isfinite(value) and logged.get(key) != value]
    if changed:
        client.log_batch(parent_run_id, metrics=changed)
    client.set_tag(parent_run_id, BEST_TAG, result.best[0].label)
    client.set_tag(parent_run_id, BEST_RULE_TAG,
                   json.dumps([row.rule for row in result.best])[:5000])
