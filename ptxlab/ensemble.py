"""Ensembles of trained runs: their probability maps averaged, then post-processed once.

Members are named by run references (run ids, `runs:/`, `models:/`: whatever `load_run` takes)
or as the trainings of one configuration of a study (`--study NAME --config key=value,...`: the
K folds of a cross-validated study, the repeats of any other). An evaluation-only arm
contributes the model of the training whose maps it scored; its own configuration decides the
post-processing.

Maps. Each member predicts every image at its own input size exactly as it alone would
(`TrainedRun.native_maps`, flip TTA included), its map is brought back to the image's native
size, and there the members' uint8 maps are averaged (rounded back to uint8: `mean_map`). The
image score is the members' mean score (the mean head probability when they have a
classification head). Members must predict the same targets (mask outputs, head).

Post-processing. For a study configuration, the rule its study chose on the configuration's
pooled out-of-fold maps, when the study logged one (`sweep.oof`: a cross-validated study, one
seed). Otherwise, and for a plain list of runs, the rule is chosen by the code a training ends
with (`experiment.choose_postprocessing`) on the members' pooled stored validation maps: every
case some member validated, the mean of their maps where several did (the ensemble's own
validation prediction), all at the largest member resolution, with the post-processing
settings of the study configuration or of the first member.

`evaluate_ensemble` logs into a new MLflow run tagged `ptxlab.ensemble_members` (a child of the
study's parent run with --study); `predict_models` writes what `ptxlab predict` writes;
`score_ensemble` scores run ids on given cases with a given rule and returns the metrics.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml
from optuna.trial import FrozenTrial, TrialState

from ptxlab import artifacts, tracking
from ptxlab.config import Config
from ptxlab.data.cases import Case
from ptxlab.data.layouts import load_cases
from ptxlab.data.sources import read_pair
from ptxlab.evaluation import Evaluation, default_name, evaluate_cases, evaluate_run
from ptxlab.experiment import choose_postprocessing, log_choice
from ptxlab.inference import Predictions
from ptxlab.metrics import MetricAccumulator
from ptxlab.postprocess import Choice, PostProcessing
from ptxlab.prediction import TrainedRun, check_tta, load_run, predict_files, predict_native
from ptxlab.sweep.source_runs import validation_predictions
from ptxlab.sweep.study import ROLE_ATTR, SCORE, TRAINING_ATTR, StudyHandle, load_existing
from ptxlab.sweep.study_file import Label
from ptxlab.sweep.trainings import training_of

MEMBERS_TAG = "ptxlab.ensemble_members"
CONFIGURATION_TAG = "ptxlab.configuration"
ROLE = "ensemble"  # the ensemble run's `ptxlab.role` tag


def mean_map(maps: Sequence[np.ndarray]) -> np.ndarray:
    """The mean of equal-shaped uint8 probability maps, rounded back to uint8 levels."""
    if len(maps) == 1:
        return maps[0]
    return np.rint(np.mean(np.stack(maps), axis=0, dtype=np.float32)).astype(np.uint8)


@dataclass
class Ensemble:
    """Trained runs that predict as one (what `prediction.predict_native` takes)."""

    members: list[TrainedRun]
    postprocess: PostProcessing

    @property
    def run_ids(self) -> list[str]:
        return [member.run_id for member in self.members]

    @property
    def image_sizes(self) -> list[int]:
        return [member.config.data.image_size for member in self.members]

    def native_maps(self, images: list[np.ndarray], tta: str, batch_size: int
                    ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray | None]:
        """Each member's native-size maps (`TrainedRun.native_maps`), averaged per image;
        the members' mean scores and head probabilities."""
        outputs = [member.native_maps(images, tta, batch_size) for member in self.members]
        maps = [mean_map([output[0][index] for output in outputs])
                for index in range(len(images))]
        scores = np.mean([output[1] for output in outputs], axis=0)
        heads = None if outputs[0][2] is None else np.mean([o[2] for o in outputs], axis=0)
        return maps, scores, heads

    def describe(self) -> dict[str, object]:
        """See `prediction.MapSource` (an ensemble has no run of its own until one is made)."""
        return {"run_id": "", "image_size": self.image_sizes, "members": self.run_ids}


