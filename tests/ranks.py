"""Several gloo processes for a test: spawned, run, and torn down so that no gloo thread outlives its group.

A process group's gloo backend runs worker threads, joined when the group is
destroyed. `destroy_process_group` only drops the references torch.distributed
keeps; the backend, and its threads, go only with the last reference. Importing
`torch._dynamo` (as DistributedDataParallel does when it is built) while a group
exists keeps references to that group for the life of the process: the threads
then live on into the interpreter's shutdown, where a thread that still lets go
of a finished collective's tensor takes the GIL of a finalizing interpreter and
is ended mid-destructor: `terminate called without an active exception`, SIGABRT.
On a loaded machine the thread lets go late enough to meet the shutdown.

So each rank imports `torch._dynamo` before it joins the group, drops its
models (a garbage collection for the cycles that hooks make) while the group is
still there, destroys the group, and checks that the threads it started are gone.
"""

from __future__ import annotations

import datetime
import gc
import os
import tempfile
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def native_threads() -> int:
    """This process's threads, as the kernel counts them (gloo's are not Python threads)."""
    return len(os.listdir("/proc/self/task"))


def run_ranks(fn: Callable[..., Any], world: int = 2, *args: Any) -> list[Any]:
    """`fn(rank, world, *args)` in `world` spawned processes joined in one gloo group; each rank's result.

    Each result is a dict (tensors, numbers) to which the rank adds
    `threads_left`: the threads it started that outlived the group.
    """
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_rank, args=(world, folder, fn, args), nprocs=world, join=True)
        return [torch.load(os.path.join(folder, f"rank{rank}.pt")) for rank in range(world)]


def _rank(rank: int, world: int, folder: str, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
    import torch._dynamo  # noqa: F401  (before the group exists: see the module's docstring)

    torch.set_num_threads(1)
    before = native_threads()
    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.path.join(folder, 'store')}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=120),  # a lost peer fails the test, it does not hang the suite
    )
    try:
        result = fn(rank, world, *args)
        gc.collect()  # DDP modules in reference cycles let go of the group now, not at shutdown
        dist.barrier()
    finally:
        dist.destroy_process_group()
    gc.collect()
    result["threads_left"] = native_threads() - before
    torch.save(result, os.path.join(folder, f"rank{rank}.pt"))
