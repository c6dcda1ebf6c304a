"""From a config's data section to cases and a function that loads (image, mask) pairs."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ptxlab.config import DataConfig
from ptxlab.data.cache import ResizedCache, default_cache_dir
from ptxlab.data.cases import Case
from ptxlab.data.dataset import PairLoader
from ptxlab.data.io import read_image, read_mask
from ptxlab.data.layouts import load_cases
from ptxlab.data.synthetic import SyntheticSpec, materialize

SYNTHETIC = "synthetic"


def cache_root(config: DataConfig) -> Path:
    return Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir()


def load_source(config: DataConfig, source: str, layout: str, progress: bool = True) -> list[Case]:
    """Cases of `source`: the embedded synthetic set, or a data set on disk in `layout`."""
    if source == SYNTHETIC:
        synthetic = config.synthetic
        spec = SyntheticSpec(synthetic.n_images, synthetic.positive_fraction, synthetic.size,
                             synthetic.seed)
        return materialize(spec, cache_root(config) / "synthetic", progress=progress)
    return load_cases(Path(source), layout, missing_mask_is_negative=config.missing_mask_is_negative)


def read_pair(case: Case) -> tuple[np.ndarray, np.ndarray]:
    """Image and mask at native resolution, validated."""
    image = read_image(case)
    return image, read_mask(case, image.shape)


def pair_loader(config: DataConfig, cases: Sequence[Case], progress: bool = True
                ) -> tuple[PairLoader, list[tuple[Case, str]]]:
    """A loader at training size (through the resized cache when enabled) and skipped cases."""
    if not config.cache:
        return read_pair, []
    cache = ResizedCache(cache_root(config) / "resized", config.image_size)
    skipped = cache.ensure(cases, skip_bad=config.skip_bad, progress=progress)
    return cache.load, skipped


def manifest_digest(cases: Sequence[Case]) -> str:
    """Digest of ids, labels and file fingerprints (size, mtime): changes when the data does."""
    digest = hashlib.sha256()
    for case in cases:
        digest.update(f"{case.case_id}|{case.positive}|{case.site}|".encode())
        for path in (case.image, case.mask):
            if path is not None:
                stat = path.stat()
                digest.update(f"{stat.st_size}:{stat.st_mtime_ns}|".encode())
        digest.update("|".join(case.rle).encode())
    return digest.hexdigest()[:20]
