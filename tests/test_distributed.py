"""`ptxlab run --nproc 2` on the CPU (gloo): rank 0 alone logs one complete run."""

import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient

from ptxlab.data.dataset import GlobalBatchSampler
from tests.conftest import TINY_RUN


def test_ranks_share_each_global_batch_exactly():
    single = list(GlobalBatchSampler(10, 4, drop_last=False))
    shards = [GlobalBatchSampler(10, 4, rank=r, world=2, drop_last=False) for r in (0, 1)]
    for sampler in [*shards]:
        sampler.set_seed(0)
    for batch, (first, second) in zip(single, zip(*shards, strict=True), strict=True):
        assert sorted(first + second) == sorted(batch)
    assert len(single) == len(shards[0]) == 3
    with pytest.raises(ValueError, match="must divide over 3 processes"):
        GlobalBatchSampler(10, 4, world=3)


@pytest.mark.slow
def test_two_cpu_processes_train_one_logged_run(isolated_store):
    overrides = [arg for o in TINY_RUN + ["tracking.overlays=0"] for arg in ("--set", o)]
    runs = {}
    for name, extra in (("single", []), ("ddp", ["--nproc", "2"])):
        result = subprocess.run(
            [sys.executable, "-m", "ptxlab", "run", *overrides, "--set",
             f"tracking.experiment={name}", *extra], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.count("run id: ") == 1  # rank 1 prints nothing
        runs[name] = result.stdout.split("run id: ")[1].split()[0]

    client = MlflowClient()
    [ddp_run] = client.search_runs([client.get_experiment_by_name("ddp").experiment_id])
    assert ddp_run.info.run_id == runs["ddp"] and ddp_run.info.status == "FINISHED"
    assert ddp_run.data.tags["ptxlab.processes"] == "2"
    for key in ("train_loss", "val_loss", "val_iou"):
        assert [m.step for m in client.get_metric_history(runs["ddp"], key)] == [0, 1]
    # Same global batch, same samples per step. Per-rank BatchNorm statistics (SyncBatchNorm
    # exists on GPUs only) and a batch Dice over each rank's shard make training differ
    # slightly; the validation loss of the two models stays close.
    for step in (0, 1):
        single = client.get_metric_history(runs["single"], "val_loss")[step].value
        ddp = client.get_metric_history(runs["ddp"], "val_loss")[step].value
        assert ddp == pytest.approx(single, rel=0.05)
    assert torch.distributed.is_available()
