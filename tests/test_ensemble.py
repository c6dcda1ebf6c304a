"""Ensembles (`ptxlab.ensemble`): averaged maps, the ensemble's post-processing, evaluate and
predict of several runs or of a study configuration.

The slow tests train tiny runs once for the module (64² phantoms, one epoch, the same
validation split): `a` at 64², `big` at 96² with another decoder, `head` with a classification
head, and a cross-validated study of one post-processing factor x 2 folds (two trainings, one
per fold, and two evaluation-only arms).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import cv2
import mlflow
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from ptxlab import artifacts
from ptxlab.cli import app
from ptxlab.config import load_config
from ptxlab.data.layouts import load_cases
from ptxlab.data.sources import read_pair
from ptxlab.data.synthetic import SyntheticSpec, materialize
from ptxlab.ensemble import (
    Ensemble,
    evaluate_ensemble,
    mean_map,
    parse_configuration,
    pooled_validation,
    resolve,
    score_ensemble,
)
from ptxlab.evaluation import evaluate_run
from ptxlab.experiment import run_experiment
from ptxlab.postprocess import PostProcessing, apply
from ptxlab.prediction import load_run, predict_native
from ptxlab.sweep import run_sweep
from ptxlab.sweep.source_runs import validation_predictions
from tests.conftest import TINY_RUN, private_store

ROOT = Path(__file__).parents[1]
# One epoch on one validation split (data.split_seed), so every run validates the same cases.
TINY = [*TINY_RUN, "train.epochs=1", "data.val_fraction=0.25", "data.split_seed=0",
        "train.device=cpu", "tracking.overlays=0"]
RUNS = {
    "a": ["seed=0"],
    "big": ["seed=2", "data.image_size=96", "model.decoder_channels=[8,8,8,8,8]"],
    "head": ["seed=1", "model.classification_head=true"],
}


def invoke(*args: object):
    return CliRunner().invoke(app, [str(arg) for arg in args])


# ---------------------------------------------------------------- quick: no training


def test_mean_map_rounds_the_mean_back_to_uint8_levels():
    first = np.array([[0, 255], [10, 3]], dtype=np.uint8)
    second = np.array([[1, 255], [20, 4]], dtype=np.uint8)
    np.testing.assert_array_equal(mean_map([first, second]), [[0, 255], [15, 4]])  # rint: even
    assert mean_map([first]) is first


class _Member:
    """A stand-in run: fixed maps, scores and head probabilities for every batch."""

    def __init__(self, maps, scores, heads=None):
        self.maps, self.scores, self.heads = maps, np.asarray(scores), heads

    def native_maps(self, images, tta, batch_size):
        return self.maps, self.scores, self.heads


def test_an_ensemble_averages_maps_scores_and_head_probabilities():
    maps = [np.full((2, 3), 100, np.uint8), np.full((4, 4), 7, np.uint8)]
    other = [np.full((2, 3), 201, np.uint8), np.full((4, 4), 9, np.uint8)]
    ensemble = Ensemble([_Member(maps, [0.2, 0.4], np.array([0.1, 0.5])),
                         _Member(other, [0.6, 0.8], np.array([0.3, 0.9]))],
                        PostProcessing())
    averaged, scores, heads = ensemble.native_maps([np.zeros((2, 3)), np.zeros((4, 4))], "none", 2)
    assert [m.tolist() for m in averaged] == [np.full((2, 3), 150).tolist(),
                                             np.full((4, 4), 8).tolist()]
    np.testing.assert_allclose(scores, [0.4, 0.6])
    np.testing.assert_allclose(heads, [0.2, 0.7])


@pytest.mark.parametrize(("text", "parsed"), [
    ("", {}),
    ("augment.preset=light", {"augment.preset": "light"}),
    ("optim.lr=0.001, augment.preset=none", {"optim.lr": "0.001", "augment.preset": "none"}),
    ("model.decoder_channels=[16, 16],optim.lr=1e-3",
     {"model.decoder_channels": "[16, 16]", "optim.lr": "1e-3"}),
])
def test_configurations_parse_as_key_value_pairs(text, parsed):
    assert parse_configuration(text) == parsed


def test_a_configuration_without_a_value_is_refused():
    with pytest.raises(ValueError, match="expected key=value"):
        parse_configuration("augment.preset")


# ---------------------------------------------------------------- slow: tiny trained runs


@dataclass
class Trained:
    ids: dict[str, str]
    root: Path
    data: Path  # 8 phantoms at 128² in the folder layout
    study: str
    journal: Path


def _write_study(root: Path) -> Path:
    """One evaluation-only factor (the minimum area) x 2 folds: 2 trainings, 2 arms."""
    tree = {"name": "ensemble-study", "base": str(ROOT / "experiments" / "default.yaml"),
            "set": {"data.synthetic.n_images": 24, "data.synthetic.size": 64,
                    "data.image_size": 64, "data.val_fraction": 0.25,
                    "model.encoder_weights": None, "model.decoder_channels": [16] * 5,
                    "train.epochs": 1, "train.batch_size": 4, "train.device": "cpu",
                    "postprocess.search": False, "postprocess.resolution": 64,
                    "tracking.experiment": "ensemble-study", "tracking.system_metrics": False,
                    "tracking.overlays": 0},
            "space": {"postprocess.min_area": {"type": "categorical", "choices": [0, 8]}},
            "cv": {"folds": 2}, "sampler": {"type": "grid", "seed": 0},
            "heartbeat": {"interval": 2, "grace_period": 30, "max_retry": 1}}
    path = root / "ensemble-study.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """The tiny runs and the study, in a private MLflow store, cache and working dir."""
    root = tmp_path_factory.mktemp("ensemble")
    with private_store(root):
        ids = {name: run_experiment(load_config(None, [*TINY, *extra]), progress=False).run_id
               for name, extra in RUNS.items()}
        study = _write_study(root)
        assert run_sweep(study, log=lambda line: None).worker_failures == []
        cases = materialize(SyntheticSpec(n_images=8, size=128, seed=5), root / "phantoms",
                            progress=False)
        yield Trained(ids, root, cases[0].image.parents[1], "ensemble-study",
                      root / "mlruns" / "optuna" / "ensemble-study.journal")


def _same_metrics(first: dict[str, float], second: dict[str, float]) -> bool:
    """Equal keys and values, NaN (an undefined metric) equal to NaN."""
    return first.keys() == second.keys() and all(
        first[k] == second[k] or (np.isnan(first[k]) and np.isnan(second[k])) for k in first)


def _one_line_error(result, *expected: str) -> str:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    for text in expected:
        assert text in lines[0]
    return lines[0]


@pytest.mark.slow
def test_an_ensemble_of_one_run_is_that_run(trained):
    run_id = trained.ids["a"]
    resolved = resolve([run_id])
    assert resolved.choice.search is not None  # chosen again, on the run's own stored maps
    assert resolved.choice.rule == load_run(run_id).postprocess
    single = evaluate_run(run_id, trained.data, "folder", name="one", progress=False)
    alone = evaluate_ensemble(resolved, trained.data, "folder", name="one", progress=False)
    assert alone.run_id != run_id and alone.members == [run_id]
    assert _same_metrics(alone.metrics, single.metrics) and alone.rows == single.rows
    assert alone.postprocess == single.postprocess
    ensemble_run = MlflowClient().get_run(alone.run_id)
    assert ensemble_run.info.status == "FINISHED"
    assert ensemble_run.data.tags["ptxlab.ensemble_members"] == run_id
    assert ensemble_run.data.tags["ptxlab.role"] == "ensemble"
    assert ensemble_run.data.metrics["one_pooled_iou"] == single.metrics["pooled_iou"]
    cases = load_cases(trained.data, "folder")
    assert _same_metrics(score_ensemble([run_id], cases, resolved.choice.rule), single.metrics)


@pytest.mark.slow
def test_two_members_at_different_sizes_average_their_native_maps(trained, tmp_path):
    members = [trained.ids["a"], trained.ids["big"]]
    resolved = resolve(members)
    assert [m.config.data.image_size for m in resolved.members] == [64, 96]
    cases = load_cases(trained.data, "folder")
    own = [list(predict_native(load_run(m), cases, read_pair, progress=False)) for m in members]
    both = list(predict_native(resolved.ensemble, cases, read_pair, batch_size=3,
                               progress=False))
    for index, result in enumerate(both):
        first, second = own[0][index].probs, own[1][index].probs
        assert first.shape == second.shape == result.probs.shape == (128, 128)
        expected = (first.astype(np.float64) + second) / 2
        assert np.abs(result.probs - expected).max() <= 0.5
        np.testing.assert_array_equal(result.probs, mean_map([first, second]))
        np.testing.assert_array_equal(result.mask, apply(result.probs, resolved.choice.rule))
        assert result.score == pytest.approx((own[0][index].score + own[1][index].score) / 2)

    # Flip TTA: each member's flip-averaged map, then the members' mean.
    flipped = [list(predict_native(load_run(m), cases[:2], read_pair, tta="hflip",
                                   progress=False)) for m in members]
    both_flipped = predict_native(resolved.ensemble, cases[:2], read_pair, tta="hflip",
                                  progress=False)
    for index, result in enumerate(both_flipped):
        np.testing.assert_array_equal(
            result.probs, mean_map([flipped[0][index].probs, flipped[1][index].probs]))
    assert not np.array_equal(flipped[0][0].probs, own[0][0].probs)

    out = tmp_path / "masks"
    result = invoke("predict", ",".join(members), trained.data / "images", "--out", out,
                    "--no-overlay")
    assert result.exit_code == 0, result.output
    assert "ensemble of 2 runs" in result.stdout
    for prediction in both:
        written = cv2.imread(str(out / f"{prediction.case.case_id}_mask.png"), cv2.IMREAD_GRAYSCALE)
        np.testing.assert_array_equal(written, prediction.mask * 255)


@pytest.mark.slow
def test_pooled_validation_maps_average_the_cases_the_members_share(trained):
    small, big = (validation_predictions(trained.ids[name])[0] for name in ("a", "big"))
    assert small.ids == big.ids  # one split
    pooled = pooled_validation([trained.ids["a"], trained.ids["big"]])
    assert pooled.ids == small.ids and pooled.probs.shape[1:] == (96, 96)
    upsized = cv2.resize(small.probs[0], (96, 96), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(pooled.probs[0], mean_map([upsized, big.probs[0]]))
    np.testing.assert_array_equal(pooled.truths, big.truths)


@pytest.mark.slow
def test_evaluate_several_runs_logs_into_a_new_ensemble_run(trained):
    members = [trained.ids["a"], trained.ids["big"]]
    result = invoke("evaluate", *members, "--data", trained.data, "--name", "pair", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["members"] == members and summary["image_size"] == [64, 96]
    client = MlflowClient()
    run = client.get_run(summary["run_id"])
    assert run.data.tags["ptxlab.ensemble_members"] == ",".join(members)
    assert run.data.metrics["pair_n_images"] == 8
    assert not any(key.startswith("pair_") for m in members
                   for key in client.get_run(m).data.metrics)
    described = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path=artifacts.ENSEMBLE)).read_text())
    assert [m["run_id"] for m in described["members"]] == members
    assert described["postprocess"] == summary["postprocess"]

    table = invoke("evaluate", ",".join(members), "--data", trained.data, "--name", "pair2")
    assert table.exit_code == 0, table.output
    assert "logged into the new ensemble run" in table.stdout


@pytest.mark.slow
def test_incompatible_members_unknown_runs_and_missing_maps_are_one_line_errors(trained):
    a, head, big = trained.ids["a"], trained.ids["head"], trained.ids["big"]
    _one_line_error(invoke("evaluate", a, head, "--data", trained.data),
                    "different targets", f"run {head}: mask (1 output) + classification head")
    _one_line_error(invoke("predict", f"{a},{head}", trained.data / "images", "--out",
                           trained.root / "never"), "different targets")
    assert not (trained.root / "never").exists()
    _one_line_error(invoke("evaluate", a, "no-such-run", "--data", trained.data),
                    "run no-such-run: not found")
    _one_line_error(invoke("evaluate", a, a, "--data", trained.data), "more than once")
    _one_line_error(invoke("evaluate", "--data", trained.data), "name the runs")
    maps = _artifact_file(big, artifacts.VALIDATION_MAPS)
    hidden = maps.with_suffix(".hidden")
    shutil.move(maps, hidden)
    try:
        _one_line_error(invoke("evaluate", a, big, "--data", trained.data),
                        f"run {big}: no {artifacts.VALIDATION_MAPS} logged")
    finally:
        shutil.move(hidden, maps)


def _artifact_file(run_id: str, artifact: str) -> Path:
    """Where the local store keeps a run's artifact."""
    return Path(urlparse(MlflowClient().get_run(run_id).info.artifact_uri).path) / artifact


