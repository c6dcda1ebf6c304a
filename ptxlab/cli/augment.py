"""`ptxlab augment preview`: look at an augmentation preset before training with it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ptxlab.cli.errors import fail_cleanly
from ptxlab.cli.options import LayoutOption
from ptxlab.vocabulary import PRESETS, spoken

app = typer.Typer(help="Inspect augmentation presets.", no_args_is_help=True)


@app.command("preview")
def preview(
    data: Annotated[
        Path, typer.Option("--data", help="Dataset folder, in one of the published layouts.")
    ],
    out: Annotated[Path, typer.Option("--out", help="PNG file to write.")],
    preset: Annotated[str, typer.Option(help=f"{spoken(PRESETS)}.")] = "paper",
    strength: Annotated[float, typer.Option(min=0.0, max=1.0, help="0 = resize only.")] = 1.0,
    size: Annotated[int, typer.Option(min=1, help="Training image side.")] = 512,
    layout: LayoutOption = "auto",
    n: Annotated[int, typer.Option("--n", min=1, help="Cases to show.")] = 8,
    seed: Annotated[int, typer.Option(help="Picks the cases and the augmentations.")] = 0,
) -> None:
    """Write a grid of original and augmented radiographs with their mask outlines."""
    with fail_cleanly():
        from ptxlab.augment import build_train_transform
        from ptxlab.augment_preview import choose_cases, render_preview
        from ptxlab.data.layouts import load_cases

        transform = build_train_transform(preset, strength, size)
        cases = choose_cases(load_cases(data, layout), n, seed)
        written = render_preview(cases, transform, size, out, seed)
    print(f"wrote {written} ({len(cases)} cases, preset {preset}, strength {strength})")
