"""`ptxlab evaluate`: score a logged run on a data set at native resolution, log into that run.

The run's model predicts every case at the run's input size; maps are resized back to each
image's own size and post-processed there (see `ptxlab.prediction`), and scored against the
native masks with the three metric families of `ptxlab.metrics` (pooled pixel, per-image Dice,
image-level detection), plus the same per site when the cases carry sites. The data set is
streamed a batch at a time: only per-image confusion counts and the gallery's few worst cases
(as thumbnails) are kept.

Logged into the run itself through the MLflow client, which leaves its status as it was
(FINISHED stays FINISHED): metrics `<name>_<key>` and `<name>_<site>_<key>` (NaN is not
logged), and under `evaluation/<name>/`: `metrics.json` (what was evaluated, how, and every
metric), `per_image.csv`, `confusion_matrix.png` (image-level calls) and `worst_cases.png`.
The name defaults to the data folder's name, with `_hflip` appended under flip TTA; names and
sites are reduced to letters, digits, `_`, `-` and `.`. `evaluate_cases` does the same for
given cases (a run's held-out test subset), optionally logging into another run (a study's
evaluation arm, which scores its training's model with its own post-processing).
"""

from __future__ import annotations

import csv
import heapq
import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import count
from pathlib import Path

import cv2
import numpy as np

from ptxlab import artifacts, plots, tracking
from ptxlab.data.cases import Case
from ptxlab.data.layouts import load_cases
from ptxlab.data.sources import read_pair
from ptxlab.metrics import MetricAccumulator, dice_from_counts
from ptxlab.prediction import (
    MapSource,
    NativePrediction,
    check_tta,
    load_run,
    predict_native,
)

GALLERY_SIZE = 8
THUMBNAIL_SIDE = 512
PER_IMAGE_COLUMNS = ("id", "site", "truth_area", "pred_area", "dice", "iou", "score")
UNASSIGNED_SITE = "unassigned"


@dataclass
class Evaluation:
    """Everything `evaluate_run` measured; `summary()` is its JSON form."""

    run_id: str
    name: str
    data: str
    layout: str
    tta: str
    image_size: int | list[int]  # an ensemble's: its members'
    postprocess: dict[str, object]
    metrics: dict[str, float]
    per_site: dict[str, dict[str, float]] = field(default_factory=dict)
    rows: list[dict[str, object]] = field(default_factory=list)
    confusion: np.ndarray = field(default_factory=lambda: np.zeros((2, 2), dtype=np.int64))
    members: list[str] = field(default_factory=list)  # an ensemble's run ids

    def logged_metrics(self) -> dict[str, float]:
        """Metric name -> value as logged in the run (NaN left out)."""
        named = {f"{self.name}_{key}": value for key, value in self.metrics.items()}
        for site, metrics in self.per_site.items():
            named.update({f"{self.name}_{site}_{key}": value for key, value in metrics.items()})
        return {key: value for key, value in named.items() if not math.isnan(value)}

    def summary(self) -> dict[str, object]:
        """A JSON-safe description (NaN as null) of the evaluation and its metrics."""
        return {
            "run_id": self.run_id,
            **({"members": self.members} if self.members else {}),
            "name": self.name,
            "data": self.data,
            "layout": self.layout,
            "tta": self.tta,
            "image_size": self.image_size,
            "postprocess": self.postprocess,
            "metrics": _json_safe(self.metrics),
            "per_site": {site: _json_safe(m) for site, m in self.per_site.items()},
            "image_confusion": {"rows": "truth negative, positive",
                                "columns": "called negative, positive",
                                "counts": self.confusion.tolist()},
        }


def _json_safe(metrics: dict[str, float]) -> dict[str, float | None]:
    return {key: None if math.isnan(value) else value for key, value in metrics.items()}


def default_name(data: Path, tta: str) -> str:
    """The data folder's name (with `_hflip` under flip TTA), made metric-safe."""
    folder = Path(os.path.abspath(data)).name  # "." and ".." named, symlinks not followed
    return artifacts.safe_name(folder if tta == "none" else f"{folder}_{tta}")


class WorstCases:
    """The `size` lowest-Dice cases seen so far (ties: more wrong pixels first), as thumbnails."""

    def __init__(self, size: int = GALLERY_SIZE):
        self.size = size
        self._heap: list[tuple[float, int, int, dict[str, object]]] = []
        self._order = count()

    def offer(self, result: NativePrediction) -> None:
        if not self.size:
            return
        truth = result.truth.astype(bool)
        mask = result.mask.astype(bool)
        tp = np.count_nonzero(mask & truth)
        wrong = np.count_nonzero(mask ^ truth)
        dice = float(dice_from_counts(tp, np.count_nonzero(mask) - tp,
                                      np.count_nonzero(truth) - tp))
        # Heap top = the least bad case kept, so it is the one a worse case replaces.
        key = (-dice, wrong, -next(self._order))
        if len(self._heap) == self.size and key <= self._heap[0][:3]:
            return
        entry = (*key, {"id": result.case.case_id, "dice": dice,
                        **_thumbnails(result.image, result.truth, result.mask)})
        if len(self._heap) < self.size:
            heapq.heappush(self._heap, entry)
        else:
            heapq.heapreplace(self._heap, entry)

    def cases(self) -> list[dict[str, object]]:
        """Kept cases, worst first."""
        return [entry[3] for entry in sorted(self._heap, reverse=True)]


