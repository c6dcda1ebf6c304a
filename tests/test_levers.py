"""The winners' levers: positive-fraction sampling, training in phases, top-k weight averaging."""

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from ptxlab import top_k
from ptxlab.config import ConfigError, load_config
from ptxlab.data.dataset import GlobalBatchSampler
from ptxlab.experiment import prepare_data
from ptxlab.sweep.study_file import build_config, load_study_file
from ptxlab.train import load_checkpoint, phase_configs, positive_fraction_at, train
from tests.conftest import TINY_RUN, wait_for_epochs


def test_positive_fraction_schedule_is_linear_over_the_epochs():
    assert positive_fraction_at(None, 3, 10) is None
    assert positive_fraction_at(0.5, 3, 10) == 0.5
    assert [positive_fraction_at((0.8, 0.4), e, 5) for e in range(5)] == pytest.approx(
        [0.8, 0.7, 0.6, 0.5, 0.4])


def test_sampler_draws_the_positive_share_each_epoch_within_binomial_tolerance():
    labels = np.arange(300) % 5 == 0  # 20 % positive: 60 positives, 240 negatives
    sampler = GlobalBatchSampler(300, 10, positives=labels)
    for epoch, fraction in enumerate([0.8, 0.6, 0.4, 0.2, 0.05]):
        sampler.set_seed(1000 + epoch)
        sampler.set_positive_fraction(fraction)
        drawn = [index for batch in sampler for index in batch]
        assert len(drawn) == 300
        share = labels[drawn].mean()
        assert abs(share - fraction) <= 3 * math.sqrt(fraction * (1 - fraction) / 300)
        positives = {i for i in drawn if labels[i]}
        if fraction * 300 >= 60:  # more draws than positives: every positive, with repeats
            assert positives == set(np.flatnonzero(labels).tolist())
        else:
            assert len(positives) == sum(labels[drawn])  # no repeats while the pool lasts
    sampler.set_positive_fraction(None)
    assert sorted(i for batch in sampler for i in batch) == list(range(300))


def test_positive_fraction_sampling_shares_each_global_batch_over_ranks():
    labels = np.arange(40) % 4 == 0
    single = GlobalBatchSampler(40, 8, positives=labels)
    ranks = [GlobalBatchSampler(40, 8, rank=r, world=2, positives=labels) for r in (0, 1)]
    for sampler in (single, *ranks):
        sampler.set_seed(7)
        sampler.set_positive_fraction(0.5)
    for whole, first, second in zip(single, *ranks, strict=True):
        assert sorted(whole) == sorted(first + second)


def test_phase_configs_take_each_phases_size_epochs_batch_freezing_and_lr():
    config = load_config(None, TINY_RUN + [
        "train.phases=[{image_size: 32, epochs: 2, lr: 0.01}, "
        "{image_size: 64, epochs: 3, batch_size: 2, freeze_encoder_epochs: 1}]"])
    first, second = phase_configs(config)
    assert (first.data.image_size, first.train.epochs, first.train.batch_size,
            first.optim.lr) == (32, 2, 4, 0.01)
    assert (second.data.image_size, second.train.epochs, second.train.batch_size,
            second.model.freeze_encoder_epochs, second.optim.lr) == (64, 3, 2, 1, config.optim.lr)
    with pytest.raises(ConfigError, match="must equal data.image_size=64"):
        load_config(None, TINY_RUN + ["train.phases=[{image_size: 32, epochs: 2}]"])


def test_top_k_ranking_keeps_the_k_best_epochs():
    ranking: list[list[float]] = []
    kept = [top_k.keep(ranking, score, epoch, 2)
            for epoch, score in enumerate([0.1, 0.3, 0.2, 0.05, 0.3])]
    assert kept == [True, True, True, False, True]
    assert ranking == [[0.3, 1], [0.3, 4]]


def test_top_k_average_is_the_mean_of_the_saved_weights(tmp_path):
    weights = [{"w": torch.randn(3, 4), "bn.running_mean": torch.randn(4),
                "bn.num_batches_tracked": torch.tensor(epoch * 10)} for epoch in range(3)]
    paths = []
    for epoch, state in enumerate(weights):
        torch.save({"model": state}, top_k.path(tmp_path, epoch))
        paths.append(top_k.path(tmp_path, epoch))
    averaged = top_k.average(paths)
    torch.testing.assert_close(averaged["w"], torch.stack([w["w"] for w in weights]).mean(0))
    torch.testing.assert_close(averaged["bn.running_mean"],
                               torch.stack([w["bn.running_mean"] for w in weights]).mean(0))
    assert averaged["bn.num_batches_tracked"] == 0  # counters: the best (first) checkpoint's


