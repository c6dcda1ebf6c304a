"""`ptxlab sweep STUDY --plan`: what a study will cost, read from the study file alone.

Nothing is written and no storage is opened. Trials are the grid's (configurations x repeats;
under cv, repeats count folds x seeds and each training holds out 1/folds), or the trial budget
of a TPE/random study. Trainings are the distinct training configurations
x repeats: levels of evaluation-only factors (`StudySpec.evaluation_dimensions`) are scored on
one training's stored maps. Epochs are the planned maximum of each training (`train.epochs`, or
what `train.max_steps` needs), before early stopping or pruning. With `step_ms` (the time of one
training batch at the base config's batch size; other batch sizes scale by images per batch) and
the training-set size, each training's time is its batches x step time, validation left out;
the wall-clock hours per worker count come from placing the trainings, longest first, on the
least loaded worker.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from pathlib import Path

from ptxlab.config import Config
from ptxlab.data.layouts import load_cases
from ptxlab.data.sources import SYNTHETIC
from ptxlab.sweep.study_file import StudyFile, build_config
from ptxlab.train import plan_steps

WORKER_COUNTS = (1, 2, 4, 8)


@dataclass
class Training:
    """One training configuration (its parameters), trained once per repeat."""

    params: dict
    arms: int  # trials scored from each of its trainings
    epochs: int | None
    batches: int | None  # training batches over all its epochs
    batch_size: int


@dataclass
class Plan:
    study: str
    sampler: str
    trials: int
    trainings: int
    repeats: int  # per configuration: seeds, times the folds under cv
    evaluation_factors: list[str]
    configurations: list[Training]
    train_images: int | None
    step_ms: float | None
    notes: list[str] = field(default_factory=list)
    held_out: float | None = None  # the validation share of each training
    cv_folds: int | None = None

    @property
    def max_epochs(self) -> int | None:
        epochs = [t.epochs for t in self.configurations]
        return None if not epochs or None in epochs else max(epochs)

    @property
    def total_epochs(self) -> int | None:
        epochs = [t.epochs for t in self.configurations]
        return None if not epochs or None in epochs else sum(epochs) * self.repeats

    def hours(self) -> dict[int, dict[str, float]] | None:
        """Per worker count: wall-clock hours and GPU-hours held (workers x wall clock)."""
        if (self.step_ms is None or not self.configurations
                or any(t.batches is None for t in self.configurations)):
            return None
        reference = self.configurations[0].batch_size if self.configurations else 1
        jobs = sorted((t.batches * self.step_ms * t.batch_size / reference / 3.6e6
                       for t in self.configurations for _ in range(self.repeats)), reverse=True)
        table = {}
        for workers in WORKER_COUNTS:
            loads = [0.0] * workers
            for job in jobs:
                heapq.heappush(loads, heapq.heappop(loads) + job)
            wall = max(loads)
            table[workers] = {"wall_hours": round(wall, 3),
                              "gpu_hours": round(wall * workers, 3),
                              "busy_gpu_hours": round(sum(jobs), 3)}
        return table

    def to_json(self) -> dict:
        return {"study": self.study, "sampler": self.sampler, "trials": self.trials,
                "trainings": self.trainings, "repeats": self.repeats,
                "cv_folds": self.cv_folds, "held_out_fraction": self.held_out,
                "evaluation_only_factors": self.evaluation_factors,
                "arms_per_training": sorted({t.arms for t in self.configurations}),
                "max_epochs": self.max_epochs, "total_epochs": self.total_epochs,
                "train_images": self.train_images, "step_ms": self.step_ms,
                "hours_by_workers": self.hours(), "notes": self.notes}

    def lines(self) -> list[str]:
        arms = sorted({t.arms for t in self.configurations})
        out = [f"study {self.study} ({self.sampler} sampler): {self.trials} trials, "
               f"{self.trainings} trainings "
               f"({len(self.configurations)} training configurations x {self.repeats} repeats)",
               "evaluation-only factors (scored on stored maps, not trained): "
               + (", ".join(self.evaluation_factors) or "none"),
               f"evaluation arms per training: {', '.join(map(str, arms)) or 'n/a'}",
               *([f"cross-validation: {self.cv_folds} folds x {self.repeats // self.cv_folds} "
                  f"seed(s) = {self.repeats} repeats per configuration; each training holds "
                  f"out 1/{self.cv_folds} = {self.held_out:.3g} for validation"]
                 if self.cv_folds else []),
               f"max epochs per training: {self.max_epochs or 'n/a'} "
               f"(all trainings: {self.total_epochs or 'n/a'}; before early stopping/pruning)"]
        hours = self.hours()
        if hours:
            out.append(f"at {self.step_ms:g} ms per training batch, {self.train_images} "
                       "training images (validation not counted):")
            out += [f"  {w} worker(s): {h['wall_hours']:.2f} h wall clock, "
                    f"{h['gpu_hours']:.2f} GPU-hours held ({h['busy_gpu_hours']:.2f} busy)"
                    for w, h in hours.items()]
        return out + [f"note: {note}" for note in self.notes]


def train_images(config: Config) -> int | None:
    """Images one training epoch sees, from the data source (None when it is not here)."""
    data = config.data
    if data.source == SYNTHETIC:
        total = data.synthetic.n_images
    elif Path(data.source).exists():
        total = len(load_cases(Path(data.source), data.layout,
                               missing_mask_is_negative=data.missing_mask_is_negative))
    else:
        return None
    total -= round(total * data.test_fraction)
    return total - max(1, round(total * held_out_fraction(config)))


def held_out_fraction(config: Config) -> float:
    """The share of the data one training validates on: 1/folds under k-fold."""
    data = config.data
    return 1 / data.folds if data.folds > 1 else data.val_fraction


def make_plan(loaded: StudyFile, step_ms: float | None = None,
              images: int | None = None) -> Plan:
    """The study's cost, from its file alone (`images`: training-set size, else read)."""
    spec = loaded.spec
    notes = []
    if spec.mode == "postprocess":
        trials = len(spec.configurations()) * spec.total_repeats if spec.sampler.type == "grid" \
            else spec.n_trials or 0
        return Plan(spec.name, spec.sampler.type, trials, 0, spec.total_repeats, list(spec.space), [],
                    None, step_ms, ["mode postprocess trains nothing: it scores finished runs"])
    if spec.sampler.type != "grid":
        notes.append(f"{spec.sampler.type} sampler: trainings are at most the trial budget "
                     "(sampled configurations that share a training configuration share it); "
                     "epochs are the fixed settings' (searched dimensions not counted)")
        points = [{}]
        trials = spec.n_trials or 0
    else:
        points = spec.configurations()
        trials = len(points) * spec.total_repeats
    base = loaded.base_config
    reference = build_config(base, spec.cv_overrides(0), str(loaded.path))
    if images is None:
        images = train_images(reference)
        if images is None and step_ms is not None:
            notes.append("GPU-hours need the training-set size: the data source is not here; "
                         "pass --train-images N")
    grouped: dict[str, list[dict]] = {}
    for params in points:
        grouped.setdefault(spec.training_key(params), []).append(params)
    configurations = []
    for group in grouped.values():
        config = build_config(base, {**spec.overrides_for(group[0]), **spec.cv_overrides(0)},
                              str(loaded.path))
        configurations.append(_training(config, group, images))
    trainings = len(configurations) * spec.total_repeats if spec.sampler.type == "grid" \
        else trials
    return Plan(spec.name, spec.sampler.type, trials, trainings, spec.total_repeats,
                spec.evaluation_dimensions(), configurations, images, step_ms, notes,
                held_out_fraction(reference), spec.cv.folds if spec.cv else None)


def _training(config: Config, group: list[dict], images: int | None) -> Training:
    batch = config.train.batch_size
    if images is None:
        epochs = config.train.epochs if config.train.max_steps is None else None
        return Training(group[0], len(group), epochs, None, batch)
    per_epoch = math.ceil(images / batch)
    if config.train.max_train_batches:
        per_epoch = min(per_epoch, config.train.max_train_batches)
    epochs, steps = plan_steps(config, per_epoch)
    batches = min(epochs * per_epoch, steps * config.train.accumulate)
    return Training(group[0], len(group), epochs, batches, batch)
