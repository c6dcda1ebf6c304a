"""A PNG grid that shows what an augmentation preset does to real radiographs and their masks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import albumentations as A
import cv2
import numpy as np

from ptxlab.augment import build_eval_transform, seed_transform
from ptxlab.data.cases import Case
from ptxlab.data.io import read_image, read_mask
from ptxlab.plots import overlay

PAIRS_PER_ROW = 2
MAX_TILE = 384
_GAP = 4


def choose_cases(cases: Sequence[Case], n: int, seed: int) -> list[Case]:
    """`n` cases picked at random (by `seed`), positives first so that there are masks to see."""
    order = np.random.default_rng(seed).permutation(len(cases))
    shuffled = [cases[i] for i in order]
    return sorted(shuffled, key=lambda case: not case.positive)[:n]


def render_preview(
    cases: Sequence[Case], transform: A.Compose, image_size: int, out: Path, seed: int = 0
) -> Path:
    """Write `out` (PNG): per case, the resized original and one augmented sample, both with the
    mask outline in colour; two such pairs per row. Sample i is drawn with seed `seed + i`."""
    if not cases:
        raise ValueError("no cases to preview")
    resize = build_eval_transform(image_size)
    tile = min(image_size, MAX_TILE)
    pairs = []
    for index, case in enumerate(cases):
        image = read_image(case)
        mask = read_mask(case, image.shape)
        seed_transform(transform, seed + index)
        original = resize(image=image, mask=mask)
        augmented = transform(image=image, mask=mask)
        pairs.append(
            _hstack([_tile(original, tile, case.case_id), _tile(augmented, tile, "augmented")])
        )
    blank = np.full_like(pairs[0], 255)
    pairs += [blank] * (-len(pairs) % PAIRS_PER_ROW)
    rows = [_hstack(pairs[i : i + PAIRS_PER_ROW]) for i in range(0, len(pairs), PAIRS_PER_ROW)]
    grid = _vstack(rows)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR)):
        raise ValueError(f"{out}: could not write the PNG")
    return out


def _tile(sample: dict[str, np.ndarray], size: int, label: str) -> np.ndarray:
    image = cv2.resize(sample["image"], (size, size), interpolation=cv2.INTER_AREA)
    mask = cv2.resize(sample["mask"], (size, size), interpolation=cv2.INTER_NEAREST)
    rgb = overlay(image, mask, None)
    text = label if len(label) <= 28 else "..." + label[-25:]
    cv2.putText(rgb, text, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 220, 0), 1, cv2.LINE_AA)
    return rgb


def _hstack(tiles: Sequence[np.ndarray]) -> np.ndarray:
    gap = np.full((tiles[0].shape[0], _GAP, 3), 255, np.uint8)
    return np.hstack([part for tile in tiles for part in (tile, gap)][:-1])


def _vstack(rows: Sequence[np.ndarray]) -> np.ndarray:
    gap = np.full((_GAP, rows[0].shape[1], 3), 255, np.uint8)
    return np.vstack([part for row in rows for part in (row, gap)][:-1])
