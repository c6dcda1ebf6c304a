"""Data-parallel training over processes started by torchrun: who this process is, how the
processes agree (rank 0 decides and tells the others), and how `ptxlab run --nproc N` starts.

NCCL on GPUs, gloo on the CPU. Rank 0 alone logs to MLflow, writes checkpoints and reports
to Optuna; the others train their shard of every global batch.

N processes train the model one process would: BatchNorm statistics and every loss term are
computed over the global batch (`global_sum`, `synchronize_batch_norm`), so the gradient after
DDP's average is the single-process gradient up to float rounding.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as collectives
from timm.layers import BatchNormAct2d
from timm.layers import convert_sync_batchnorm as convert_to_cuda_sync_batch_norm
from torch import nn
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import main as torchrun

from ptxlab import environment


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    launched: bool = False  # started by torchrun, even as its only process

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """In a process group: more than one process, or `--nproc 1` (which runs the whole
        data-parallel path, NCCL included, in one process)."""
        return self.world > 1 or self.launched


def current() -> Ranks:
    """This process's place, from torchrun's environment (a single process without it)."""
    return Ranks(*environment.torchrun_place(), environment.started_by_torchrun())


def init(use_cuda: bool) -> Ranks:
    """Join the process group once: NCCL with each rank on GPU `local_rank` when training on
    CUDA, gloo on the CPU."""
    ranks = current()
    if ranks.distributed and not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(ranks.local_rank)  # NCCL's collectives use the current GPU
        dist.init_process_group("nccl" if use_cuda else "gloo")
    return ranks


def broadcast(value: Any, ranks: Ranks) -> Any:
    """Rank 0's `value`, on every rank."""
    if not ranks.distributed:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


class RankZeroFailed(Exception):
    """Rank 0 failed before handing the run over; it reported why, the other ranks stop."""


class Handoff:
    """Rank 0's set-up ends by sending the others what they need (`send`). If rank 0 fails
    before that, they are told so, and stop with `RankZeroFailed` instead of breaking off in
    a collective with an error that hides rank 0's."""

    def __init__(self, ranks: Ranks):
        self.ranks = ranks
        self.sent = False

    def send(self, value: Any) -> None:
        broadcast(value, self.ranks)
        self.sent = True

    def __enter__(self) -> Handoff:
        return self

    def __exit__(self, error_type, *_) -> None:
        failed = error_type is not None and issubclass(error_type, Exception)  # not Ctrl-C
        if failed and not self.sent and self.ranks.distributed:
            broadcast(None, self.ranks)

    @staticmethod
    def receive(ranks: Ranks) -> Any:
        """On the other ranks: what rank 0 sent, or RankZeroFailed."""
        value = broadcast(None, ranks)
        if value is None:
            raise RankZeroFailed
        return value


def sum_across(values: list[float], ranks: Ranks) -> list[float]:
    """Element-wise sums over all ranks."""
    if not ranks.distributed:
        return values
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"  # NCCL reduces GPU tensors only
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()


def _in_process_group() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def global_sum(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over all ranks (itself in a single process), differentiably.

    The backward pass sums the gradients of every rank's use of the result, so after DDP
    divides by the world size each rank's share gets the gradient of the global quantity.
    """
    if not _in_process_group():
        return tensor
    return collectives.wait_tensor(collectives.all_reduce(tensor, "sum", dist.group.WORLD))


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with training statistics over the global batch of all ranks.

    torch's SyncBatchNorm runs on GPUs only; this is the same computation in plain autograd
    ops, for gloo on the CPU. State-dict keys are BatchNorm2d's, so checkpoints load anywhere.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and _in_process_group()):
            return super().forward(x)
        channels = (0, 2, 3)
        local_count = x.new_tensor([x.numel() // x.shape[1]])
        totals = global_sum(torch.cat([x.sum(channels), local_count]))
        count = totals[-1]
        mean = totals[:-1] / count
        centred = x - mean.view(1, -1, 1, 1)
        variance = global_sum(centred.square().sum(channels)) / count
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), variance.detach(), count.item())
        out = centred * torch.rsqrt(variance + self.eps).view(1, -1, 1, 1)
        if self.affine:
            out = out * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return out

    @torch.no_grad()
    def _update_running_stats(self, mean: torch.Tensor, variance: torch.Tensor,
                              count: float) -> None:
        self.num_batches_tracked += 1
        factor = (self.momentum if self.momentum is not None
                  else 1.0 / self.num_batches_tracked.item())
        unbiased = variance * (count / max(count - 1.0, 1.0))
        self.running_mean.lerp_(mean, factor)
        self.running_var.lerp_(unbiased, factor)


class GlobalBatchNormAct2d(GlobalBatchNorm2d):
    """timm's BatchNormAct2d (norm, then dropout and activation) with global statistics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


def _to_global_batch_norm(module: nn.Module) -> nn.Module:
    if not isinstance(module, nn.BatchNorm2d):
        for name, child in module.named_children():
            setattr(module, name, _to_global_batch_norm(child))
        return module
    kind = GlobalBatchNormAct2d if isinstance(module, BatchNormAct2d) else GlobalBatchNorm2d
    replacement = kind(module.num_features, module.eps, module.momentum, module.affine,
                       module.track_running_stats)
    if isinstance(module, BatchNormAct2d):
        replacement.drop, replacement.act = module.drop, module.act
    replacement.load_state_dict(module.state_dict())
    if module.running_mean is not None:
        replacement.to(module.running_mean.device, module.running_mean.dtype)
    return replacement.train(module.training)


def synchronize_batch_norm(model: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of `model` normalised over the global batch: torch's SyncBatchNorm on
    CUDA, GlobalBatchNorm2d elsewhere. timm's norm+activation layers keep their activation
    (torch's own converter would drop it)."""
    if device.type == "cuda":
        return convert_to_cuda_sync_batch_norm(model)
    return _to_global_batch_norm(model)


def launch(nproc: int, argv: list[str]) -> int:
    """Run `ptxlab <argv>` in `nproc` processes on this machine through torchrun's launcher
    (in this process); returns `exit_status` of the failed ranks, else 0.

    The ranks report their own errors in one line, so torchrun's traceback, failure summary
    and banner are left out.
    """
    for name in ("torch.distributed.elastic", "torch.distributed.run"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        torchrun(["--standalone", f"--nproc_per_node={nproc}", "-m", "ptxlab", *argv])
    except ChildFailedError as error:
        return exit_status({rank: failure.exitcode for rank, failure in error.failures.items()})
    return 0


def exit_status(exit_codes: dict[int, int]) -> int:
    """One exit status for failed ranks, whichever stopped first: the lowest rank's own exit
    code (rank 0 says why a run failed; torchrun stops the others with a signal, which shows
    as a negative code), else 1."""
    own = [code for _, code in sorted(exit_codes.items()) if code > 0]
    return own[0] if own else 1
