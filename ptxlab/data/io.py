"""Read one case's image and mask as arrays, refusing anything that is not what it claims to be.

Images come back as uint8 (H, W) grayscale: PNG and JPEG through OpenCV, DICOM through
`ptxlab.data.dicom`. A 3-channel file is accepted only when its channels are identical (a gray
image saved as RGB); RGBA, gray+alpha, colour and 16-bit files are refused with a message that
says which. Masks come back as uint8 {0, 1}: from a PNG holding only 0/255 or only 0/1, from the
case's SIIM RLE rows, or all zero for a negative without a mask.

PTX-498 masks (`<n>.2.mask.png`) are the one exception to the 0/255 rule: they are binarised at
> 127, exactly as the published PTX-498 loaders do, so foreground areas agree with theirs even if
an exported mask carries anti-aliased edges.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import cv2
import numpy as np

from ptxlab.data.cases import Case, DataError
from ptxlab.data.dicom import read_dicom
from ptxlab.data.rle import decode_rle

T = TypeVar("T")
R = TypeVar("R")
DICOM_SUFFIXES = (".dcm", ".dicom")
PTX498_MASK_SUFFIX = ".2.mask.png"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"
_JPEG_START = b"\xff\xd8"
_JPEG_END = b"\xff\xd9"


def read_image(case: Case) -> np.ndarray:
    """The case's radiograph as uint8 (H, W) grayscale; DataError if it cannot be read as such."""
    return read_image_file(case.image)


def read_image_file(path: Path) -> np.ndarray:
    """Read a PNG, JPEG or DICOM file as uint8 (H, W) grayscale."""
    path = Path(path)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return read_dicom(path).pixels
    return _single_channel(_decode(path), path, "image")


def read_mask(case: Case, shape: tuple[int, int]) -> np.ndarray:
    """The case's ground truth as uint8 {0, 1} of the image's `shape` (H, W)."""
    if case.mask is not None:
        mask = read_mask_file(case.mask)
        if mask.shape != tuple(shape):
            raise DataError(
                case.mask,
                f"mask is {size_label(mask.shape)} but its image {case.image.name} is {size_label(shape)}",
            )
        return mask
    if case.rle:
        try:
            return decode_rle(case.rle, shape)
        except ValueError as exc:
            raise DataError(case.image, f"RLE label: {exc}") from exc
    return np.zeros(shape, dtype=np.uint8)


def read_mask_file(path: Path) -> np.ndarray:
    """Read a mask PNG as uint8 {0, 1}; values must be only 0/255 or only 0/1 (PTX-498: > 127)."""
    path = Path(path)
    mask = _single_channel(_decode(path), path, "mask")
    if path.name.endswith(PTX498_MASK_SUFFIX):
        return (mask > 127).astype(np.uint8)
    present = np.flatnonzero(np.bincount(mask.reshape(-1), minlength=256))
    if set(present.tolist()) <= {0, 255}:
        return (mask == 255).astype(np.uint8)
    if set(present.tolist()) <= {0, 1}:
        return mask.copy()
    shown = ", ".join(str(value) for value in present[:6]) + (", ..." if len(present) > 6 else "")
    raise DataError(path, f"mask values must be only 0/255 or only 0/1, found {shown}")


def size_label(shape: tuple[int, ...]) -> str:
    """`'<width>x<height>'` for an (H, W) shape, the way sizes are reported."""
    return f"{shape[1]}x{shape[0]}"


def map_in_threads(function: Callable[[T], R], items: Iterable[T]) -> Iterator[R]:
    """`map` over a thread pool, in order (decoders release the GIL, so file reads overlap)."""
    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
    try:
        yield from pool.map(function, items)
    finally:  # a consumer that stops early must not wait for the rest of the queue
        pool.shutdown(cancel_futures=True)


def _decode(path: Path) -> np.ndarray:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(path, f"cannot read file: {exc.strerror or exc}") from exc
    if not data:
        raise DataError(path, "empty file")
    if data.startswith(_PNG_SIGNATURE) and not data.rstrip(b"\x00").endswith(_PNG_END):
        raise DataError(path, "truncated PNG (no IEND chunk at the end)")
    if data.startswith(_JPEG_START) and not data.rstrip(b"\x00").endswith(_JPEG_END):
        raise DataError(path, "truncated JPEG (no end-of-image marker)")
    pixels = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if pixels is None:
        raise DataError(path, "not a decodable PNG or JPEG image")
    return pixels


def _single_channel(pixels: np.ndarray, path: Path, role: str) -> np.ndarray:
    if pixels.dtype != np.uint8:
        bits = pixels.dtype.itemsize * 8
        raise DataError(path, f"{bits}-bit {role}; expected 8-bit grayscale")
    if pixels.ndim == 2:
        return pixels
    channels = pixels.shape[2]
    if channels == 4:
        raise DataError(path, f"RGBA {role} (4 channels); expected 8-bit grayscale")
    if channels == 2:
        raise DataError(path, f"grayscale+alpha {role} (2 channels); expected 8-bit grayscale")
    if channels == 3:
        first = pixels[:, :, 0]
        if np.array_equal(first, pixels[:, :, 1]) and np.array_equal(first, pixels[:, :, 2]):
            return np.ascontiguousarray(first)
        raise DataError(path, f"colour {role} (3 different channels); expected grayscale")
    if channels == 1:
        return np.ascontiguousarray(pixels[:, :, 0])
    raise DataError(path, f"{role} has {channels} channels; expected 8-bit grayscale")