@pytest.mark.slow
def test_a_run_averages_its_top_k_epochs_and_logs_both_scores(isolated_store):
    config = load_config(None, TINY_RUN + ["train.epochs=3", "train.average_top_k=2",
                                           "train.early_stopping_patience=0",
                                           "data.positive_fraction=[0.9, 0.3]"])
    data = prepare_data(config, progress=False)
    workdir = isolated_store / "work"
    result = train(config, data.train, data.val, workdir)
    ranked = sorted(result.history, key=lambda m: (-m["val_iou"], m["epoch"]))[:2]
    files = sorted(p.name for p in (workdir / top_k.FOLDER).glob("*.pt"))
    assert files == sorted(f"epoch-{m['epoch']}.pt" for m in ranked)
    assert set(result.averaged) == {"top_k_average_val_iou", "best_epoch_val_iou",
                                    "top_k_average_used"}
    assert result.averaged["best_epoch_val_iou"] == ranked[0]["val_iou"]
    best = load_checkpoint(result.best_checkpoint)
    if result.averaged["top_k_average_used"]:
        mean = top_k.average([top_k.path(workdir, m["epoch"]) for m in ranked])
        for name, value in mean.items():
            torch.testing.assert_close(best["model"][name], value)
    else:
        assert best["epoch"] == ranked[0]["epoch"] and "averaged_epochs" not in best
    shares = [m["train_positive_fraction"] for m in result.history]
    assert shares[0] > shares[-1]  # 0.9 -> 0.3 over the epochs (of ~20 training images)


PHASES = "train.phases=[{image_size: 32, epochs: 2}, {image_size: 64, epochs: 2, " \
         "freeze_encoder_epochs: 1, lr: 0.0005}]"


def _run(experiment: str, *extra: str) -> subprocess.Popen:
    args = ["run", "--set", f"tracking.experiment={experiment}", "--set", PHASES]
    for override in [*TINY_RUN, "train.early_stopping_patience=0", *extra]:
        args += ["--set", override]
    return subprocess.Popen([sys.executable, "-m", "ptxlab", *args], env={**os.environ},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_phase_run_changes_resolution_and_resumes_after_sigkill_in_phase_two(
        isolated_store):
    whole = _run("whole")
    output = whole.communicate(timeout=900)[0]
    assert whole.returncode == 0, output

    killed = _run("killed")
    client = MlflowClient()
    run_id, last, epochs_done = wait_for_epochs(isolated_store, "killed", 3, killed,
                                                timeout=900)
    assert epochs_done == 3 and killed.poll() is None, "the run was not caught in phase 2"
    state = torch.load(last, weights_only=False)["state"]
    assert state["phase"] == 1
    killed.send_signal(signal.SIGKILL)
    killed.wait()

    resumed = subprocess.run([sys.executable, "-m", "ptxlab", "run", "--resume", run_id],
                             capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    [whole_run] = client.search_runs([client.get_experiment_by_name("whole").experiment_id])
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["ptxlab.image_size"] == "64" and run.data.tags["ptxlab.phase"] == "2/2"
    for key in ("train_loss", "val_loss", "val_iou", "lr"):
        got = [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
        want = [(m.step, m.value) for m in client.get_metric_history(whole_run.info.run_id, key)]
        assert [step for step, _ in got] == [0, 1, 2, 3], key
        assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-4, abs=1e-5), key
    lr = [m.value for m in client.get_metric_history(run_id, "lr")]
    assert lr[2] > lr[1]  # the schedule restarted at phase 2 (its own peak, 5e-4)
    assert run.data.metrics["best_val_pooled_iou"] == pytest.approx(
        whole_run.data.metrics["best_val_pooled_iou"], rel=1e-4, abs=1e-5)


def test_the_resolution_and_winners_studies_load_and_resolve_their_levers():
    studies = Path(__file__).parents[1] / "experiments" / "studies"
    resolution = load_study_file(studies / "resolution.yaml")
    configs = {params["resolution"]: build_config(resolution.base_config,
                                                  resolution.spec.overrides_for(params), "test")
               for params in resolution.spec.configurations()}
    assert configs["512"].train.phases is None and configs["512"].data.image_size == 512
    uptrain = phase_configs(configs["512-then-1024"])
    assert [c.data.image_size for c in uptrain] == [512, 1024]
    assert uptrain[1].model.freeze_encoder_epochs == 2
    winners = load_study_file(studies / "winners.yaml")
    assert winners.spec.evaluation_dimensions() == ["postprocessing"]
    levers = {params["lever"]: build_config(winners.base_config,
                                            winners.spec.overrides_for(params), "test")
              for params in winners.spec.configurations()}
    assert levers["paper"].data.positive_fraction is None and levers["paper"].train.average_top_k \
        is None and not levers["paper"].model.classification_head
    assert levers["winners"].data.positive_fraction == (0.8, 0.4)
    assert levers["winners"].train.average_top_k == 3
    for study in (resolution, winners):  # every arm starts from the study's protocol
        assert study.base_config["augment"]["order"] == "source-first"
