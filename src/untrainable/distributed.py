"""torch.distributed plumbing: process-group set-up under torchrun, DDP, gathers."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


def setup(device_name: str = "auto") -> DistInfo:
    """Join the process group that torchrun describes in the environment (gloo on CPU, nccl on GPU).

    Without torchrun (no WORLD_SIZE, or WORLD_SIZE=1) this is a single process.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(0, 1, 0, torch.device("cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def wrap(model: nn.Module, info: DistInfo) -> nn.Module:
    """The target in DistributedDataParallel when there are several processes, else itself."""
    if info.world_size <= 1:
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def gather_for_similarity(x: Tensor) -> Tensor:
    """Concatenate a (batch, ...) tensor over all ranks along the batch, keeping gradients.

    CKA is a batch statistic: computing it on the global batch needs every
    rank's activations. The autograd-aware all-gather sends each rank the
    gradient of the loss with respect to its own rows, so after DDP averages
    the gradients they equal those of one process on the global batch.
    Single process: x unchanged.
    """
    if not is_distributed():
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def gather_objects(obj: Any, info: DistInfo) -> Any:
    """A list of `obj` from every rank (on every rank); `obj` itself in a single process."""
    if info.world_size <= 1:
        return obj
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.world_size > 1:
        dist.barrier()


def all_reduce_sums(sums: dict[str, float], info: DistInfo) -> dict[str, float]:
    """Sum a dict of floats over ranks (evaluation statistics of each shard)."""
    if info.world_size <= 1:
        return sums
    keys = sorted(sums)
    values = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=info.device)
    dist.all_reduce(values)
    return dict(zip(keys, values.tolist()))
