"""A logged run's model applied at each image's native resolution, and `ptxlab predict`'s files.

`load_run` fetches a run's `model/best.pt` and `model/postprocess.json` from MLflow.
`predict_native` streams cases one batch at a time through a `MapSource` (a run, or an
ensemble of runs): each image is brought to the run's input size exactly as training saw it
(INTER_AREA through the resized cache when `data.cache` was on, the evaluation transform's
resize otherwise), predicted, and its uint8 probability map is resized back to the image's own
size with INTER_LINEAR; the run's post-processing then runs on that map, so its areas scale
with the image (`PostProcessing.resolution`). Only the current batch is held.

The image score is the classification head's probability when the model has one, else the
highest pixel probability of the model-resolution map (as in validation); an image is called
positive when its post-processed mask is non-empty.

`predict_files` writes, per input, `<stem>_mask.png` (0/255, native size), optionally
`<stem>_overlay.png` (prediction outlined in red), and one `predictions.csv`. Everything goes to
a hidden staging folder first and is moved into place only when every input succeeded, so a bad
input leaves no output at all. Only pixels are written: no DICOM tag reaches an output.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import cv2
import numpy as np
import torch
from tqdm import tqdm

from ptxlab import tracking
from ptxlab.augment import build_eval_transform
from ptxlab.config import Config
from ptxlab.data.cache import resize_image
from ptxlab.data.cases import Case, DataError
from ptxlab.data.dataset import SegmentationDataset
from ptxlab.data.io import read_image_file
from ptxlab.data.layouts import IMAGE_SUFFIXES
from ptxlab.data.sources import cached_size
from ptxlab.inference import load_trained_model, predict
from ptxlab.metrics import image_scores
from ptxlab.plots import overlay
from ptxlab.postprocess import PostProcessing, apply
from ptxlab.train import select_device
from ptxlab.vocabulary import TTA_MODES

PREDICTIONS_CSV = "predictions.csv"
PREDICTION_COLUMNS = ("file", "predicted_area", "score", "positive")

# Reads one case at native size: (uint8 image, uint8 {0, 1} truth or None when there is none).
NativeReader = Callable[[Case], tuple[np.ndarray, np.ndarray | None]]


class MapSource(Protocol):
    """What `predict_native` predicts with: one run, or an ensemble of runs
    (`ptxlab.ensemble.Ensemble`)."""

    postprocess: PostProcessing

    def native_maps(self, images: list[np.ndarray], tta: str, batch_size: int
                    ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray | None]:
        """Probability maps of native uint8 images at their own sizes (uint8), each image's
        score and classification-head probability (None without a head)."""

    def describe(self) -> dict[str, object]:
        """`run_id` (the run to log into) and `image_size`; an ensemble's also `members`."""


@dataclass
class TrainedRun:
    """What evaluate and predict need of a logged run."""

    run_id: str
    model: torch.nn.Module
    config: Config
    postprocess: PostProcessing
    device: torch.device

    def native_maps(self, images: list[np.ndarray], tta: str, batch_size: int
                    ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray | None]:
        """See `MapSource`: each image brought to the run's input size as validation saw it,
        predicted, and its map resized back with INTER_LINEAR."""
        data = self.config.data
        cache = cached_size(data, self.config.augment.order)

        def model_input(case: Case) -> tuple[np.ndarray, np.ndarray]:
            image = images[int(case.case_id)]
            if data.cache and cache:  # as validation saw it: the cache's resize first
                image = resize_image(image, cache)
            # `predict` also resizes a mask; the truth is scored at native size: pass zeros.
            return image, np.zeros(image.shape, dtype=np.uint8)

        positions = [Case(str(i), Path(str(i)), positive=False) for i in range(len(images))]
        dataset = SegmentationDataset(positions, model_input,
                                      build_eval_transform(data.image_size), seed=0)
        result = predict(self.model, dataset, self.device, batch_size, tta, progress=False)
        maps = [cv2.resize(small, (image.shape[1], image.shape[0]),
                           interpolation=cv2.INTER_LINEAR)
                for image, small in zip(images, result.probs, strict=True)]
        return maps, image_scores(result.probs, result.class_probs), result.class_probs

    def describe(self) -> dict[str, object]:
        """See `MapSource`."""
        return {"run_id": self.run_id, "image_size": self.config.data.image_size}


@dataclass
class NativePrediction:
    """One case predicted and post-processed at its native (H, W)."""

    case: Case
    image: np.ndarray  # uint8 (H, W)
    truth: np.ndarray | None  # uint8 {0, 1} (H, W), when the reader has one
    probs: np.ndarray  # uint8 (H, W), round(p * 255)
    mask: np.ndarray  # uint8 {0, 1} (H, W), post-processed
    score: float


