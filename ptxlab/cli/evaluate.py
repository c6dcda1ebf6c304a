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
from ptxlab.cli.options import BatchSizeOption, LayoutOption, RunIdArg, TtaOption

if TYPE_CHECKING:
    from ptxlab.evaluation import Evaluation

COUNT_KEYS = ("n_images", "n_positive")


def evaluate(
    run_id: RunIdArg,
    data: Annotated[Path, typer.Option("--data", help="Dataset folder, in a published layout.",
                                       show_default=False)],
    layout: LayoutOption = "auto",
    tta: TtaOption = "none",
    name: Annotated[str | None, typer.Option(
        "--name", help="Metric prefix and artifact folder (default: the data folder's name).",
        show_default=False)] = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help="Print one JSON object of the metrics, nothing else.")] = False,
    batch_size: BatchSizeOption = 8,
) -> None:
    """Score a run at each image's native resolution and log the results into that run."""
    with fail_cleanly(as_json):
        from ptxlab.evaluation import evaluate_run

        evaluation = evaluate_run(run_id, data, layout, tta, name, batch_size,
                                  progress=sys.stderr.isatty())
    if as_json:
        print(json.dumps(evaluation.summary()))
        return
    Console().print(_metrics_table(evaluation))
    print(f"logged into run {evaluation.run_id}: metrics {evaluation.name}_*, "
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
