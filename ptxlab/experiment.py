"""One tracked run end to end: data -> split -> train -> post-processing search -> logged results.

`run_experiment` is what `ptxlab run` and every sweep trial call. Training and evaluation know
nothing of MLflow; this module wires them to `tracking`.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from ptxlab import artifacts, distributed, plots, preflight, retention, tracking
from ptxlab.augment import build_eval_transform, build_train_transform, serialize
from ptxlab.config import Config, DataConfig
from ptxlab.data.cases import Case
from ptxlab.data.dataset import SegmentationDataset, hold_out, random_split, stratified_split
from ptxlab.data.layouts import load_cases
from ptxlab.data.sources import SYNTHETIC, cached_size, load_source, training_pairs
from ptxlab.evaluation import evaluate_cases
from ptxlab.inference import Predictions, load_trained_model, predict
from ptxlab.metrics import accumulate
from ptxlab.mlflow_model import log_model
from ptxlab.postprocess import (
    PAPER_GRID,
    Choice,
    PostProcessing,
    SearchResult,
    apply,
    choose,
    save_probability_maps,
    search_subset,
)
from ptxlab.prediction import load_run
from ptxlab.progress import EpochReporter, display
from ptxlab.train import (
    NonFiniteLossError,
    TrainingCallbacks,
    load_checkpoint,
    select_device,
    train,
)

SHOWN_SKIPPED = 3
logger = logging.getLogger(__name__)


@dataclass
class RunSummary:
    run_id: str
    experiment: str
    experiment_id: str
    best_epoch: int
    stopped_by: str
    metrics: dict[str, float] = field(default_factory=dict)
    postprocess: dict = field(default_factory=dict)
    test_metrics: dict[str, float] = field(default_factory=dict)  # on the test set, if any


@dataclass
class PreparedData:
    train: SegmentationDataset
    val: SegmentationDataset
    digest: str
    skipped: list[str]  # one '<file>: <problem>' per file data.skip_bad left out
    test: list[Case] = field(default_factory=list)  # held out by data.test_fraction


def checkpoint_dir(run_id: str) -> Path:
    """Local working copies of a run's checkpoints (what `--resume` continues from)."""
    return retention.checkpoint_root() / run_id


def prepare_data(config: Config, progress: bool = True) -> PreparedData:
    """Cases of the configured source, cached (at training size unless augmenting at the
    source size), less the held-out test subset (`data.test_fraction`), split, wrapped as
    datasets."""
    data = config.data
    cases, problems = load_source(data, data.source, data.layout, progress=progress)
    order = config.augment.order
    # raises unless data.skip_bad
    pairs = training_pairs(data, cases, cached_size(data, order), progress=progress)
    bad = {case.case_id for case, _ in pairs.skipped}
    usable, test_cases = hold_out([case for case in cases if case.case_id not in bad],
                                  data.test_fraction, data.test_seed)
    if data.test_fraction and not test_cases:
        raise ValueError(f"data.test_fraction={data.test_fraction:g} holds out none of the "
                         f"{len(cases)} cases; raise it or set 0")
    split_seed = config.seed if data.split_seed is None else data.split_seed
    if data.split == "random":
        train_cases, val_cases = random_split(usable, data.val_fraction, split_seed)
    else:
        train_cases, val_cases = stratified_split(usable, data.val_fraction, split_seed,
                                                  data.folds, data.fold)
    size = data.image_size
    train_transform = build_train_transform(config.augment.preset, config.augment.strength, size,
                                            order)
    return PreparedData(
        train=SegmentationDataset(train_cases, pairs.load, train_transform, config.seed),
        val=SegmentationDataset(val_cases, pairs.load, build_eval_transform(size), config.seed),
        digest=pairs.digest,
        skipped=[str(problem) for problem in problems] + [line for _, line in pairs.skipped],
        test=test_cases,
    )


