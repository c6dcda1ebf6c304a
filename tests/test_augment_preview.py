"""`ptxlab augment preview` on the real SIIM sample: a reproducible grid with mask outlines."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from typer.testing import CliRunner

from ptxlab.cli import app
from ptxlab.plots import TRUTH_COLOUR

SIZE = 96
LABEL_BAND = 20  # rows at the top of a tile that carry its text label


def _preview(sample: Path, out: Path, *extra: str) -> np.ndarray:
    args = ["augment", "preview", "--data", str(sample), "--layout", "folder"]
    args += ["--out", str(out), "--size", str(SIZE), "--n", "3", *extra]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert str(out) in result.output
    return cv2.cvtColor(cv2.imread(str(out)), cv2.COLOR_BGR2RGB)


def _tiles(grid: np.ndarray) -> list[np.ndarray]:
    """The four tiles of the first row: case A, A augmented, case B, B augmented."""
    step = SIZE + 4
    return [grid[LABEL_BAND:SIZE, i * step : i * step + SIZE] for i in range(4)]


def test_preview_grid_shows_outlines_and_is_reproducible(siim_sample: Path, tmp_path: Path) -> None:
    grid = _preview(siim_sample, tmp_path / "a.png", "--preset", "paper", "--seed", "3")
    assert grid.shape == (2 * SIZE + 4, 4 * SIZE + 3 * 4, 3)  # 3 pairs -> 2 rows of 2 pairs
    outline = np.all(grid == TRUTH_COLOUR, axis=-1)
    assert outline[:SIZE, :SIZE].any()  # positives are shown first: case A has a mask
    np.testing.assert_array_equal(
        _preview(siim_sample, tmp_path / "b.png", "--preset", "paper", "--seed", "3"), grid
    )
    assert not np.array_equal(_preview(siim_sample, tmp_path / "c.png", "--seed", "4"), grid)


def test_strength_zero_preview_matches_the_originals(siim_sample: Path, tmp_path: Path) -> None:
    original_a, augmented_a, original_b, augmented_b = _tiles(
        _preview(siim_sample, tmp_path / "zero.png", "--strength", "0")
    )
    np.testing.assert_array_equal(original_a, augmented_a)
    np.testing.assert_array_equal(original_b, augmented_b)


def test_unknown_preset_is_one_line_error(siim_sample: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        [
            "augment",
            "preview",
            "--data",
            str(siim_sample),
            "--out",
            str(tmp_path / "x.png"),
            "--preset",
            "heavy",
        ],
    )
    assert result.exit_code == 2
    assert "unknown augment preset 'heavy'" in result.output
    assert not (tmp_path / "x.png").exists()
