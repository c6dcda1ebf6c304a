"""The training loop: AMP, cosine schedule per optimizer step, early stopping, checkpoints, resume.

It knows nothing of MLflow or Optuna: progress leaves through `TrainingCallbacks`, which the
tracking and sweep layers implement (and through which a pruner can stop a trial).
"""

from __future__ import annotations

import math
import os
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ptxlab import distributed
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


def _save_atomic(payload: dict, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)


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
    ranks = distributed.current()
    callbacks = callbacks if ranks.is_main and callbacks else TrainingCallbacks()
    workdir.mkdir(parents=True, exist_ok=True)
    device = select_device(config.train.device, ranks.local_rank)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    seed_everything(config.seed)

    model, weights_note = build_model(config.model, load_weights=resume_from is None)
    if ranks.distributed:
        model = distributed.synchronize_batch_norm(model, device)
    model.to(device)
    normalize = model.normalize_input
    criterion = SegmentationLoss(config.loss, across_ranks=ranks.distributed)
    val_criterion = SegmentationLoss(config.loss)  # rank 0 validates alone
    lr = effective_lr(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=config.optim.weight_decay)
    use_amp = config.train.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if config.train.amp_dtype == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
    loader_args = dict(num_workers=config.data.num_workers, pin_memory=device.type == "cuda")
    sampler = GlobalBatchSampler(len(train_set), config.train.batch_size, ranks.rank,
                                 ranks.world, drop_last=len(train_set) >= 2 *
                                 config.train.batch_size)
    train_loader = DataLoader(train_set, batch_sampler=sampler, **loader_args)
    val_loader = DataLoader(val_set, batch_size=config.train.batch_size, **loader_args)
    batches_per_epoch = len(train_loader)
    if config.train.max_train_batches:
        batches_per_epoch = min(batches_per_epoch, config.train.max_train_batches)
    epochs, total_steps = plan_steps(config, batches_per_epoch)

    state = TrainState()
    if resume_from is not None:
        checkpoint = load_checkpoint(resume_from)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        state = TrainState(**checkpoint["state"])
        weights_note = f"resumed from epoch {state.epoch}"

    callbacks.on_train_start({
        "device": str(device), "amp": use_amp, "encoder_weights_loaded": weights_note,
        "lr_effective": lr, "epochs_planned": epochs, "optimizer_steps_planned": total_steps,
        "train_images": len(train_set), "val_images": len(val_set),
        "batches_per_epoch": batches_per_epoch, "start_epoch": state.epoch,
        "processes": ranks.world,
    })
    best_path, last_path = workdir / "best.pt", workdir / "last.pt"
    stopped_by = "max_steps" if config.train.max_steps is not None else "epochs"
    autocast = (lambda: torch.autocast("cuda", dtype=amp_dtype)) if use_amp else nullcontext

    forward, frozen = None, None  # built for the first epoch, again when freezing changes
    for epoch in range(state.epoch, epochs):
        if state.global_step >= total_steps:
            break
        torch.manual_seed(epoch_seed(config.seed, epoch) + ranks.rank)
        sampler.set_seed(epoch_seed(config.seed, epoch))
        train_set.set_epoch(epoch)
        freeze = epoch < config.model.freeze_encoder_epochs
        if freeze != frozen:
            for parameter in model.encoder.parameters():
                parameter.requires_grad_(not freeze)
            forward, frozen = _forward_for(model, config, ranks, device), freeze

        train_terms, images_per_s, state.global_step = _train_epoch(
            forward, normalize, criterion, optimizer, scaler, train_loader, device, autocast,
            config, state.global_step, total_steps, lr, batches_per_epoch,
            on_batch=partial(callbacks.on_batch_end, epoch), ranks=ranks,
        )
        metrics = {**train_terms, "images_per_s": images_per_s,
                   "lr": optimizer.param_groups[0]["lr"]}
        if ranks.is_main:
            metrics.update(evaluate_loader(model, normalize, val_criterion, val_loader, device,
                                           autocast, threshold=config.postprocess.threshold))
        metrics = distributed.broadcast(metrics, ranks)
        metrics["epoch"] = epoch
        state.history.append(metrics)

        improved = metrics[MONITOR] > state.best_score
        if improved:
            state.best_score, state.best_epoch = metrics[MONITOR], epoch
            state.epochs_without_improvement = 0
        else:
            state.epochs_without_improvement += 1
        state.epoch = epoch + 1
        stop = None
        if ranks.is_main:
            stop = _checkpoint_and_report(model, optimizer, scaler, state, config, metrics,
                                          improved, best_path, last_path, callbacks)
        stop = distributed.broadcast(stop, ranks)
        if stop:
            stopped_by = stop
            break

    return TrainResult(state.best_epoch, state.history, best_path, last_path, stopped_by)


