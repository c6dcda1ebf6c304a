"""Turning probability maps into masks, and grid-searching how to do it on validation maps.

Two rules:

* ``threshold`` (the published study): foreground = probability > ``threshold`` (BT); then
  8-connected components smaller than ``min_area`` pixels (RT) are removed.
* ``triplet`` (the SIIM challenge winners): if fewer than ``min_top_area`` pixels have
  probability > ``top_threshold`` the mask is empty; otherwise the mask is probability >
  ``bottom_threshold``.

Areas are given at ``resolution`` x ``resolution`` and scale with the map: a map of H x W pixels
uses ``area * H * W / resolution**2`` (compared as a float, never rounded). A component is kept
when its area is >= that value, so ``min_area=0`` keeps everything.

Probability maps are float in [0, 1] or uint8-quantised (q = round(p * 255), see
``quantise``). A uint8 pixel is foreground when q / 255 > threshold, i.e. q > floor(threshold *
255): thresholds inside the same 1/255 step (about 0.004) give identical masks, and a pixel's
decision can differ from the unquantised map only when its probability lies within 0.5/255
(about 0.002) of the threshold. The search and ``apply`` use the same comparison, so a rule
searched on quantised maps is reproduced exactly on those maps.

Grid search (``search_threshold``, ``search_triplet``) computes the expensive part once and
reuses it for every cheap parameter: connected components are labelled once per (image, BT),
with each component's area and its overlap with the truth, so every RT costs O(#components).
The triplet rule needs only per-image pixel counts above each threshold (one 256-bin histogram
per image for uint8 maps). Ties between grid points go to the smallest parameters (first in
ascending order). When the best point lies on an edge of a grid axis that can be extended, the
axis is widened in that direction and the search repeated, at most ``max_widenings`` rounds:

* thresholds: below the lowest value t, add t/5, 2t/5, 3t/5, 4t/5 (none under 1/255); above
  the highest value, add four more steps of the last spacing (all < 1);
* areas: below the lowest value a > 0, add 0, a/4, a/2, 3a/4; above the highest value, add
  1.5x, 2x and 3x it (capped at resolution**2). An area axis starting at 0 is not widened down.
* an axis with a single value is fixed and never widened.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np

from ptxlab.atomic import write_file
from ptxlab.metrics import dice_from_counts, iou_from_counts
from ptxlab.vocabulary import GATES, OBJECTIVES, RULES

# The study's grid: BT 0.05..0.5 in steps of 0.05; RT in pixels at 512 x 512 (0 = keep all),
# doubling from 64 to 2048 and then 1024-pixel steps to 4096 (1.6% of the image).
DEFAULT_THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)
DEFAULT_MIN_AREAS = (0, 64, 128, 256, 512, 1024, 2048, 3072, 4096)
# The study's script, exactly: BT = numpy.linspace(0.05, 0.5, 10); RT in pixels at 512 x 512.
# `postprocess.grid=paper` searches it as is, never widened.
PAPER_GRID = {
    "thresholds": tuple(np.linspace(0.05, 0.5, 10).tolist()),
    "min_areas": (0, 256, 512, 1024, 2048, 4096),
    "widen": False,
}
# Triplet grid around the challenge winners' choices (top ~0.75, area ~2048 at 1024 x 1024 =
# 512 at 512 x 512, bottom ~0.3-0.4), areas at 512 x 512.
DEFAULT_TOP_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULT_MIN_TOP_AREAS = (0, 256, 512, 1024, 2048, 3072, 4096)
DEFAULT_BOTTOM_THRESHOLDS = (0.2, 0.3, 0.4, 0.5)

_LOWEST_THRESHOLD = 1 / 255


@dataclass(frozen=True)
class PostProcessing:
    """How a probability map becomes a mask; areas are in pixels at ``resolution`` squared."""

    kind: str = "threshold"
    threshold: float = 0.5
    min_area: int = 0
    top_threshold: float = 0.5
    min_top_area: int = 0
    bottom_threshold: float = 0.5
    resolution: int = 512
    gate: str = "none"
    gate_threshold: float = 0.0
    gate_min_area: int = 0

    def __post_init__(self):
        if self.kind not in RULES:
            raise ValueError(f"kind must be one of {RULES}, got {self.kind!r}")
        if self.gate not in GATES:
            raise ValueError(f"gate must be one of {GATES}, got {self.gate!r}")
        if not 0.0 <= self.gate_threshold < 1.0 or self.gate_min_area < 0:
            raise ValueError("gate_threshold must be in [0, 1) and gate_min_area >= 0")
        for name in ("threshold", "top_threshold", "bottom_threshold"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.min_area < 0 or self.min_top_area < 0 or self.resolution <= 0:
            raise ValueError("areas must be >= 0 and resolution > 0")

    def to_dict(self) -> dict[str, object]:
        """The kind, its own parameters and the resolution (flat, for logging as params)."""
        fields = _RULE_PARAMETERS[self.kind] + _GATE_PARAMETERS[self.gate]
        values = asdict(self)
        return {"kind": self.kind, **{f: values[f] for f in fields}, "resolution": self.resolution}

    @classmethod
    def from_dict(cls, values: dict[str, object]) -> PostProcessing:
        """Inverse of ``to_dict`` (missing parameters take their defaults)."""
        return cls(**values)

    def masks(self, probs: np.ndarray, head_probs: np.ndarray | None = None) -> np.ndarray:
        """``apply`` to each of (N, H, W) maps (with each image's head probability, if any)."""
        return np.stack([apply(p, self, None if head_probs is None else head_probs[i])
                         for i, p in enumerate(probs)])


def quantise(probs: np.ndarray) -> np.ndarray:
    """Probabilities as uint8 levels round(p * 255), p clipped to [0, 1]; uint8 passes through."""
    probs = np.asarray(probs)
    if probs.dtype == np.uint8:
        return probs
    return np.rint(np.clip(probs, 0.0, 1.0) * 255.0).astype(np.uint8)


def _uint8_level(threshold: float) -> int:
    """The uint8 level L with q > L  <=>  q / 255 > threshold (guarding float round-off)."""
    return math.floor(threshold * 255.0 + 1e-9)


def foreground(probs: np.ndarray, threshold: float) -> np.ndarray:
    """Boolean map of probability > threshold, for float maps or uint8-quantised maps."""
    if probs.dtype == np.uint8:
        return probs > _uint8_level(threshold)
    if not np.issubdtype(probs.dtype, np.floating):
        raise TypeError(f"probability maps must be float or uint8, got {probs.dtype}")
    return probs > probs.dtype.type(threshold)


def scaled_area(area: float, shape: tuple[int, ...], resolution: int) -> float:
    """An area given at resolution x resolution, in pixels of a map of the given (H, W) shape."""
    return area * shape[-2] * shape[-1] / resolution**2


def apply(probs: np.ndarray, pp: PostProcessing, head_prob: float | None = None) -> np.ndarray:
    """The (H, W) uint8 0/1 mask that ``pp`` makes of one (H, W) probability map.

    With ``pp.gate == "head"`` the image's classification-head probability is required: the
    mask is emptied when it is below ``gate_threshold``. With ``"area"`` the mask is emptied
    when its total area is below ``gate_min_area`` (at ``resolution``).
    """
    probs = np.asarray(probs)
    if probs.ndim != 2:
        raise ValueError(f"apply takes one (H, W) map, got shape {probs.shape}")
    if pp.gate == "head":
        if head_prob is None:
            raise ValueError("gate 'head' needs the classification head's probability")
        if head_prob < pp.gate_threshold:
            return np.zeros(probs.shape, dtype=np.uint8)
    mask = _mask(probs, pp)
    if pp.gate == "area" and mask.sum() < scaled_area(pp.gate_min_area, probs.shape,
                                                      pp.resolution):
        return np.zeros(probs.shape, dtype=np.uint8)
    return mask


def _mask(probs: np.ndarray, pp: PostProcessing) -> np.ndarray:
    return _RULE_MASKS[pp.kind](probs, pp)


def _triplet_mask(probs: np.ndarray, pp: PostProcessing) -> np.ndarray:
    top_area = np.count_nonzero(foreground(probs, pp.top_threshold))
    if top_area < scaled_area(pp.min_top_area, probs.shape, pp.resolution):
        return np.zeros(probs.shape, dtype=np.uint8)
    return foreground(probs, pp.bottom_threshold).astype(np.uint8)


def _threshold_mask(probs: np.ndarray, pp: PostProcessing) -> np.ndarray:
    mask = foreground(probs, pp.threshold)
    min_pixels = scaled_area(pp.min_area, probs.shape, pp.resolution)
    if min_pixels > 0 and mask.any():
        _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
        keep = stats[:, cv2.CC_STAT_AREA] >= min_pixels
        keep[0] = False
        mask = keep[labels]
    return mask.astype(np.uint8)


@dataclass(frozen=True)
class SearchResult:
    """Outcome of a grid search; ``table`` has one row per grid point: parameters + ``score``."""

    best: PostProcessing
    best_score: float
    objective: str
    table: list[dict[str, float]]
    widenings: tuple[str, ...] = field(default=())

    @property
    def widened(self) -> bool:
        """Whether the grid was extended because the optimum sat on an edge."""
        return bool(self.widenings)

    def to_dict(self) -> dict[str, object]:
        """The search as JSON: objective, best score and rule, widenings, the whole table."""
        return {"objective": self.objective, "best_score": self.best_score,
                "best": self.best.to_dict(), "widenings": list(self.widenings),
                "table": self.table}

    def heatmap(self) -> Heatmap:
        """The table as a threshold x area matrix (for the triplet rule: top threshold x top
        area at the best bottom threshold)."""
        best = self.best
        if best.kind == "threshold":
            row_key, col_key, rows = "threshold", "min_area", self.table
        else:
            row_key, col_key = "top_threshold", "min_top_area"
            rows = [r for r in self.table if r["bottom_threshold"] == best.bottom_threshold]
        thresholds = sorted({row[row_key] for row in rows})
        areas = sorted({row[col_key] for row in rows})
        scores = np.full((len(thresholds), len(areas)), np.nan)
        for row in rows:
            scores[thresholds.index(row[row_key]), areas.index(row[col_key])] = row["score"]
        cell = (thresholds.index(getattr(best, row_key)), areas.index(getattr(best, col_key)))
        return Heatmap(scores, thresholds, areas, cell)


@dataclass(frozen=True)
class Heatmap:
    """A search table as a matrix: ``scores[i, j]`` at ``thresholds[i]`` x ``areas[j]``."""

    scores: np.ndarray
    thresholds: list[float]
    areas: list[float]
    best: tuple[int, int]  # (row, column) of the best rule


def search_subset(n_images: int, count: int | None, seed: int) -> np.ndarray:
    """Indices of the validation images a search uses: all of them when `count` is None, else
    min(count, n) drawn as the study did, `RandomState(seed).choice(n, size, replace=False)`."""
    if count is None:
        return np.arange(n_images)
    return np.random.RandomState(seed).choice(n_images, min(count, n_images), replace=False)


def _objective_scores(
    objective: str, tp: np.ndarray, pred_area: np.ndarray, truth_area: np.ndarray
) -> np.ndarray:
    """Objective over the last (image) axis from per-image true-positive and area counts."""
    if objective not in _OBJECTIVE_SCORES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    return _OBJECTIVE_SCORES[objective](tp, pred_area - tp, truth_area - tp)


def _check_maps(probs: np.ndarray, truths: np.ndarray, objective: str):
    probs = np.asarray(probs)
    truths = np.asarray(truths).astype(bool, copy=False)
    if probs.ndim != 3 or probs.shape != truths.shape or len(probs) == 0:
        raise ValueError(f"need equal non-empty (N, H, W) maps, got {probs.shape}, {truths.shape}")
    if probs.dtype != np.uint8 and not np.issubdtype(probs.dtype, np.floating):
        raise TypeError(f"probability maps must be float or uint8, got {probs.dtype}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    return probs, truths


def _widen_axis(values: np.ndarray, at_low: bool, is_area: bool, resolution: int) -> list[float]:
    """New values beyond one edge of a sorted grid axis (see the module docstring)."""
    if is_area:
        if at_low:
            low = values[0]
            return [] if low == 0 else [round(low * f) for f in (0, 0.25, 0.5, 0.75)]
        return [min(round(values[-1] * f), resolution**2) for f in (1.5, 2, 3)]
    if at_low:
        new = [round(values[0] * f, 4) for f in (0.2, 0.4, 0.6, 0.8)]
        return [v for v in new if v >= _LOWEST_THRESHOLD]
    step = values[-1] - values[-2]
    return [v for v in (round(values[-1] + k * step, 4) for k in (1, 2, 3, 4)) if v < 1.0]


def _grid_search(
    axes: dict[str, Sequence[float]],
    area_axes: set[str],
    score_grid: Callable[[dict[str, np.ndarray]], np.ndarray],
    make: Callable[[dict[str, float]], PostProcessing],
    objective: str,
    resolution: int,
    widen: bool,
    max_widenings: int,
) -> SearchResult:
    """Score the full grid, widen edge optima a bounded number of times, pick the best."""
    grid = {name: np.array(sorted(set(values)), dtype=np.float64) for name, values in axes.items()}
    widenings: list[str] = []
    rounds = 0
    while True:
        scores = score_grid(grid)
        best = np.unravel_index(int(np.argmax(scores)), scores.shape)
        added = {}
        if widen and rounds < max_widenings:
            for axis, (name, values) in enumerate(grid.items()):
                if len(values) < 2 or 0 < best[axis] < len(values) - 1:
                    continue
                at_low = best[axis] == 0
                new = _widen_axis(values, at_low, name in area_axes, resolution)
                new = sorted(set(new) - set(values.tolist()))
                if new:
                    added[name] = new
                    side = "lower" if at_low else "upper"
                    listed = ", ".join(f"{v:g}" for v in new)
                    widenings.append(
                        f"{name}: best {values[best[axis]]:g} on the {side} edge, added {listed}"
                    )
        if not added:
            break
        rounds += 1
        for name, new in added.items():
            grid[name] = np.array(sorted({*grid[name].tolist(), *new}), dtype=np.float64)
    names = list(grid)
    table = []
    for index in np.ndindex(scores.shape):
        row = {n: float(grid[n][i]) for n, i in zip(names, index, strict=True)}
        table.append({**row, "score": float(scores[index])})
    best_params = {n: float(grid[n][i]) for n, i in zip(names, best, strict=True)}
    return SearchResult(
        best=make(best_params),
        best_score=float(scores[best]),
        objective=objective,
        table=table,
        widenings=tuple(widenings),
    )


class _ComponentCache:
    """Per threshold: every 8-connected component of every image, with area and truth overlap."""

    def __init__(self, probs: np.ndarray, truths: np.ndarray):
        self.probs = probs
        self.truths = truths
        self.truth_area = np.count_nonzero(truths.reshape(len(truths), -1), axis=1)
        self._by_threshold: dict[float, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    def components(self, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(image index, area, overlap with truth) of each component at this threshold."""
        return self._by_threshold[threshold]

    def label(self, thresholds: Sequence[float]) -> None:
        """Label the thresholds not yet cached, each on the bounding box of its foreground."""
        todo = sorted(set(thresholds) - set(self._by_threshold))
        if not todo:
            return
        parts: dict[float, list[tuple[np.ndarray, ...]]] = {t: [] for t in todo}
        for i, (prob, truth) in enumerate(zip(self.probs, self.truths, strict=True)):
            # Ascending thresholds: each foreground lies inside the previous one's box.
            for threshold in todo:
                mask = foreground(prob, threshold)
                rows = np.flatnonzero(mask.any(axis=1))
                if rows.size == 0:
                    break
                cols = np.flatnonzero(mask.any(axis=0))
                box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
                prob, truth = prob[box], truth[box]
                count, labels, stats, _ = cv2.connectedComponentsWithStats(
                    np.ascontiguousarray(mask[box]).view(np.uint8), connectivity=8
                )
                overlap = np.bincount(labels[truth], minlength=count)[1:]
                index = np.full(count - 1, i, dtype=np.int64)
                parts[threshold].append((index, stats[1:, cv2.CC_STAT_AREA], overlap))
        for threshold, found in parts.items():
            columns = zip(*found, strict=True) if found else ([], [], [])
            self._by_threshold[threshold] = tuple(
                np.concatenate(c).astype(np.int64) if len(c) else np.zeros(0, dtype=np.int64)
                for c in columns
            )


def search_threshold(
    probs: np.ndarray,
    truths: np.ndarray,
    objective: str = "pooled_iou",
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    min_areas: Sequence[int] = DEFAULT_MIN_AREAS,
    resolution: int = 512,
    widen: bool = True,
    max_widenings: int = 3,
) -> SearchResult:
    """Best (threshold BT, min component area RT) for the objective on (N, H, W) maps."""
    probs, truths = _check_maps(probs, truths, objective)
    cache = _ComponentCache(probs, truths)
    n_images = len(probs)

    def score_grid(grid: dict[str, np.ndarray]) -> np.ndarray:
        cache.label(grid["threshold"].tolist())
        pixels = [scaled_area(a, probs.shape, resolution) for a in grid["min_area"]]
        shape = (len(grid["threshold"]), len(pixels), n_images)
        tp = np.zeros(shape, dtype=np.int64)
        pred_area = np.zeros(shape, dtype=np.int64)
        for a, threshold in enumerate(grid["threshold"].tolist()):
            image, area, overlap = cache.components(threshold)
            for b, min_pixels in enumerate(pixels):
                kept = area >= min_pixels
                pred_area[a, b] = np.bincount(image[kept], area[kept], minlength=n_images)
                tp[a, b] = np.bincount(image[kept], overlap[kept], minlength=n_images)
        return _objective_scores(objective, tp, pred_area, cache.truth_area)

    return _grid_search(
        {"threshold": thresholds, "min_area": min_areas},
        {"min_area"},
        score_grid,
        lambda p: PostProcessing(
            "threshold",
            threshold=p["threshold"],
            min_area=int(p["min_area"]),
            resolution=resolution,
        ),
        objective,
        resolution,
        widen,
        max_widenings,
    )


def _pixels_above(
    probs: np.ndarray, truths: np.ndarray, thresholds: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Per (threshold, image): pixels above the threshold, and those of them inside the truth."""
    n_images = len(probs)
    above = np.zeros((len(thresholds), n_images), dtype=np.int64)
    above_in_truth = np.zeros_like(above)
    if probs.dtype == np.uint8:
        levels = [_uint8_level(t) for t in thresholds]
        for i in range(n_images):
            # count of q > L = pixels in histogram bins L+1..255
            for counts, values in ((above, probs[i]), (above_in_truth, probs[i][truths[i]])):
                greater = np.cumsum(np.bincount(values.ravel(), minlength=256)[::-1])[::-1]
                counts[:, i] = [greater[level + 1] if level < 255 else 0 for level in levels]
        return above, above_in_truth
    for k, threshold in enumerate(thresholds):
        for i in range(n_images):
            mask = foreground(probs[i], threshold)
            above[k, i] = np.count_nonzero(mask)
            above_in_truth[k, i] = np.count_nonzero(mask & truths[i])
    return above, above_in_truth


def search_triplet(
    probs: np.ndarray,
    truths: np.ndarray,
    objective: str = "mean_dice",
    top_thresholds: Sequence[float] = DEFAULT_TOP_THRESHOLDS,
    min_top_areas: Sequence[int] = DEFAULT_MIN_TOP_AREAS,
    bottom_thresholds: Sequence[float] = DEFAULT_BOTTOM_THRESHOLDS,
    resolution: int = 512,
    widen: bool = True,
    max_widenings: int = 3,
) -> SearchResult:
    """Best (top threshold, min top area, bottom threshold) for the objective on (N, H, W) maps."""
    probs, truths = _check_maps(probs, truths, objective)
    truth_area = np.count_nonzero(truths.reshape(len(truths), -1), axis=1)

    def score_grid(grid: dict[str, np.ndarray]) -> np.ndarray:
        top_above, _ = _pixels_above(probs, truths, grid["top_threshold"].tolist())
        bottom_above, bottom_tp = _pixels_above(probs, truths, grid["bottom_threshold"].tolist())
        pixels = np.array([scaled_area(a, probs.shape, resolution) for a in grid["min_top_area"]])
        non_empty = top_above[:, None, None, :] >= pixels[None, :, None, None]
        pred_area = np.where(non_empty, bottom_above[None, None], 0)
        tp = np.where(non_empty, bottom_tp[None, None], 0)
        return _objective_scores(objective, tp, pred_area, truth_area)

    return _grid_search(
        {
            "top_threshold": top_thresholds,
            "min_top_area": min_top_areas,
            "bottom_threshold": bottom_thresholds,
        },
        {"min_top_area"},
        score_grid,
        lambda p: PostProcessing(
            "triplet",
            top_threshold=p["top_threshold"],
            min_top_area=int(p["min_top_area"]),
            bottom_threshold=p["bottom_threshold"],
            resolution=resolution,
        ),
        objective,
        resolution,
        widen,
        max_widenings,
    )


DEFAULT_GATE_THRESHOLDS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULT_GATE_MIN_AREAS = (0, 256, 512, 1024, 2048, 4096)


def search_gate(
    probs: np.ndarray,
    truths: np.ndarray,
    pp: PostProcessing,
    gate: str,
    head_probs: np.ndarray | None = None,
    objective: str = "pooled_iou",
    widen: bool = True,
) -> SearchResult:
    """Best image-level gate on top of an already chosen rule ``pp`` (whose masks are fixed).

    ``head``: empty the mask when the classification head's probability < t (t = 0: no gate).
    ``area``: empty the mask when its total area < A pixels at ``pp.resolution`` (A = 0: none).
    """
    probs, truths = _check_maps(probs, truths, objective)
    if gate not in ("head", "area"):
        raise ValueError(f"gate must be 'head' or 'area', got {gate!r}")
    if gate == "head" and (head_probs is None or len(head_probs) != len(probs)):
        raise ValueError("gate 'head' needs one classification-head probability per image")
    masks = np.stack([_mask(p, pp) for p in probs]).reshape(len(probs), -1).astype(bool)
    flat_truths = truths.reshape(len(truths), -1)
    tp = np.count_nonzero(masks & flat_truths, axis=1)
    pred_area = np.count_nonzero(masks, axis=1)
    truth_area = np.count_nonzero(flat_truths, axis=1)
    name = "gate_threshold" if gate == "head" else "gate_min_area"

    def score_grid(grid: dict[str, np.ndarray]) -> np.ndarray:
        values = grid[name]
        if gate == "head":
            keep = np.asarray(head_probs)[None, :] >= values[:, None]
        else:
            pixels = np.array([scaled_area(a, probs.shape, pp.resolution) for a in values])
            keep = pred_area[None, :] >= pixels[:, None]
        return _objective_scores(objective, tp * keep, pred_area * keep, truth_area)

    values = DEFAULT_GATE_THRESHOLDS if gate == "head" else DEFAULT_GATE_MIN_AREAS
    base = {k: v for k, v in asdict(pp).items() if not k.startswith("gate")}
    return _grid_search(
        {name: values},
        {"gate_min_area"},
        score_grid,
        lambda p: PostProcessing(**base, gate=gate, **{name: type(getattr(pp, name))(p[name])}),
        objective,
        pp.resolution,
        widen,
        max_widenings=3,
    )


@dataclass(frozen=True)
class StoredMaps:
    """Validation maps as a run stores them: enough to re-search post-processing later."""

    ids: list[str]
    probs: np.ndarray  # (N, H, W) uint8, round(p * 255)
    truths: np.ndarray | None = None  # (N, H, W) bool at the maps' resolution
    head_probs: np.ndarray | None = None  # (N,) classification-head probabilities


def save_probability_maps(path: str | Path, ids: Sequence[str], probs: np.ndarray,
                          truths: np.ndarray | None = None,
                          head_probs: np.ndarray | None = None) -> None:
    """Store (N, H, W) maps with their ids as a compressed .npz, quantised to uint8; optionally
    the truths (bit-packed) and the classification head's probabilities."""
    probs = quantise(probs)
    if probs.ndim != 3 or len(ids) != len(probs):
        raise ValueError(f"need (N, H, W) maps and N ids, got {probs.shape} and {len(ids)} ids")
    arrays = {"ids": np.asarray([str(i) for i in ids]), "probs": probs}
    if truths is not None:
        if np.shape(truths) != probs.shape:
            raise ValueError(f"truths {np.shape(truths)} must match the maps {probs.shape}")
        arrays["truths"] = np.packbits(np.asarray(truths, dtype=bool), axis=-1)
    if head_probs is not None:
        if len(head_probs) != len(probs):
            raise ValueError(f"need {len(probs)} head probabilities, got {len(head_probs)}")
        arrays["head_probs"] = np.asarray(head_probs, dtype=np.float32)
    write_file(path, lambda handle: np.savez_compressed(handle, **arrays))


def load_probability_maps(path: str | Path) -> StoredMaps:
    """What ``save_probability_maps`` wrote."""
    with np.load(path, allow_pickle=False) as data:
        probs = data["probs"]
        truths = None
        if "truths" in data:
            width = probs.shape[-1]
            truths = np.unpackbits(data["truths"], axis=-1, count=width).astype(bool)
        head = data["head_probs"] if "head_probs" in data else None
        return StoredMaps([str(i) for i in data["ids"]], probs, truths, head)


@dataclass(frozen=True)
class Choice:
    """The post-processing a run uses, and the searches that chose it (None when not run)."""

    rule: PostProcessing
    search: SearchResult | None = None
    gate_search: SearchResult | None = None


def choose(probs: np.ndarray, truths: np.ndarray, configured: PostProcessing, search: bool,
           objective: str, gate: str, head_probs: np.ndarray | None = None,
           grid: dict | None = None) -> Choice:
    """``configured`` as it is, or the grid-search optimum of its kind on validation maps,
    then (unless ``gate`` is "none") the best image-level gate on top of it. ``grid``:
    the searcher's grid arguments (e.g. ``PAPER_GRID``); None: its own, widened at edges."""
    if not search:
        return Choice(configured)
    result = SEARCHES[configured.kind](probs, truths, objective=objective,
                                       resolution=configured.resolution, **(grid or {}))
    if gate == "none":
        return Choice(result.best, result)
    gated = search_gate(probs, truths, result.best, gate, head_probs, objective=objective)
    return Choice(gated.best, result, gated)


# One entry per name of `vocabulary.RULES`, `GATES` and `OBJECTIVES`.
_RULE_PARAMETERS = {"threshold": ("threshold", "min_area"),
                    "triplet": ("top_threshold", "min_top_area", "bottom_threshold")}
_RULE_MASKS = {"threshold": _threshold_mask, "triplet": _triplet_mask}
SEARCHES = {"threshold": search_threshold, "triplet": search_triplet}
_GATE_PARAMETERS = {"none": (), "head": ("gate", "gate_threshold"),
                    "area": ("gate", "gate_min_area")}
_OBJECTIVE_SCORES = {
    "pooled_iou": lambda tp, fp, fn: iou_from_counts(tp.sum(axis=-1), fp.sum(axis=-1),
                                                     fn.sum(axis=-1)),
    "mean_dice": lambda tp, fp, fn: dice_from_counts(tp, fp, fn).mean(axis=-1),
}
