"""The fold ensemble of a cross-validated study's best configuration, on its held-out test set.

When the study's runs have a test set (`data.test_fraction`: a subset no fold trained or
validated on; or `data.test_source`), the K fold models of the configuration with the best
out-of-fold objective (`sweep.oof`) predict it together: their maps averaged at each image's
native size (`ensemble.Ensemble`), post-processed with the rule chosen on the configuration's
pooled out-of-fold maps. The ensemble is scored with `evaluation.evaluate_cases` into the
study's parent run (metrics `ensemble_test_*`, files under `evaluation/ensemble_test/`), next
to each fold's own test score: its trial's `test_*`, that fold's model with the rule chosen on
its own fold's validation maps.

Whether the ensemble helped is measured per test image: the ensemble's Dice minus the mean of
the folds' Dice, and its pooled IoU minus the folds' mean pooled IoU, each with a 95 %
image-bootstrap interval. The result goes to the parent run as `artifacts.FOLD_ENSEMBLE`; it is
computed once per (members, rule) and read back after that, so nothing is logged twice.
"""

from __future__ import annotations

import csv
import io
import json
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ptxlab import artifacts, tracking
from ptxlab.ensemble import Ensemble, load_members
from ptxlab.evaluation import evaluate_cases
from ptxlab.experiment import test_set
from ptxlab.metrics import iou_from_counts
from ptxlab.noise import image_bootstrap_intervals
from ptxlab.postprocess import PostProcessing
from ptxlab.sweep.oof import OutOfFold, training_run
from ptxlab.sweep.study import StudyHandle

NAME = "ensemble_test"  # the evaluation's name: metrics ensemble_test_*
KEY_TAG = "ptxlab.fold_ensemble"  # members and rule of the logged result
DIFFERENCES = ("mean_dice", "pooled_iou")


@dataclass
class FoldEnsemble:
    """The best configuration's fold models on the test set, alone and as an ensemble."""

    configuration: str
    members: list[str]  # training run ids, fold order
    trials: list[int]  # the configuration's trials, fold order (their test_* are the folds')
    rule: dict
    images: int
    ensemble: dict[str, float]
    folds: list[dict[str, float]]
    # metric -> (ensemble minus mean of folds, 95 % interval low, high)
    differences: dict[str, tuple[float, float, float]]

    def verdict(self, metric: str = "mean_dice") -> str:
        _, low, high = self.differences[metric]
        if low > 0:
            return "the ensemble helped"
        if high < 0:
            return "the ensemble hurt"
        return "no clear difference"


def fold_ensemble(handle: StudyHandle, oof: OutOfFold | None) -> FoldEnsemble | None:
    """Score (or read back) the fold ensemble of the best out-of-fold configuration on the test
    set, for its first seed; None without a cv study, a best configuration or a test set."""
    if oof is None or not oof.best:
        return None
    best = oof.best[0]
    trials = handle.study.get_trials(deepcopy=False)
    chosen = [trials[number] for number in best.trials]
    members = [training_run(trial, trials) for trial in chosen]
    config = handle.trial_config(best.configuration, best.seed * oof.folds,
                                 where=f"fold ensemble of {best.label}")
    found = test_set(members[0], config.data)
    if found is None:
        return None
    key = json.dumps({"members": members, "rule": best.rule}, sort_keys=True)
    client = tracking.configure()
    parent = handle.parent_run_id
    if client.get_run(parent).data.tags.get(KEY_TAG) == key:
        return _read_back(parent)
    cases, described, layout = found
    ensemble = Ensemble(load_members(members), PostProcessing.from_dict(best.rule))
    evaluation = evaluate_cases(ensemble, cases, NAME, described, layout, progress=False,
                                log_into=parent)
    fold_rows = [_per_image(trial.user_attrs["mlflow_run_id"], artifacts.TEST)
                 for trial in chosen]
    result = FoldEnsemble(best.label, members, best.trials, best.rule, len(cases),
                          evaluation.metrics, [_test_metrics(t) for t in chosen],
                          differences(_rows_by_id(evaluation.rows), fold_rows))
    client.log_dict(parent, _json_safe(asdict(result)), artifacts.FOLD_ENSEMBLE)
    client.set_tag(parent, KEY_TAG, key)
    return result


