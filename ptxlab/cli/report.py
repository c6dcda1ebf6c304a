"""`ptxlab report`: a finished study's effects, importances and hypothesis verdicts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ptxlab.cli.errors import fail_cleanly
from ptxlab.cli.options import StorageOption
from ptxlab.cli.registry import RegisterOption, register_best_model


def report(
    study: Annotated[str, typer.Argument(help="Study file or study name.")],
    storage: StorageOption = None,
    out: Annotated[Path | None, typer.Option(
        help="Output folder (default: mlruns/reports/<study>), or a .md page: its plots go to "
             "a folder of its name beside it, and text above its marker line is kept.",
        show_default=False)] = None,
    register: RegisterOption = None,
) -> None:
    """Effects with 95 % CIs over repeats, importances, best configuration and hypothesis
    verdicts of a study, as Markdown + PNG, also logged to the study's MLflow parent run."""
    with fail_cleanly():
        from ptxlab.report import write_report

        result = write_report(study, storage, out)
    print(f"report: {result.markdown}")
    for verdict in result.verdicts:
        print(f"{verdict.verdict:>13}: {verdict.hypothesis.name} ({verdict.summary})")
    print(f"logged to MLflow parent run {result.parent_run_id} under report/")
    if register:
        register_best_model(study, storage, register)
