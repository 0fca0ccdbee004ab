"""torch.distributed plumbing: process-group set-up under torchrun, DDP, gathers."""

from __future__ import annotations

import atexit
import datetime
import gc
import importlib
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


def setup(device_name: str = "auto", timeout_s: float = 300.0) -> DistInfo:
    """Join the process group that torchrun describes in the environment (gloo on CPU, nccl on GPU).

    Without torchrun (no WORLD_SIZE, or WORLD_SIZE=1) this is a single process.
    A collective that waits longer than `timeout_s` for another process (one
    that hangs) raises, so no process waits forever: see `is_timeout`.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo(0, 1, 0, torch.device("cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name != "cpu"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        # DistributedDataParallel imports torch._dynamo when it is built; imported while a group exists, it keeps
        # references to the group for the life of the process, and gloo's threads then outlive `teardown` into the
        # interpreter's shutdown (a SIGABRT there, under load). Imported first, it holds none.
        importlib.import_module("torch._dynamo")

        dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
        atexit.register(teardown)
    device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def teardown() -> None:
    """Leave the process group (`setup` calls this at exit): its backend's threads end while the interpreter runs."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()  # the reference cycles of a finished run's models and hooks, which hold the group
        dist.destroy_process_group()


def export_slurm_env(environ: dict[str, str] | None = None) -> bool:
    """Set what torchrun would (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR/PORT) from a SLURM task's variables.

    Only inside a job step of several tasks (SLURM_NTASKS > 1) and where
    torchrun has not set them already; `setup` then joins the group as under
    torchrun. The master is the job's first node; the port is derived from
    the job id, so the tasks of one job agree without talking. Returns
    whether anything was set.
    """
    env = os.environ if environ is None else environ
    tasks = int(env.get("SLURM_NTASKS", "1"))
    if tasks <= 1 or "RANK" in env:
        return False
    nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")))
    env["RANK"] = env["SLURM_PROCID"]
    env["LOCAL_RANK"] = env["SLURM_LOCALID"]
    env["WORLD_SIZE"] = str(tasks)
    env["LOCAL_WORLD_SIZE"] = str(tasks // max(nodes, 1))
    env["MASTER_ADDR"] = first_node(env.get("SLURM_JOB_NODELIST", env.get("SLURMD_NODENAME", "localhost")))
    job = env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID")
    number = int(env["SLURM_JOB_ID"]) if not job else int(env["SLURM_ARRAY_JOB_ID"]) + int(env["SLURM_ARRAY_TASK_ID"])
    env["MASTER_PORT"] = str(20000 + number % 20000)
    return True


def first_node(nodelist: str) -> str:
    """The first host name of a SLURM node list: "gpu[03-05,09],cpu1" -> "gpu03"."""
    first = nodelist.split(",")[0] if "[" not in nodelist.split(",")[0] else nodelist[: nodelist.index("]") + 1]
    if "[" not in first:
        return first
    prefix, ranges = first[:-1].split("[", 1)
    return prefix + ranges.split(",")[0].split("-")[0]


def is_timeout(err: BaseException) -> bool:
    """Whether `err` is a collective's time-out (another process hung), as gloo and nccl raise it."""
    return (
        isinstance(err, RuntimeError)
        and dist.is_available()
        and dist.is_initialized()
        and "timed out" in str(err).lower()
    )


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
    if not torch.is_floating_point(x):
        # Masks and token ids carry no gradient; gloo cannot send bool tensors.
        send = (x.to(torch.uint8) if x.dtype == torch.bool else x).contiguous()
        parts = [torch.empty_like(send) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, send)
        return torch.cat(parts, dim=0).to(x.dtype)
    return _GatherBatch.apply(x)


class _GatherBatch(torch.autograd.Function):
    """All-gather along the batch whose backward hands each rank the summed gradient of its own rows.

    Every rank computes the same loss from the gathered batch, so the
    gradient of rank r's rows is the sum over ranks of their gradients for
    those rows: a reduce-scatter (nccl), or an all-reduce and a slice where
    the backend has no reduce-scatter (gloo).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.rows = x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        rank, rows = dist.get_rank(), ctx.rows
        if dist.get_backend() == dist.Backend.NCCL:
            out = torch.empty_like(grad[:rows])
            dist.reduce_scatter_tensor(out, grad)
            return out
        dist.all_reduce(grad)
        return grad[rank * rows : (rank + 1) * rows].clone()


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
    # A rank whose shard is empty (fewer examples than ranks) has no statistics at all: agree on the keys first.
    keys = sorted(set().union(*gather_objects(sorted(sums), info)))
    values = torch.tensor([sums.get(k, 0.0) for k in keys], dtype=torch.float64, device=info.device)
    dist.all_reduce(values)
    return dict(zip(keys, values.tolist()))


def shard_indices(n: int, info: DistInfo) -> list[int]:
    """This rank's share of n examples for evaluation: every world_size-th one, none repeated."""
    return list(range(info.rank, n, info.world_size))


def broadcast_buffers(model: nn.Module, info: DistInfo) -> None:
    """Copy rank 0's buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts buffers at the start of each forward, so after the last
    training step every rank holds statistics updated on its own shard; a
    sharded evaluation must first agree on one model.
    """
    if info.world_size <= 1:
        return
    for buffer in model.buffers():
        dist.broadcast(buffer.data, src=0)
