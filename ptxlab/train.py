"""The training loop: AMP, cosine schedule per optimizer step, early stopping, checkpoints, resume.

It knows nothing of MLflow or Optuna: progress leaves through `TrainingCallbacks`, which the
tracking and sweep layers implement (and through which a pruner can stop a trial).

`train` reads as its steps: set up, then per epoch start it, train it, validate, record the
decision (best so far? early stop?), checkpoint and report. The steps share one `Training`.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ptxlab import distributed
from ptxlab.atomic import save_torch
from ptxlab.config import Config
from ptxlab.data.dataset import GlobalBatchSampler, SegmentationDataset
from ptxlab.losses import SegmentationLoss
from ptxlab.metrics import MetricAccumulator, image_scores
from ptxlab.model import build_model, split_output
from ptxlab.postprocess import foreground

MONITOR = "val_iou"


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training cannot continue meaningfully."""


class StopTraining(Exception):
    """Raised by a callback (e.g. an Optuna pruner) to end training early."""


class TrainingCallbacks:
    """Hooks the training loop calls; the default does nothing."""

    def on_train_start(self, info: dict) -> None:
        """Static facts about the run: device, weights, sizes, steps."""

    def on_batch_end(self, epoch: int, batch: int, batches: int, loss: float,
                     images_per_s: float) -> None:
        """After training batch `batch` (0-based) of `batches`; loss and rate so far this epoch."""

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        """After validation of `epoch` (0-based). May raise StopTraining."""

    def on_checkpoint(self, epoch: int, path: Path, is_best: bool) -> None:
        """A checkpoint was written atomically to `path`."""


@dataclass
class TrainResult:
    best_epoch: int
    history: list[dict[str, float]]
    best_checkpoint: Path
    last_checkpoint: Path
    stopped_by: str  # "epochs" | "max_steps" | "early_stopping" | "callback"


@dataclass
class TrainState:
    """Everything a resumed run needs besides the weights."""

    epoch: int = 0  # next epoch to run
    global_step: int = 0
    best_score: float = -math.inf
    best_epoch: int = -1
    epochs_without_improvement: int = 0
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class Training:
    """One training run's moving parts, built by `_set_up` and shared by every step."""

    config: Config
    ranks: distributed.Ranks
    device: torch.device
    model: nn.Module
    weights_note: str
    criterion: SegmentationLoss  # across ranks under torchrun
    val_criterion: SegmentationLoss  # rank 0 validates alone
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    amp: bool
    autocast: Callable[[], AbstractContextManager]
    lr: float  # the cosine schedule's peak
    train_set: SegmentationDataset
    sampler: GlobalBatchSampler
    train_loader: DataLoader
    val_loader: DataLoader
    batches_per_epoch: int
    epochs: int
    total_steps: int
    callbacks: TrainingCallbacks
    best_path: Path
    last_path: Path
    state: TrainState = field(default_factory=TrainState)
    forward: Callable | None = None  # what trains `model`; rebuilt when freezing changes
    frozen: bool | None = None


def select_device(choice: str, local_rank: int = 0) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is available")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def epoch_seed(seed: int, epoch: int) -> int:
    """All randomness of an epoch derives from (seed, epoch), so resuming needs no RNG dump."""
    return int(np.random.SeedSequence([seed, epoch, 7]).generate_state(1)[0])


def effective_lr(config: Config) -> float:
    """Base LR scaled for the effective batch relative to `optim.reference_batch`."""
    ratio = config.train.batch_size * config.train.accumulate / config.optim.reference_batch
    scale = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[config.optim.lr_scaling]
    return config.optim.lr * scale


def plan_steps(config: Config, batches_per_epoch: int) -> tuple[int, int]:
    """(epochs to run, total optimizer steps) for an epoch- or step-defined schedule."""
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / config.train.accumulate))
    if config.train.max_steps is not None:
        return math.ceil(config.train.max_steps / steps_per_epoch), config.train.max_steps
    return config.train.epochs, config.train.epochs * steps_per_epoch


def _cosine(step: int, total: int, lr: float, lr_min: float) -> float:
    progress = min(step / max(1, total), 1.0)
    return lr_min + 0.5 * (lr - lr_min) * (1.0 + math.cos(math.pi * progress))


