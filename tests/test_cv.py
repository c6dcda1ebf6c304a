"""Cross-validation studies (`cv: {folds: K}`): the schema, which fold and seed a repeat trains,
the plan, and a tiny real study whose folds validate every image once per configuration."""

import json
import re
from collections import defaultdict
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState
from typer.testing import CliRunner

from ptxlab import artifacts
from ptxlab.cli import app
from ptxlab.config import ConfigError
from ptxlab.metrics import roc_auc, weighted_roc_auc
from ptxlab.noise import image_bootstrap_intervals
from ptxlab.report import write_report
from ptxlab.sweep import load_study_file, run_sweep
from ptxlab.sweep.oof import pool_predictions
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
    objectives (evaluation-only), 2 folds, 1 seed, 1 epoch at 64², a held-out test subset:
    8 trials, 4 trainings."""
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
        tree = yaml.safe_load(path.read_text())
        tree["set"]["data.test_fraction"] = 0.25  # 6 of the 24 phantoms: trials get test_*
        path.write_text(yaml.safe_dump(tree, sort_keys=False))
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
    assert len(validated) == 4 and len(cases) == 18 and not cases & set(split["test"])
    for images in validated.values():
        assert sorted(images) == sorted(cases)  # each case once: the folds are disjoint


def _oof_table(parent_run_id: str) -> dict:
    return json.loads(Path(MlflowClient().download_artifacts(
        parent_run_id, artifacts.OUT_OF_FOLD)).read_text())


@pytest.mark.slow
def test_the_parent_run_holds_the_out_of_fold_table(cv_study):
    path, result, study = cv_study
    oof = result.out_of_fold
    assert len(oof.rows) == 4 and oof.incomplete == []  # 2 LRs x 2 objectives x 1 seed
    table = _oof_table(result.parent_run_id)
    assert table["folds"] == 2 and len(table["data"]) == 4
    column = {name: i for i, name in enumerate(table["columns"])}
    assert {"configuration", "rule", "pooled_iou", "pooled_iou_low", "auc_high"} <= set(column)
    for values, row in zip(table["data"], oof.rows, strict=True):
        assert values[column["images"]] == 18 and values[column["trials"]] == row.trials
        assert values[column["rule"]].startswith("kind=threshold, threshold=")
        for metric in ("pooled_iou", "mean_dice"):
            low, high = values[column[f"{metric}_low"]], values[column[f"{metric}_high"]]
            assert low <= values[column[metric]] <= high
    parent = MlflowClient().get_run(result.parent_run_id).data
    best = oof.best[0]
    assert parent.tags["ptxlab.oof_best"] == best.label
    assert parent.metrics["oof_pooled_iou"] == pytest.approx(best.metrics["pooled_iou"])
    # each configuration's own search objective chose its rule: an arm differs from its training
    by_objective = {r.configuration["postprocess.objective"]: r for r in oof.rows
                    if r.configuration["optim.lr"] == 0.003}
    assert set(by_objective) == {"pooled_iou", "mean_dice"}


@pytest.mark.slow
def test_the_pooled_maps_cover_each_case_once(cv_study):
    path, result, study = cv_study
    trained = [t for t in study.trials if t.user_attrs["ptxlab.role"] == "train"
               and t.params["optim.lr"] == 0.003]
    runs = [t.user_attrs["mlflow_run_id"] for t in sorted(trained, key=lambda t: t.user_attrs["fold"])]
    pooled = pool_predictions(runs)
    split = _split(runs[0])
    assert sorted(pooled.ids) == sorted(split["train"] + split["val"])
    assert len(pooled.probs) == len(pooled.truths) == 18
    with pytest.raises(ValueError, match="more than once"):
        pool_predictions([runs[0], runs[0]])


@pytest.mark.slow
def test_redoing_the_out_of_fold_table_duplicates_nothing(cv_study):
    path, result, study = cv_study
    client = MlflowClient()
    before = _oof_table(result.parent_run_id)
    again = run_sweep(path)  # the finished study: no trial runs, the table is redone
    write_report(str(path), out=path.parent / "again")  # and again
    assert (again.counts.complete, again.counts.waiting) == (8, 0)
    assert _oof_table(result.parent_run_id) == before
    assert [a.path for a in client.list_artifacts(result.parent_run_id, "study")].count(
        artifacts.OUT_OF_FOLD) == 1
    for key in ("oof_pooled_iou", "oof_mean_dice", "oof_auc"):
        assert len(client.get_metric_history(result.parent_run_id, key)) <= 1
    assert len(client.get_metric_history(result.parent_run_id, "oof_pooled_iou")) == 1


@pytest.mark.slow
def test_the_report_of_a_cv_study_pairs_by_fold(cv_study):
    path, result, _ = cv_study
    text = write_report(str(path), out=path.parent / "report").markdown.read_text()
    assert "| repeats | 2: cross-validation, 2 folds x 1 seed(s)" in text
    assert "paired by fold (same validation images, same seed)" in text
    interval = r"(\d\.\d{4} \[\d\.\d{4}, \d\.\d{4}\]|n/a)"

    configurations = _table_after(text, "Configurations ranked by the mean of best_val_pooled_iou")
    assert configurations[0] == (
        "| configuration | repeats | pooled IoU | pooled Dice | per-image Dice | image AUC | "
        "test pooled IoU | test pooled Dice | test per-image Dice | test image AUC |")
    assert len(configurations) == 2 + 4  # header, rule, every configuration
    for line in configurations[2:]:
        assert re.fullmatch(rf"\| optim\.lr=[^|]+, postprocess\.objective=\w+ \| 2 \| "
                            rf"({interval} \| ){{8}}", line + " "), line

    oof = _table_after(text, "## Out-of-fold (pooled over folds)")
    assert oof[0] == ("| configuration | seed | chosen post-processing | images | pooled IoU | "
                      "pooled Dice | per-image Dice | image AUC |")
    assert len(oof) == 2 + 4
    for line in oof[2:]:
        assert re.fullmatch(rf"\| optim\.lr=[^|]+, postprocess\.objective=\w+ \| 0 \| "
                            rf"kind=threshold, [^|]+ \| 18 \| ({interval} \| ){{4}}",
                            line + " "), line


def _table_after(text: str, heading: str) -> list[str]:
    """The lines of the first Markdown table after the line that starts with `heading`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    first = next(i for i in range(start, len(lines)) if lines[i].startswith("|"))
    end = next((i for i in range(first, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[first:end]


def test_weighted_auc_counts_each_image_as_often_as_it_was_drawn():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 6, 60).astype(float)  # many ties
    labels = rng.random(60) < 0.4
    weights = rng.integers(0, 3, (5, 60))
    for row, auc in zip(weights, weighted_roc_auc(scores, labels, weights), strict=True):
        drawn = np.repeat(np.arange(60), row)
        assert auc == pytest.approx(roc_auc(scores[drawn], labels[drawn]))
    assert np.isnan(weighted_roc_auc(scores, labels, (~labels)[None].astype(int)))[0]


def test_image_bootstrap_intervals_are_reproducible_and_hold_the_estimate():
    values = np.random.default_rng(1).random(40)
    statistics = {"mean": lambda w: (w @ values) / w.sum(axis=1)}
    low, high = image_bootstrap_intervals(statistics, 40)["mean"]
    assert low < values.mean() < high and high - low < 0.4
    assert image_bootstrap_intervals(statistics, 40) == {"mean": (low, high)}
