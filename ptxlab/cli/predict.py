"""`ptxlab predict`: a logged run's masks for new images, written to a folder."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ptxlab.cli.errors import fail_cleanly
from ptxlab.cli.options import (
    BatchSizeOption,
    EnsembleConfigOption,
    EnsembleStudyOption,
    StorageOption,
    TtaOption,
)


def predict(
    model: Annotated[str, typer.Argument(
        help="A finished training run's id or its MLflow model (runs:/…, models:/…); several, "
             "comma-separated (RUN,RUN), for their ensemble. With --study: the first input.",
        show_default=False)],
    out: Annotated[Path, typer.Option("--out", help="Folder for masks, overlays and "
                                                    "predictions.csv.", show_default=False)],
    inputs: Annotated[list[Path] | None, typer.Argument(
        help="PNG, JPEG or DICOM files, or folders searched recursively.", show_default=False)
    ] = None,
    tta: TtaOption = "none",
    with_overlay: Annotated[bool, typer.Option(
        "--overlay/--no-overlay", help="Also write <stem>_overlay.png.")] = True,
    batch_size: BatchSizeOption = 8,
    study: EnsembleStudyOption = None,
    configuration: EnsembleConfigOption = None,
    storage: StorageOption = None,
) -> None:
    """Write a native-resolution mask (and overlay) per image, plus predictions.csv."""
    references, files = ([], [Path(model), *(inputs or [])]) if study else ([model], inputs)
    with fail_cleanly():
        if not files:
            raise ValueError("name at least one input (file or folder) after the model")
        from ptxlab.ensemble import predict_models
        from ptxlab.prediction import PREDICTIONS_CSV

        rows, runs = predict_models(references, files, out, tta, with_overlay, batch_size,
                                    sys.stderr.isatty(), study, configuration, storage)
    positives = sum(int(row["positive"]) for row in rows)
    by = f" (ensemble of {len(runs)} runs: {', '.join(runs)})" if len(runs) > 1 or study else ""
    print(f"wrote {len(rows)} masks ({positives} called positive) and {PREDICTIONS_CSV} to "
          f"{out}{by}")
