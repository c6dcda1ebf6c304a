"""The training loop: AMP, cosine schedule per optimizer step, early stopping, checkpoints, resume.

It knows nothing of MLflow or Optuna: progress leaves through `TrainingCallbacks`, which the
tracking and sweep layers implement (and through which a pruner can stop a trial).

`train` reads as its steps: set up, then for each phase (`train.phases`; one without it) enter
it, and per epoch start it, train it, validate, record the decision (best so far? early stop?),
checkpoint and report; at the end, optionally average the top-k epochs' weights. The steps
share one `Training`.
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

from ptxlab import distributed, top_k
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
    averaged: dict[str, float] = field(default_factory=dict)  # train.average_top_k's scores


@dataclass
class TrainState:
    """Everything a resumed run needs besides the weights."""

    epoch: int = 0  # next epoch to run, counted over all phases
    phase: int = 0
    global_step: int = 0  # optimizer steps taken in this phase (its schedule's position)
    best_score: float = -math.inf  # best, patience and top k are this phase's
    best_epoch: int = -1
    epochs_without_improvement: int = 0
    top_k: list[list[float]] = field(default_factory=list)  # [score, epoch], best first
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class Phase:
    """One stretch of training at one image size with its own cosine schedule (`train.phases`;
    a run without phases is one phase)."""

    index: int
    config: Config  # the run's config with this phase's size, epochs, batch, freezing and LR
    train_set: SegmentationDataset
    sampler: GlobalBatchSampler
    train_loader: DataLoader
    val_loader: DataLoader
    batches_per_epoch: int
    first_epoch: int
    end_epoch: int  # exclusive
    total_steps: int  # optimizer steps of the phase's schedule
    lr: float  # the schedule's peak


@dataclass
class Training:
    """One training run's moving parts, built by `_set_up` and shared by every step."""

    config: Config
    phases: list[Config]  # one config per phase (see `phase_configs`)
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
    callbacks: TrainingCallbacks
    workdir: Path
    state: TrainState = field(default_factory=TrainState)
    phase: Phase | None = None  # entered by `_enter_phase`
    forward: Callable | None = None  # what trains `model`; rebuilt when freezing changes
    frozen: bool | None = None

    @property
    def best_path(self) -> Path:
        return self.workdir / "best.pt"

    @property
    def last_path(self) -> Path:
        return self.workdir / "last.pt"

    @property
    def epochs_planned(self) -> int:
        """Epochs over all phases."""
        if len(self.phases) == 1:
            return self.phase.end_epoch
        return sum(phase.train.epochs for phase in self.phases)


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


Datasets = Callable[[int], tuple[SegmentationDataset, SegmentationDataset]]


def train(
    config: Config,
    train_set: SegmentationDataset,
    val_set: SegmentationDataset,
    workdir: Path,
    callbacks: TrainingCallbacks | None = None,
    resume_from: Path | None = None,
    datasets_at: Datasets | None = None,
) -> TrainResult:
    """Train `config` on the two datasets, writing best.pt and last.pt into `workdir`.

    With `train.phases`, `datasets_at(image_size)` gives each phase's datasets. Under torchrun
    every rank calls this; rank 0 validates, decides, checkpoints and calls the callbacks, and
    tells the other ranks what it decided.
    """
    run = _set_up(config, workdir, callbacks, resume_from)
    datasets = datasets_at or _only_at(config.data.image_size, train_set, val_set)
    while True:
        _enter_phase(run, datasets)
        stopped_by = _run_phase(run)
        if stopped_by == "callback" or run.state.phase + 1 == len(run.phases):
            break
        _next_phase(run.state, run.phase.end_epoch)
    averaged = _average_top_k(run) if run.ranks.is_main else {}
    state = run.state
    return TrainResult(state.best_epoch, state.history, run.best_path, run.last_path, stopped_by,
                       averaged)


def _only_at(image_size: int, train_set: SegmentationDataset, val_set: SegmentationDataset
             ) -> Datasets:
    def at(size: int) -> tuple[SegmentationDataset, SegmentationDataset]:
        if size != image_size:
            raise ValueError(f"a phase at image_size={size} needs train(datasets_at=...)")
        return train_set, val_set

    return at


