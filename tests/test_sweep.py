"""Optuna studies: study files, workers on PostgreSQL and on the local journal, kill and resume,
pruning, post-processing studies on stored maps, MLflow parent and child runs."""

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from ptxlab.config import ConfigError, load_config
from ptxlab.experiment import run_experiment
from ptxlab.postprocess import PostProcessing
from ptxlab.report import write_report
from ptxlab.sweep import load_study_file, open_study, resolve_storage, run_sweep
from ptxlab.sweep.source_runs import validation_predictions
from tests.conftest import TINY_RUN, service_unavailable

ROOT = Path(__file__).parents[1]
STUDIES = ROOT / "experiments" / "studies"
POSTGRES = os.environ.get("PTXLAB_TEST_POSTGRES",
                          "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
# Two learning rates (one learns, one cannot in 4 epochs), light augmentation, 3 seeds: 6 trials.
LR_ONLY = {"optim.lr": {"type": "categorical", "choices": [0.003, 1.0e-7]}}
LR_HYPOTHESIS = {"name": "3e-3 beats 1e-7", "compare": {"optim.lr": 0.003},
                 "against": {"optim.lr": 1.0e-7}, "expect": "greater"}


def write_study(directory: Path, epochs: int = 4, **changes) -> Path:
    """The shipped smoke study with a unique name, an absolute base and `changes` on top."""
    tree = yaml.safe_load((STUDIES / "smoke.yaml").read_text())
    tree.update(base=str(ROOT / "experiments" / "default.yaml"),
                name=f"test-{uuid.uuid4().hex[:10]}", space=LR_ONLY, hypotheses=[LR_HYPOTHESIS])
    tree["set"].update({"augment.preset": "light", "train.epochs": epochs})
    tree.update(changes)
    path = directory / f"{tree['name']}.yaml"
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def load(name: str, storage: str) -> optuna.Study:
    if "://" not in storage:
        storage = JournalStorage(JournalFileBackend(storage))
    return optuna.load_study(study_name=name, storage=storage)


def child_runs(parent_run_id: str) -> list:
    client = MlflowClient()
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    return client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'")


def check_complete_grid(study: optuna.Study, expected: int) -> list:
    """The right number of complete trials, no grid point twice, one child run per trial under
    the study's one parent run; returns the child runs."""
    trials = study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == expected, [(t.number, t.state.name) for t in trials]
    points = {(tuple(sorted(t.params.items())), t.user_attrs["repeat"]) for t in complete}
    assert len(points) == expected
    parent = study.user_attrs["mlflow.parent_run_id"]
    runs = child_runs(parent)
    assert sorted(r.info.run_id for r in runs) == sorted(t.user_attrs["mlflow_run_id"]
                                                         for t in trials)
    by_id = {r.info.run_id: r for r in runs}
    split_seeds = set()
    for trial in complete:
        run = by_id[trial.user_attrs["mlflow_run_id"]]
        assert run.data.params["seed"] == str(trial.user_attrs["seed"])
        split_seeds.add(run.data.params["data.split_seed"])
        tags = run.data.tags
        assert tags["optuna.trial_number"] == str(trial.number)
        assert tags["optuna.state"] == "COMPLETE"
        assert tags["optuna.param.optim.lr"] == str(trial.params["optim.lr"])
    assert len(split_seeds) == 1  # repeats vary the training seed on one validation split
    client = MlflowClient()
    studies = client.search_runs(
        [client.get_run(parent).info.experiment_id],
        f"tags.`ptxlab.role` = 'study' and tags.`ptxlab.study` = '{study.study_name}'")
    assert [r.info.run_id for r in studies] == [parent]
    assert studies[0].info.status == "FINISHED"
    return runs


@pytest.fixture
def postgres() -> str:
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(POSTGRES, connect_args={"connect_timeout": 3})
        with engine.connect():
            pass
    except sqlalchemy.exc.OperationalError as error:
        service_unavailable(f"PostgreSQL unreachable at {POSTGRES}: {error}".splitlines()[0])
    return POSTGRES


# Opens the storage at an agreed instant, so that the processes really start together.
OPEN_STORAGE_AT = """
import sys, time
from ptxlab.sweep.storage import make_storage
from ptxlab.sweep.study_file import HeartbeatSpec
url, start = sys.argv[1], float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
make_storage(url, HeartbeatSpec())
"""


@pytest.mark.slow
@pytest.mark.service
def test_workers_starting_together_on_a_new_database_all_open_it(postgres):
    """Optuna creates its tables on first use; unguarded, most of 4 simultaneous first uses
    fail on PostgreSQL with a duplicate pg_type row (9 of 12 in a trial here)."""
    from tests.servers import throwaway_database

    with throwaway_database("ptxlab_test_schema", postgres) as url:
        start = time.time() + 8  # after every interpreter has imported ptxlab
        workers = [subprocess.Popen([sys.executable, "-c", OPEN_STORAGE_AT, url, str(start)],
                                    stderr=subprocess.PIPE, text=True) for _ in range(4)]
        errors = [worker.communicate(timeout=120)[1] for worker in workers]
    assert [worker.returncode for worker in workers] == [0] * 4, errors


def test_shipped_study_files_are_valid():
    sizes = {path.stem: load_study_file(path) for path in sorted(STUDIES.glob("*.yaml"))}
    grid = {name: len(s.spec.configurations()) * s.spec.repeats for name, s in sizes.items()}
    assert grid == {"augmentation": 30, "batch-size": 24, "gap": 48, "real-sample": 12,
                    "resolution": 6, "smoke": 12, "thresholds": 498, "winners": 30}
    augmentation = sizes["augmentation"].spec.configurations()
    assert {"augment.preset": "none"} in augmentation  # strength only where a preset augments
    assert len({tuple(sorted(c.items())) for c in augmentation}) == len(augmentation) == 10
    assert sizes["batch-size"].base_config["optim"]["lr_scaling"] == "linear"


def test_the_plan_of_the_gap_study_counts_its_trainings(isolated_store):
    """48 trials, 24 trainings: post-processing levels are scored on one training's maps.
    Nothing is written: no MLflow store, no journal, no cache."""
    from typer.testing import CliRunner

    from ptxlab.cli import app

    result = CliRunner().invoke(app, ["sweep", str(STUDIES / "gap.yaml"), "--plan", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert (plan["trials"], plan["trainings"], plan["max_epochs"]) == (48, 24, 100)
    assert plan["evaluation_only_factors"] == ["postprocess.objective"]
    assert plan["arms_per_training"] == [2] and plan["total_epochs"] == 2400
    assert sorted(os.listdir(isolated_store)) == []

    result = CliRunner().invoke(app, ["sweep", str(STUDIES / "gap.yaml"), "--plan",
                                      "--step-ms", "360", "--train-images", "10240"])
    assert result.exit_code == 0, result.output
    # 8 configurations x 3 repeats x 100 epochs x 320 (batch 32) or 1280 (batch 8) batches;
    # a batch of 8 takes a quarter of the 360 ms of a batch of 32: every epoch takes 115.2 s.
    hours = 3 * 100 * (4 * 320 * 0.360 + 4 * 1280 * 0.090) / 3600
    assert f"1 worker(s): {hours:.2f} h wall clock" in result.output
    assert f"4 worker(s): {hours / 4:.2f} h wall clock" in result.output
    assert sorted(os.listdir(isolated_store)) == []


def test_sweep_set_joins_the_study_files_set(isolated_store):
    """`--set` overrides the study file's `set` (here for the plan), and a malformed or
    invalid one is a one-line error."""
    from typer.testing import CliRunner

    from ptxlab.cli import app

    smoke = str(STUDIES / "smoke.yaml")
    result = CliRunner().invoke(app, ["sweep", smoke, "--plan", "--json",
                                      "--set", "train.epochs=3"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["max_epochs"] == 3
    for bad, message in (("trainepochs", "expected KEY=VALUE"),
                         ("train.epochs=0", "set: train.epochs: Input should be greater")):
        result = CliRunner().invoke(app, ["sweep", smoke, "--plan", "--set", bad])
        assert result.exit_code == 2 and message in result.output
        assert len(result.output.strip().splitlines()) == 1


def test_training_and_evaluation_keys_come_from_the_config_schema():
    from ptxlab.config import evaluation_only

    assert all(evaluation_only(k) for k in ("postprocess.objective", "postprocess.rule",
                                            "postprocess.min_area", "model.gate"))
    # per-epoch validation thresholds at postprocess.threshold to choose the best checkpoint
    assert not any(evaluation_only(k) for k in ("postprocess.threshold", "train.batch_size",
                                                "model.classification_head", "seed"))
    spec = load_study_file(STUDIES / "gap.yaml").spec
    assert spec.evaluation_dimensions() == ["postprocess.objective"]
    keys = {spec.training_key(p) for p in spec.configurations()}
    assert len(keys) == 8  # classification (a bundle with a training key) is a training factor
    unshared = spec.model_copy(update={"share_trainings": False})
    assert len({unshared.training_key(p) for p in spec.configurations()}) == 16


@pytest.mark.parametrize(("change", "message"), [
    ({"space": {"optim.lrr": {"type": "categorical", "choices": [1]}}}, "optim.lrr"),
    ({"space": {"optim.lr": {"type": "log_float", "low": 1e-4, "high": 1e-2}}}, "no grid"),
    ({"space": {"optim.lr": {"type": "float", "low": 2, "high": 1}}}, "low 2.0 must be < high"),
    ({"space": {"train.epochs": {"type": "int", "low": 1, "high": 3,
                                 "when": {"augment.preset": "none"}}}}, "not an earlier"),
    ({"hypotheses": [{"name": "h", "compare": {"x": 1}, "against": {"x": 2}}]}, "not dimensions"),
    ({"objective": {"metric": "best_val_iou"}}, "metric 'best_val_iou'"),
    ({"mode": "postprocess", "base": None, "pruner": {"type": "none"}}, "not post-processing"),
])
def test_study_file_errors_name_the_problem(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        load_study_file(write_study(tmp_path, **{"hypotheses": [], **change}))


@pytest.mark.slow
def test_rejoining_with_another_definition_is_refused(isolated_store):
    path = write_study(isolated_store)
    loaded = load_study_file(path)
    url = resolve_storage(None, loaded.spec.name)
    created = open_study(loaded, url)
    joined = open_study(load_study_file(path), url)
    assert joined.parent_run_id == created.parent_run_id
    # the grid's queue, enqueued once by the open that created the study, not again on joining
    assert len(joined.study.get_trials(states=(TrialState.WAITING,))) == 6
    changed = write_study(isolated_store, name=loaded.spec.name, repeats=2)
    with pytest.raises(ValueError, match="another definition"):
        open_study(load_study_file(changed), url)


@pytest.mark.slow
@pytest.mark.service
def test_two_workers_on_postgres_run_the_grid_once(isolated_store, postgres):
    path = write_study(isolated_store)
    name = path.stem
    try:
        result = run_sweep(path, storage=postgres, workers=2)
        assert result.worker_failures == []
        study = load(name, postgres)
        check_complete_grid(study, expected=6)
        assert len({t.user_attrs["worker"] for t in study.trials}) == 2
    finally:
        optuna.delete_study(study_name=name, storage=postgres)


@pytest.mark.slow
def test_two_workers_on_the_local_journal_then_the_report(isolated_store):
    path = write_study(isolated_store)
    result = run_sweep(path, workers=2)
    assert result.worker_failures == []
    journal = isolated_store / "mlruns" / "optuna" / f"{path.stem}.journal"
    study = load(path.stem, str(journal))
    check_complete_grid(study, expected=6)
    assert len({t.user_attrs["worker"] for t in study.trials}) == 2

    report = write_report(str(path), out=isolated_store / "report")
    text = report.markdown.read_text()
    assert f"# Study `{path.stem}`" in text and "## Factors" in text
    assert {p.name for p in report.figures} >= {"factor_optim.lr.png", "history.png"}
    (verdict,) = report.verdicts
    assert verdict.verdict in text and verdict.a and verdict.b
    logged = {a.path for a in MlflowClient().list_artifacts(result.parent_run_id, "report")}
    assert "report/report.md" in logged


@pytest.mark.slow
def test_a_killed_worker_s_trial_is_retried_when_the_command_is_rerun(isolated_store):
    path = write_study(isolated_store, repeats=1, heartbeat={"interval": 1, "grace_period": 6})
    journal = isolated_store / "mlruns" / "optuna" / f"{path.stem}.journal"
    worker = subprocess.Popen([sys.executable, "-m", "ptxlab", "sweep", str(path)],
                              stderr=subprocess.DEVNULL)
    try:
        killed = _wait_for_a_trial_mid_training(path.stem, journal, worker)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    assert load(path.stem, str(journal)).trials[killed].state == TrialState.RUNNING

    result = run_sweep(path)  # the command again

    study = load(path.stem, str(journal))
    runs = {r.info.run_id: r for r in check_complete_grid(study, expected=2)}
    failed = [t for t in study.trials if t.state == TrialState.FAIL]
    assert [t.number for t in failed] == [killed]
    (killed_run,) = [r for r in runs.values()
                     if r.data.tags["optuna.trial_number"] == str(killed)]
    assert killed_run.info.status == "KILLED"
    assert "heartbeats" in killed_run.data.tags["ptxlab.trial_reason"]
    (retry,) = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed]
    assert retry.state == TrialState.COMPLETE and retry.params == study.trials[killed].params
    assert runs[retry.user_attrs["mlflow_run_id"]].data.tags["ptxlab.retry_of_trial"] == str(killed)
    assert (result.counts.complete, result.counts.retried, result.counts.failed) == (2, 1, 0)


def _wait_for_a_trial_mid_training(name: str, journal: Path, worker: subprocess.Popen) -> int:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        assert worker.poll() is None, "the worker ended before it could be killed"
        if journal.is_file():
            try:
                trials = load(name, str(journal)).trials
            except KeyError:  # the study is not created yet
                trials = []
            for trial in trials:
                if trial.state == TrialState.RUNNING and trial.intermediate_values:
                    return trial.number
        time.sleep(0.3)
    raise AssertionError("no trial reached its first epoch in time")


@pytest.mark.slow
def test_pruning_stops_trials_that_fall_behind(isolated_store):
    epochs = 6
    path = write_study(isolated_store, epochs=epochs, repeats=2, pruner={
        "type": "median", "n_startup_trials": 1, "n_warmup_steps": 2})
    run_sweep(path)
    study = load(path.stem, str(isolated_store / "mlruns" / "optuna" / f"{path.stem}.journal"))
    pruned = [t for t in study.trials if t.state == TrialState.PRUNED]
    assert any(t.params["optim.lr"] == 1.0e-7 for t in pruned)
    for trial in study.trials:
        assert sorted(trial.intermediate_values) == list(range(trial.user_attrs["epochs_trained"]))
    assert all(t.user_attrs["epochs_trained"] == epochs for t in study.trials
               if t.state == TrialState.COMPLETE)
    runs = {r.info.run_id: r for r in child_runs(study.user_attrs["mlflow.parent_run_id"])}
    for trial in pruned:  # a trial that trained every epoch counts as complete
        assert trial.user_attrs["epochs_trained"] < epochs
        run = runs[trial.user_attrs["mlflow_run_id"]]
        assert run.data.tags["optuna.state"] == "PRUNED"
        assert run.data.tags["ptxlab.stopped_by"] == "callback"
        assert "pruned after epoch" in run.data.tags["ptxlab.trial_reason"]


def _source_run(*overrides: str):
    config = load_config(None, [*TINY_RUN, "tracking.experiment=maps", "tracking.overlays=0",
                                *overrides])
    return run_experiment(config, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("gate", ["none", "head"])
def test_postprocess_studies_score_stored_maps_without_training(isolated_store, gate):
    head = ["model.classification_head=true", "model.gate=head"] if gate == "head" else []
    source = _source_run(*head)
    client = MlflowClient()
    logged = client.get_run(source.run_id).data.metrics
    chosen = PostProcessing.from_dict(source.postprocess)
    assert chosen.gate == gate
    stored, _ = validation_predictions(source.run_id)
    assert (stored.class_probs is not None) == (gate == "head")  # the head's probabilities

    # The rule the run chose, evaluated by a study, reproduces the run's own results.
    fields = {k: v for k, v in chosen.to_dict().items() if k != "resolution"}
    path = write_study(isolated_store, mode="postprocess", base=None, pruner={"type": "none"},
                       source={"runs": [source.run_id]}, repeats=1, hypotheses=[],
                       space={k: {"type": "categorical", "choices": [v]} for k, v in fields.items()},
                       set={"resolution": chosen.resolution}, experiment="thresholds")
    run_sweep(path)
    journal = isolated_store / "mlruns" / "optuna" / f"{path.stem}.journal"
    (trial,) = load(path.stem, str(journal)).trials
    assert trial.state == TrialState.COMPLETE
    for key in ("pooled_iou", "mean_dice", "auc"):
        assert trial.user_attrs["metrics"][key] == pytest.approx(logged[f"best_val_{key}"], abs=1e-9)
    child = client.get_run(trial.user_attrs["mlflow_run_id"])
    assert "train_loss" not in child.data.metrics  # nothing trained
    assert child.data.tags["ptxlab.source_run"] == source.run_id
    assert not client.list_artifacts(child.info.run_id)


@pytest.mark.slow
def test_a_random_sampler_queues_the_other_repeats_of_a_configuration(isolated_store):
    source = _source_run()
    path = write_study(isolated_store, mode="postprocess", base=None, pruner={"type": "none"},
                       source={"runs": [source.run_id, source.run_id]}, repeats=2, n_trials=6,
                       sampler={"type": "random", "seed": 3}, hypotheses=[], set={},
                       space={"threshold": {"type": "float", "low": 0.1, "high": 0.9}},
                       experiment="thresholds")
    run_sweep(path)
    journal = isolated_store / "mlruns" / "optuna" / f"{path.stem}.journal"
    trials = load(path.stem, str(journal)).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6
    by_threshold: dict[float, list] = {}
    for trial in trials:
        by_threshold.setdefault(trial.params["threshold"], []).append(trial)
    assert len(by_threshold) == 3
    for repeats in by_threshold.values():
        assert sorted(t.user_attrs["repeat"] for t in repeats) == [0, 1]
        assert repeats[0].value == repeats[1].value  # the same maps twice


# --- evaluation-only factors: one training per (training configuration, repeat) --------------

# A training factor (the learning rate) crossed with an evaluation-only one (what the
# post-processing search optimises): 4 configurations, 2 trainings per repeat.
LR_X_OBJECTIVE = {**LR_ONLY, "postprocess.objective": {"type": "categorical",
                                                       "choices": ["pooled_iou", "mean_dice"]}}


def trainings_and_arms(parent_run_id: str) -> tuple[list, list]:
    """The study's child runs that trained (FINISHED ones) and those that scored maps."""
    runs = child_runs(parent_run_id)
    trained = [r for r in runs if r.data.tags.get("ptxlab.trial_role") == "train"
               and r.info.status == "FINISHED"]
    scored = [r for r in runs if r.data.tags.get("ptxlab.trial_role") == "score"]
    return trained, scored


def check_arms_score_their_training(study: optuna.Study) -> None:
    """Each training configuration and repeat trained once (counted from MLflow); every arm
    scored the maps of the training of its own learning rate and repeat, and logged no model."""
    trained, scored = trainings_and_arms(study.user_attrs["mlflow.parent_run_id"])
    keys = [(r.data.params["optim.lr"], r.data.tags["ptxlab.repeat"]) for r in trained]
    assert len(keys) == len(set(keys)) == len({(t.params["optim.lr"], t.user_attrs["repeat"])
                                               for t in study.trials})
    by_id = {r.info.run_id: r for r in trained}
    for arm in scored:
        training = by_id[arm.data.tags["ptxlab.training_run"]]
        for key in ("optim.lr", "seed", "data.split_seed"):
            assert arm.data.params[key] == training.data.params[key]
        assert arm.data.params["postprocess.objective"] != training.data.params[
            "postprocess.objective"]
        assert models(arm) == ["model/postprocess.json"]  # its own chosen rule, no weights
        assert "best_val_pooled_iou" in arm.data.metrics
    assert all("model/best.pt" in models(r) for r in trained)


def models(run) -> list[str]:
    return sorted(a.path for a in MlflowClient().list_artifacts(run.info.run_id, "model"))


@pytest.mark.slow
def test_evaluation_only_factors_score_one_training_s_maps(isolated_store):
    path = write_study(isolated_store, repeats=2, space=LR_X_OBJECTIVE, hypotheses=[
        {"name": "searching for Dice raises Dice", "metric": "mean_dice",
         "compare": {"postprocess.objective": "mean_dice"},
         "against": {"postprocess.objective": "pooled_iou"}}])
    result = run_sweep(path, workers=2)
    assert result.worker_failures == []
    study = load(path.stem, str(isolated_store / "mlruns" / "optuna" / f"{path.stem}.journal"))
    check_complete_grid(study, expected=8)
    check_arms_score_their_training(study)
    trained, scored = trainings_and_arms(result.parent_run_id)
    assert (len(trained), len(scored)) == (4, 4)  # 2 LRs x 2 repeats trained, 4 arms scored
    for arm in (t for t in study.trials if t.user_attrs["ptxlab.role"] == "score"):
        training = study.trials[arm.user_attrs["training_trial"]]
        assert arm.intermediate_values == training.intermediate_values
        assert arm.user_attrs["seed"] == training.user_attrs["seed"]

    report = write_report(str(path), out=isolated_store / "report")
    text = report.markdown.read_text()
    assert "### postprocess.objective" in text and "### optim.lr" in text
    (verdict,) = report.verdicts
    assert verdict.images is not None and "- image bootstrap (validation images" in text
    assert {p.name for p in report.figures} >= {"factor_postprocess.objective.png"}


@pytest.mark.slow
def test_a_training_killed_mid_way_loses_no_arm(isolated_store):
    path = write_study(isolated_store, repeats=1, space=LR_X_OBJECTIVE,
                       heartbeat={"interval": 1, "grace_period": 6})
    journal = isolated_store / "mlruns" / "optuna" / f"{path.stem}.journal"
    worker = subprocess.Popen([sys.executable, "-m", "ptxlab", "sweep", str(path)],
                              stderr=subprocess.DEVNULL)
    try:
        killed = _wait_for_a_trial_mid_training(path.stem, journal, worker)
    finally:
        worker.send_signal(signal.SIGKILL)
        worker.wait()
    study = load(path.stem, str(journal))
    victim = study.trials[killed]
    assert victim.user_attrs["ptxlab.role"] == "train"
    (arm,) = [t for t in study.trials if t.user_attrs["ptxlab.role"] == "score"
              and t.user_attrs["ptxlab.training"] == victim.user_attrs["ptxlab.training"]]
    assert arm.state == TrialState.WAITING  # queued until its training's maps exist

    result = run_sweep(path)  # the command again

    study = load(path.stem, str(journal))
    check_complete_grid(study, expected=4)
    check_arms_score_their_training(study)
    assert (result.counts.complete, result.counts.retried, result.counts.failed) == (4, 1, 0)
    (retry,) = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed]
    arm = study.trials[arm.number]
    assert arm.state == TrialState.COMPLETE and arm.user_attrs["training_trial"] == retry.number


@pytest.mark.slow
def test_a_random_sampler_shares_trainings_between_sampled_configurations(isolated_store):
    path = write_study(isolated_store, repeats=1, n_trials=5, space=LR_X_OBJECTIVE,
                       sampler={"type": "random", "seed": 1}, hypotheses=[])
    run_sweep(path)
    study = load(path.stem, str(isolated_store / "mlruns" / "optuna" / f"{path.stem}.journal"))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 5
    trained, scored = trainings_and_arms(study.user_attrs["mlflow.parent_run_id"])
    assert len(trained) == len({t.params["optim.lr"] for t in study.trials}) == 2
    assert len(scored) == 3
    lr_of = {r.info.run_id: r.data.params["optim.lr"] for r in trained}
    assert all(lr_of[r.data.tags["ptxlab.training_run"]] == r.data.params["optim.lr"]
               for r in scored)
