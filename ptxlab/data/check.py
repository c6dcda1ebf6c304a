"""Read every image and mask of a dataset and report what is there and what is wrong with it."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm import tqdm

from ptxlab.data.cases import Case, DataError
from ptxlab.data.io import map_in_threads, read_image, read_mask, size_label
from ptxlab.data.layouts import scan_layout

NO_SITE = "unspecified"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with one file."""

    file: str
    reason: str


@dataclass
class CheckReport:
    """What `check_dataset` found. Counts are by label; `mask_pixels` is at native resolution."""

    root: str
    layout: str
    n_images: int = 0
    n_positive: int = 0
    n_negative: int = 0
    mask_pixels: int = 0
    sites: dict[str, dict[str, int]] = field(default_factory=dict)
    image_sizes: dict[str, int] = field(default_factory=dict)
    problems: list[Problem] = field(default_factory=list)
    left_out: list[Problem] = field(default_factory=list)  # e.g. unlabelled images

    @property
    def ok(self) -> bool:
        """True when no problem was found (files left out are no problem)."""
        return not self.problems

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-ready form; image sizes are keyed `'<width>x<height>'`."""
        return {**asdict(self), "ok": self.ok}


@dataclass(frozen=True)
class _CaseResult:
    size: str | None
    mask_pixels: int
    problem: Problem | None


def check_dataset(
    root: Path,
    layout: str = "auto",
    *,
    missing_mask_is_negative: bool = False,
    progress: bool = True,
    rle_csv: Path | None = None,
) -> CheckReport:
    """Read every image and mask under `root`, collecting problems instead of stopping.

    Raises DataError only when there is nothing to check (no folder, empty folder, unknown
    layout, unreadable label file). A positive label with an empty mask, or a negative label
    with foreground, is a problem.
    """
    scan = scan_layout(
        root, layout, missing_mask_is_negative=missing_mask_is_negative, rle_csv=rle_csv
    )
    report = CheckReport(root=str(root), layout=scan.layout, n_images=len(scan.cases))
    report.problems.extend(Problem(error.path, error.problem) for error in scan.problems)
    report.left_out.extend(Problem(error.path, error.problem) for error in scan.left_out)
    sizes: Counter[str] = Counter()
    results = map_in_threads(_check_case, scan.cases)
    bar = tqdm(results, total=len(scan.cases), desc="checking", unit="image", disable=not progress)
    for case, result in zip(scan.cases, bar, strict=True):
        site = report.sites.setdefault(
            case.site or NO_SITE, {"images": 0, "positive": 0, "negative": 0}
        )
        site["images"] += 1
        site["positive" if case.positive else "negative"] += 1
        report.mask_pixels += result.mask_pixels
        if result.problem is not None:
            report.problems.append(result.problem)
        if result.size is not None:
            sizes[result.size] += 1
    report.n_positive = sum(case.positive for case in scan.cases)
    report.n_negative = report.n_images - report.n_positive
    report.image_sizes = dict(sizes.most_common())
    report.sites = dict(sorted(report.sites.items()))
    return report


def _check_case(case: Case) -> _CaseResult:
    try:
        image = read_image(case)
    except DataError as exc:
        return _CaseResult(None, 0, Problem(exc.path, exc.problem))
    size = size_label(image.shape)
    try:
        mask_pixels = int(read_mask(case, image.shape).sum())
    except DataError as exc:
        return _CaseResult(size, 0, Problem(exc.path, exc.problem))
    label_file = str(case.mask or case.image)
    if case.positive and not mask_pixels:
        return _CaseResult(size, 0, Problem(label_file, "labelled positive but the mask is empty"))
    if not case.positive and mask_pixels:
        reason = f"labelled negative but the mask has {mask_pixels} foreground pixels"
        return _CaseResult(size, mask_pixels, Problem(label_file, reason))
    return _CaseResult(size, mask_pixels, None)