def target(run: TrainedRun) -> str:
    """What a run predicts, in words: its mask outputs and whether it has a classification head."""
    head = getattr(run.model, "segmentation_head", None)
    convs = [m for m in head.modules() if isinstance(m, torch.nn.Conv2d)] if head else []
    outputs = convs[-1].out_channels if convs else "unknown"
    with_head = " + classification head" if run.config.model.classification_head else ""
    return f"mask ({outputs} output{'s' if outputs != 1 else ''}){with_head}"


def load_members(references: Sequence[str]) -> list[TrainedRun]:
    """The runs behind `references`, each named once and all predicting the same targets."""
    members = [load_run(reference) for reference in references]
    ids = [member.run_id for member in members]
    repeated = [run_id for index, run_id in enumerate(ids) if run_id in ids[:index]]
    if repeated:
        raise ValueError(f"run {repeated[0]} is named more than once in the ensemble")
    targets = {member.run_id: target(member) for member in members}
    if len(set(targets.values())) > 1:
        raise ValueError("ensemble members predict different targets: " + "; ".join(
            f"run {run_id}: {what}" for run_id, what in targets.items()))
    return members


def _resized(image: np.ndarray, shape: tuple[int, int], interpolation: int) -> np.ndarray:
    if image.shape == shape:
        return image
    return cv2.resize(image, (shape[1], shape[0]), interpolation=interpolation)


def pooled_validation(run_ids: Sequence[str]) -> Predictions:
    """The runs' stored validation maps as one set (see the module docstring): the mean map of
    each case over the runs that validated it, at the largest of their resolutions (maps
    bilinear; the truth nearest, from the case's largest stored truth)."""
    stored = []
    for run_id in run_ids:
        if not tracking.has_artifact(run_id, artifacts.VALIDATION_MAPS):
            raise FileNotFoundError(
                f"run {run_id}: no {artifacts.VALIDATION_MAPS} logged, and the ensemble's "
                "post-processing is chosen on its members' validation maps")
        stored.append(validation_predictions(run_id)[0])
    shape = max((p.probs.shape[1:] for p in stored), key=lambda s: s[0] * s[1])
    by_case: dict[str, list[tuple[int, int]]] = {}
    for member, predictions in enumerate(stored):
        for index, case_id in enumerate(predictions.ids):
            by_case.setdefault(case_id, []).append((member, index))
    ids = list(by_case)
    probs = np.stack([mean_map([_resized(stored[m].probs[i], shape, cv2.INTER_LINEAR)
                                for m, i in by_case[case_id]]) for case_id in ids])
    truths = []
    for case_id in ids:
        m, i = max(by_case[case_id], key=lambda entry: stored[entry[0]].truths[entry[1]].size)
        truth = stored[m].truths[i].astype(np.uint8)
        truths.append(_resized(truth, shape, cv2.INTER_NEAREST).astype(bool))
    heads = None
    if stored[0].class_probs is not None:
        heads = np.array([np.mean([stored[m].class_probs[i] for m, i in by_case[case_id]])
                          for case_id in ids], dtype=np.float32)
    return Predictions(ids, probs, np.stack(truths), heads)


def configuration_label(params: dict[str, Label]) -> str:
    """A study configuration as `key=value,key=value` (values as the study stores them)."""
    return ",".join(f"{key}={value}" for key, value in params.items())


def parse_configuration(text: str) -> dict[str, str]:
    """`key=value,key=value` as a dict; a value may hold commas (a JSON list's label)."""
    wanted = {}
    for part in re.split(r",\s*(?=[A-Za-z_][\w.-]*=)", text.strip()) if text.strip() else []:
        key, equals, value = part.partition("=")
        if not equals or not key.strip():
            raise ValueError(f"--config {text!r}: expected key=value,key=value")
        wanted[key.strip()] = value.strip()
    return wanted