def _forward_for(model: torch.nn.Module, config: Config, ranks: distributed.Ranks,
                 device: torch.device):
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


def _checkpoint_and_report(model, optimizer, scaler, state: TrainState, config: Config,
                           metrics: dict, improved: bool, best_path: Path, last_path: Path,
                           callbacks: TrainingCallbacks) -> str | None:
    """Write best/last checkpoints, call the callbacks; return why to stop, if we should."""
    epoch = state.epoch - 1
    if improved:
        _save_atomic({"model": model.state_dict(), "config": config.model_dump(mode="json"),
                      "epoch": epoch, "metrics": metrics}, best_path)
    _save_atomic({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                  "scaler": scaler.state_dict(), "state": state.__dict__,
                  "config": config.model_dump(mode="json")}, last_path)
    if improved:
        callbacks.on_checkpoint(epoch, best_path, is_best=True)
    callbacks.on_checkpoint(epoch, last_path, is_best=False)
    try:
        callbacks.on_epoch_end(epoch, metrics)
    except StopTraining:
        return "callback"
    patience = config.train.early_stopping_patience
    if patience and state.epochs_without_improvement >= patience:
        return "early_stopping"
    return None


def _train_epoch(model, normalize, criterion, optimizer, scaler, loader, device, autocast,
                 config: Config, global_step: int, total_steps: int, lr: float,
                 batches_per_epoch: int, on_batch, ranks: distributed.Ranks
                 ) -> tuple[dict[str, float], float, int]:
    """One pass over the training loader; returns (mean loss and its terms, images/s, step).

    The terms are named train_loss, train_bce, train_dice (and train_classification); under
    torchrun they are means over all ranks' images and images/s is the global rate.
    """
    model.train()
    accumulate = config.train.accumulate
    sums: dict[str, float] = {}
    n_images, started = 0, time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    for batch_index, (images, masks, _) in enumerate(loader):
        if batch_index >= batches_per_epoch or global_step >= total_steps:
            break
        images = images.to(device, non_blocking=True)
        masks = masks.to(device, non_blocking=True)
        inputs = normalize(images)
        if config.model.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with autocast():
            output = split_output(model(inputs))
            loss, terms = criterion(output, masks)
        if not torch.isfinite(loss):
            raise NonFiniteLossError(f"loss is {loss.item()} at optimizer step {global_step}")
        scaler.scale(loss / accumulate).backward()
        last_of_epoch = batch_index + 1 == batches_per_epoch
        if (batch_index + 1) % accumulate == 0 or last_of_epoch:
            for group in optimizer.param_groups:
                group["lr"] = _cosine(global_step, total_steps, lr, config.optim.lr_min)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
        n_images += images.shape[0]
        for name, value in {"loss": loss, **terms}.items():
            sums[f"train_{name}"] = sums.get(f"train_{name}", 0.0) + value.item() * len(images)
        on_batch(batch_index, batches_per_epoch, sums["train_loss"] / n_images,
                 n_images / (time.perf_counter() - started))
    elapsed = time.perf_counter() - started
    names = sorted(sums)
    *totals, n_images = distributed.sum_across([sums[n] for n in names] + [n_images], ranks)
    means = {name: total / max(n_images, 1) for name, total in zip(names, totals, strict=True)}
    return means, n_images / elapsed, global_step


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
