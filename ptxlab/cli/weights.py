"""`ptxlab weights ...`: make pretrained encoder weights available offline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ptxlab.cli.errors import fail_cleanly

app = typer.Typer(help="Pretrained encoder weights for offline machines.", no_args_is_help=True)


@app.command("import-lite0")
def import_lite0(
    dest: Annotated[
        Path | None,
        typer.Option(
            help="Folder to write to (default: $PTXLAB_CACHE/weights or "
            "~/.cache/ptxlab/weights, where configs find it by name)."
        ),
    ] = None,
) -> None:
    """Convert the bundled EfficientNet-Lite0 ImageNet weights for tu-tf_efficientnet_lite0."""
    with fail_cleanly():
        from ptxlab.weights import import_lite0 as convert
        from ptxlab.weights import weights_dir

        path = convert(dest)
    print(f"saved: {path}")
    if dest is None or dest.resolve() == weights_dir().resolve():
        value = "lite0-imagenet"
    else:
        value = str(path)
    print(
        f"use:   --set model.encoder=tu-tf_efficientnet_lite0 --set model.encoder_weights={value}"
    )
