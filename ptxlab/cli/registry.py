"""`--register NAME` of `ptxlab sweep` and `ptxlab report`."""

from __future__ import annotations

from typing import Annotated

import typer

from ptxlab.cli.errors import fail_cleanly

RegisterOption = Annotated[str | None, typer.Option(
    "--register", help="Register the best trial's model (by the study's objective) as a new "
                       "version of this MLflow registered model and point its alias @best at "
                       "it.", show_default=False)]


def register_best_model(study: str, storage: str | None, name: str) -> None:
    """Register study `study`'s best model as `name` and say where it is."""
    with fail_cleanly():
        from ptxlab.sweep.registry import register_best
        from ptxlab.sweep.study import load_existing

        registered = register_best(load_existing(study, storage)[0], name)
    print(f"registered trial {registered.trial}'s model (run {registered.run_id}) as {name} "
          f"version {registered.version}: {registered.uri}")
