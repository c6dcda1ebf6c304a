"""`ptxlab evaluate`: score a logged run on a labelled data set, logged into that run."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from ptxlab.cli.errors import fail_cleanly
from ptxlab.cli.options import (
    BatchSizeOption,
    EnsembleConfigOption,
    EnsembleStudyOption,
    LayoutOption,
    ModelsArg,
    StorageOption,
    TtaOption,
)

if TYPE_CHECKING:
    from ptxlab.evaluation import Evaluation

COUNT_KEYS = ("n_images", "n_positive")


def evaluate(
    data: Annotated[Path, typer.Option("--data", help="Dataset folder, in a published layout.",
                                       show_default=False)],
    models: ModelsArg = None,
    layout: LayoutOption = "auto",
    tta: TtaOption = "none",
    name: Annotated[str | None, typer.Option(
        "--name", help="Metric prefix and artifact folder (default: the data folder's name).",
        show_default=False)] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print one JSON object of the metrics, nothing else.")] = False,
    batch_size: BatchSizeOption = 8,
    study: EnsembleStudyOption = None,
    configuration: EnsembleConfigOption = None,
    storage: StorageOption = None,
) -> None:
    """Score a run at each image's native resolution and log the results into that run; score
    an ensemble (several runs, or --study) into a new run of its own."""
    with fail_cleanly(as_json):
        from ptxlab.ensemble import evaluate_models

        evaluation = evaluate_models(models or [], data, layout, tta, name, batch_size,
                                     sys.stderr.isatty(), study, configuration, storage)
    if as_json:
        print(json.dumps(evaluation.summary()))
        return
    Console().print(_metrics_table(evaluation))
    where = f"run {evaluation.run_id}"
    if evaluation.members:
        where = (f"the new ensemble run {evaluation.run_id} (members "
                 f"{', '.join(evaluation.members)})")
    print(f"logged into {where}: metrics {evaluation.name}_*, "
          f"artifacts evaluation/{evaluation.name}/")


def _metrics_table(evaluation: Evaluation) -> Table:
    columns = {"all": evaluation.metrics, **evaluation.per_site}
    kind = f"ensemble of {len(evaluation.members)} runs, " if evaluation.members else ""
    table = Table(title=f"{evaluation.name} ({kind}run {evaluation.run_id})",
                  caption=f"tta {evaluation.tta}; post-processing {evaluation.postprocess}")
    table.add_column("metric")
    for column in columns:
        table.add_column(column, justify="right")
    for key in evaluation.metrics:
        cells = [columns[column][key] for column in columns]
        shown = [f"{v:.0f}" if key in COUNT_KEYS else f"{v:.4f}" for v in cells]
        table.add_row(key, *shown)
    return table
