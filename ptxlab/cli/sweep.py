"""`ptxlab sweep` and `ptxlab report`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ptxlab.cli.errors import fail_cleanly

StorageOption = Annotated[str | None, typer.Option(
    help="Optuna storage: an RDB URL such as postgresql+psycopg2://user@host/db (workers on "
         "several hosts) or a journal file path. Default: $OPTUNA_STORAGE, else "
         "mlruns/optuna/<study>.journal.", show_default=False)]


def sweep(
    study: Annotated[Path, typer.Argument(help="Study file (experiments/studies/*.yaml).")],
    storage: StorageOption = None,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes on this host.")] = 1,
    n_trials: Annotated[int | None, typer.Option(
        min=1, help="Finished trials the study should have (default: the study file's n_trials, "
                    "else the grid's size).", show_default=False)] = None,
    timeout: Annotated[float | None, typer.Option(
        min=1, help="Start no trial after this many seconds.", show_default=False)] = None,
    name: Annotated[str | None, typer.Option(
        help="Study name instead of the file's `name` (a fresh study from the same file).",
        show_default=False)] = None,
) -> None:
    """Run (create, join or resume) an Optuna study; each trial is a child MLflow run."""
    with fail_cleanly():
        from ptxlab.sweep import run_sweep

        result = run_sweep(study, storage, workers, n_trials, timeout, name)
    counts = result.counts
    print(f"study {result.name} ({result.storage}): {counts.finished} of {result.budget} trials "
          f"finished: {counts.complete} complete, {counts.pruned} pruned, {counts.failed} failed "
          f"({counts.retried} more lost with their worker and re-run); {counts.running} running, "
          f"{counts.waiting} queued ({result.stopped})")
    if result.best is not None:
        params = ", ".join(f"{k}={v}" for k, v in result.best.params.items())
        print(f"best trial {result.best.number}: {result.best.value:.4f} ({params}; "
              f"repeat {result.best.user_attrs.get('repeat')})")
    print(f"MLflow parent run {result.parent_run_id} (experiment '{result.experiment}'); "
          f"report: ptxlab report {study}")
    for failure in result.worker_failures:
        print(f"{'error' if result.unfinished else 'warning'}: {failure}")
    if result.worker_failures and result.unfinished:
        print("run the command again to finish the study")
        raise typer.Exit(3)


def report(
    study: Annotated[str, typer.Argument(help="Study file or study name.")],
    storage: StorageOption = None,
    out: Annotated[Path | None, typer.Option(
        help="Output folder (default: mlruns/reports/<study>).", show_default=False)] = None,
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
