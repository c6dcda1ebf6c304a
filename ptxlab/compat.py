"""Checks of the installation that run before any command, from package metadata alone.

segmentation-models-pytorch imports torchvision, whose compiled operators only load into the
torch release they were built for; a mismatched pair fails deep inside an import. On hosts with
a system-wide PyTorch (offline GPU servers) that pair is not pip's to choose, so ptxlab names
the problem first. Reading versions from metadata costs milliseconds; importing torchvision
would cost seconds on every command.
"""

from __future__ import annotations

import re
from importlib.metadata import PackageNotFoundError, version

# torch 2.N ships with torchvision 0.(N + 15): 2.4 / 0.19, ..., 2.11 / 0.26, 2.14 / 0.29.
TORCHVISION_MINOR_OFFSET = 15


def _major_minor(text: str) -> tuple[int, int]:
    match = re.match(r"(\d+)\.(\d+)", text)
    if not match:
        raise ValueError(f"unreadable version {text!r}")
    return int(match[1]), int(match[2])


def torch_pair_problem(torch_version: str | None, torchvision_version: str | None) -> str | None:
    """What is wrong with this torch/torchvision pair (versions as installed), or None."""
    if torch_version is None:
        return "torch is not installed; install PyTorch and its matching torchvision"
    torch_major, torch_minor = _major_minor(torch_version)
    wanted = f"0.{torch_minor + TORCHVISION_MINOR_OFFSET}"
    if torchvision_version is None:
        return (f"torchvision is not installed; install torchvision {wanted}.x, "
                f"the release that goes with torch {torch_version}")
    if torch_major != 2:
        return None  # the pairing rule is known for torch 2.x only
    if _major_minor(torchvision_version) != _major_minor(wanted):
        return (f"torch {torch_version} and torchvision {torchvision_version} are not a matching "
                f"pair (torch 2.{torch_minor} goes with torchvision {wanted}); install the "
                "torchvision built for this torch")
    return None


def _installed(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def check_torch_pair() -> None:
    """Raise RuntimeError (one line) unless the installed torch and torchvision go together."""
    problem = torch_pair_problem(_installed("torch"), _installed("torchvision"))
    if problem:
        raise RuntimeError(problem)