def _thumbnails(image: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
    scale = min(1.0, THUMBNAIL_SIDE / max(image.shape))
    if scale == 1.0:
        return {"image": image.copy(), "truth": truth.copy(), "mask": mask.copy()}
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    return {
        "image": cv2.resize(image, size, interpolation=cv2.INTER_AREA),
        "truth": cv2.resize(truth, size, interpolation=cv2.INTER_NEAREST),
        "mask": cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST),
    }


def evaluate_run(reference: str, data: Path, layout: str = "auto", tta: str = "none",
                 name: str | None = None, batch_size: int = 8, gallery_size: int = GALLERY_SIZE,
                 progress: bool = True) -> Evaluation:
    """Score a run's model (a run id or model URI, see `load_run`) on the data set at `data` and
    log the results into the run that trained it."""
    check_tta(tta)
    name = artifacts.safe_name(name) if name else default_name(data, tta)
    cases = load_cases(Path(data), layout)
    return evaluate_cases(load_run(reference), cases, name, str(data), layout, tta, batch_size,
                          gallery_size, progress)


def evaluate_cases(run: MapSource, cases: Sequence[Case], name: str, data: str,
                   layout: str = "auto", tta: str = "none", batch_size: int = 8,
                   gallery_size: int = GALLERY_SIZE, progress: bool = True,
                   log_into: str | None = None) -> Evaluation:
    """Score `run` (a run, or an ensemble) with its post-processing on `cases` (`data` and
    `layout` say where they come from) and log the results as `name` into the run `log_into`
    (default: the run that trained the model)."""
    check_tta(tta)
    name = artifacts.safe_name(name)
    with_sites = any(case.site for case in cases)
    accumulator = MetricAccumulator()
    worst = WorstCases(gallery_size)
    for result in predict_native(run, cases, read_pair, batch_size, tta, progress):
        site = artifacts.safe_name(result.case.site) if result.case.site else UNASSIGNED_SITE
        accumulator.update(result.mask[None], result.truth[None], [result.score],
                           groups=[site if with_sites else ""], ids=[result.case.case_id])
        worst.offer(result)
    rows = [{column: row["group" if column == "site" else column] for column in PER_IMAGE_COLUMNS}
            for row in accumulator.rows()]
    described = run.describe()
    evaluation = Evaluation(
        run_id=log_into or described["run_id"], name=name, data=data, layout=layout, tta=tta,
        image_size=described["image_size"], postprocess=run.postprocess.to_dict(),
        metrics=accumulator.compute(),
        per_site=accumulator.per_group() if with_sites else {},
        rows=rows,
        confusion=accumulator.image_confusion(),
        members=described.get("members", []),
    )
    log_evaluation(evaluation, worst.cases())
    return evaluation


def per_image_csv(rows: list[dict[str, object]]) -> str:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=PER_IMAGE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return text.getvalue()


def _short(case_id: str, keep: int = 32) -> str:
    """Long ids (SIIM UIDs) cut to their distinctive end, so gallery titles fit."""
    return case_id if len(case_id) <= keep else "..." + case_id[-keep:]


def log_evaluation(evaluation: Evaluation, gallery: list[dict[str, object]]) -> None:
    """Metrics and artifacts into the evaluated run, leaving its status unchanged."""
    client = tracking.configure()
    run_id = evaluation.run_id
    name = evaluation.name
    client.log_dict(run_id, evaluation.summary(), artifacts.evaluation_file(name, "metrics.json"))
    client.log_text(run_id, per_image_csv(evaluation.rows),
                    artifacts.evaluation_file(name, "per_image.csv"))
    figure = plots.confusion_matrix(evaluation.confusion, ["negative", "positive"],
                                    f"{evaluation.name}: image-level calls (mask non-empty)")
    client.log_figure(run_id, figure, artifacts.evaluation_file(name, "confusion_matrix.png"))
    plots.close(figure)
    if gallery:
        figure = plots.overlay_grid(
            [case["image"] for case in gallery], [case["truth"] for case in gallery],
            [case["mask"] for case in gallery],
            [f"Dice {case['dice']:.3f}  {_short(str(case['id']))}" for case in gallery])
        client.log_figure(run_id, figure, artifacts.evaluation_file(name, "worst_cases.png"))
        plots.close(figure)
    for key, value in evaluation.logged_metrics().items():
        client.log_metric(run_id, key, float(value))

