"""Data-parallel training over processes started by torchrun: who this process is, how the
processes agree (rank 0 decides and tells the others), and how `ptxlab run --nproc N` starts.

NCCL on GPUs, gloo on the CPU. Rank 0 alone logs to MLflow, writes checkpoints and reports
to Optuna; the others train their shard of every global batch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def current() -> Ranks:
    """This process's place, from torchrun's environment (a single process without it)."""
    env = os.environ
    return Ranks(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)),
                 int(env.get("LOCAL_RANK", 0)))


def init() -> Ranks:
    """Join the process group once (NCCL when CUDA is available, gloo otherwise)."""
    ranks = current()
    if ranks.distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return ranks


def broadcast(value: Any, ranks: Ranks) -> Any:
    """Rank 0's `value`, on every rank."""
    if not ranks.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def sum_across(values: list[float], ranks: Ranks) -> list[float]:
    """Element-wise sums over all ranks."""
    if not ranks.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def launch(nproc: int, argv: list[str]) -> int:
    """Run `ptxlab <argv>` in `nproc` processes on this machine through torchrun."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "ptxlab", *argv]
    return subprocess.call(command)
