"""`ptxlab gc`: free the local disk that finished runs and old caches no longer need."""

from __future__ import annotations

from typing import Annotated

import typer

from ptxlab.cli.errors import fail_cleanly


def gc(
    older_than: Annotated[float | None, typer.Option(
        "--older-than", min=0, metavar="DAYS",
        help="Also remove checkpoints of unfinished runs and cache entries unused for DAYS.",
        show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="List what would be removed and the space it would free.")] = False,
) -> None:
    """Remove checkpoints no run will resume from (finished, deleted or unknown runs) and
    temporaries that killed writers left in the cache."""
    with fail_cleanly():
        from ptxlab import retention, tracking
        from ptxlab.config import TrackingConfig
        from ptxlab.data.cache import default_cache_dir
        from ptxlab.preflight import check_tracking_store

        check_tracking_store(tracking.tracking_uri(), TrackingConfig().preflight_timeout_s)
        items = [*retention.checkpoint_folders(retention.checkpoint_root(), tracking.run_status,
                                               older_than),
                 *retention.cache_leftovers(default_cache_dir(), older_than)]
        verb = "would remove" if dry_run else "removing"
        for item in items:
            typer.echo(f"{verb} {item.path} ({_mb(item.n_bytes)}; {item.reason})")
        freed = sum(item.n_bytes for item in items) if dry_run else retention.remove(items)
    typer.echo(f"{'would free' if dry_run else 'freed'} {_mb(freed)} in {len(items)} items")


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:,.1f} MB"