def load_checkpoint(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def train(
    config: Config,
    train_set: SegmentationDataset,
    val_set: SegmentationDataset,
    workdir: Path,
    callbacks: TrainingCallbacks | None = None,
    resume_from: Path | None = None,
) -> TrainResult:
    """Train `config` on the two datasets, writing best.pt and last.pt into `workdir`.

    Under torchrun every rank calls this; rank 0 validates, decides, checkpoints and calls
    the callbacks, and tells the other ranks what it decided.
    """
    run = _set_up(config, train_set, val_set, workdir, callbacks, resume_from)
    run.callbacks.on_train_start(_start_facts(run))
    stopped_by = "max_steps" if config.train.max_steps is not None else "epochs"
    for epoch in range(run.state.epoch, run.epochs):
        if run.state.global_step >= run.total_steps:
            break
        _start_epoch(run, epoch)
        metrics = _train_epoch(run, epoch)
        metrics = _validate(run, metrics)
        improved = _record(run.state, epoch, metrics)
        stop = _checkpoint_and_report(run, metrics, improved)
        if stop:
            stopped_by = stop
            break
    state = run.state
    return TrainResult(state.best_epoch, state.history, run.best_path, run.last_path, stopped_by)


# --- set up -----------------------------------------------------------------------------------


def _set_up(config: Config, train_set: SegmentationDataset, val_set: SegmentationDataset,
            workdir: Path, callbacks: TrainingCallbacks | None,
            resume_from: Path | None) -> Training:
    """Device, seeded model, loss, optimizer, loaders and schedule; the checkpoint if resuming."""
    ranks = distributed.current()
    workdir.mkdir(parents=True, exist_ok=True)
    device = select_device(config.train.device, ranks.local_rank)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    seed_everything(config.seed)
    model, weights_note = build_model(config.model, load_weights=resume_from is None)
    if ranks.distributed:
        model = distributed.synchronize_batch_norm(model, device)
    model.to(device)
    lr = effective_lr(config)
    use_amp = config.train.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if config.train.amp_dtype == "bf16" else torch.float16
    sampler, train_loader, val_loader = _loaders(config, train_set, val_set, ranks, device)
    batches_per_epoch = len(train_loader)
    if config.train.max_train_batches:
        batches_per_epoch = min(batches_per_epoch, config.train.max_train_batches)
    epochs, total_steps = plan_steps(config, batches_per_epoch)
    run = Training(
        config=config, ranks=ranks, device=device, model=model, weights_note=weights_note,
        criterion=SegmentationLoss(config.loss, across_ranks=ranks.distributed),
        val_criterion=SegmentationLoss(config.loss),
        optimizer=torch.optim.Adam(model.parameters(), lr=lr,
                                   weight_decay=config.optim.weight_decay),
        scaler=torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16),
        amp=use_amp,
        autocast=(lambda: torch.autocast("cuda", dtype=amp_dtype)) if use_amp else nullcontext,
        lr=lr, train_set=train_set, sampler=sampler, train_loader=train_loader,
        val_loader=val_loader, batches_per_epoch=batches_per_epoch, epochs=epochs,
        total_steps=total_steps,
        callbacks=callbacks if ranks.is_main and callbacks else TrainingCallbacks(),
        best_path=workdir / "best.pt", last_path=workdir / "last.pt",
    )
    if resume_from is not None:
        _resume(run, load_checkpoint(resume_from))
    return run


def _loaders(config: Config, train_set: SegmentationDataset, val_set: SegmentationDataset,
             ranks: distributed.Ranks, device: torch.device
             ) -> tuple[GlobalBatchSampler, DataLoader, DataLoader]:
    """The seeded training batch sampler (this rank's share) and both loaders."""
    batch_size = config.train.batch_size
    loader_args = dict(num_workers=config.data.num_workers, pin_memory=device.type == "cuda")
    sampler = GlobalBatchSampler(len(train_set), batch_size, ranks.rank, ranks.world,
                                 drop_last=len(train_set) >= 2 * batch_size)
    train_loader = DataLoader(train_set, batch_sampler=sampler, **loader_args)
    val_loader = DataLoader(val_set, batch_size=batch_size, **loader_args)
    return sampler, train_loader, val_loader


