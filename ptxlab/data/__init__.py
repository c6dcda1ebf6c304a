"""Reading chest X-ray datasets: published layouts, RLE labels, DICOM pixels, caching, splits."""