def _run_phase(run: Training) -> str:
    """The epochs of the current phase, each: start, train, validate, record, checkpoint and
    report. Returns why the phase ended."""
    phase = run.phase
    for epoch in range(run.state.epoch, phase.end_epoch):
        if run.state.global_step >= phase.total_steps:
            break
        if _patience_ran_out(run):
            return "early_stopping"
        _start_epoch(run, epoch)
        metrics = _train_epoch(run, epoch)
        metrics = _validate(run, metrics)
        improved = _record(run.state, epoch, metrics)
        if _checkpoint_and_report(run, metrics, improved):
            return "callback"
    if _patience_ran_out(run):
        return "early_stopping"
    return "max_steps" if phase.config.train.max_steps is not None else "epochs"


# --- set up -----------------------------------------------------------------------------------


def phase_configs(config: Config) -> list[Config]:
    """The run's config for each phase of `train.phases` (its image size, epochs, batch size,
    encoder freezing and LR), or the config itself when it has no phases."""
    if not config.train.phases:
        return [config]
    configs = []
    for phase in config.train.phases:
        tree = config.model_dump()
        tree["train"].update(phases=None, epochs=phase.epochs,
                             batch_size=phase.batch_size or config.train.batch_size)
        tree["data"]["image_size"] = phase.image_size
        tree["model"]["freeze_encoder_epochs"] = phase.freeze_encoder_epochs
        tree["optim"]["lr"] = phase.lr or config.optim.lr
        configs.append(Config.model_validate(tree))
    return configs


def _set_up(config: Config, workdir: Path, callbacks: TrainingCallbacks | None,
            resume_from: Path | None) -> Training:
    """Device, seeded model, loss, optimizer and AMP; the checkpoint if resuming."""
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
    use_amp = config.train.amp and device.type == "cuda"
    amp_dtype = torch.bfloat16 if config.train.amp_dtype == "bf16" else torch.float16
    run = Training(
        config=config, phases=phase_configs(config), ranks=ranks, device=device, model=model,
        weights_note=weights_note,
        criterion=SegmentationLoss(config.loss, across_ranks=ranks.distributed),
        val_criterion=SegmentationLoss(config.loss),
        optimizer=torch.optim.Adam(model.parameters(), lr=effective_lr(config),
                                   weight_decay=config.optim.weight_decay),
        scaler=torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16),
        amp=use_amp,
        autocast=(lambda: torch.autocast("cuda", dtype=amp_dtype)) if use_amp else nullcontext,
        callbacks=callbacks if ranks.is_main and callbacks else TrainingCallbacks(),
        workdir=workdir,
    )
    if resume_from is not None:
        _resume(run, load_checkpoint(resume_from))
    return run


