"""A run killed with SIGKILL mid-epoch resumes into the same MLflow run and ends as if whole."""

import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import TINY_RUN, wait_for_epochs

EPOCHS = 4
OVERRIDES = [*TINY_RUN, f"train.epochs={EPOCHS}", "train.early_stopping_patience=0",
             "tracking.system_metrics=false"]


def _ptxlab(*args: str, env: dict) -> subprocess.Popen:
    command = [sys.executable, "-m", "ptxlab", *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _run_args(experiment: str) -> list[str]:
    args = ["run", "--set", f"tracking.experiment={experiment}"]
    for override in OVERRIDES:
        args += ["--set", override]
    return args


def _epoch_metrics(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    return {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
            for key in ("train_loss", "val_loss", "val_iou")}


@pytest.mark.slow
def test_killed_run_resumes_to_the_uninterrupted_result(isolated_store):
    env = {**os.environ}
    whole = _ptxlab(*_run_args("whole"), env=env)
    output = whole.communicate(timeout=600)[0]
    assert whole.returncode == 0, output

    killed = _ptxlab(*_run_args("killed"), env=env)
    client = MlflowClient()
    run_id, _, epochs_done = wait_for_epochs(isolated_store, "killed", 2, killed, timeout=600)
    assert epochs_done == 2 and killed.poll() is None, "the run was not caught mid-training"
    time.sleep(1.0)  # into the next epoch
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert client.get_run(run_id).info.status == "RUNNING"  # nobody closed it

    resumed = _ptxlab("run", "--resume", run_id, env=env)
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output
    assert f"run id: {run_id}" in output

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    [whole_run] = client.search_runs([client.get_experiment_by_name("whole").experiment_id])
    resumed_metrics = _epoch_metrics(client, run_id)
    whole_metrics = _epoch_metrics(client, whole_run.info.run_id)
    for key, history in resumed_metrics.items():
        steps = [step for step, _ in history]
        assert steps == list(range(EPOCHS)), f"{key} logged steps {steps}"
        for (_, got), (_, want) in zip(history, whole_metrics[key], strict=True):
            assert got == pytest.approx(want, rel=1e-4, abs=1e-5), key
    assert run.data.metrics["best_val_pooled_iou"] == pytest.approx(
        whole_run.data.metrics["best_val_pooled_iou"], rel=1e-4, abs=1e-5)


@pytest.mark.slow
def test_resume_refuses_a_new_config(isolated_store):
    result = subprocess.run([sys.executable, "-m", "ptxlab", "run", "--resume", "abc",
                             "--set", "train.epochs=3"], capture_output=True, text=True)
    assert result.returncode == 2
    assert "--resume continues a run with its own logged config" in result.stderr
