"""Arguments and options that more than one command takes, defined once."""

from __future__ import annotations

from typing import Annotated

import typer

RunIdArg = Annotated[str, typer.Argument(help="MLflow run id of a finished training run.",
                                         show_default=False)]
TtaOption = Annotated[str, typer.Option("--tta", help="Test-time augmentation: none or hflip.")]
BatchSizeOption = Annotated[int, typer.Option("--batch-size", min=1, help="Images per batch.")]
StorageOption = Annotated[str | None, typer.Option(
    help="Optuna storage: an RDB URL such as postgresql+psycopg2://user@host/db (workers on "
         "several hosts) or a journal file path. Default: $OPTUNA_STORAGE, else "
         "mlruns/optuna/<study>.journal.", show_default=False)]