def _test_metrics(trial) -> dict[str, float]:
    return _nan_for_none(trial.user_attrs.get("test_metrics") or {})


def _nan_for_none(values: dict[str, float | None]) -> dict[str, float]:
    """Metrics stored as JSON (an undefined one as null) back as floats (NaN)."""
    return {key: math.nan if value is None else value for key, value in values.items()}


def _per_image(run_id: str, name: str) -> dict[str, dict[str, float]]:
    """An evaluation's per-image rows (`per_image.csv`), by image id."""
    with tempfile.TemporaryDirectory(prefix="ptxlab-per-image-") as folder:
        path = tracking.download_artifact(run_id, artifacts.evaluation_file(name, "per_image.csv"),
                                          Path(folder))
        return _rows_by_id(list(csv.DictReader(io.StringIO(path.read_text()))))


def _rows_by_id(rows: list[dict]) -> dict[str, dict[str, float]]:
    return {str(row["id"]): {k: float(row[k]) for k in ("truth_area", "pred_area", "dice")}
            for row in rows}


def _counts(rows: dict[str, dict[str, float]], ids: list[str]) -> tuple[np.ndarray, ...]:
    """Per image (in `ids` order): Dice, and the true-positive, false-positive and
    false-negative pixel counts its Dice and areas imply."""
    dice = np.array([rows[i]["dice"] for i in ids])
    truth = np.array([rows[i]["truth_area"] for i in ids])
    predicted = np.array([rows[i]["pred_area"] for i in ids])
    tp = np.rint(dice * (truth + predicted) / 2)
    return dice, tp, predicted - tp, truth - tp


def differences(ensemble: dict[str, dict[str, float]], folds: list[dict[str, dict[str, float]]]
                ) -> dict[str, tuple[float, float, float]]:
    """Ensemble minus the mean of the folds, per-image Dice and pooled IoU, each with its 95 %
    image-bootstrap interval (the same resamples of the test images for every model)."""
    ids = sorted(ensemble)
    if any(set(rows) != set(ids) for rows in folds):
        raise ValueError("the fold models were scored on other test images than the ensemble")
    models = [_counts(ensemble, ids)] + [_counts(rows, ids) for rows in folds]

    def per_image_dice(w: np.ndarray) -> np.ndarray:
        means = [(w @ dice) / w.sum(axis=1) for dice, *_ in models]
        return means[0] - np.mean(means[1:], axis=0)

    def pooled_iou(w: np.ndarray) -> np.ndarray:
        values = [iou_from_counts(w @ tp, w @ fp, w @ fn) for _, tp, fp, fn in models]
        return values[0] - np.mean(values[1:], axis=0)

    statistics = {"mean_dice": per_image_dice, "pooled_iou": pooled_iou}
    intervals = image_bootstrap_intervals(statistics, len(ids))
    everything = np.ones((1, len(ids)))
    return {name: (float(statistic(everything)[0]), *intervals[name])
            for name, statistic in statistics.items()}


def _json_safe(value: object) -> object:
    """NaN as null, recursively (the artifact is strict JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(item) for item in value]
    return value


def _read_back(parent: str) -> FoldEnsemble:
    """The result logged earlier for the same members and rule."""
    with tempfile.TemporaryDirectory(prefix="ptxlab-fold-ensemble-") as folder:
        path = tracking.download_artifact(parent, artifacts.FOLD_ENSEMBLE, Path(folder))
        stored = json.loads(path.read_text())
    stored["ensemble"] = _nan_for_none(stored["ensemble"])
    stored["folds"] = [_nan_for_none(fold) for fold in stored["folds"]]
    stored["differences"] = {key: tuple(math.nan if v is None else v for v in values)
                             for key, values in stored["differences"].items()}
    return FoldEnsemble(**stored)