def datasets_at(config: Config, data: PreparedData
                ) -> Callable[[int], tuple[SegmentationDataset, SegmentationDataset]]:
    """Training and validation datasets at an image size, for the phases of `train.phases`
    (the same split; the prepared ones at `data.image_size`)."""
    def at(image_size: int) -> tuple[SegmentationDataset, SegmentationDataset]:
        if image_size == config.data.image_size:
            return data.train, data.val
        sized = config.model_copy(
            update={"data": config.data.model_copy(update={"image_size": image_size})})
        other = prepare_data(sized, progress=False)
        return other.train, other.val

    return at


def warn_skipped(skipped: list[str], run_id: str) -> None:
    """What data.skip_bad left out, once on the console: count, the first few, the full list."""
    if skipped:
        shown = "; ".join(skipped[:SHOWN_SKIPPED])
        more = f"; and {len(skipped) - SHOWN_SKIPPED} more" if len(skipped) > SHOWN_SKIPPED else ""
        logger.warning("data.skip_bad left out %d files: %s%s (all of them: artifact %s of run %s)",
                       len(skipped), shown, more, artifacts.SKIPPED, run_id)


def _log_inputs(config: Config, config_text: str | None, data: PreparedData) -> None:
    tracking.log_params(config.flat())
    tracking.log_text(config.to_yaml(), artifacts.RESOLVED_CONFIG)
    if config_text:
        tracking.log_text(config_text, artifacts.SOURCE_CONFIG)
    tracking.log_dict(serialize(data.train.transform), artifacts.AUGMENTATION)
    split = {"train": [c.case_id for c in data.train.cases],
             "val": [c.case_id for c in data.val.cases]}
    if data.test:
        split[artifacts.TEST] = [c.case_id for c in data.test]
    tracking.log_dict(split, artifacts.SPLIT)
    if data.skipped:
        tracking.log_text("\n".join(data.skipped) + "\n", artifacts.SKIPPED)
    tracking.log_metrics({"data_skipped": len(data.skipped)})
    for context in ("training", "validation") + ((artifacts.TEST,) if data.test else ()):
        tracking.log_dataset(_dataset_input(config, data, context), context)


def _dataset_input(config: Config, data: PreparedData, context: str):
    """The training or validation split, or the held-out test subset, as an MLflow dataset
    (case manifest, content digest)."""
    source = config.data.source
    name = SYNTHETIC if source == SYNTHETIC else Path(source).name
    cases = {"training": data.train.cases, "validation": data.val.cases}.get(context, data.test)
    rows = [{"case_id": c.case_id, "positive": int(c.positive), "site": c.site}
            for c in cases]
    return tracking.dataset(rows, source, f"{name}-{context}", data.digest)


def run_experiment(
    config: Config,
    config_text: str | None = None,
    resume_run_id: str | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    extra_callbacks: TrainingCallbacks | None = None,
    progress: bool = True,
) -> RunSummary:
    """Train `config` in a (new or resumed) MLflow run and log everything about it.

    Under torchrun (`ptxlab run --nproc N`) rank 0 does all of this; the other ranks only
    train their shards (see `_train_as_other_rank`) and return an empty summary.
    """
    ranks = distributed.init(use_cuda=select_device(config.train.device).type == "cuda")
    if not ranks.is_main:
        return _train_as_other_rank(config, ranks)
    with distributed.Handoff(ranks) as handoff:
        summary = _run_as_main_rank(config, config_text, resume_run_id, parent_run_id, tags,
                                    extra_callbacks, progress, handoff)
    if not config.train.keep_checkpoints:  # FINISHED: the best model is an MLflow artifact
        retention.remove_checkpoints(checkpoint_dir(summary.run_id))
    return summary


