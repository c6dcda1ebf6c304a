"""What a study's noise allows: intervals that respect a metric's bounds, the smallest effect a
study could detect, and the repeats it would need.

Bounded metrics (IoU, Dice, AUC, sensitivity, ...) live in [0, 1], and so does the mean over
repeats. Its 95 % t-interval is intersected with [0, 1]: the true mean lies in [0, 1], so the
clipped interval covers it exactly as often, and it never reads `0.7083 ± 1.2549`. (A logit
transform was tried: with values at exactly 0 or 1, which small validation sets and
configurations that learn nothing produce, it blows up to nearly the whole of [0, 1].)

Power follows the normal-theory t approximation for the test the report makes. With SE the
standard error of A - B (paired: s_d / sqrt(n) of the per-repeat differences; unpaired:
Welch's sqrt(s_a^2/n_a + s_b^2/n_b)), a true difference that lies `d` beyond the decision
boundary is detected with 80 % power when d >= (t_{0.975,df} + t_{q,df}) x SE, q = 0.80 for
`greater`/`less` (boundary: the margin) and q = 0.90 for `equal` (two one-sided tests; boundary:
the margins, true difference 0). The repeats needed are the smallest n giving that for the
target distance, the noise per repeat held at what was observed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import stats

POWER = 0.80
MAX_REPEATS = 1000


def bounded_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """The t-interval for the mean of values in [0, 1], intersected with [0, 1]."""
    n = len(values)
    mean = float(np.mean(values))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * np.std(values, ddof=1) / math.sqrt(n))
    return max(0.0, mean - half), min(1.0, mean + half)


@dataclass(frozen=True)
class Noise:
    """The spread of a difference A - B as observed: per-repeat SDs and counts."""

    paired: bool
    sd: float  # paired: SD of the differences; unpaired: sqrt(s_a^2 + s_b^2) (per repeat)
    n: int  # repeats (per side when unpaired)
    dof: float

    @classmethod
    def of(cls, a: dict[int, float], b: dict[int, float]) -> Noise | None:
        """The noise of a difference, paired over shared repeats when both sides have the
        same ones; None when a side has fewer than two repeats."""
        if set(a) == set(b) and len(a) >= 2:
            d = np.array([a[r] - b[r] for r in sorted(a)])
            return cls(True, float(d.std(ddof=1)), len(d), len(d) - 1)
        if len(a) < 2 or len(b) < 2:
            return None
        va, vb = np.var(list(a.values()), ddof=1), np.var(list(b.values()), ddof=1)
        na, nb = len(a), len(b)
        se2 = va / na + vb / nb
        welch = se2**2 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1)) if se2 else 1
        return cls(False, float(math.sqrt(va + vb)), min(na, nb), float(welch))

    def detectable(self, expect: str, n: int | None = None) -> float:
        """Distance beyond the decision boundary detected with 80 % power at `n` repeats."""
        n = n or self.n
        dof = self.dof if n == self.n else (n - 1 if self.paired else 2 * n - 2)
        quantile = 1 - (1 - POWER) / 2 if expect == "equal" else POWER
        return float((stats.t.ppf(0.975, dof) + stats.t.ppf(quantile, dof))
                     * self.sd / math.sqrt(n))

    def repeats_needed(self, expect: str, distance: float) -> int | None:
        """Smallest repeats (per side) detecting `distance` with 80 % power; None if more
        than MAX_REPEATS or the distance is not positive."""
        if distance <= 0:
            return None
        if self.sd == 0:
            return 2
        for n in range(2, MAX_REPEATS + 1):
            if self.detectable(expect, n) <= distance:
                return n
        return None


BOOTSTRAP_RESAMPLES = 2000


def image_bootstrap(a: dict[int, np.ndarray], b: dict[int, np.ndarray],
                    seed: int = 0) -> tuple[float, float, float] | None:
    """A - B of a per-image metric, with a 95 % percentile interval from a paired bootstrap
    over validation images within each repeat: per resample, each shared repeat's images are
    drawn with replacement (the same draw for A and B: they are the same images), the mean
    difference taken, and averaged over repeats. Seeds are held fixed, so the interval shows
    the uncertainty that comes from which images were validated on, not from the seeds.
    `a`, `b`: per repeat, the per-image values (aligned). None without a shared repeat."""
    repeats = sorted(set(a) & set(b))
    if not repeats:
        return None
    rng = np.random.default_rng(seed)
    resampled = np.zeros(BOOTSTRAP_RESAMPLES)
    differences = [np.asarray(a[r], dtype=np.float64) - np.asarray(b[r], dtype=np.float64)
                   for r in repeats]
    for diff in differences:
        draws = rng.integers(0, len(diff), size=(BOOTSTRAP_RESAMPLES, len(diff)))
        resampled += np.nanmean(diff[draws], axis=1)
    resampled /= len(differences)
    low, high = np.percentile(resampled, [2.5, 97.5])
    return float(np.mean([np.nanmean(d) for d in differences])), float(low), float(high)


BOOTSTRAP_CELLS = 4_000_000  # resamples x images held in memory at once


def image_bootstrap_intervals(statistics: dict[str, Callable[[np.ndarray], np.ndarray]],
                              n_images: int, seed: int = 0) -> dict[str, tuple[float, float]]:
    """95 % percentile intervals of statistics of one set of images, over BOOTSTRAP_RESAMPLES
    resamples of the images with replacement (the same resamples for every statistic). A
    statistic gets resamples as weights, an (R, n_images) array of how often each image was
    drawn, and returns R values; NaN ones (e.g. an AUC of a resample with one class) are left
    out, and a statistic with none gets (NaN, NaN)."""
    rng = np.random.default_rng(seed)
    found: dict[str, list[np.ndarray]] = {name: [] for name in statistics}
    chunk = max(1, BOOTSTRAP_CELLS // max(1, n_images))
    for start in range(0, BOOTSTRAP_RESAMPLES, chunk):
        count = min(chunk, BOOTSTRAP_RESAMPLES - start)
        draws = rng.integers(0, n_images, size=(count, n_images))
        draws += n_images * np.arange(count)[:, None]
        weights = np.bincount(draws.ravel(), minlength=count * n_images).reshape(count, n_images)
        for name, statistic in statistics.items():
            found[name].append(np.asarray(statistic(weights), dtype=np.float64))
    intervals = {}
    for name, values in found.items():
        values = np.concatenate(values)
        values = values[np.isfinite(values)]
        intervals[name] = ((float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5)))
                           if values.size else (math.nan, math.nan))
    return intervals
