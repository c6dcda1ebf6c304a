"""SIIM-ACR run-length encoding: decode, encode, and read the label CSV in its published variants.

The SIIM convention (checked pixel for pixel against the real masks, see the sample's SOURCE.md):
pairs `a1 l1 a2 l2 ...` are *relative* (run i starts `a_i` pixels after the end of run i-1, the
first run `a_1` pixels after pixel 0), pixels are 0-based and counted column-major, and an image
with several rows in the CSV has the union of them as its mask. `-1` means no pneumothorax.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from ptxlab.data.cases import DataError

EMPTY_RLE = "-1"
_RUNS = re.compile(r"\d+(?: \d+)*")


def parse_runs(rle: str) -> np.ndarray:
    """Parse an RLE string into an (n, 2) int64 array of (relative start, length) pairs.

    `-1` gives no runs. Raises ValueError for anything else that is not an even count of
    non-negative integers with positive lengths (an empty string included).
    """
    text = " ".join(rle.split())
    if text == EMPTY_RLE:
        return np.zeros((0, 2), dtype=np.int64)
    if not _RUNS.fullmatch(text):
        raise ValueError(f"not a run-length string: {_preview(rle)!r}")
    values = np.array(text.split(" "), dtype=np.int64)
    if values.size % 2:
        raise ValueError(f"odd number of values ({values.size}) in run-length string")
    runs = values.reshape(-1, 2)
    if (runs[:, 1] <= 0).any():
        raise ValueError("run-length string has a run of length 0")
    return runs


def decode_rle(rows: str | Iterable[str], shape: tuple[int, int] = (1024, 1024)) -> np.ndarray:
    """Decode one SIIM RLE string, or the union of several, into a uint8 {0,1} (H, W) mask.

    Raises ValueError when a row does not parse or runs past the end of the image.
    """
    if isinstance(rows, str):
        rows = (rows,)
    height, width = shape
    n_pixels = height * width
    # +1/-1 at each run's start/end, summed over all rows; a pixel is set where the running
    # sum is positive, which is the union of the runs.
    edges = np.zeros(n_pixels + 1, dtype=np.int32)
    for row in rows:
        runs = parse_runs(row)
        if not len(runs):
            continue
        gaps, lengths = runs[:, 0], runs[:, 1]
        starts = np.cumsum(gaps) + np.concatenate(([0], np.cumsum(lengths)[:-1]))
        ends = starts + lengths
        if ends[-1] > n_pixels:
            raise ValueError(f"runs end at pixel {ends[-1]}, past the {width}x{height} (width x height) image")
        edges[starts] += 1  # starts are strictly increasing within a row, so no repeats
        edges[ends] -= 1
    column_major = np.cumsum(edges[:-1]) > 0
    return np.ascontiguousarray(column_major.reshape(width, height).T).astype(np.uint8)


def encode_rle(mask: np.ndarray) -> str:
    """Encode a (H, W) mask (nonzero = foreground) as one SIIM relative RLE string, `-1` if empty."""
    flat = np.asarray(mask).T.reshape(-1) != 0
    changes = np.flatnonzero(np.diff(np.concatenate(([False], flat, [False])).astype(np.int8)))
    if not changes.size:
        return EMPTY_RLE
    starts, ends = changes[0::2], changes[1::2]
    gaps = starts - np.concatenate(([0], ends[:-1]))
    pairs = np.column_stack((gaps, ends - starts)).reshape(-1)
    return " ".join(map(str, pairs.tolist()))


def read_rle_csv(path: Path) -> dict[str, tuple[str, ...]]:
    """Read a SIIM label CSV (`.csv` or `.csv.gz`) into {ImageId: tuple of RLE rows}.

    Accepts the published variants: header `ImageId,EncodedPixels` with or without a space,
    no header, a UTF-8 BOM, values with or without a leading space. A negative image maps to
    an empty tuple. Raises DataError naming the file and line for a row that does not parse, and
    for an image marked `-1` on one line and given runs on another.
    """
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        text = raw.decode("utf-8-sig")
    except (OSError, EOFError, gzip.BadGzipFile, UnicodeDecodeError) as exc:
        raise DataError(path, f"cannot read label CSV: {exc}") from exc
    labels: dict[str, list[str]] = {}
    negative_line: dict[str, int] = {}
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        image_id, sep, encoded = (part.strip() for part in line.partition(","))
        if line_no == 1 and image_id.lower() == "imageid":
            continue
        if not sep or not image_id:
            raise DataError(path, f"line {line_no}: expected 'ImageId,EncodedPixels'")
        try:
            parse_runs(encoded)
        except ValueError as exc:
            raise DataError(path, f"line {line_no}: {image_id}: {exc}") from exc
        if encoded == EMPTY_RLE:
            negative_line.setdefault(image_id, line_no)
            labels.setdefault(image_id, [])
        else:
            labels.setdefault(image_id, []).append(encoded)
        if image_id in negative_line and labels[image_id]:
            raise DataError(
                path,
                f"line {line_no}: {image_id} is marked -1 on line {negative_line[image_id]} "
                "and also has runs",
            )
    return {image_id: tuple(rows) for image_id, rows in labels.items()}


def _preview(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
