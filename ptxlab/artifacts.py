"""The artifact layout of one training run: every file a run logs, named once.

A run writes these (through `tracking`) and evaluate, predict, resume and post-processing
studies read them back by the same names:

    config/config.yaml                 resolved config: defaults + file + overrides (`--resume`)
    config/source.yaml                 the config file as given, when there was one
    config/augmentation.json           the training transform, as albumentations JSON
    data/split.json                    case ids of the training and validation splits, and of
                                       the held-out test subset (key TEST, data.test_fraction)
    data/skipped.txt                   cases `data.skip_bad` left out, with the reason
    model/best.pt                      best checkpoint (what evaluate and predict load)
    model/postprocess.json             the chosen post-processing (what they replay)
    validation/val_probabilities.npz   validation maps, truths and head probabilities
    validation/postprocess_search.json grid-search table of the post-processing rule
    validation/gate_search.json        grid-search table of the image-level gate
    plots/learning_curves.png, plots/postprocess_search.png, plots/validation_overlays.png
    evaluation/<name>/                 what `ptxlab evaluate` logged (see `evaluation_file`);
                                       evaluation/test/ is the run's own test set (TEST)

An ensemble's run (`ptxlab evaluate` of several runs) holds `ensemble/ensemble.json` (its
members, the study configuration they come from, its post-processing), the searches that chose
that post-processing (as above) and its `evaluation/<name>/`.

and logs the best model as an MLflow model (a LoggedModel, stored apart from the run's
artifacts) named LOGGED_MODEL: `runs:/<run id>/segmenter`, `models:/<model id>`. Its files
`artifacts/best.pt` and `artifacts/postprocess.json` are copies of MODEL and POSTPROCESS.
"""

from __future__ import annotations

import re

RESOLVED_CONFIG = "config/config.yaml"
SOURCE_CONFIG = "config/source.yaml"
AUGMENTATION = "config/augmentation.json"
SPLIT = "data/split.json"
SKIPPED = "data/skipped.txt"
MODEL = "model/best.pt"
POSTPROCESS = "model/postprocess.json"
LOGGED_MODEL = "segmenter"
LOGGED_MODEL_CHECKPOINT = "artifacts/best.pt"  # inside the logged model's folder
LOGGED_MODEL_POSTPROCESS = "artifacts/postprocess.json"
VALIDATION_MAPS = "validation/val_probabilities.npz"
POSTPROCESS_SEARCH = "validation/postprocess_search.json"
GATE_SEARCH = "validation/gate_search.json"
PER_IMAGE_DICE = "validation/per_image_dice.json"  # {"ids": [...], "dice": [...]}, chosen rule
LEARNING_CURVES = "plots/learning_curves.png"
POSTPROCESS_SEARCH_PLOT = "plots/postprocess_search.png"
VALIDATION_OVERLAYS = "plots/validation_overlays.png"

# On a study's parent run: the out-of-fold table of a cross-validation study (`sweep.oof`), and
# its best configuration's fold models on the test set, alone and as an ensemble.
OUT_OF_FOLD = "study/out_of_fold.json"
FOLD_ENSEMBLE = "study/fold_ensemble.json"
TEST = "test"  # the test set's evaluation name (metrics test_*) and its key in SPLIT
ENSEMBLE = "ensemble/ensemble.json"


def folder(artifact: str) -> str:
    """The folder an artifact lives in (what `log_artifact` and `list_artifacts` take)."""
    return artifact.rpartition("/")[0]


def file_name(artifact: str) -> str:
    """The artifact's own file name, e.g. for a local copy before it is logged."""
    return artifact.rpartition("/")[2]


def safe_name(text: str) -> str:
    """`text` reduced to what MLflow metric names and artifact folders take safely: letters,
    digits, `_`, `-` and `.`, other runs replaced by `_`, no `_` or `.` at either end."""
    cleaned = re.sub(r"[^0-9A-Za-z_.-]+", "_", text).strip("_.")
    if not cleaned:
        raise ValueError(f"name {text!r} has no letters or digits; give --name")
    return cleaned


def evaluation_folder(name: str) -> str:
    """Where `ptxlab evaluate --name NAME` logs its files."""
    return f"evaluation/{name}"


def evaluation_file(name: str, file: str) -> str:
    """One file of an evaluation: metrics.json, per_image.csv, confusion_matrix.png, ..."""
    return f"{evaluation_folder(name)}/{file}"