def _same(value: Label, text: str) -> bool:
    """Whether `text` names the stored value: as written, or read as YAML (0.001 = 1e-3)."""
    if text == str(value):
        return True
    try:
        parsed = yaml.safe_load(text)
    except yaml.YAMLError:
        return False
    if isinstance(parsed, list | dict):
        return json.dumps(parsed, sort_keys=True) == value
    return parsed == value


@dataclass(frozen=True)
class StudyConfiguration:
    """One configuration of a study and the runs that trained it."""

    study: str
    params: dict[str, Label]
    trials: list[int]  # its finished trials (evaluation-only arms included)
    run_ids: list[str]
    config: Config  # its resolved config: the post-processing settings that choose its rule
    parent_run_id: str

    @property
    def label(self) -> str:
        return configuration_label(self.params)


def _select(configurations: list[dict[str, Label]], text: str, handle: StudyHandle
            ) -> dict[str, Label]:
    """The one configuration that `text` (a partial `key=value,...`) names."""
    name = handle.spec.name
    if not configurations:
        raise ValueError(f"study {name!r} has no finished trials yet")
    wanted = parse_configuration(text)
    unknown = sorted(set(wanted) - set(handle.spec.space))
    if unknown:
        raise ValueError(f"--config: {unknown[0]!r} is not a parameter of study {name!r} (its "
                         f"parameters: {', '.join(handle.spec.space)})")
    matching = [params for params in configurations
                if all(key in params and _same(params[key], value)
                       for key, value in wanted.items())]
    if len(matching) == 1:
        return matching[0]
    listed = " | ".join(configuration_label(params) for params in matching or configurations)
    if not matching:
        raise ValueError(f"--config {text!r} names none of the configurations of study "
                         f"{name!r}: {listed}")
    if not wanted:
        raise ValueError(f"study {name!r} has {len(matching)} configurations; name one with "
                         f"--config: {listed}")
    raise ValueError(f"--config {text!r} names {len(matching)} configurations of study {name!r}; "
                     f"give more of its parameters: {listed}")


def _training_runs(chosen: list[FrozenTrial], trials: list[FrozenTrial],
                   handle: StudyHandle) -> list[str]:
    """The runs that trained the chosen trials: their own, or for evaluation-only arms the run
    of the training they scored; in repeat (fold) order."""
    runs: list[str] = []
    for trial in sorted(chosen, key=lambda t: (t.user_attrs.get("repeat", 0), t.number)):
        trainer: FrozenTrial | None = trial
        if trial.user_attrs.get(ROLE_ATTR) == SCORE:
            training = training_of(trials, trial.user_attrs[TRAINING_ATTR],
                                   trial.user_attrs["repeat"], handle.spec.heartbeat)
            trainer = training.trial if training.state == "done" else None
        run_id = trainer.user_attrs.get("mlflow_run_id") if trainer else None
        if run_id and run_id not in runs:
            runs.append(run_id)
    return runs


def study_configuration(study: str, configuration: str = "", storage: str | None = None
                        ) -> StudyConfiguration:
    """The configuration of study `study` (a name or study file) that `configuration` names, and
    the runs that trained its finished trials."""
    handle, _ = load_existing(study, storage)
    spec = handle.spec
    if spec.mode != "train":
        raise ValueError(f"study {spec.name!r} is a mode {spec.mode} study: it trained no models")
    trials = handle.study.get_trials(deepcopy=False)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    configurations: list[dict[str, Label]] = []
    for trial in finished:
        if trial.params not in configurations:
            configurations.append(trial.params)
    configurations.sort(key=configuration_label)
    params = _select(configurations, configuration, handle)
    label = configuration_label(params)
    chosen = [t for t in finished if t.params == params]
    run_ids = _training_runs(chosen, trials, handle)
    if not run_ids:
        raise ValueError(f"study {spec.name!r}, configuration {label}: no finished training")
    config = handle.trial_config(params, 0, where=f"study {spec.name}: {label}")
    return StudyConfiguration(spec.name, params, [t.number for t in chosen], run_ids, config,
                              handle.parent_run_id)


