"""The unit every layout produces: one image with its ground truth, and the error for bad input."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class DataError(ValueError):
    """Bad input data. The message is one line: '<file>: <problem>'."""

    def __init__(self, path: Path | str, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")


@dataclass(frozen=True)
class Case:
    """One radiograph and where its ground truth comes from.

    Exactly one of `mask` (a PNG mask file) or `rle` (SIIM run-length rows, unioned) carries
    a positive label; a negative case has `mask=None` and `rle=()` or an all-zero mask file.
    """

    case_id: str
    image: Path
    positive: bool
    mask: Path | None = None
    rle: tuple[str, ...] = ()
    site: str = ""
