"""`ptxlab run`: train one configuration, tracked in MLflow (optionally on several processes)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer

from ptxlab import artifacts, environment
from ptxlab.cli.errors import fail_cleanly
from ptxlab.cli.options import ConfigArg, SetOption
from ptxlab.config import Config, load_config
from ptxlab.progress import choose

if TYPE_CHECKING:
    from ptxlab.experiment import RunSummary


def run(
    config: ConfigArg = None,
    overrides: SetOption = None,
    resume: Annotated[str | None, typer.Option(
        help="Continue a killed run from its last checkpoint, into the same MLflow run.")] = None,
    nproc: Annotated[int | None, typer.Option(
        min=1, help="Data-parallel processes on this machine (torchrun; NCCL on GPUs, gloo on "
                    "CPU; 1 runs that whole path in one process). train.batch_size stays the "
                    "global batch.")] = None,
    progress: Annotated[str | None, typer.Option(
        help="auto (bars on a terminal, else one line per epoch), bar, lines or none. "
             "Default: $PTXLAB_PROGRESS, else auto.", show_default=False)] = None,
) -> None:
    """Train one configuration and log everything to MLflow."""
    launching = nproc is not None and not environment.under_torchrun()  # else 1 process or a rank
    with fail_cleanly():
        if progress is not None:
            choose(progress)
        if resume:
            if config or overrides:
                raise ValueError("--resume continues a run with its own logged config; "
                                 "drop CONFIG and --set")
            resolved = load_config(_resumed_config(resume))
        else:
            resolved = load_config(config, overrides or [])
        if launching:
            _check_processes(resolved, nproc)
        from ptxlab.preflight import check_tracking_store
        from ptxlab.tracking import tracking_uri

        check_tracking_store(tracking_uri(), resolved.tracking.preflight_timeout_s)
    if launching:
        from ptxlab.distributed import launch

        raise typer.Exit(launch(nproc, _argv_without_nproc()))
    from ptxlab.distributed import RankZeroFailed, current
    from ptxlab.experiment import run_experiment  # torch, smp, MLflow: after the config

    try:
        with fail_cleanly():
            summary = run_experiment(resolved, config.read_text() if config else None,
                                     resume_run_id=resume)
    except RankZeroFailed:
        _end_rank(2)  # rank 0 has said why
    except typer.Exit as stop:
        if environment.under_torchrun():
            _end_rank(stop.exit_code)
        raise
    if current().is_main:
        _print_summary(summary, resolved)


def _print_summary(summary: RunSummary, resolved: Config) -> None:
    """What the run reached, and where to look at it."""
    from ptxlab.tracking import ui_link

    metrics = summary.metrics
    print(f"run id: {summary.run_id}")
    if metrics:
        print(f"best epoch: {summary.best_epoch + 1} (stopped by {summary.stopped_by})")
        print(f"best validation Dice: {metrics['pooled_dice']:.4f}  IoU: {metrics['pooled_iou']:.4f}"
              f"  (pooled pixels, post-processing {summary.postprocess})")
        print(f"per-image mean Dice: {metrics['mean_dice']:.4f}")
    if summary.test_metrics:
        test = summary.test_metrics
        where = resolved.data.test_source or f"held out {resolved.data.test_fraction:g}"
        print(f"test set ({where}): Dice {test['pooled_dice']:.4f}  "
              f"IoU {test['pooled_iou']:.4f}  per-image mean Dice {test['mean_dice']:.4f}")
    print(f"open it: ptxlab ui, then {ui_link(summary.experiment_id, summary.run_id)}")


def _end_rank(code: int) -> NoReturn:
    """End a torchrun rank at once with `code`. A normal interpreter exit can abort in the
    process group's C++ threads ("terminate called without an active exception"), which
    would make the launcher's exit status depend on timing."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _resumed_config(run_id: str) -> Path:
    """The resolved config a run logged, after checking that the store answers and has it."""
    from ptxlab import tracking
    from ptxlab.config import TrackingConfig
    from ptxlab.preflight import check_tracking_store

    check_tracking_store(tracking.tracking_uri(), TrackingConfig().preflight_timeout_s)
    tracking.require_run(run_id)
    return tracking.download_artifact(run_id, artifacts.RESOLVED_CONFIG)


def _check_processes(config: Config, nproc: int) -> None:
    """What would stop every rank at once, said once before any process starts."""
    if config.train.batch_size % nproc:
        raise ValueError(f"train.batch_size={config.train.batch_size} must divide over "
                         f"--nproc {nproc} processes (it is the global batch)")
    import torch

    from ptxlab.train import select_device

    if select_device(config.train.device).type == "cuda" and torch.cuda.device_count() < nproc:
        raise ValueError(f"--nproc {nproc}: this machine has {torch.cuda.device_count()} "
                         "CUDA devices (one process per GPU)")


def _argv_without_nproc() -> list[str]:
    """This command line minus --nproc, for the processes torchrun starts."""
    argv, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            argv.append(arg)
    return argv
