"""Top-k checkpoint averaging (`train.average_top_k`): keep the weights of the k best epochs,
average them at the end of training.

The ranking lives in the training state (`[score, epoch]` pairs, best first), so a resumed run
continues it; each kept epoch's weights are a file `top-k/epoch-<n>.pt` in the run's checkpoint
folder, written before the state that names it and removed only after a state that no longer
names it, so a kill at any moment leaves every ranked epoch's file in place.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

FOLDER = "top-k"


def path(workdir: Path, epoch: int) -> Path:
    """Where the weights of `epoch` are kept while it ranks among the top k."""
    folder = Path(workdir) / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"epoch-{epoch}.pt"


def keep(ranking: list[list[float]], score: float, epoch: int, k: int | None) -> bool:
    """Rank `epoch` by `score` (higher is better; ties keep the earlier epoch first); keep the
    k best in `ranking`. True when `epoch` is among them, i.e. its weights must be saved."""
    if not k:
        return False
    ranking[:] = [pair for pair in ranking if int(pair[1]) != epoch]  # a re-run epoch
    ranking.append([score, epoch])
    ranking.sort(key=lambda pair: (-pair[0], pair[1]))
    del ranking[k:]
    return any(int(e) == epoch for _, e in ranking)


def remove_others(workdir: Path, ranking: Sequence[Sequence[float]]) -> None:
    """Delete kept weights of epochs that left the ranking."""
    kept = {path(workdir, int(epoch)).name for _, epoch in ranking}
    for file in (Path(workdir) / FOLDER).glob("epoch-*.pt"):
        if file.name not in kept:
            file.unlink(missing_ok=True)


def average(paths: Sequence[Path]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the saved weights (floating tensors, BatchNorm running
    statistics included); integer buffers such as BatchNorm's batch counters are taken from
    the first (best) checkpoint."""
    states = [torch.load(p, map_location="cpu", weights_only=True)["model"] for p in paths]
    averaged = {}
    for name, first in states[0].items():
        if first.is_floating_point():
            averaged[name] = torch.stack([state[name].float() for state in states]).mean(0)
            averaged[name] = averaged[name].to(first.dtype)
        else:
            averaged[name] = first.clone()
    return averaged