def _resume(run: Training, checkpoint: dict) -> None:
    """Continue from a last.pt: weights, optimizer, scaler and the loop's state."""
    run.model.load_state_dict(checkpoint["model"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scaler.load_state_dict(checkpoint["scaler"])
    run.state = TrainState(**checkpoint["state"])
    run.weights_note = f"resumed from epoch {run.state.epoch}"


def _start_facts(run: Training) -> dict:
    """What `on_train_start` reports: static facts about the run."""
    return {
        "device": str(run.device), "amp": run.amp,
        "encoder_weights_loaded": run.weights_note, "lr_effective": run.lr,
        "epochs_planned": run.epochs, "optimizer_steps_planned": run.total_steps,
        "train_images": len(run.train_set), "val_images": len(run.val_loader.dataset),
        "batches_per_epoch": run.batches_per_epoch, "start_epoch": run.state.epoch,
        "processes": run.ranks.world,
    }


# --- one epoch --------------------------------------------------------------------------------


def _start_epoch(run: Training, epoch: int) -> None:
    """Seed the epoch's randomness from (seed, epoch); freeze or unfreeze the encoder.

    Freezing is smp's own: encoder parameters stop requiring gradients and its normalisation
    layers stop updating their running statistics until `unfreeze_encoder`.
    """
    seed = epoch_seed(run.config.seed, epoch)
    torch.manual_seed(seed + run.ranks.rank)
    run.sampler.set_seed(seed)
    run.train_set.set_epoch(epoch)
    freeze = epoch < run.config.model.freeze_encoder_epochs
    if freeze != run.frozen:
        if freeze:
            run.model.freeze_encoder()
        else:
            run.model.unfreeze_encoder()
        run.forward, run.frozen = _forward_for(run.model, run.config, run.ranks, run.device), freeze


def _forward_for(model: nn.Module, config: Config, ranks: distributed.Ranks,
                 device: torch.device) -> Callable:
    """The callable that trains `model`: DDP-wrapped under torchrun, compiled if configured.

    DDP registers the parameters that require gradients when it is built, so it is built
    again whenever encoder freezing changes that set.
    """
    forward = model
    if ranks.distributed:
        forward = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if config.model.compile:
        forward = torch.compile(forward)
    return forward


def _train_epoch(run: Training, epoch: int) -> dict[str, float]:
    """One pass over the training loader: mean loss and its terms, images/s and the LR.
    Progress leaves through `on_batch_end` after every batch.

    The terms are named train_loss, train_bce, train_dice (and train_classification); under
    torchrun they are means over all ranks' images and images/s is the global rate.
    """
    run.model.train()
    sums: dict[str, float] = {}
    n_images, started = 0, time.perf_counter()
    run.optimizer.zero_grad(set_to_none=True)
    for batch_index, (images, masks, _) in enumerate(run.train_loader):
        if batch_index >= run.batches_per_epoch or run.state.global_step >= run.total_steps:
            break
        loss, terms = _train_step(run, batch_index, images, masks)
        n_images += images.shape[0]
        for name, value in {"loss": loss, **terms}.items():
            sums[f"train_{name}"] = sums.get(f"train_{name}", 0.0) + value.item() * len(images)
        run.callbacks.on_batch_end(epoch, batch_index, run.batches_per_epoch,
                                   sums["train_loss"] / n_images,
                                   n_images / (time.perf_counter() - started))
    elapsed = time.perf_counter() - started
    names = sorted(sums)
    *totals, n_images = distributed.sum_across([sums[n] for n in names] + [n_images], run.ranks)
    means = {name: total / max(n_images, 1) for name, total in zip(names, totals, strict=True)}
    return {**means, "images_per_s": n_images / elapsed,
            "lr": run.optimizer.param_groups[0]["lr"]}


def _train_step(run: Training, batch_index: int, images: torch.Tensor, masks: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward and backward one batch; step the optimizer at the end of each accumulation."""
    images = images.to(run.device, non_blocking=True)
    masks = masks.to(run.device, non_blocking=True)
    inputs = run.model.normalize_input(images)
    if run.config.model.channels_last:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    with run.autocast():
        output = split_output(run.forward(inputs))
        loss, terms = run.criterion(output, masks)
    if not torch.isfinite(loss):
        raise NonFiniteLossError(f"loss is {loss.item()} at optimizer step "
                                 f"{run.state.global_step}")
    accumulate = run.config.train.accumulate
    run.scaler.scale(loss / accumulate).backward()
    last_of_epoch = batch_index + 1 == run.batches_per_epoch
    if (batch_index + 1) % accumulate == 0 or last_of_epoch:
        for group in run.optimizer.param_groups:
            group["lr"] = _cosine(run.state.global_step, run.total_steps, run.lr,
                                  run.config.optim.lr_min)
        run.scaler.step(run.optimizer)
        run.scaler.update()
        run.optimizer.zero_grad(set_to_none=True)
        run.state.global_step += 1
    return loss, terms


# --- validate, decide, checkpoint -------------------------------------------------------------


def _validate(run: Training, metrics: dict[str, float]) -> dict[str, float]:
    """Rank 0 adds the validation metrics to the epoch's; every rank gets the result."""
    if run.ranks.is_main:
        metrics = {**metrics, **evaluate_loader(
            run.model, run.model.normalize_input, run.val_criterion, run.val_loader, run.device,
            run.autocast, threshold=run.config.postprocess.threshold)}
    return distributed.broadcast(metrics, run.ranks)


def _record(state: TrainState, epoch: int, metrics: dict[str, float]) -> bool:
    """Add the epoch to the history and the early-stopping count; True if it is the best."""
    metrics["epoch"] = epoch
    state.history.append(metrics)
    improved = metrics[MONITOR] > state.best_score
    if improved:
        state.best_score, state.best_epoch = metrics[MONITOR], epoch
        state.epochs_without_improvement = 0
    else:
        state.epochs_without_improvement += 1
    state.epoch = epoch + 1
    return improved


def _checkpoint_and_report(run: Training, metrics: dict, improved: bool) -> str | None:
    """Rank 0 checkpoints, calls the callbacks and decides; returns why to stop, if it should."""
    stop = None
    if run.ranks.is_main:
        _save_checkpoints(run, metrics, improved)
        stop = _report(run, metrics)
    return distributed.broadcast(stop, run.ranks)


def _save_checkpoints(run: Training, metrics: dict, improved: bool) -> None:
    """best.pt when the epoch improved, last.pt always, each written atomically; then tell."""
    epoch = run.state.epoch - 1
    config = run.config.model_dump(mode="json")
    if improved:
        save_torch({"model": run.model.state_dict(), "config": config,
                    "epoch": epoch, "metrics": metrics}, run.best_path)
    save_torch({"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                "scaler": run.scaler.state_dict(), "state": run.state.__dict__,
                "config": config}, run.last_path)
    if improved:
        run.callbacks.on_checkpoint(epoch, run.best_path, is_best=True)
    run.callbacks.on_checkpoint(epoch, run.last_path, is_best=False)


def _report(run: Training, metrics: dict) -> str | None:
    """Call `on_epoch_end`; "callback" if it stopped training, "early_stopping" if patience ran
    out, else None."""
    try:
        run.callbacks.on_epoch_end(run.state.epoch - 1, metrics)
    except StopTraining:
        return "callback"
    patience = run.config.train.early_stopping_patience
    if patience and run.state.epochs_without_improvement >= patience:
        return "early_stopping"
    return None


@torch.no_grad()
def evaluate_loader(model, normalize, criterion, loader, device, autocast=nullcontext,
                    threshold: float = 0.5) -> dict:
    """Validation loss and metrics at a plain probability threshold (no post-processing)."""
    model.eval()
    accumulator = MetricAccumulator()
    loss_sum, n_images = 0.0, 0
    for images, masks, _ in loader:
        images, masks = images.to(device), masks.to(device)
        with autocast():
            output = split_output(model(normalize(images)))
            loss, _ = criterion(output, masks)
        probs = torch.sigmoid(output.mask_logits.float())[:, 0].cpu().numpy()
        truth = masks[:, 0].cpu().numpy().astype(bool)
        accumulator.update(foreground(probs, threshold), truth, image_scores(probs))
        loss_sum += loss.item() * images.shape[0]
        n_images += images.shape[0]
    summary = accumulator.compute()
    return {
        "val_loss": loss_sum / max(n_images, 1),
        "val_iou": summary["pooled_iou"],
        "val_dice": summary["pooled_dice"],
        "val_mean_dice": summary["mean_dice"],
        "val_auc": summary["auc"],
    }
