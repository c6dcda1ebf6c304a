"""`ptxlab config show`: the resolved configuration of a run, before running it."""

from __future__ import annotations

from typing import Annotated

import typer

from ptxlab.cli.errors import fail_cleanly
from ptxlab.cli.options import ConfigArg, SetOption
from ptxlab.config import config_as_text, load_config

app = typer.Typer(help="Inspect configurations.", no_args_is_help=True)


@app.command("show")
def show(
    config: ConfigArg = None,
    overrides: SetOption = None,
    fmt: Annotated[str, typer.Option("--format", help="yaml or json.")] = "yaml",
) -> None:
    """Print the resolved configuration (defaults + file + overrides)."""
    with fail_cleanly():
        if fmt not in ("yaml", "json"):
            raise ValueError(f"--format {fmt!r}: allowed yaml, json")
        print(config_as_text(load_config(config, overrides or []), fmt), end="")