def _run_as_main_rank(config: Config, config_text: str | None, resume_run_id: str | None,
                      parent_run_id: str | None, tags: dict[str, str] | None,
                      extra_callbacks: TrainingCallbacks | None, progress: bool,
                      handoff: distributed.Handoff) -> RunSummary:
    """Rank 0 (or the only process): data, MLflow run, training, post-processing, test set."""
    shown = display() if progress else "none"
    progress = shown == "bar"  # bars for data preparation and prediction, too
    preflight.check_run(config, retention.checkpoint_root(), tracking.tracking_uri())
    resume_from = checkpoint_dir(resume_run_id) / "last.pt" if resume_run_id else None
    if resume_from is not None and not resume_from.exists():
        raise FileNotFoundError(f"{resume_from}: no checkpoint to resume run {resume_run_id}")
    data = prepare_data(config, progress=progress)
    with tracking.open_run(
        config.tracking.experiment, config.tracking.run_name, run_id=resume_run_id,
        parent_run_id=parent_run_id, tags=tags, system_metrics=config.tracking.system_metrics,
    ) as run:
        run_id = run.info.run_id
        workdir = checkpoint_dir(run_id)
        if not resume_run_id:
            _log_inputs(config, config_text, data)
            warn_skipped(data.skipped, run_id)
        handoff.send((run_id, resume_from))
        callbacks = _Callbacks(tracking.MlflowCallbacks(run_id, resumed=bool(resume_run_id)),
                               EpochReporter(shown), extra_callbacks)
        if resume_from is not None:
            callbacks.tracker.replay(load_checkpoint(resume_from)["state"]["history"])
        try:
            result = train(config, data.train, data.val, workdir, callbacks, resume_from,
                           datasets_at(config, data))
        except NonFiniteLossError as error:
            tracking.record_failure(run_id, f"non-finite loss: {error}")
            raise
        summary = RunSummary(run_id, config.tracking.experiment, run.info.experiment_id,
                             result.best_epoch, result.stopped_by)
        if result.best_epoch < 0:
            return summary
        tracking.set_tags({"ptxlab.stopped_by": result.stopped_by,
                           "ptxlab.best_epoch": result.best_epoch})
        if result.averaged:
            tracking.log_metrics(result.averaged)
        figure = plots.learning_curves(result.history, result.best_epoch)
        tracking.log_figure(figure, artifacts.LEARNING_CURVES)
        plots.close(figure)
        summary.metrics, summary.postprocess = _finalize(config, data, result.best_checkpoint,
                                                          workdir, progress)
        summary.test_metrics = score_test_set(run_id, config, progress=progress)
        return summary


def score_test_set(training_run_id: str, config: Config,
                   postprocess: PostProcessing | None = None, log_into: str | None = None,
                   progress: bool = False) -> dict[str, float]:
    """The model of `training_run_id` on the run's test set at native resolution, logged as
    `test_*` into the run `log_into` (default: that run itself); scored with `postprocess`
    instead of the run's own choice when given (a study's evaluation arm). Empty when the
    config has no test set."""
    found = test_set(training_run_id, config.data)
    if found is None:
        return {}
    cases, described, layout = found
    run = load_run(training_run_id)
    if postprocess is not None:
        run = replace(run, postprocess=postprocess)
    return evaluate_cases(run, cases, artifacts.TEST, described, layout, progress=progress,
                          log_into=log_into).metrics


def test_set(training_run_id: str, data: DataConfig) -> tuple[list[Case], str, str] | None:
    """(cases, their description, layout) of `data.test_source`, or of the held-out subset
    the run's split manifest lists (`data.test_fraction`); None without either."""
    if data.test_source:
        return (load_cases(Path(data.test_source), data.test_layout), data.test_source,
                data.test_layout)
    if not data.test_fraction:
        return None
    with tempfile.TemporaryDirectory(prefix="ptxlab-split-") as folder:
        path = tracking.download_artifact(training_run_id, artifacts.SPLIT, Path(folder))
        held_out = set(json.loads(path.read_text()).get(artifacts.TEST, ()))
    cases = [case for case in load_source(data, data.source, data.layout, progress=False)[0]
             if case.case_id in held_out]
    if not held_out or len(cases) != len(held_out):
        raise ValueError(f"run {training_run_id}: its {artifacts.SPLIT} lists "
                         f"{len(held_out)} held-out test cases, {len(cases)} of them are in "
                         f"{data.source}")
    described = (f"{data.source} (held out: data.test_fraction={data.test_fraction:g}, "
                 f"data.test_seed={data.test_seed})")
    return cases, described, data.layout


