"""`data.test_fraction`: a stratified test subset held out of the one source, fixed by
`data.test_seed` alone, never trained or validated on, scored as `test_*` at the end of a run
and in each evaluation arm of a study."""

import json
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from ptxlab import artifacts
from ptxlab.config import ConfigError, load_config
from ptxlab.data.cases import Case
from ptxlab.data.dataset import hold_out, stratified_split
from ptxlab.experiment import prepare_data, run_experiment
from ptxlab.sweep import run_sweep
from tests.conftest import TINY_RUN
from tests.test_sweep import load, write_study


def _cases(n_positive: int, n_negative: int) -> list[Case]:
    return [Case(f"case{i:03d}", Path(f"{i}.png"), positive=i < n_positive)
            for i in range(n_positive + n_negative)]


def _ids(cases) -> set[str]:
    return {case.case_id for case in cases}


def test_the_subset_takes_round_fraction_of_each_class_by_its_own_seed():
    cases = _cases(20, 80)
    rest, test = hold_out(cases, 0.2, seed=5)
    assert (sum(c.positive for c in test), len(test)) == (4, 20)
    assert _ids(rest) | _ids(test) == _ids(cases) and not _ids(rest) & _ids(test)
    assert hold_out(cases, 0.2, seed=5) == (rest, test)
    assert _ids(hold_out(cases, 0.2, seed=6)[1]) != _ids(test)
    assert hold_out(cases, 0.0, seed=5) == (cases, [])


PREPARED = TINY_RUN + ["data.synthetic.n_images=40", "data.test_fraction=0.25",
                       "data.test_seed=3"]


def test_the_subset_is_fixed_across_seeds_splits_and_folds_and_never_trained_on(isolated_store):
    variants = [[], ["seed=7"], ["data.split_seed=11"], ["data.split=random"],
                ["data.folds=3", "data.fold=0"], ["data.folds=3", "data.fold=2"]]
    prepared = [prepare_data(load_config(None, PREPARED + v), progress=False) for v in variants]
    test = _ids(prepared[0].test)
    assert len(test) == 10 and sum(c.positive for c in prepared[0].test) == 5
    whole = prepare_data(load_config(None, TINY_RUN + ["data.synthetic.n_images=40"]),
                         progress=False)
    every = _ids(whole.train.cases) | _ids(whole.val.cases)
    for data in prepared:
        train, val = _ids(data.train.cases), _ids(data.val.cases)
        assert _ids(data.test) == test
        assert not (train | val) & test and not train & val
        assert train | val | test == every
    assert _ids(prepared[0].val.cases) != _ids(prepared[1].val.cases)  # the split still moves
    # The rest is split exactly as a source without the subset would be.
    rest = prepared[0].train.cases + prepared[0].val.cases
    assert _ids(stratified_split(rest, 0.15, 42)[1]) == _ids(prepared[0].val.cases)
    other_seed = prepare_data(load_config(None, PREPARED[:-1] + ["data.test_seed=4"]),
                              progress=False)
    assert _ids(other_seed.test) != test


def test_test_fraction_and_test_source_are_refused_together():
    with pytest.raises(ConfigError, match="data.test_fraction and data.test_source"):
        load_config(None, ["data.test_fraction=0.2", "data.test_source=/data/ptx498"])
    with pytest.raises(ConfigError, match="data.test_fraction"):
        load_config(None, ["data.test_fraction=1"])


def test_a_fraction_too_small_to_hold_out_anything_is_an_error(isolated_store):
    config = load_config(None, TINY_RUN + ["data.test_fraction=0.01"])
    with pytest.raises(ValueError, match="holds out none of the 24 cases"):
        prepare_data(config, progress=False)


@pytest.mark.slow
def test_a_run_on_the_siim_sample_ends_with_test_metrics_on_its_held_out_subset(
        isolated_store, siim_sample):
    config = load_config(None, TINY_RUN + [f"data.source={siim_sample}", "train.epochs=1",
                                           "data.test_fraction=0.2", "data.test_seed=1"])
    summary = run_experiment(config, progress=False)
    client = MlflowClient()
    split = json.loads(Path(client.download_artifacts(summary.run_id, artifacts.SPLIT,
                                                      str(isolated_store))).read_text())
    assert len(split["test"]) == 15  # round(0.2 * 53) positives + round(0.2 * 19) negatives
    assert not set(split["test"]) & (set(split["train"]) | set(split["val"]))
    assert len(split["train"]) + len(split["val"]) + len(split["test"]) == 72
    assert set(summary.test_metrics) >= {"pooled_iou", "pooled_dice", "mean_dice", "auc"}
    run = client.get_run(summary.run_id)
    assert run.data.metrics["test_n_images"] == 15
    assert run.data.metrics["test_pooled_dice"] == pytest.approx(
        summary.test_metrics["pooled_dice"])
    evaluated = json.loads(Path(client.download_artifacts(
        summary.run_id, artifacts.evaluation_file("test", "metrics.json"),
        str(isolated_store))).read_text())
    assert evaluated["postprocess"] == summary.postprocess
    assert "data.test_fraction=0.2" in evaluated["data"]
    assert "test" in {i.dataset.name.rsplit("-", 1)[1] for i in run.inputs.dataset_inputs}


@pytest.mark.slow
def test_a_study_s_evaluation_arm_scores_its_training_s_model_on_the_subset(isolated_store):
    objective = {"postprocess.objective": {"type": "categorical",
                                           "choices": ["pooled_iou", "mean_dice"]}}
    path = write_study(isolated_store, epochs=1, repeats=1, space=objective, hypotheses=[])
    tree = yaml.safe_load(path.read_text())
    tree["set"]["data.test_fraction"] = 0.25  # 24 phantoms, 18 positive: 4 + 2 held out
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    run_sweep(path)
    study = load(path.stem, str(isolated_store / "mlruns" / "optuna" / f"{path.stem}.journal"))
    by_role = {t.user_attrs["ptxlab.role"]: t for t in study.trials}
    training, arm = by_role["train"], by_role["score"]
    client = MlflowClient()
    arm_run = client.get_run(arm.user_attrs["mlflow_run_id"])
    for trial in (training, arm):
        logged = client.get_run(trial.user_attrs["mlflow_run_id"]).data.metrics
        assert logged["test_n_images"] == trial.user_attrs["test_metrics"]["n_images"] == 6
        assert logged["test_pooled_dice"] == pytest.approx(
            trial.user_attrs["test_metrics"]["pooled_dice"])
    assert arm_run.data.tags["ptxlab.training_run"] == training.user_attrs["mlflow_run_id"]
    folder = Path(client.download_artifacts(arm_run.info.run_id, "", str(isolated_store / "arm")))
    chosen = json.loads((folder / artifacts.POSTPROCESS).read_text())
    evaluated = json.loads((folder / artifacts.evaluation_file("test", "metrics.json")).read_text())
    assert evaluated["postprocess"] == chosen  # the arm's own rule, not its training's
    assert evaluated["run_id"] == arm_run.info.run_id