def out_of_fold_rule(selection: StudyConfiguration) -> PostProcessing | None:
    """The rule a cross-validated study chose on the configuration's pooled out-of-fold maps
    (its parent run's `artifacts.OUT_OF_FOLD`, one row per configuration and seed), when it
    logged one and the configuration has one seed; None otherwise (several seeds' rules
    differ: the ensemble of all of them chooses its own)."""
    parent = selection.parent_run_id
    if not tracking.has_artifact(parent, artifacts.OUT_OF_FOLD):
        return None
    with tempfile.TemporaryDirectory(prefix="ptxlab-oof-") as folder:
        table = json.loads(tracking.download_artifact(parent, artifacts.OUT_OF_FOLD,
                                                      Path(folder)).read_text())
    column = {name: index for index, name in enumerate(table["columns"])}
    if "postprocess" not in column:  # logged before the table held the rule itself
        return None
    rows = [row for row in table["data"] if set(row[column["trials"]]) <= set(selection.trials)]
    if len(rows) != 1:
        return None
    return PostProcessing.from_dict(rows[0][column["postprocess"]])


@dataclass
class Resolved:
    """An ensemble ready to predict: its members, its post-processing and where they come from."""

    members: list[TrainedRun]
    choice: Choice
    config: Config  # whose post-processing settings chose `choice`
    rule_source: str  # where the rule comes from, in words
    study: StudyConfiguration | None = None

    @property
    def ensemble(self) -> Ensemble:
        return Ensemble(self.members, self.choice.rule)

    def description(self) -> dict[str, object]:
        """What the ensemble is, as JSON: members, configuration, rule."""
        described: dict[str, object] = {
            "members": [{"run_id": m.run_id, "image_size": m.config.data.image_size,
                         "encoder": m.config.model.encoder} for m in self.members],
            "postprocess": self.choice.rule.to_dict(),
            "postprocess_from": self.rule_source}
        if self.study:
            described.update(study=self.study.study, configuration=self.study.params,
                             study_parent_run=self.study.parent_run_id)
        return described


def split_references(references: Sequence[str]) -> list[str]:
    """Run references as given: several arguments, or comma-separated in one."""
    return [part.strip() for given in references for part in given.split(",") if part.strip()]


def resolve(references: Sequence[str], study: str | None = None, configuration: str | None = None,
            storage: str | None = None) -> Resolved:
    """The ensemble of the runs `references` name, or of a study configuration's trainings."""
    references = split_references(references)
    if study is None:
        if configuration is not None or storage is not None:
            raise ValueError("--config and --storage select runs of a study: give --study NAME")
        if not references:
            raise ValueError("name the runs (run ids or model URIs), or --study NAME --config "
                             "key=value,...")
        members = load_members(references)
        return Resolved(members, *_validation_choice(members, members[0].config))
    if references:
        raise ValueError("give either runs or --study, not both")
    selection = study_configuration(study, configuration or "", storage)
    members = load_members(selection.run_ids)
    rule = out_of_fold_rule(selection)
    if rule is None:
        return Resolved(members, *_validation_choice(members, selection.config), selection)
    return Resolved(members, Choice(rule), selection.config,
                    "chosen by the study on the configuration's pooled out-of-fold maps",
                    selection)


def _validation_choice(members: list[TrainedRun], config: Config
                       ) -> tuple[Choice, Config, str]:
    """The rule `config`'s post-processing settings choose on the members' pooled validation
    maps, those settings, and where the rule comes from."""
    choice = choose_postprocessing(config, pooled_validation([m.run_id for m in members]))
    source = ("searched on the members' pooled validation maps" if choice.search
              else "configured (postprocess.search: false)")
    return choice, config, source