def _train_as_other_rank(config: Config, ranks: distributed.Ranks) -> RunSummary:
    """A rank > 0: wait for rank 0 to prepare the data and open the run, then train."""
    run_id, resume_from = distributed.Handoff.receive(ranks)
    data = prepare_data(config, progress=False)
    result = train(config, data.train, data.val, checkpoint_dir(run_id), None, resume_from,
                   datasets_at(config, data))
    return RunSummary(run_id, config.tracking.experiment, "", result.best_epoch,
                      result.stopped_by)


class _Callbacks(TrainingCallbacks):
    """MLflow logging first, then progress on stderr, then an optional extra listener (e.g. an
    Optuna pruner)."""

    def __init__(self, tracker: tracking.MlflowCallbacks, reporter: EpochReporter,
                 extra: TrainingCallbacks | None):
        self.tracker = tracker
        self.listeners = [tracker, reporter] + ([extra] if extra else [])

    def on_train_start(self, info: dict) -> None:
        for listener in self.listeners:
            listener.on_train_start(info)

    def on_batch_end(self, epoch: int, batch: int, batches: int, loss: float,
                     images_per_s: float) -> None:
        for listener in self.listeners:
            listener.on_batch_end(epoch, batch, batches, loss, images_per_s)

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        for listener in self.listeners:
            listener.on_epoch_end(epoch, metrics)

    def on_checkpoint(self, epoch: int, path: Path, is_best: bool) -> None:
        for listener in self.listeners:
            listener.on_checkpoint(epoch, path, is_best)


def _finalize(config: Config, data: PreparedData, best_checkpoint: Path, workdir: Path,
              progress: bool) -> tuple[dict[str, float], dict]:
    """Best model on validation: store maps, choose post-processing, log metrics and figures."""
    device = select_device(config.train.device)
    model, _ = load_trained_model(best_checkpoint, device)
    predictions = predict(model, data.val, device, config.train.batch_size, progress=progress)
    maps_path = workdir / artifacts.file_name(artifacts.VALIDATION_MAPS)
    save_probability_maps(maps_path, predictions.ids, predictions.probs, predictions.truths,
                          predictions.class_probs)
    tracking.log_artifact(maps_path, artifacts.folder(artifacts.VALIDATION_MAPS))

    def log_best_model(chosen: PostProcessing) -> dict:
        """The logged model and validation data that the best_val_* metrics describe."""
        return {"model_id": log_model(best_checkpoint, chosen.to_dict(), config, workdir),
                "dataset": _dataset_input(config, data, "validation")}

    metrics, chosen = evaluate_validation(config, predictions, log_best_model)
    _log_overlays(config, data.val, predictions, chosen)
    tracking.log_artifact(best_checkpoint, artifacts.folder(artifacts.MODEL))
    return metrics, chosen.to_dict()


