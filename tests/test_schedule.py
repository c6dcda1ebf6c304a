"""Batch sizes that can be compared: LR scaling, accumulation, epoch- or step-defined schedules."""

import math

import pytest
import torch

from ptxlab.config import load_config
from ptxlab.experiment import prepare_data
from ptxlab.model import build_model
from ptxlab.train import (
    TrainingCallbacks,
    _cosine,
    effective_lr,
    plan_steps,
    seed_everything,
    train,
)
from tests.conftest import TINY_RUN


@pytest.mark.parametrize(
    ("scaling", "batch", "accumulate", "expected"),
    [("none", 4, 1, 1e-3), ("linear", 4, 1, 0.25e-3), ("linear", 4, 4, 1e-3),
     ("sqrt", 4, 1, 0.5e-3), ("sqrt", 64, 1, 2e-3)],
)
def test_lr_scales_with_the_effective_batch(scaling, batch, accumulate, expected):
    config = load_config(None, [f"optim.lr_scaling={scaling}", f"train.batch_size={batch}",
                                f"train.accumulate={accumulate}", "optim.reference_batch=16",
                                "optim.lr=1e-3"])
    assert effective_lr(config) == pytest.approx(expected)


def test_schedule_by_epochs_or_by_updates():
    by_epochs = load_config(None, ["train.epochs=10", "train.accumulate=2"])
    assert plan_steps(by_epochs, batches_per_epoch=9) == (10, 50)  # ceil(9 / 2) updates/epoch
    by_steps = load_config(None, ["train.max_steps=100", "train.accumulate=1"])
    assert plan_steps(by_steps, batches_per_epoch=8) == (13, 100)


def test_cosine_decays_from_lr_to_lr_min():
    assert _cosine(0, 100, 1e-3, 1e-5) == pytest.approx(1e-3)
    assert _cosine(50, 100, 1e-3, 1e-5) == pytest.approx((1e-3 + 1e-5) / 2)
    assert _cosine(100, 100, 1e-3, 1e-5) == pytest.approx(1e-5)


@pytest.mark.slow
def test_fixed_updates_stop_at_max_steps_with_accumulation(isolated_store):
    config = load_config(None, TINY_RUN + ["train.max_steps=5", "train.accumulate=2",
                                           "train.early_stopping_patience=0"])
    data = prepare_data(config, progress=False)
    result = train(config, data.train, data.val, isolated_store / "work")
    state = torch.load(result.last_checkpoint, weights_only=False)["state"]
    batches = len(data.train) // config.train.batch_size
    assert state["global_step"] == 5
    assert len(result.history) == math.ceil(5 / math.ceil(batches / 2))
    # the last update used the cosine value of step 4 of 5 (steps are 0-based)
    assert result.history[-1]["lr"] == pytest.approx(_cosine(4, 5, config.optim.lr,
                                                              config.optim.lr_min))
    assert result.stopped_by == "max_steps"


@pytest.mark.slow
def test_frozen_encoder_stays_put_for_its_epochs_then_trains(isolated_store):
    config = load_config(None, TINY_RUN + ["model.freeze_encoder_epochs=1",
                                           "train.early_stopping_patience=0"])
    seed_everything(config.seed)
    initial, _ = build_model(config.model)  # train() builds the same network from the seed
    snapshots = {}

    class Snapshot(TrainingCallbacks):
        def on_checkpoint(self, epoch, path, is_best):
            if not is_best:
                snapshots[epoch] = torch.load(path, weights_only=False)["model"]

    data = prepare_data(config, progress=False)
    train(config, data.train, data.val, isolated_store / "work", Snapshot())
    names = [name for name, _ in initial.encoder.named_parameters()]
    start = {f"encoder.{n}": p for n, p in initial.encoder.named_parameters()}
    assert all(torch.equal(snapshots[0][f"encoder.{n}"], start[f"encoder.{n}"]) for n in names)
    assert any(not torch.equal(snapshots[1][f"encoder.{n}"], start[f"encoder.{n}"])
               for n in names)
    decoder = [k for k in snapshots[0] if k.startswith("decoder.") and k.endswith("weight")]
    assert any(not torch.equal(snapshots[0][k], initial.state_dict()[k]) for k in decoder)
    # smp's freeze_encoder also stops the encoder's BatchNorm statistics; unfreezing restarts them
    statistics = [k for k in snapshots[0] if k.startswith("encoder.") and "running_" in k]
    assert statistics
    assert all(torch.equal(snapshots[0][k], initial.state_dict()[k]) for k in statistics)
    assert any(not torch.equal(snapshots[1][k], initial.state_dict()[k]) for k in statistics)
