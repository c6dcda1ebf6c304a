"""ptxlab: an experiment platform for pneumothorax segmentation on chest X-rays."""

import os

# albumentations checks PyPI for updates at import unless told not to; ptxlab never wants that.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

__version__ = "0.1.0"
