"""`ptxlab evaluate` and `ptxlab predict`: use a logged run's model on new images."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from ptxlab.cli.errors import fail_cleanly

if TYPE_CHECKING:
    from ptxlab.evaluation import Evaluation

RunIdArg = Annotated[str, typer.Argument(help="MLflow run id of a finished training run.",
                                         show_default=False)]
TtaOption = Annotated[str, typer.Option("--tta", help="Test-time augmentation: none or hflip.")]
BatchSizeOption = Annotated[int, typer.Option("--batch-size", min=1, help="Images per batch.")]
COUNT_KEYS = ("n_images", "n_positive")


def evaluate(
    run_id: RunIdArg,
    data: Annotated[Path, typer.Option("--data", help="Dataset folder, in a published layout.",
                                       show_default=False)],
    layout: Annotated[str, typer.Option(
        "--layout", help="auto, siim-png, siim-dicom, ptx498 or folder.")] = "auto",
    tta: TtaOption = "none",
    name: Annotated[str | None, typer.Option(
        "--name", help="Metric prefix and artifact folder (default: the data folder's name).",
        show_default=False)] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print one JSON object of the metrics, nothing else.")] = False,
    batch_size: BatchSizeOption = 8,
) -> None:
    """Score a run at each image's native resolution and log the results into that run."""
    with fail_cleanly():
        from ptxlab.evaluation import evaluate_run

        evaluation = evaluate_run(run_id, data, layout, tta, name, batch_size,
                                  progress=sys.stderr.isatty())
    if as_json:
        print(json.dumps(evaluation.summary()))
        return
    Console().print(_metrics_table(evaluation))
    print(f"logged into run {run_id}: metrics {evaluation.name}_*, "
          f"artifacts evaluation/{evaluation.name}/")


def _metrics_table(evaluation: Evaluation) -> Table:
    columns = {"all": evaluation.metrics, **evaluation.per_site}
    table = Table(title=f"{evaluation.name} (run {evaluation.run_id})",
                  caption=f"tta {evaluation.tta}; post-processing {evaluation.postprocess}")
    table.add_column("metric")
    for column in columns:
        table.add_column(column, justify="right")
    for key in evaluation.metrics:
        cells = [columns[column][key] for column in columns]
        shown = [f"{v:.0f}" if key in COUNT_KEYS else f"{v:.4f}" for v in cells]
        table.add_row(key, *shown)
    return table


def predict(
    run_id: RunIdArg,
    inputs: Annotated[list[Path], typer.Argument(
        help="PNG, JPEG or DICOM files, or folders searched recursively.", show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Folder for masks, overlays and "
                                                    "predictions.csv.", show_default=False)],
    tta: TtaOption = "none",
    with_overlay: Annotated[bool, typer.Option(
        "--overlay/--no-overlay", help="Also write <stem>_overlay.png.")] = True,
    batch_size: BatchSizeOption = 8,
) -> None:
    """Write a native-resolution mask (and overlay) per image, plus predictions.csv."""
    with fail_cleanly():
        from ptxlab.prediction import PREDICTIONS_CSV, predict_files

        rows = predict_files(run_id, inputs, out, tta, with_overlay, batch_size,
                             progress=sys.stderr.isatty())
    positives = sum(int(row["positive"]) for row in rows)
    print(f"wrote {len(rows)} masks ({positives} called positive) and {PREDICTIONS_CSV} to {out}")
