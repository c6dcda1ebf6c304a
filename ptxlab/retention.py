"""What local disk ptxlab may free: checkpoints that no run will resume from, and cache entries
nothing has used for a while.

A run that ends FINISHED has logged its best model as an MLflow artifact, so its local
checkpoint folder (`<checkpoints>/<run id>/`) is removed when it ends (unless
`train.keep_checkpoints`); FAILED and KILLED runs keep theirs so `--resume` can continue them.
`ptxlab gc` collects what is left over: checkpoint folders of finished, deleted or unknown runs,
temporaries of killed writers, and, with `--older-than DAYS`, also checkpoints of unfinished
runs and cache entries not used for that long.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ptxlab import environment, tracking
from ptxlab.atomic import TEMPORARY_SUFFIX

DAY_S = 86400


@dataclass(frozen=True)
class Removable:
    path: Path
    n_bytes: int
    reason: str


def checkpoint_root() -> Path:
    """`$PTXLAB_CHECKPOINTS`, else `mlruns/checkpoints` beside the local store."""
    return environment.checkpoints_dir() or tracking.local_store() / "checkpoints"


def remove_checkpoints(folder: Path) -> None:
    """A finished run's checkpoint folder; nothing if it is gone already."""
    shutil.rmtree(folder, ignore_errors=True)


def size_of(path: Path) -> int:
    if path.is_file() or path.is_symlink():
        return path.lstat().st_size
    return sum(item.lstat().st_size for item in path.rglob("*") if not item.is_dir())


def last_used(path: Path) -> float:
    """The latest modification of `path` or anything in it, or read of a file in it (listing a
    folder updates its access time, so folders count by modification only)."""
    items = [path, *path.rglob("*")] if path.is_dir() else [path]
    stamps = [item.lstat().st_mtime if item.is_dir() else
              max(item.lstat().st_atime, item.lstat().st_mtime) for item in items]
    return max(stamps)


def checkpoint_folders(root: Path, run_status: Callable[[str], str | None],
                       older_than_days: float | None, now: float | None = None
                       ) -> list[Removable]:
    """Checkpoint folders no run needs: the run FINISHED, or the store does not know it
    (deleted, or another store's); with `older_than_days` also unfinished runs' folders not
    touched for that long."""
    now = time.time() if now is None else now
    found = []
    if not root.is_dir():
        return found
    for folder in sorted(path for path in root.iterdir() if path.is_dir()):
        status = run_status(folder.name)
        if status == "FINISHED":
            reason = "run finished"
        elif status is None:
            reason = "no such run in the tracking store"
        elif older_than_days is not None and now - last_used(folder) > older_than_days * DAY_S:
            reason = f"run {status}, untouched for over {older_than_days:g} days"
        else:
            continue
        found.append(Removable(folder, size_of(folder), reason))
    return found


def cache_leftovers(cache_root: Path, older_than_days: float | None,
                    now: float | None = None) -> list[Removable]:
    """Temporaries of killed writers (an hour old), and with `older_than_days` resized entries
    and synthetic data sets not used for that long."""
    now = time.time() if now is None else now
    found = []
    if not cache_root.is_dir():
        return found
    temporaries = [*cache_root.rglob(f".*{TEMPORARY_SUFFIX}"),
                   *cache_root.glob(f"synthetic/synthetic-*{TEMPORARY_SUFFIX}*")]
    for path in sorted(set(temporaries)):
        if now - last_used(path) > 3600:
            found.append(Removable(path, size_of(path), "temporary of a killed writer"))
    if older_than_days is None:
        return found
    entries = [*cache_root.glob("resized/resized-*/*/*.npy"), *cache_root.glob("synthetic/*")]
    for path in sorted(entries):
        if path in {item.path for item in found} or path.suffix == ".lock":
            continue
        if now - last_used(path) > older_than_days * DAY_S:
            found.append(Removable(path, size_of(path),
                                   f"cache entry unused for over {older_than_days:g} days"))
    return found


def remove(items: list[Removable]) -> int:
    """Delete every item; the bytes freed."""
    freed = 0
    for item in items:
        if item.path.is_dir() and not item.path.is_symlink():
            shutil.rmtree(item.path, ignore_errors=True)
        else:
            item.path.unlink(missing_ok=True)
        freed += item.n_bytes
    return freed