def is_ensemble(references: Sequence[str], study: str | None) -> bool:
    """More than one run, or a study's: anything but the single run evaluate always took."""
    return study is not None or len(split_references(references)) != 1


def evaluate_ensemble(resolved: Resolved, data: Path, layout: str = "auto", tta: str = "none",
                      name: str | None = None, batch_size: int = 8, progress: bool = True
                      ) -> Evaluation:
    """Score the ensemble on the data set at `data`, logged into a new run of its own (in the
    first member's experiment, or a child of the study's parent run)."""
    check_tta(tta)
    name = artifacts.safe_name(name) if name else default_name(data, tta)
    cases = load_cases(Path(data), layout)
    ensemble, study = resolved.ensemble, resolved.study
    tags = {"ptxlab.role": ROLE, MEMBERS_TAG: ",".join(ensemble.run_ids)}
    if study:
        tags.update({"ptxlab.study": study.study, CONFIGURATION_TAG: study.label})
    parent = study.parent_run_id if study else None
    with tracking.open_run(tracking.experiment_name(parent or ensemble.run_ids[0]),
                           f"ensemble of {len(ensemble.members)} runs", parent_run_id=parent,
                           tags=tags, system_metrics=False) as run:
        tracking.log_dict(resolved.description(), artifacts.ENSEMBLE)
        tracking.log_params({f"chosen.postprocess.{key}": value
                             for key, value in ensemble.postprocess.to_dict().items()})
        log_choice(resolved.choice, resolved.config)
        return evaluate_cases(ensemble, cases, name, str(data), layout, tta, batch_size,
                              progress=progress, log_into=run.info.run_id)


def evaluate_models(references: Sequence[str], data: Path, layout: str = "auto",
                    tta: str = "none", name: str | None = None, batch_size: int = 8,
                    progress: bool = True, study: str | None = None,
                    configuration: str | None = None, storage: str | None = None
                    ) -> Evaluation:
    """`ptxlab evaluate`: one run as it always was (`evaluate_run`, logged into that run), or
    the ensemble of several runs or of a study configuration (`evaluate_ensemble`)."""
    check_tta(tta)
    if not is_ensemble(references, study):
        return evaluate_run(split_references(references)[0], data, layout, tta, name,
                            batch_size, progress=progress)
    return evaluate_ensemble(resolve(references, study, configuration, storage), data, layout,
                             tta, name, batch_size, progress)


def predict_models(references: Sequence[str], inputs: Sequence[Path], out: Path,
                   tta: str = "none", with_overlay: bool = True, batch_size: int = 8,
                   progress: bool = True, study: str | None = None,
                   configuration: str | None = None, storage: str | None = None
                   ) -> tuple[list[dict[str, object]], list[str]]:
    """`ptxlab predict` with one run or an ensemble: the rows `predict_files` wrote, and the
    run ids that predicted them."""
    check_tta(tta)
    if not is_ensemble(references, study):
        reference = split_references(references)[0]
        return predict_files(reference, inputs, out, tta, with_overlay, batch_size,
                             progress), [reference]
    ensemble = resolve(references, study, configuration, storage).ensemble
    return predict_files(ensemble, inputs, out, tta, with_overlay, batch_size,
                         progress), ensemble.run_ids


def score_ensemble(run_ids: Sequence[str], cases: Sequence[Case], rule: PostProcessing,
                   tta: str = "none", batch_size: int = 8, progress: bool = False
                   ) -> dict[str, float]:
    """The metrics (`metrics.METRIC_KEYS`) of the ensemble of `run_ids` (any run references) on
    labelled `cases`, read and scored at native size as `ptxlab evaluate` does, with `rule` as
    its post-processing. Nothing is logged."""
    ensemble = Ensemble(load_members(run_ids), rule)
    accumulator = MetricAccumulator()
    for result in predict_native(ensemble, cases, read_pair, batch_size, tta, progress):
        accumulator.update(result.mask[None], result.truth[None], [result.score],
                           ids=[result.case.case_id])
    return accumulator.compute()
