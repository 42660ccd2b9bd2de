"""Data-parallel training on several processes or machines (torchrun, DistributedDataParallel).

A training stage started by `torchrun` (or by the stage itself when LANDSEG_NPROC > 1, see
`relaunch_under_torchrun`) trains the same model as one process, to float rounding:

- every rank draws the step's *global* batch (`batch_size` windows, a pure function of seed and
  step) and keeps its own contiguous slice of it (`Ranks.slice`), so the batch, its augmentations
  and the sampled cells do not depend on the process count;
- the terms that look across the batch are computed over the global batch: batch-norm statistics
  (`SyncedBatchNorm2d`, also on CPU where torch's SyncBatchNorm is CUDA-only), the marginal
  entropy, the contrastive term's candidate cells and the distillation teacher's soft k-means;
  every loss term is averaged over ranks (`Ranks.mean`), so each rank holds the global loss and
  DistributedDataParallel's gradient average is the one-process gradient;
- rank 0 alone validates, keeps the best weights, writes checkpoints, DVCLive logs and outputs;
  a resumed run reads the checkpoint on rank 0 and broadcasts it (no shared disk needed).

The collectives of the loss run on a process group of their own, so they never interleave with
DDP's gradient buckets. A rank that dies ends the job: torchrun stops the others, and a
collective waiting on a lost peer fails after LANDSEG_DIST_TIMEOUT seconds (default 1800) at the
latest.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

# The process group of the loss's collectives, set by `init_ranks` (module level, not an attribute
# of the networks: they are deep-copied for the weight EMA, and a process group cannot be).
_LOSS_GROUP = None


class DistributedError(RuntimeError):
    """A distributed run that cannot start or cannot go on."""


class _SumAcrossRanks(torch.autograd.Function):
    """Sum over ranks whose gradient is the sum of the ranks' gradients (each rank's loss uses
    the same global value, so every rank's contribution reaches every other rank's inputs)."""

    @staticmethod
    def forward(ctx, tensor):
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=_LOSS_GROUP)
        return out

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, group=_LOSS_GROUP)
        return grad


def _gather(rows: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    n = rows.shape[0]
    padded = rows.new_zeros((world_size * n, *rows.shape[1:]))
    padded = padded.index_copy(0, torch.arange(rank * n, (rank + 1) * n, device=rows.device), rows)
    return _SumAcrossRanks.apply(padded)


class Ranks:
    """This process's place in the job: rank, world size, local rank (0 of 1 when not distributed).

    `sum`, `mean` and `gather` are differentiable collectives over all ranks; with one process they
    return their input unchanged, so a one-process run computes exactly what it did before.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, local_world_size: int = 1):
        self.rank, self.world_size = rank, world_size
        self.local_rank, self.local_world_size = local_rank, local_world_size

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def slice(self, batch_size: int, what: str = "batch_size") -> slice:
        """The rows of a global batch of `batch_size` this rank trains on (equal, contiguous)."""
        if batch_size % self.world_size:
            raise DistributedError(f"{what} = {batch_size} does not split over {self.world_size} processes: "
                                   "choose a process count that divides it")
        n = batch_size // self.world_size
        return slice(self.rank * n, (self.rank + 1) * n)

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        return _SumAcrossRanks.apply(t) if self.distributed else t

    def mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean over ranks of a per-rank mean over equal slices: the global batch's mean."""
        return _SumAcrossRanks.apply(t) / self.world_size if self.distributed else t

    def mean_each(self, terms: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`mean` of each scalar in `terms`, in one collective."""
        if not self.distributed:
            return terms
        means = self.mean(torch.stack(list(terms.values())))
        return dict(zip(terms, means.unbind()))

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Every rank's (n, ...) rows stacked in rank order, (world_size * n, ...), differentiable
        (a zero-padded sum: gloo has no reduce-scatter for all_gather's gradient)."""
        return _gather(rows, self.rank, self.world_size) if self.distributed else rows

    def broadcast(self, obj):
        """Rank 0's picklable `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def __repr__(self) -> str:
        return f"Ranks(rank={self.rank}, world_size={self.world_size})"


ONE_PROCESS = Ranks()


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedError(f"{name} must be an integer, got {raw!r}") from None


def init_ranks(device: torch.device) -> tuple[torch.device, Ranks]:
    """Joins the job torchrun started (RANK, WORLD_SIZE, ... in the environment): gloo on CPU,
    nccl on CUDA (each process on the GPU of its LOCAL_RANK). Without one, `device` and
    `ONE_PROCESS`."""
    global _LOSS_GROUP
    world_size = env_int("WORLD_SIZE", 1)
    if world_size <= 1:
        return device, ONE_PROCESS
    if "MASTER_ADDR" not in os.environ:
        raise DistributedError("WORLD_SIZE > 1 but MASTER_ADDR is not set: start distributed runs with torchrun")
    timeout = datetime.timedelta(seconds=env_int("LANDSEG_DIST_TIMEOUT", 1800))
    local_rank = env_int("LOCAL_RANK", 0)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout)
    _LOSS_GROUP = dist.new_group(backend=backend, timeout=timeout)
    return device, Ranks(dist.get_rank(), dist.get_world_size(), local_rank, env_int("LOCAL_WORLD_SIZE", 1))


def close_ranks(ranks: Ranks) -> None:
    global _LOSS_GROUP
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()
        _LOSS_GROUP = None


class SyncedBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch (all ranks).

    One all-reduce per forward (and one per backward) of every rank's per-channel mean and variance;
    running statistics are updated as BatchNorm2d does (unbiased variance, `momentum`). In eval
    mode, or with one process, it is BatchNorm2d. Same parameters and buffers (`wrap_ddp` swaps the
    class of a network's BatchNorm2d modules in place), so the optimiser, checkpoints and the
    runtime's batch-norm folding do not change.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized() and dist.get_world_size(_LOSS_GROUP) > 1):
            return super().forward(x)
        if self.momentum is None:
            raise DistributedError("SyncedBatchNorm2d: cumulative averaging (momentum=None) is not supported")
        world, rank = dist.get_world_size(_LOSS_GROUP), dist.get_rank(_LOSS_GROUP)
        # each rank's (mean, variance) in one collective, combined as for equal parts (Chan et al.):
        # stable where E[x^2] - E[x]^2 is not
        local_mean = x.mean(dim=(0, 2, 3))
        local_var = (x - local_mean.view(1, -1, 1, 1)).pow(2).mean(dim=(0, 2, 3))
        parts = _gather(torch.stack([local_mean, local_var])[None], rank, world)
        mean = parts[:, 0].mean(dim=0)
        var = (parts[:, 1] + (parts[:, 0] - mean).pow(2)).mean(dim=0)
        count = x.shape[0] * x.shape[2] * x.shape[3] * world
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            self.running_mean.mul_(1 - self.momentum).add_(mean.detach(), alpha=self.momentum)
            unbiased = var.detach() * (count / max(count - 1, 1))
            self.running_var.mul_(1 - self.momentum).add_(unbiased, alpha=self.momentum)
        y = (x - mean.view(1, -1, 1, 1)) * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        return y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def wrap_ddp(module: nn.Module, ranks: Ranks, device: torch.device) -> nn.Module:
    """DistributedDataParallel over `module`, its batch norms made SyncedBatchNorm2d (itself with one
    process). Buffers are not broadcast each step: the batch-norm statistics are already global."""
    if not ranks.distributed:
        return module
    for m in module.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = SyncedBatchNorm2d
    import inspect

    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # torch 2.13 renamed the per-step buffer sync; either way the buffers agree at the start
    sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else "broadcast_buffers")
    return DistributedDataParallel(module, device_ids=ids, **{sync: False})


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or env_int("WORLD_SIZE", 1) > 1


def relaunch_under_torchrun(module: str, argv: Sequence[str], nproc: int) -> int | None:
    """Runs `python -m <module> <argv>` as `torchrun --standalone --nproc-per-node nproc` and
    returns its exit status, when `nproc` > 1 and this process is not already one of torchrun's;
    else None (train here). This is how `dvc repro` trains on several processes: LANDSEG_NPROC
    is an execution setting, not a DVC param, since the result does not depend on it."""
    if nproc <= 1 or under_torchrun():
        return None
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", module, *argv]
    return subprocess.call(cmd)


def local_threads(threads: int, ranks: Ranks) -> int:
    """torch CPU threads of this process: `threads` if set, else the cores shared by the processes
    on this machine (all cores with one process)."""
    if threads > 0:
        return threads
    return max(1, (os.cpu_count() or 1) // max(1, ranks.local_world_size))


def usage_over_ranks(usage, ranks: Ranks):
    """Cluster shares (numpy, k) of equal slices averaged over ranks."""
    if not ranks.distributed:
        return usage
    t = torch.as_tensor(usage, dtype=torch.float64)
    dist.all_reduce(t, group=_LOSS_GROUP)
    return (t / ranks.world_size).numpy()


__all__ = ["DistributedError", "ONE_PROCESS", "Ranks", "SyncedBatchNorm2d", "close_ranks", "init_ranks",
           "local_threads", "relaunch_under_torchrun", "under_torchrun", "usage_over_ranks", "wrap_ddp"]
