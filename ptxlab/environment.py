"""Every environment variable ptxlab reads, read here and nowhere else.

    MLFLOW_TRACKING_URI   the MLflow store (default: sqlite under ./mlruns; see `tracking`)
    OPTUNA_STORAGE        a study's storage when `--storage` is not given (see `sweep.storage`)
    PTXLAB_CACHE          the resized-image cache folder (default: ~/.cache/ptxlab)
    PTXLAB_CHECKPOINTS    where runs keep checkpoints (default: ./mlruns/checkpoints)
    PTXLAB_PROGRESS       how runs show progress when `--progress` is not given (see `progress`)
    PTXLAB_SWEEP_WORKER   set by `ptxlab sweep --workers N` for each worker process it starts
    RANK, WORLD_SIZE, LOCAL_RANK   set by torchrun for each rank of `ptxlab run --nproc N`
    TORCHELASTIC_RUN_ID   set by torchrun too: a process group even at `--nproc 1`

A process ptxlab starts gets this process's environment plus what `for_child` adds.
"""

from __future__ import annotations

import os
from pathlib import Path

TRACKING_URI = "MLFLOW_TRACKING_URI"
OPTUNA_STORAGE = "OPTUNA_STORAGE"
CACHE = "PTXLAB_CACHE"
CHECKPOINTS = "PTXLAB_CHECKPOINTS"
SWEEP_WORKER = "PTXLAB_SWEEP_WORKER"
PROGRESS = "PTXLAB_PROGRESS"


def tracking_uri() -> str | None:
    return os.environ.get(TRACKING_URI) or None


def optuna_storage() -> str | None:
    return os.environ.get(OPTUNA_STORAGE) or None


def cache_dir() -> Path | None:
    configured = os.environ.get(CACHE)
    return Path(configured).expanduser() if configured else None


def checkpoints_dir() -> Path | None:
    configured = os.environ.get(CHECKPOINTS)
    return Path(configured) if configured else None


def progress_choice() -> str:
    return os.environ.get(PROGRESS, "auto")


def sweep_worker_index() -> int | None:
    """Which of `ptxlab sweep --workers N`'s processes this is (1..N); None when not one."""
    index = os.environ.get(SWEEP_WORKER)
    return int(index) if index else None


def torchrun_place() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun set them; (0, 1, 0) without torchrun."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))


def under_torchrun() -> bool:
    """Whether torchrun started this process (as one rank of several)."""
    return "RANK" in os.environ


def started_by_torchrun() -> bool:
    """Whether torchrun started this process, also as its only rank (`--nproc 1`)."""
    return "TORCHELASTIC_RUN_ID" in os.environ


def for_child(**values: str) -> dict[str, str]:
    """This process's environment with `values` set: what a child process ptxlab starts gets."""
    return {**os.environ, **values}
