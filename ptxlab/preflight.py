"""Checks a run makes before reading any data, so the faults users meet in their first week end
in seconds with one line naming the thing and the fix, instead of after the data cache was
built (or after MLflow's HTTP retries, ~4 minutes).

- the tracking store answers within `tracking.preflight_timeout_s` (one short request),
- the cache, checkpoint and local store folders are writable,
- their file systems have room for the data cache and one set of checkpoints (an estimate
  from the number of images, the image size and the model's parameter count).
"""

from __future__ import annotations

import os
import socket
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections import defaultdict
from pathlib import Path

from ptxlab.config import Config
from ptxlab.data.sources import SYNTHETIC, cache_root, synthetic_root
from ptxlab.data.synthetic import SyntheticSpec

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".dcm", ".dicom"}
DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
SLACK_BYTES = 16 << 20  # logs, plots, probability maps, SQLite growth
TIMEOUT_HELP = "tracking.preflight_timeout_s sets how long to wait"


class PreflightError(OSError):
    """Something a run needs from its machine is missing; the message says what and the fix."""


def check_run(config: Config, checkpoints: Path, tracking_uri: str) -> None:
    """Everything below, in order; raises PreflightError at the first problem."""
    check_tracking_store(tracking_uri, config.tracking.preflight_timeout_s)
    folders = {"checkpoint folder (PTXLAB_CHECKPOINTS)": checkpoints}
    if config.data.cache or config.data.source == SYNTHETIC:
        folders["cache directory (data.cache_dir or PTXLAB_CACHE)"] = cache_root(config.data)
    for label, folder in folders.items():
        check_writable(folder, label)
    needs = {checkpoints: checkpoint_bytes(config)}
    if config.data.cache or config.data.source == SYNTHETIC:
        root = cache_root(config.data)
        needs[root] = needs.get(root, 0) + cache_bytes(config)
    check_free_space(needs)


def check_tracking_store(uri: str, timeout_s: float) -> None:
    """One short request to a tracking server (HTTP) or database host; a SQLite store's folder
    must be writable. Other stores (file:, databricks) are left to MLflow."""
    parsed = urllib.parse.urlparse(uri)
    scheme = parsed.scheme.split("+")[0]
    if scheme in ("http", "https"):
        _check_http(uri, timeout_s)
    elif scheme == "sqlite":
        database = Path(uri[len("sqlite:///"):].split("?", 1)[0]) if "///" in uri else None
        if database is not None and str(database) not in ("", ":memory:"):
            check_writable(database.parent, "tracking store folder (MLFLOW_TRACKING_URI)")
    elif scheme in DEFAULT_PORTS and parsed.hostname:
        _check_tcp(uri, parsed.hostname, parsed.port or DEFAULT_PORTS[scheme], timeout_s)


def _check_http(uri: str, timeout_s: float) -> None:
    health = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=timeout_s):
            return
    except urllib.error.HTTPError:
        return  # it answered (an auth proxy's 401 or a 404 still means it is there)
    except (OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        raise PreflightError(
            f"tracking server {uri} did not answer within {timeout_s:g} s ({reason}); start it, "
            f"or set MLFLOW_TRACKING_URI to a reachable server or unset it for the local "
            f"store ({TIMEOUT_HELP})") from None


def _check_tcp(uri: str, host: str, port: int, timeout_s: float) -> None:
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as error:
        shown = uri.split("@")[-1]  # never print a password
        raise PreflightError(
            f"tracking database {shown} did not answer within {timeout_s:g} s "
            f"({error.strerror or error}); start it or fix MLFLOW_TRACKING_URI "
            f"({TIMEOUT_HELP})") from None


def check_writable(folder: Path, label: str) -> None:
    """Create `folder` if needed and write (then remove) a file in it."""
    if folder.exists() and not folder.is_dir():
        raise PreflightError(f"{label} {folder}: is a file, not a folder; point it at a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        descriptor, probe = tempfile.mkstemp(dir=folder, prefix=".ptxlab-probe.")
        os.close(descriptor)
        os.unlink(probe)
    except OSError as error:
        raise PreflightError(f"{label} {folder}: not writable ({error.strerror or error}); "
                             "point it at a writable folder") from None


def check_free_space(needs: dict[Path, int]) -> None:
    """`needs` maps folders to bytes they will receive; folders on one file system add up."""
    by_device: dict[int, list[Path]] = defaultdict(list)
    total: dict[int, int] = defaultdict(int)
    for folder, need in needs.items():
        device = os.stat(folder).st_dev
        by_device[device].append(folder)
        total[device] += need
    for device, folders in by_device.items():
        free = os.statvfs(folders[0])
        available = free.f_bavail * free.f_frsize
        need = total[device] + SLACK_BYTES
        if available < need:
            shown = ", ".join(str(folder) for folder in folders)
            raise PreflightError(
                f"{shown}: {_mb(available)} free, a run needs about {_mb(need)} for the data "
                "cache and one set of checkpoints; free some space (ptxlab gc) or point "
                "data.cache_dir / PTXLAB_CHECKPOINTS elsewhere")


def _mb(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:,.0f} MB"


def checkpoint_bytes(config: Config) -> int:
    """best.pt (weights) + last.pt (weights and Adam's two moments), float32."""
    import torch  # here, so that the tracking check runs before torch and smp load

    from ptxlab.model import build_model

    with torch.device("meta"):  # shapes only: nothing allocated, no weights read
        network, _ = build_model(config.model, load_weights=False)
    parameters = sum(p.numel() for p in network.parameters())
    buffers = sum(b.numel() for b in network.buffers())
    return 4 * (4 * parameters + 2 * buffers)


def cache_bytes(config: Config) -> int:
    """Resized entries (image + mask, one byte per pixel) for the images not cached yet, plus
    the synthetic data set's PNGs."""
    data = config.data
    size = data.image_size
    if data.source == SYNTHETIC:
        n_images = data.synthetic.n_images
        synthetic = data.synthetic
        spec = SyntheticSpec(n_images, synthetic.positive_fraction, synthetic.size, synthetic.seed)
        written = (synthetic_root(data) / f"synthetic-{spec.digest()}" / "COMPLETE").exists()
        phantoms = 0 if written else 2 * n_images * synthetic.size ** 2  # PNG < 2x raw
    else:
        n_images, phantoms = count_images(Path(data.source)), 0
    if not data.cache:
        return phantoms
    cached = sum(1 for _ in (cache_root(data) / "resized" / f"resized-{size}").glob("*/*.npy"))
    return phantoms + max(0, n_images - cached) * 2 * size * size


def count_images(source: Path) -> int:
    """Image files below `source`, masks left out (by folder or file name)."""
    count = 0
    for folder, _, files in os.walk(source):
        if "mask" in Path(folder).name.lower():
            continue
        count += sum(1 for name in files
                     if Path(name).suffix.lower() in IMAGE_SUFFIXES and "mask" not in name.lower())
    return count
