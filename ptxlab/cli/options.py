"""Arguments and options that more than one command takes, defined once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ptxlab.vocabulary import LAYOUT_CHOICES, TTA_MODES, spoken

ModelsArg = Annotated[list[str] | None, typer.Argument(
    help="A finished training run's id, or its MLflow model: runs:/<run id>/segmenter, "
         "models:/<model id>, models:/<registered name>/<version> or models:/<name>@<alias>. "
         "Several (or RUN,RUN): their ensemble. None with --study.", show_default=False)]
EnsembleStudyOption = Annotated[str | None, typer.Option(
    "--study", help="The ensemble of a study's trainings of one configuration (its folds, or "
                    "repeats): the study's name or file.", show_default=False)]
EnsembleConfigOption = Annotated[str | None, typer.Option(
    "--config", help="With --study: the configuration, by its parameter values as the study "
                     "stores them, e.g. 'augment.preset=light,optim.lr=0.001' (a part that "
                     "names one configuration is enough).", show_default=False)]
TtaOption = Annotated[str, typer.Option("--tta", help=f"Test-time augmentation: {spoken(TTA_MODES)}.")]
LayoutOption = Annotated[str, typer.Option(
    "--layout", help=f"{spoken(LAYOUT_CHOICES)}.")]
BatchSizeOption = Annotated[int, typer.Option("--batch-size", min=1, help="Images per batch.")]
StorageOption = Annotated[str | None, typer.Option(
    help="Optuna storage: an RDB URL such as postgresql+psycopg2://user@host/db (workers on "
         "several hosts) or a journal file path. Default: $OPTUNA_STORAGE, else "
         "mlruns/optuna/<study>.journal.", show_default=False)]
ConfigArg = Annotated[
    Path | None,
    typer.Argument(help="YAML run config (default: the built-in CPU quick configuration, "
                        "= experiments/default.yaml).", show_default=False),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a key, e.g. --set train.batch_size=8 (repeatable)."),
]