def _study_trainings(trained: Trained) -> tuple[list[str], str]:
    """The study's training runs in fold order, and its parent run."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    study = optuna.load_study(study_name=trained.study,
                              storage=JournalStorage(JournalFileBackend(str(trained.journal))))
    trainers = sorted((t for t in study.trials if t.user_attrs["ptxlab.role"] == "train"),
                      key=lambda t: t.user_attrs["repeat"])
    return [t.user_attrs["mlflow_run_id"] for t in trainers], study.user_attrs[
        "mlflow.parent_run_id"]


@pytest.mark.slow
@pytest.mark.parametrize("min_area", [0, 8])
def test_study_config_selects_the_configuration_s_trainings(trained, min_area):
    trainings, parent = _study_trainings(trained)
    result = invoke("evaluate", "--study", trained.study, "--config",
                    f"postprocess.min_area={min_area}", "--data", trained.data, "--json",
                    "--name", f"area{min_area}")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["members"] == trainings  # an arm's configuration: its training's model
    assert [MlflowClient().get_run(m).data.tags["ptxlab.fold"] for m in trainings] == ["0", "1"]
    assert summary["postprocess"]["min_area"] == min_area  # and its own post-processing
    run = MlflowClient().get_run(summary["run_id"])
    assert run.data.tags["mlflow.parentRunId"] == parent
    assert run.data.tags["ptxlab.configuration"] == f"postprocess.min_area={min_area}"
    described = json.loads(Path(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path=artifacts.ENSEMBLE)).read_text())
    assert "out-of-fold" in described["postprocess_from"]  # the study's own choice, logged
    assert described["configuration"] == {"postprocess.min_area": min_area}


@pytest.mark.slow
def test_without_the_study_s_out_of_fold_rule_the_folds_maps_choose_it_again(trained):
    study = resolve([], trained.study, "postprocess.min_area=8")
    assert study.rule_source.endswith("out-of-fold maps")
    table = _artifact_file(_study_trainings(trained)[1], artifacts.OUT_OF_FOLD)
    hidden = table.with_suffix(".hidden")
    shutil.move(table, hidden)
    try:
        again = resolve([], trained.study, "postprocess.min_area=8")
    finally:
        shutil.move(hidden, table)
    assert again.rule_source == "configured (postprocess.search: false)"
    assert again.choice.rule.to_dict() == study.choice.rule.to_dict()


@pytest.mark.slow
def test_study_config_errors_list_the_configurations(trained, tmp_path):
    line = _one_line_error(invoke("evaluate", "--study", trained.study, "--data", trained.data),
                           "has 2 configurations; name one with --config")
    assert line.endswith("postprocess.min_area=0 | postprocess.min_area=8")
    _one_line_error(invoke("evaluate", "--study", trained.study, "--config",
                           "postprocess.min_area=4", "--data", trained.data),
                    "names none of the configurations", "postprocess.min_area=8")
    _one_line_error(invoke("evaluate", "--study", trained.study, "--config", "optim.lr=1",
                           "--data", trained.data), "'optim.lr' is not a parameter")
    _one_line_error(invoke("evaluate", "--study", "no-such-study", "--data", trained.data),
                    "no-such-study")
    images = sorted((trained.data / "images").iterdir())[:2]
    result = invoke("predict", "--study", trained.study, "--config", "postprocess.min_area=8",
                    *images, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "ensemble of 2 runs" in result.stdout
    assert len(list((tmp_path / "out").glob("*_mask.png"))) == 2