def evaluate_validation(config: Config, predictions: Predictions,
                        link_metrics: Callable[[PostProcessing], dict] | None = None
                        ) -> tuple[dict[str, float], PostProcessing]:
    """Choose the post-processing on the validation maps, score it, log both (and per-image
    Dice, for the report's image bootstrap) into the active run: what a training ends with,
    and what a study's evaluation-only arm does on the maps that training stored.
    `link_metrics(chosen)` gives the model_id and dataset the metrics are logged against."""
    chosen = _choose_postprocessing(config, predictions)
    tracking.log_dict(chosen.to_dict(), artifacts.POSTPROCESS)
    tracking.log_params({f"chosen.postprocess.{k}": v for k, v in chosen.to_dict().items()})
    scored = accumulate(predictions, chosen)
    metrics = scored.compute()
    rows = scored.rows()
    tracking.log_dict({"ids": [r["id"] for r in rows], "dice": [round(r["dice"], 6) for r in rows]},
                      artifacts.PER_IMAGE_DICE)
    linked = link_metrics(chosen) if link_metrics else {}
    tracking.log_metrics({f"best_val_{key}": value for key, value in metrics.items()}, **linked)
    return metrics, chosen


def _choose_postprocessing(config: Config, predictions: Predictions) -> PostProcessing:
    """`choose_postprocessing`, its searches logged into the active run."""
    choice = choose_postprocessing(config, predictions)
    log_choice(choice, config)
    return choice.rule


def choose_postprocessing(config: Config, predictions: Predictions) -> Choice:
    """`postprocess.choose` on validation maps (all, or the seeded subset
    `postprocess.search_images`) with the config's rule, search, objective, grid and gate."""
    pp = config.postprocess
    configured = PostProcessing(pp.rule, threshold=pp.threshold, min_area=pp.min_area,
                                top_threshold=pp.top_threshold, min_top_area=pp.min_top_area,
                                bottom_threshold=pp.bottom_threshold, resolution=pp.resolution)
    subset = search_subset(len(predictions.probs), pp.search_images, config.seed)
    head = None if predictions.class_probs is None else predictions.class_probs[subset]
    return choose(predictions.probs[subset], predictions.truths[subset], configured,
                  pp.search, pp.objective, config.model.gate, head,
                  grid=PAPER_GRID if pp.grid == "paper" else None)


def log_choice(choice: Choice, config: Config) -> None:
    """The searches behind a choice into the active run: tables, and the rule's heatmap."""
    if choice.search is not None:
        _log_search(choice.search, config.postprocess.resolution, config.postprocess.objective)
    if choice.gate_search is not None:
        tracking.log_dict(choice.gate_search.to_dict(), artifacts.GATE_SEARCH)


def _log_search(result: SearchResult, resolution: int, objective: str) -> None:
    """The score table as JSON, and as a threshold x area heatmap."""
    best = result.best
    if best.kind == "threshold":
        rows_label, col_label = "threshold BT", f"min component area RT (px at {resolution}²)"
    else:
        rows_label = "top threshold"
        col_label = f"min top area (px at {resolution}², bottom {best.bottom_threshold:g})"
    heatmap = result.heatmap()
    figure = plots.heatmap(heatmap.scores, heatmap.thresholds, heatmap.areas, rows_label,
                           col_label, f"validation {objective} ({best.kind} rule)", heatmap.best)
    tracking.log_figure(figure, artifacts.POSTPROCESS_SEARCH_PLOT)
    plots.close(figure)
    tracking.log_dict(result.to_dict(), artifacts.POSTPROCESS_SEARCH)


def _log_overlays(config: Config, dataset: SegmentationDataset, predictions: Predictions,
                  pp: PostProcessing) -> None:
    count = config.tracking.overlays
    if not count:
        return
    positives = [i for i, case in enumerate(dataset.cases) if case.positive]
    negatives = [i for i, case in enumerate(dataset.cases) if not case.positive]
    chosen = (positives[: count - count // 4] + negatives[: count // 4])[:count]
    images = [dataset[i][0][0].numpy() for i in chosen]
    figure = plots.overlay_grid(
        images, [predictions.truths[i].astype(np.uint8) for i in chosen],
        [apply(predictions.probs[i], pp, None if predictions.class_probs is None
               else predictions.class_probs[i]) for i in chosen],
        [dataset.cases[i].case_id for i in chosen])
    tracking.log_figure(figure, artifacts.VALIDATION_OVERLAYS)
    plots.close(figure)
