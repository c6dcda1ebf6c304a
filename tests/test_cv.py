"""Cross-validation studies (`cv: {folds: K}`): the schema, which fold and seed a repeat trains,
the plan, and a tiny real study whose folds validate every image once per configuration."""

import json
from collections import defaultdict
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from typer.testing import CliRunner

from ptxlab import artifacts
from ptxlab.cli import app
from ptxlab.config import ConfigError
from ptxlab.report import write_report
from ptxlab.sweep import load_study_file, run_sweep
from tests.test_sweep import child_runs, load, write_study

LR_X_OBJECTIVE = {"optim.lr": {"type": "categorical", "choices": [0.003, 1.0e-7]},
                  "postprocess.objective": {"type": "categorical",
                                            "choices": ["pooled_iou", "mean_dice"]}}


@pytest.mark.parametrize(("change", "message"), [
    ({"cv": {"folds": 1}}, "cv.folds: cross-validation needs at least 2 folds, got 1"),
    ({"cv": {"folds": 3, "shuffle": True}}, "cv.shuffle: unknown key"),
    ({"cv": {"folds": 2}, "set": {"data.folds": 5}}, r"remove \['data.folds'\]"),
    ({"cv": {"folds": 2}, "space": {"data.fold": {"type": "categorical", "choices": [0, 1]}}},
     r"remove \['data.fold'\]"),
    ({"cv": {"folds": 2}, "space": {"split": {"type": "categorical", "choices": {
        "a": {"data.folds": 2}, "b": {"optim.lr": 0.1}}}}}, r"remove \['data.folds'\]"),
    ({"cv": {"folds": 2}, "set": {"data.split": "random"}}, "cv needs data.split: stratified"),
    ({"cv": {"folds": 2}, "space": {"data.split": {"type": "categorical",
                                                   "choices": ["stratified", "random"]}}},
     "cv needs data.split: stratified"),
    ({"cv": {"folds": 2}, "mode": "postprocess", "base": None, "set": {},
      "space": {"threshold": {"type": "categorical", "choices": [0.5]}}}, "takes no `cv`"),
])
def test_cv_study_file_errors_name_the_problem(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        load_study_file(write_study(tmp_path, **{"hypotheses": [], **change}))


def test_a_repeat_trains_fold_r_mod_k_with_seed_base_plus_r_div_k(tmp_path):
    spec = load_study_file(write_study(tmp_path, cv={"folds": 3}, repeats=2)).spec
    assert spec.total_repeats == 6
    mapping = [(spec.repeat_fold(r), spec.repeat_seed_offset(r)) for r in range(6)]
    assert mapping == [(0, 0), (1, 0), (2, 0), (0, 1), (1, 1), (2, 1)]
    assert spec.cv_overrides(4) == {"data.folds": 3, "data.fold": 1}
    plain = load_study_file(write_study(tmp_path, repeats=2)).spec
    assert plain.total_repeats == 2 and plain.cv_overrides(1) == {}
    assert [(plain.repeat_fold(r), plain.repeat_seed_offset(r)) for r in (0, 1)] == [
        (None, 0), (None, 1)]


def test_the_plan_counts_folds_times_seeds_and_holds_out_one_fold(tmp_path):
    path = write_study(tmp_path, cv={"folds": 4}, repeats=2, space=LR_X_OBJECTIVE,
                       hypotheses=[])
    result = CliRunner().invoke(app, ["sweep", str(path), "--plan", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    # 2 LRs x 2 objectives x 4 folds x 2 seeds; objectives share trainings
    assert (plan["trials"], plan["trainings"], plan["repeats"]) == (32, 16, 8)
    assert (plan["cv_folds"], plan["held_out_fraction"]) == (4, 0.25)
    assert plan["train_images"] == 24 - 6
    result = CliRunner().invoke(app, ["sweep", str(path), "--plan"])
    assert "cross-validation: 4 folds x 2 seed(s) = 8 repeats" in result.output
    assert "holds out 1/4 = 0.25" in result.output


def _split(run_id: str) -> dict:
    return json.loads(Path(MlflowClient().download_artifacts(run_id, artifacts.SPLIT)).read_text())


@pytest.fixture(scope="module")
def cv_study(tmp_path_factory):
    """A tiny finished cv study in its own store (as `isolated_store`): 2 LRs x 2 search
    objectives (evaluation-only), 2 folds, 1 seed, 1 epoch at 64²: 8 trials, 4 trainings."""
    folder = tmp_path_factory.mktemp("cv")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(folder)
        uri = f"sqlite:///{folder / 'mlflow.db'}"
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        for name, value in (("PTXLAB_CACHE", "cache"), ("PTXLAB_CHECKPOINTS", "checkpoints")):
            monkeypatch.setenv(name, str(folder / value))
        monkeypatch.setenv("PTXLAB_PROGRESS", "0")
        mlflow.set_tracking_uri(uri)
        path = write_study(folder, epochs=1, cv={"folds": 2}, repeats=1, space=LR_X_OBJECTIVE,
                           hypotheses=[])
        result = run_sweep(path)
        study = load(path.stem, str(folder / "mlruns" / "optuna" / f"{path.stem}.journal"))
        try:
            yield path, result, study
        finally:
            mlflow.set_tracking_uri(None)


@pytest.mark.slow
def test_every_image_is_validated_once_per_configuration_and_seed(cv_study):
    path, result, study = cv_study
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 8
    runs = {r.info.run_id: r for r in child_runs(result.parent_run_id)}
    validated: dict[tuple, list[str]] = defaultdict(list)
    for trial in study.trials:
        run = runs[trial.user_attrs["mlflow_run_id"]]
        fold = trial.user_attrs["repeat"] % 2
        assert trial.user_attrs["fold"] == fold and run.data.tags["ptxlab.fold"] == str(fold)
        assert (run.data.params["data.folds"], run.data.params["data.fold"]) == ("2", str(fold))
        assert run.data.params["seed"] == "42"  # one seed: both folds train with the base seed
        trained_by = run.data.tags.get("ptxlab.training_run", run.info.run_id)
        validated[tuple(sorted(trial.params.items()))] += _split(trained_by)["val"]
    split = _split(trained_by)
    cases = set(split["train"]) | set(split["val"])
    assert len(validated) == 4 and len(cases) == 24
    for images in validated.values():
        assert sorted(images) == sorted(cases)  # each case once: the folds are disjoint


@pytest.mark.slow
def test_the_report_of_a_cv_study_pairs_by_fold(cv_study):
    path, result, _ = cv_study
    text = write_report(str(path), out=path.parent / "report").markdown.read_text()
    assert "| repeats | 2: cross-validation, 2 folds x 1 seed(s)" in text
    assert "paired by fold (same validation images, same seed)" in text
