"""The one typed configuration of a run: load YAML, apply `--set key=value` overrides, validate."""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ptxlab.vocabulary import (
    AugmentOrder,
    Gate,
    InputScaling,
    LayoutChoice,
    Objective,
    Preset,
    Rule,
    SearchGrid,
    Split,
)


class ConfigError(ValueError):
    """A configuration problem, reported as one line."""


STAGE = "stage"  # schema marker: "evaluation" for keys that cannot change the trained weights
EVALUATION = {STAGE: "evaluation"}
TRAINING = {STAGE: "training"}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticConfig(_Section):
    """The embedded phantom data set (used when `data.source` is `synthetic`)."""

    n_images: int = Field(320, ge=4)
    positive_fraction: float = Field(0.5, ge=0.0, le=1.0)
    size: int = Field(256, ge=32, le=2048)
    seed: int = Field(0, description="data seed, separate from the training seed")


Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class DataConfig(_Section):
    source: str = "synthetic"
    layout: LayoutChoice = "auto"
    test_source: str | None = None
    test_layout: LayoutChoice = "auto"
    test_fraction: float = Field(
        0.0, ge=0.0, lt=1.0, description="hold out this share of the source's positives and "
        "of its negatives as a test subset, scored like test_source; 0: none")
    test_seed: int = Field(
        0, description="seed of the test subset alone: fixed across seed, split_seed and folds")
    image_size: int = Field(128, ge=32, le=2048)
    cache_size: int | None = Field(
        None, ge=32, le=4096, description="side of the cached pairs; null: data.image_size "
        "under augment.order=resize-first, the source's own resolution under source-first")
    split: Split = Field(
        "stratified", description="random = the study's train_test_split(shuffle=True), "
        "seeded by split_seed")
    val_fraction: float = Field(0.15, gt=0.0, lt=1.0)
    split_seed: int | None = Field(
        None, description="seed of the train/validation split; null: the run's `seed`")
    folds: int = Field(1, ge=1, description="1 = a single stratified split; k > 1 = k-fold")
    fold: int = Field(0, ge=0)
    missing_mask_is_negative: bool = False
    skip_bad: bool = False
    cache: bool = True
    cache_dir: str | None = Field(None, description="default: $PTXLAB_CACHE or ~/.cache/ptxlab")
    num_workers: int = Field(0, ge=0)
    positive_fraction: Fraction | tuple[Fraction, Fraction] | None = Field(
        None, description="share of positive images each training epoch draws (with "
        "replacement where needed); [start, end] changes linearly over the epochs; null: "
        "every image once")
    synthetic: SyntheticConfig = SyntheticConfig()

    @model_validator(mode="after")
    def _fold_in_range(self) -> DataConfig:
        if self.folds > 1 and self.fold >= self.folds:
            raise ValueError(f"data.fold={self.fold} must be < data.folds={self.folds}")
        if self.split == "random" and self.folds > 1:
            raise ValueError("data.split=random is a single split; use data.folds=1")
        if self.test_fraction > 0 and self.test_source:
            raise ValueError("data.test_fraction and data.test_source both make the test set "
                             "`test`; set one of them")
        return self


class ModelConfig(_Section):
    arch: Literal["Unet", "UnetPlusPlus", "FPN", "DeepLabV3Plus"] = "Unet"
    encoder: str = "tu-tf_efficientnet_lite0"
    encoder_weights: str | None = "lite0-imagenet"
    decoder_channels: list[int] = Field([128, 64, 32, 16, 8], min_length=1, max_length=5)
    classification_head: bool = False
    gate: Gate = Field(
        "none", description="image-level decision that can empty a mask; searched on validation",
        json_schema_extra=EVALUATION)
    freeze_encoder_epochs: int = Field(0, ge=0)
    input_scaling: InputScaling = Field(
        "encoder", description="encoder: the pretrained weights' mean/std; unit: pixels / 255 "
        "with no mean/std (the study's script)")
    channels_last: bool = False
    compile: bool = False

    @model_validator(mode="after")
    def _head_gate_needs_head(self) -> ModelConfig:
        if self.gate == "head" and not self.classification_head:
            raise ValueError("model.gate=head needs model.classification_head=true")
        return self


class AugmentConfig(_Section):
    preset: Preset = "light"
    strength: float = Field(1.0, ge=0.0, le=1.0)
    order: AugmentOrder = Field(
        "resize-first", description="source-first augments at the cached (source) resolution "
        "and resizes to data.image_size last, as the study's script did")


