"""`ptxlab sweep`: run an Optuna study of training or post-processing configurations."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ptxlab import artifacts
from ptxlab.cli.errors import fail_cleanly
from ptxlab.cli.options import SetOption, StorageOption
from ptxlab.cli.registry import RegisterOption, register_best_model


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
    plan: Annotated[bool, typer.Option(
        "--plan", help="Print what the study will cost (trials, trainings, epochs, GPU-hours) "
                       "and stop; writes nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="With --plan: one JSON object.")] = False,
    step_ms: Annotated[float | None, typer.Option(
        min=0.001, help="With --plan: milliseconds per training batch at the base config's "
                        "batch size, for the GPU-hours estimate.", show_default=False)] = None,
    train_images: Annotated[int | None, typer.Option(
        min=1, help="With --plan: training-set size when the data source is not on this host.",
        show_default=False)] = None,
    register: RegisterOption = None,
    overrides: SetOption = None,
) -> None:
    """Run (create, join or resume) an Optuna study; each trial is a child MLflow run.
    `--set KEY=VALUE` adds to the study file's `set` (e.g. where its data lives); a study
    resumed or joined must be given the same."""
    if plan:
        _print_plan(study, name, as_json, step_ms, train_images, overrides or [])
        return
    with fail_cleanly():
        from ptxlab.sweep import run_sweep
        from ptxlab.sweep.runs import parent_link

        result = run_sweep(study, storage, workers, n_trials, timeout, name,
                           overrides=overrides or [])
        ensemble = _fold_ensemble(result)
    counts = result.counts
    print(f"study {result.name} ({result.storage}): {counts.finished} of {result.budget} trials "
          f"finished: {counts.complete} complete, {counts.pruned} pruned, {counts.failed} failed "
          f"({counts.retried} more lost with their worker and re-run); {counts.running} running, "
          f"{counts.waiting} queued ({result.stopped})")
    if result.best is not None:
        params = ", ".join(f"{k}={v}" for k, v in result.best.params.items())
        print(f"best trial {result.best.number}: {result.best.value:.4f} ({params}; "
              f"repeat {result.best.user_attrs.get('repeat')})")
    _print_out_of_fold(result.out_of_fold, ensemble)
    print(f"MLflow parent run {result.parent_run_id} (experiment '{result.experiment}'); "
          f"report: ptxlab report {study}")
    print(f"compare its trials: ptxlab ui, then {parent_link(result.parent_run_id)}")
    for failure in result.worker_failures:
        print(f"{'error' if result.unfinished else 'warning'}: {failure}")
    if result.worker_failures and result.unfinished:
        print("run the command again to finish the study")
        raise typer.Exit(3)
    if register:
        register_best_model(name or str(study), storage, register)


def _fold_ensemble(result):
    """A cv study's best configuration on its test set (`sweep.fold_ensemble`), when it has
    one. Imported here, not by the sweep package: the ensemble module imports that package."""
    if result.out_of_fold is None:
        return None
    from ptxlab.sweep.fold_ensemble import fold_ensemble

    return fold_ensemble(result.handle, result.out_of_fold)


def _print_out_of_fold(oof, ensemble) -> None:
    """A cv study's best out-of-fold configuration (`sweep.oof`), when there is one, and its
    fold ensemble on the test set."""
    if oof and oof.best:
        print(f"out-of-fold ({oof.folds} folds pooled, {len(oof.rows)} configuration x seed "
              f"rows): best {oof.best[0].label}: oof_{oof.objective}="
              f"{oof.mean(oof.best, oof.objective):.4f} (table {artifacts.OUT_OF_FOLD} on the "
              "parent run)")
    if ensemble is not None:
        value, low, high = ensemble.differences["mean_dice"]
        print(f"fold ensemble of {ensemble.configuration} on the {ensemble.images} test images: "
              f"per-image Dice {ensemble.ensemble['mean_dice']:.4f}, {value:+.4f} [{low:+.4f}, "
              f"{high:+.4f}] against its folds' mean ({ensemble.verdict()})")


def _print_plan(study: Path, name: str | None, as_json: bool, step_ms: float | None,
                train_images: int | None, overrides: list[str]) -> None:
    with fail_cleanly():
        from ptxlab.sweep import load_study_file
        from ptxlab.sweep.plan import make_plan

        cost = make_plan(load_study_file(study, name, overrides), step_ms, train_images)
    print(json.dumps(cost.to_json()) if as_json else "\n".join(cost.lines()))

