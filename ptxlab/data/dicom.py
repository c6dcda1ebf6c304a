"""DICOM radiographs to 8-bit grayscale pixels.

Only pixels and pixel geometry leave this module: no patient, study or device tag is returned,
logged or put in an error message.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.pixels import apply_voi_lut

from ptxlab.data.cases import DataError


@dataclass(frozen=True)
class DicomImage:
    """Display-ready pixels (uint8, H x W, bright = dense) and the pixel geometry of one DICOM."""

    pixels: np.ndarray
    geometry: dict[str, object]


def read_dicom(path: Path) -> DicomImage:
    """Read a single-frame grayscale DICOM (compressed or not) as uint8 pixels plus geometry.

    8-bit data is kept as stored. Deeper data gets its VOI LUT or window when the file has one,
    and is then stretched linearly from its minimum to its maximum onto 0..255. MONOCHROME1
    (bright = air) is inverted so that every image reads like MONOCHROME2.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():  # a truncated file's warning says what the error says
            warnings.simplefilter("ignore", UserWarning)
            dataset = pydicom.dcmread(path)
    except Exception as exc:  # pydicom raises many types for bad or truncated files
        raise DataError(path, f"not a readable DICOM file: {_one_line(exc)}") from exc
    if "PixelData" not in dataset:
        raise DataError(path, "no pixel data (the file is truncated, or holds no image)")
    geometry = _geometry(dataset)
    photometric = geometry["photometric_interpretation"]
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DataError(path, f"unsupported photometric interpretation {photometric!r}")
    if int(dataset.get("NumberOfFrames", 1) or 1) != 1:
        raise DataError(path, "multi-frame DICOM; expected one radiograph per file")
    try:
        stored = dataset.pixel_array
    except Exception as exc:
        raise DataError(path, f"cannot decode DICOM pixels: {_one_line(exc)}") from exc
    if stored.ndim != 2:
        raise DataError(path, f"expected a 2-D image, got pixel array shape {stored.shape}")
    pixels = _to_uint8(stored, dataset)
    if photometric == "MONOCHROME1":
        pixels = 255 - pixels
    return DicomImage(pixels=pixels, geometry=geometry)


def _geometry(dataset: pydicom.Dataset) -> dict[str, object]:
    spacing = dataset.get("PixelSpacing") or dataset.get("ImagerPixelSpacing")
    return {
        "rows": int(dataset.get("Rows", 0)),
        "columns": int(dataset.get("Columns", 0)),
        "pixel_spacing": tuple(float(value) for value in spacing) if spacing else None,
        "photometric_interpretation": str(dataset.get("PhotometricInterpretation", "")),
        "bits_allocated": int(dataset.get("BitsAllocated", 0)),
        "bits_stored": int(dataset.get("BitsStored", 0) or dataset.get("BitsAllocated", 0)),
    }


def _to_uint8(stored: np.ndarray, dataset: pydicom.Dataset) -> np.ndarray:
    if stored.dtype == np.uint8:
        return np.ascontiguousarray(stored)
    values = apply_voi_lut(stored, dataset).astype(np.float32)
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)


def _one_line(exc: Exception) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:200]
