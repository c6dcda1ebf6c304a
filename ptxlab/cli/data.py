"""`ptxlab data check` and `ptxlab data cache`."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from ptxlab.cli.errors import fail_cleanly
from ptxlab.cli.options import LayoutOption

if TYPE_CHECKING:
    from ptxlab.data.check import CheckReport, Problem

app = typer.Typer(
    help="Check a dataset folder as published, and build the resized training cache.",
    no_args_is_help=True,
)
SHOWN_PROBLEMS = 50
FILE_WIDTH = 1000  # console width when not a terminal; tables only take what they need


PathArg = Annotated[
    Path,
    typer.Argument(help="Dataset folder, in one of the published layouts.", show_default=False),
]
MissingMaskOption = Annotated[
    bool,
    typer.Option(
        "--missing-mask-is-negative", help="Treat an image without a mask file as negative."
    ),
]
RleCsvOption = Annotated[
    Path | None,
    typer.Option(
        "--rle-csv",
        help="siim-dicom: the label CSV, if not stage_2_train.csv or train-rle.csv.",
        show_default=False,
    ),
]


@app.command("check")
def check(
    path: PathArg,
    layout: LayoutOption = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    missing_mask_is_negative: MissingMaskOption = False,
    rle_csv: RleCsvOption = None,
) -> None:
    """Read every image and mask; exit 0 only if nothing is wrong (1: problems, 2: unusable)."""
    from ptxlab.data.check import check_dataset

    with fail_cleanly(as_json):
        report = check_dataset(
            path,
            layout,
            missing_mask_is_negative=missing_mask_is_negative,
            progress=sys.stderr.isatty(),
            rle_csv=rle_csv,
        )
    if as_json:
        typer.echo(json.dumps(report.to_dict()))
    else:
        _print_report(report)
    raise typer.Exit(0 if report.ok else 1)


@app.command("cache")
def cache(
    path: PathArg,
    size: Annotated[int, typer.Option("--size", min=1, help="Side of the square cached images.")],
    layout: LayoutOption = "auto",
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            "--cache-dir",
            help="ptxlab cache folder (default: $PTXLAB_CACHE, else "
            "~/.cache/ptxlab); entries go to its resized/ subfolder, where training "
            "looks for them.",
            show_default=False,
        ),
    ] = None,
    missing_mask_is_negative: MissingMaskOption = False,
    rle_csv: RleCsvOption = None,
    skip_bad: Annotated[
        bool, typer.Option("--skip-bad", help="Skip unreadable cases (listed on stderr).")
    ] = False,
) -> None:
    """Decode and resize every case once, so training loads small arrays instead."""
    from ptxlab.data.cache import ResizedCache, default_cache_dir
    from ptxlab.data.layouts import load_cases, scan_layout, warn_left_out
    from ptxlab.preflight import check_writable

    options = {"missing_mask_is_negative": missing_mask_is_negative, "rle_csv": rle_csv}
    with fail_cleanly():
        root = cache_dir or default_cache_dir()
        check_writable(root, "cache directory (--cache-dir or PTXLAB_CACHE)")
        if skip_bad:
            scan = scan_layout(path, layout, **options)
            warn_left_out(path, scan)
            cases, skipped = scan.cases, [str(problem) for problem in scan.problems]
        else:
            cases, skipped = load_cases(path, layout, **options), []
        resized = ResizedCache(root / "resized", size)
        skipped_cases = resized.ensure(cases, skip_bad=skip_bad, progress=sys.stderr.isatty())
    for problem in skipped + [problem for _, problem in skipped_cases]:
        typer.echo(f"skipped: {problem}", err=True)
    cached = len(cases) - len(skipped_cases)
    typer.echo(f"{cached} cases cached at {size}x{size} in {resized.cache_root}")


def _print_report(report: CheckReport) -> None:
    console = Console(highlight=False)
    if not console.is_terminal:  # piped or redirected: never cut a file name to fit 80 columns
        console.width = FILE_WIDTH
    summary = Table(title=f"{report.root} ({report.layout})", show_header=False)
    summary.add_column(style="bold")
    summary.add_column(justify="right")
    summary.add_row("images", str(report.n_images))
    summary.add_row("positive", str(report.n_positive))
    summary.add_row("negative", str(report.n_negative))
    summary.add_row("mask pixels", f"{report.mask_pixels:,}")
    for size, count in report.image_sizes.items():
        summary.add_row(f"size {size}", str(count))
    console.print(summary)
    sites = Table("site", "images", "positive", "negative")
    for site, counts in report.sites.items():
        sites.add_row(site, *(str(counts[key]) for key in ("images", "positive", "negative")))
    console.print(sites)
    _print_files(console, report.left_out, "left out", "why")
    if report.ok:
        console.print("[green]no problems[/green]")
        return
    _print_files(console, report.problems, "problems", "problem")


def _print_files(console: Console, entries: list[Problem], title: str, column: str) -> None:
    if not entries:
        return
    table = Table("file", column, title=f"{len(entries)} {title}")
    for entry in entries[:SHOWN_PROBLEMS]:
        table.add_row(entry.file, entry.reason)
    console.print(table)
    if len(entries) > SHOWN_PROBLEMS:
        console.print(f"... and {len(entries) - SHOWN_PROBLEMS} more (use --json)")