def check_tta(tta: str) -> None:
    if tta not in TTA_MODES:
        raise ValueError(f"--tta {tta!r}: allowed {', '.join(TTA_MODES)}")


def load_run(reference: str, device: torch.device | None = None) -> TrainedRun:
    """The best model, config and chosen post-processing of a run id or an MLflow model URI
    (`runs:/…`, `models:/<model id>`, `models:/<name>/<version>`, `models:/<name>@<alias>`)."""
    device = device or select_device("auto")
    with tempfile.TemporaryDirectory(prefix="ptxlab-run-") as folder:
        run_id, checkpoint, rule = tracking.model_files(reference, Path(folder))
        model, config = load_trained_model(checkpoint, device)
        postprocess = PostProcessing.from_dict(json.loads(rule.read_text()))
    return TrainedRun(run_id, model, config, postprocess, device)


def predict_native(source: MapSource, cases: Sequence[Case], read: NativeReader,
                   batch_size: int = 8, tta: str = "none", progress: bool = True
                   ) -> Iterator[NativePrediction]:
    """Predict `cases` batch by batch, yielding native-resolution results in case order."""
    check_tta(tta)
    with tqdm(total=len(cases), desc="predict", unit="image", leave=False,
              disable=not progress) as bar:
        for start in range(0, len(cases), batch_size):
            batch = list(cases[start : start + batch_size])
            natives = [read(case) for case in batch]
            maps, scores, heads = source.native_maps([image for image, _ in natives], tta,
                                                     batch_size)
            for index, (case, (image, truth), probs) in enumerate(
                    zip(batch, natives, maps, strict=True)):
                head = None if heads is None else float(heads[index])
                yield NativePrediction(case, image, truth, probs,
                                       apply(probs, source.postprocess, head),
                                       float(scores[index]))
            bar.update(len(batch))


def collect_inputs(inputs: Sequence[Path], exclude: Path | None = None) -> list[Path]:
    """Image files named directly or found below named folders (sorted), minus `exclude`.

    One output name per stem: two inputs with the same stem are refused, naming the second.
    """
    excluded = Path(os.path.abspath(exclude)) if exclude is not None else None
    files: list[Path] = []
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            found = sorted(
                p for p in path.rglob("*")
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                and not any(part.startswith(".") for part in p.relative_to(path).parts)
                and (excluded is None or excluded not in Path(os.path.abspath(p)).parents)
            )
            if not found:
                raise DataError(path, "no PNG, JPEG or DICOM files in this folder")
            files.extend(found)
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise DataError(path, "not a PNG, JPEG or DICOM file (by its suffix)")
            files.append(path)
        else:
            raise DataError(path, "no such file or folder")
    by_stem: dict[str, Path] = {}
    for path in files:
        if path.stem in by_stem:
            raise DataError(path, f"same output name {path.stem!r} as {by_stem[path.stem]}")
        by_stem[path.stem] = path
    return files


def _read_image_only(case: Case) -> tuple[np.ndarray, None]:
    return read_image_file(case.image), None


def _write_png(path: Path, pixels: np.ndarray) -> None:
    ok, encoded = cv2.imencode(".png", pixels)
    if not ok:
        raise RuntimeError(f"{path}: PNG encoding failed")
    path.write_bytes(encoded.tobytes())


def predict_files(model: str | MapSource, inputs: Sequence[Path], out: Path, tta: str = "none",
                  with_overlay: bool = True, batch_size: int = 8, progress: bool = True
                  ) -> list[dict[str, object]]:
    """Write masks (and overlays) of every input plus predictions.csv into `out`; return rows.
    `model`: a run reference (see `load_run`) or what `predict_native` takes."""
    check_tta(tta)
    out = Path(out)
    files = collect_inputs(inputs, exclude=out)
    source = load_run(model) if isinstance(model, str) else model
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".predict-", dir=out))
    try:
        cases = [Case(path.stem, path, positive=False) for path in files]
        rows = []
        for result in predict_native(source, cases, _read_image_only, batch_size, tta,
                                     progress):
            stem = result.case.case_id
            _write_png(staging / f"{stem}_mask.png", result.mask * np.uint8(255))
            if with_overlay:
                outlined = overlay(result.image, None, result.mask)
                _write_png(staging / f"{stem}_overlay.png",
                           cv2.cvtColor(outlined, cv2.COLOR_RGB2BGR))
            area = int(np.count_nonzero(result.mask))
            rows.append({"file": str(result.case.image), "predicted_area": area,
                         "score": round(result.score, 6), "positive": int(area > 0)})
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=PREDICTION_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        (staging / PREDICTIONS_CSV).write_text(text.getvalue())
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(out.iterdir()):
            out.rmdir()
        raise
    for written in sorted(staging.iterdir()):
        os.replace(written, out / written.name)
    staging.rmdir()
    return rows