class LossConfig(_Section):
    bce_weight: float = Field(1.0, ge=0.0)
    dice_weight: float = Field(1.0, ge=0.0)
    classification_weight: float = Field(0.5, ge=0.0)


class OptimConfig(_Section):
    lr: float = Field(1e-3, gt=0.0)
    lr_min: float = Field(1e-5, ge=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    reference_batch: int = Field(16, ge=1)


class PhaseConfig(_Section):
    """One phase of `train.phases`: its own image size, epochs, batch, freezing and LR."""

    image_size: int = Field(ge=32, le=2048)
    epochs: int = Field(ge=1)
    batch_size: int | None = Field(None, ge=1, description="null: train.batch_size")
    freeze_encoder_epochs: int = Field(0, ge=0, description="from the phase's first epoch")
    lr: float | None = Field(None, gt=0.0, description="the phase's peak LR; null: optim.lr")


class TrainConfig(_Section):
    epochs: int = Field(15, ge=1)
    max_steps: int | None = Field(None, ge=1, description="fix optimizer updates instead of epochs")
    batch_size: int = Field(16, ge=1)
    accumulate: int = Field(1, ge=1)
    amp: bool = True
    amp_dtype: Literal["fp16", "bf16"] = "fp16"
    early_stopping_patience: int = Field(5, ge=0, description="0 disables early stopping")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int = Field(0, ge=0, description="CPU threads for torch; 0 = torch's default")
    max_train_batches: int | None = Field(None, ge=1, description="cap per epoch (smoke tests)")
    phases: list[PhaseConfig] | None = Field(
        None, min_length=1, description="train in phases (e.g. 512 then 1024), one MLflow run; "
        "each restarts the cosine schedule; the last one's image_size is data.image_size")
    average_top_k: int | None = Field(
        None, ge=2, description="average the weights of the k best epochs at the end; the "
        "average becomes the model when it validates better")
    keep_checkpoints: bool = Field(
        False, description="keep the local checkpoints of a FINISHED run (the best model is an "
                           "MLflow artifact either way)")


class PostprocessConfig(_Section):
    """How probability maps become masks; areas are pixels at `resolution`².

    Evaluation-only (a study scores these on a training's stored maps), except `threshold`:
    per-epoch validation uses it, and that chooses the best checkpoint.

    `threshold` rule: probability > BT (`threshold`), then components smaller than RT
    (`min_area`) removed. `triplet` rule: empty unless at least `min_top_area` pixels exceed
    `top_threshold`, then probability > `bottom_threshold`. With `search`, the rule's
    parameters are grid-searched on the best model's validation maps after training and the
    optimum is what evaluate/predict use. `threshold` is also the plain threshold that
    per-epoch validation uses.
    """

    rule: Rule = Field(
        "threshold", description="threshold = the study's BT + RT; triplet = the winners' rule")
    threshold: float = Field(0.5, gt=0.0, lt=1.0, json_schema_extra=TRAINING)
    min_area: int = Field(0, ge=0)
    top_threshold: float = Field(0.75, gt=0.0, lt=1.0)
    min_top_area: int = Field(512, ge=0)
    bottom_threshold: float = Field(0.4, gt=0.0, lt=1.0)
    resolution: int = Field(512, ge=1)
    search: bool = True
    objective: Objective = "pooled_iou"
    grid: SearchGrid = Field(
        "auto", description="paper: the study's BT x RT grid exactly, never widened")
    search_images: int | None = Field(
        None, ge=1, description="search on a seeded random subset of this many validation "
        "images (the study: 256); null: all of them")

    @model_validator(mode="after")
    def _paper_grid_is_for_threshold(self) -> PostprocessConfig:
        if self.grid == "paper" and self.rule != "threshold":
            raise ValueError("postprocess.grid=paper is the study's BT x RT grid; it needs "
                             "postprocess.rule=threshold (use grid=auto for triplet)")
        return self

    model_config = ConfigDict(json_schema_extra=EVALUATION)


class TrackingConfig(_Section):
    experiment: str = "ptxlab"
    run_name: str | None = None
    system_metrics: bool = True
    overlays: int = Field(8, ge=0)
    preflight_timeout_s: float = Field(
        5.0, gt=0, description="how long a run waits for the tracking server before giving up")


class Config(_Section):
    """Everything one training run does. The defaults are the CPU quick configuration
    (experiments/default.yaml); experiments/paper.yaml is the published study's setup."""

    seed: int = 42
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    augment: AugmentConfig = AugmentConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    postprocess: PostprocessConfig = PostprocessConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _phases_end_at_the_image_size(self) -> Config:
        phases = self.train.phases
        if phases and phases[-1].image_size != self.data.image_size:
            raise ValueError(f"the last of train.phases has image_size={phases[-1].image_size}; "
                             f"it must equal data.image_size={self.data.image_size}")
        if phases and self.train.max_steps is not None:
            raise ValueError("train.phases set their epochs; use train.max_steps=null")
        return self

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, the form logged as MLflow params."""
        return flatten(self.model_dump(mode="json"))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _stage_of(marked: Any) -> str | None:
    extra = getattr(marked, "json_schema_extra", None)
    if extra is None and isinstance(marked, type) and issubclass(marked, BaseModel):
        extra = marked.model_config.get("json_schema_extra")
    return extra.get(STAGE) if isinstance(extra, dict) else None


def evaluation_only(key: str) -> bool:
    """Whether a dotted config key only affects evaluation after training (post-processing,
    the image-level gate), never the trained weights: the schema's `stage` markers decide, the
    innermost one (field, else its section) winning; unmarked keys count as training keys."""
    section: type[BaseModel] = Config
    stage = _stage_of(section)
    for part in key.split("."):
        field = section.model_fields.get(part)
        if field is None:
            break
        annotation = field.annotation
        is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
        stage = _stage_of(field) or (_stage_of(annotation) if is_section else None) or stage
        if not is_section:
            break
        section = annotation
    return stage == "evaluation"


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = value
    return flat


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.batch_size=8` -> (["train", "batch_size"], 8); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.batch_size=8")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"--set {text!r}: value is not valid YAML ({err.problem})") from None
    return key.strip().split("."), value


def apply_overrides(tree: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `--set KEY=VALUE` texts to a nested dict (see `set_dotted`)."""
    for text in overrides:
        path, value = parse_override(text)
        set_dotted(tree, path, value)
    return tree


def set_dotted(tree: dict[str, Any], path: list[str], value: Any) -> None:
    """Set the key at `path` (["train", "batch_size"]) in a nested config dict, refusing keys
    the schema does not know and values where a section belongs."""
    node = tree
    section: type[BaseModel] = Config
    for depth, part in enumerate(path):
        dotted = ".".join(path[: depth + 1])
        if part not in section.model_fields:
            where = ".".join(path[:depth]) or "the top level"
            raise ConfigError(
                f"unknown key {dotted!r}: {where} has {', '.join(section.model_fields)}"
            )
        if depth == len(path) - 1:
            node[part] = value
            return
        annotation = section.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            raise ConfigError(f"key {dotted!r} is a value, not a section")
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
        section = annotation


def describe_error(error: ValidationError, source: str, overridden: Collection[str] = ()) -> str:
    """pydantic's first problem as one line: '<source>: <key>: <problem>', where the source is
    `--set` for a key in `overridden`."""
    first = error.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    if key in overridden:
        source = "--set"
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        message = "unknown key"
    elif first["type"] == "literal_error":
        allowed = first.get("ctx", {}).get("expected", "")
        message = f"got {first.get('input')!r}, allowed: {allowed}"
    return f"{source}: {key}: {message}" if key else f"{source}: {message}"


def validate(tree: dict[str, Any], source: str, overridden: Collection[str] = ()) -> Config:
    """The Config of a nested dict; a problem is one ConfigError line naming `source` (or
    `--set` for a key in `overridden`)."""
    try:
        return Config.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(describe_error(err, source, overridden)) from None


def read_yaml_mapping(path: Path, kind: str) -> dict[str, Any]:
    """A YAML file whose top level is a mapping; problems are one line naming the file."""
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such {kind} file") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})".replace("\n", " ")) from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return tree


def load_config(path: Path | str | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults), apply overrides, validate. Errors are one line."""
    source = str(path) if path else "defaults"
    tree = read_yaml_mapping(Path(path), "config") if path is not None else {}
    overridden = {item.split("=", 1)[0].strip() for item in overrides or []}
    return validate(apply_overrides(tree, overrides or []), source, overridden)


def config_as_text(config: Config, fmt: Literal["yaml", "json"] = "yaml") -> str:
    if fmt == "json":
        return json.dumps(config.model_dump(mode="json"), indent=2)
    return config.to_yaml()
