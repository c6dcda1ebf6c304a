"""`ptxlab predict`: a logged run's masks for new images, written to a folder."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from ptxlab.cli.errors import fail_cleanly
from ptxlab.cli.options import BatchSizeOption, RunIdArg, TtaOption


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
