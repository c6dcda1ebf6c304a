"""From a config's data section to cases and a function that loads (image, mask) pairs."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ptxlab.config import DataConfig
from ptxlab.data.cache import ResizedCache, default_cache_dir
from ptxlab.data.cases import Case, DataError
from ptxlab.data.dataset import PairLoader
from ptxlab.data.io import read_image, read_mask
from ptxlab.data.layouts import load_cases, scan_layout, warn_left_out
from ptxlab.data.synthetic import SyntheticSpec, materialize

SYNTHETIC = "synthetic"


def cache_root(config: DataConfig) -> Path:
    return Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir()


def synthetic_root(config: DataConfig) -> Path:
    return cache_root(config) / "synthetic"


def load_source(config: DataConfig, source: str, layout: str, progress: bool = True
                ) -> tuple[list[Case], list[DataError]]:
    """Cases of `source` (the embedded synthetic set, or a data set on disk in `layout`) and
    the layout's problems (a missing mask, a mask without its image). A problem raises its
    DataError, unless `skip_bad`: then it is returned and its case left out."""
    if source == SYNTHETIC:
        synthetic = config.synthetic
        spec = SyntheticSpec(synthetic.n_images, synthetic.positive_fraction, synthetic.size,
                             synthetic.seed)
        return materialize(spec, synthetic_root(config), progress=progress), []
    options = {"missing_mask_is_negative": config.missing_mask_is_negative}
    if not config.skip_bad:
        return load_cases(Path(source), layout, **options), []
    scan = scan_layout(Path(source), layout, **options)
    warn_left_out(Path(source), scan)
    return scan.cases, scan.problems


def read_pair(case: Case) -> tuple[np.ndarray, np.ndarray]:
    """Image and mask at native resolution, validated."""
    image = read_image(case)
    return image, read_mask(case, image.shape)


@dataclass
class TrainingPairs:
    """How a run reads its cases at training size, which cases were skipped, and a digest."""

    load: PairLoader
    skipped: list[tuple[Case, str]]
    digest: str


def cached_size(config: DataConfig, augment_order: str) -> int | None:
    """The side the cache resizes to: `cache_size` if set, else `image_size` when augmenting
    after the resize, else None (the source's own resolution, for source-first)."""
    if config.cache_size is not None:
        return config.cache_size
    return config.image_size if augment_order == "resize-first" else None


def training_pairs(config: DataConfig, cases: Sequence[Case], size: int | None,
                   progress: bool = True) -> TrainingPairs:
    """Through the cache at `size` (None: source size) when enabled, every case read and
    validated up front; otherwise straight from the source files."""
    if not config.cache:
        return TrainingPairs(read_pair, [], _fingerprint_digest(cases))
    cache = ResizedCache(cache_root(config) / "resized", size)
    skipped = cache.ensure(cases, skip_bad=config.skip_bad, progress=progress)
    bad = {case.case_id for case, _ in skipped}
    # Cache entries are named by the sha256 of their sources' content.
    entries = [f"{c.case_id}|{c.positive}|{c.site}|{cache.entry_path(c).name}"
               for c in cases if c.case_id not in bad]
    digest = hashlib.sha256("\n".join(entries).encode()).hexdigest()[:20]
    return TrainingPairs(cache.load, skipped, digest)


def _fingerprint_digest(cases: Sequence[Case]) -> str:
    """Without the cache: ids, labels and file fingerprints (size, mtime), not content."""
    digest = hashlib.sha256()
    for case in cases:
        digest.update(f"{case.case_id}|{case.positive}|{case.site}|".encode())
        for path in (case.image, case.mask):
            if path is not None:
                stat = path.stat()
                digest.update(f"{stat.st_size}:{stat.st_mtime_ns}|".encode())
        digest.update("|".join(case.rle).encode())
    return digest.hexdigest()[:20]