def _resume(run: Training, checkpoint: dict) -> None:
    """Continue from a last.pt: weights, optimizer, scaler and the loop's state."""
    run.model.load_state_dict(checkpoint["model"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.scaler.load_state_dict(checkpoint["scaler"])
    run.state = TrainState(**checkpoint["state"])
    run.weights_note = f"resumed from epoch {run.state.epoch}"


def _enter_phase(run: Training, datasets: Datasets) -> None:
    """Datasets, loaders and schedule of the state's phase; announce them to the callbacks."""
    config = run.phases[run.state.phase]
    train_set, val_set = datasets(config.data.image_size)
    sampler, train_loader, val_loader = _loaders(config, train_set, val_set, run.ranks,
                                                 run.device)
    batches_per_epoch = len(train_loader)
    if config.train.max_train_batches:
        batches_per_epoch = min(batches_per_epoch, config.train.max_train_batches)
    epochs, total_steps = plan_steps(config, batches_per_epoch)
    first_epoch = sum(phase.train.epochs for phase in run.phases[: run.state.phase])
    run.phase = Phase(run.state.phase, config, train_set, sampler, train_loader, val_loader,
                      batches_per_epoch, first_epoch, first_epoch + epochs, total_steps,
                      effective_lr(config))
    run.frozen = None  # the phase's own freezing decides at its first epoch
    run.callbacks.on_train_start(_start_facts(run))


def _next_phase(state: TrainState, first_epoch: int) -> None:
    """Move the state to the next phase: a fresh schedule, best score, patience and top k."""
    state.phase += 1
    state.epoch = first_epoch
    state.global_step = 0
    state.best_score, state.best_epoch = -math.inf, -1
    state.epochs_without_improvement = 0
    state.top_k = []


def _loaders(config: Config, train_set: SegmentationDataset, val_set: SegmentationDataset,
             ranks: distributed.Ranks, device: torch.device
             ) -> tuple[GlobalBatchSampler, DataLoader, DataLoader]:
    """The seeded training batch sampler (this rank's share) and both loaders."""
    batch_size = config.train.batch_size
    loader_args = dict(num_workers=config.data.num_workers, pin_memory=device.type == "cuda")
    sampler = GlobalBatchSampler(len(train_set), batch_size, ranks.rank, ranks.world,
                                 drop_last=len(train_set) >= 2 * batch_size,
                                 positives=[case.positive for case in train_set.cases])
    train_loader = DataLoader(train_set, batch_sampler=sampler, **loader_args)
    val_loader = DataLoader(val_set, batch_size=batch_size, **loader_args)
    return sampler, train_loader, val_loader


def _start_facts(run: Training) -> dict:
    """What `on_train_start` reports: static facts about the run (and its current phase)."""
    phase = run.phase
    facts = {
        "device": str(run.device), "amp": run.amp,
        "encoder_weights_loaded": run.weights_note, "lr_effective": phase.lr,
        "epochs_planned": run.epochs_planned, "optimizer_steps_planned": phase.total_steps,
        "train_images": len(phase.train_set), "val_images": len(phase.val_loader.dataset),
        "batches_per_epoch": phase.batches_per_epoch, "start_epoch": run.state.epoch,
        "processes": run.ranks.world,
    }
    if len(run.phases) > 1:
        facts.update(phase=f"{phase.index + 1}/{len(run.phases)}",
                     image_size=phase.config.data.image_size)
    return facts


# --- one epoch --------------------------------------------------------------------------------


def positive_fraction_at(schedule: float | tuple[float, float] | None, epoch: int,
                         epochs: int) -> float | None:
    """`data.positive_fraction` for `epoch` of `epochs`: None, a constant, or a [start, end]
    pair interpolated linearly from the first epoch to the last."""
    if schedule is None or isinstance(schedule, float | int):
        return schedule
    start, end = schedule
    return start + (end - start) * epoch / max(epochs - 1, 1)


def _start_epoch(run: Training, epoch: int) -> None:
    """Seed the epoch's randomness from (seed, epoch), set its positive fraction, and freeze or
    unfreeze the encoder.

    Freezing is smp's own: encoder parameters stop requiring gradients and its normalisation
    layers stop updating their running statistics until `unfreeze_encoder`.
    """
    phase = run.phase
    seed = epoch_seed(run.config.seed, epoch)
    torch.manual_seed(seed + run.ranks.rank)
    phase.sampler.set_seed(seed)
    phase.sampler.set_positive_fraction(
        positive_fraction_at(run.config.data.positive_fraction, epoch, run.epochs_planned))
    phase.train_set.set_epoch(epoch)
    freeze = epoch - phase.first_epoch < phase.config.model.freeze_encoder_epochs
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
    again whenever encoder freezing changes that set. The graph is static: some encoders keep
    layers their forward never uses (smp's EfficientNet keeps `_conv_head`), which plain DDP
    refuses at the second step; a static graph lets it learn the unused set once.
    """
    forward = model
    if ranks.distributed:
        forward = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            static_graph=True)
    if config.model.compile:
        forward = torch.compile(forward)
    return forward


def _train_epoch(run: Training, epoch: int) -> dict[str, float]:
    """One pass over the training loader: mean loss and its terms, images/s and the LR (and
    the share of positive images when `data.positive_fraction` is set). Progress leaves
    through `on_batch_end` after every batch.

    The terms are named train_loss, train_bce, train_dice (and train_classification); under
    torchrun they are means over all ranks' images and images/s is the global rate.
    """
    phase = run.phase
    run.model.train()
    labels = torch.tensor([case.positive for case in phase.train_set.cases], dtype=torch.float64)
    sums: dict[str, float] = {}
    n_images, positives, started = 0, 0.0, time.perf_counter()
    run.optimizer.zero_grad(set_to_none=True)
    for batch_index, (images, masks, indices) in enumerate(phase.train_loader):
        if batch_index >= phase.batches_per_epoch or run.state.global_step >= phase.total_steps:
            break
        loss, terms = _train_step(run, batch_index, images, masks)
        n_images += images.shape[0]
        positives += labels[indices].sum().item()
        for name, value in {"loss": loss, **terms}.items():
            sums[f"train_{name}"] = sums.get(f"train_{name}", 0.0) + value.item() * len(images)
        run.callbacks.on_batch_end(epoch, batch_index, phase.batches_per_epoch,
                                   sums["train_loss"] / n_images,
                                   n_images / (time.perf_counter() - started))
    elapsed = time.perf_counter() - started
    names = sorted(sums)
    *totals, positives, n_images = distributed.sum_across(
        [sums[n] for n in names] + [positives, n_images], run.ranks)
    means = {name: total / max(n_images, 1) for name, total in zip(names, totals, strict=True)}
    if run.config.data.positive_fraction is not None:
        means["train_positive_fraction"] = positives / max(n_images, 1)
    return {**means, "images_per_s": n_images / elapsed,
            "lr": run.optimizer.param_groups[0]["lr"]}


def _train_step(run: Training, batch_index: int, images: torch.Tensor, masks: torch.Tensor
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Forward and backward one batch; step the optimizer at the end of each accumulation."""
    phase = run.phase
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
    last_of_epoch = batch_index + 1 == phase.batches_per_epoch
    if (batch_index + 1) % accumulate == 0 or last_of_epoch:
        for group in run.optimizer.param_groups:
            group["lr"] = _cosine(run.state.global_step, phase.total_steps, phase.lr,
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
            run.model, run.model.normalize_input, run.val_criterion, run.phase.val_loader,
            run.device, run.autocast, threshold=run.config.postprocess.threshold)}
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


def _patience_ran_out(run: Training) -> bool:
    patience = run.config.train.early_stopping_patience
    return bool(patience) and run.state.epochs_without_improvement >= patience


def _checkpoint_and_report(run: Training, metrics: dict, improved: bool) -> bool:
    """Rank 0 checkpoints and calls the callbacks; True when a callback stopped training."""
    stop = False
    if run.ranks.is_main:
        _save_checkpoints(run, metrics, improved)
        stop = _report(run, metrics)
    return distributed.broadcast(stop, run.ranks)


def _save_checkpoints(run: Training, metrics: dict, improved: bool) -> None:
    """best.pt when the epoch improved, the epoch's weights when it is among the top k,
    last.pt always, each written atomically; then tell the callbacks."""
    epoch = run.state.epoch - 1
    config = run.config.model_dump(mode="json")
    if improved:
        save_torch({"model": run.model.state_dict(), "config": config,
                    "epoch": epoch, "metrics": metrics}, run.best_path)
    kept = top_k.keep(run.state.top_k, metrics[MONITOR], epoch, run.config.train.average_top_k)
    if kept:
        save_torch({"model": run.model.state_dict()}, top_k.path(run.workdir, epoch))
    save_torch({"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                "scaler": run.scaler.state_dict(), "state": run.state.__dict__,
                "config": config}, run.last_path)
    top_k.remove_others(run.workdir, run.state.top_k)
    if improved:
        run.callbacks.on_checkpoint(epoch, run.best_path, is_best=True)
    run.callbacks.on_checkpoint(epoch, run.last_path, is_best=False)


def _report(run: Training, metrics: dict) -> bool:
    """Call `on_epoch_end`; True if a callback stopped training."""
    try:
        run.callbacks.on_epoch_end(run.state.epoch - 1, metrics)
    except StopTraining:
        return True
    return False


def _average_top_k(run: Training) -> dict[str, float]:
    """With `train.average_top_k`: average the k best epochs' weights, validate the average and
    make it best.pt when it beats the best epoch. Returns both scores (empty without it)."""
    epochs = [int(epoch) for _, epoch in run.state.top_k]
    if len(epochs) < 2:
        return {}
    run.model.load_state_dict(top_k.average([top_k.path(run.workdir, e) for e in epochs]))
    score = evaluate_loader(run.model, run.model.normalize_input, run.val_criterion,
                            run.phase.val_loader, run.device, run.autocast,
                            threshold=run.config.postprocess.threshold)[MONITOR]
    used = score > run.state.best_score
    if used:
        save_torch({"model": run.model.state_dict(), "config": run.config.model_dump(mode="json"),
                    "epoch": run.state.best_epoch, "averaged_epochs": epochs,
                    "metrics": {MONITOR: score}}, run.best_path)
    return {f"top_k_average_{MONITOR}": score, f"best_epoch_{MONITOR}": run.state.best_score,
            "top_k_average_used": float(used)}


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
