"""Two CPU processes with half the batch each match one process with the whole batch (global-batch CKA)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ranks import run_ranks
from untrainable import distributed
from untrainable.guidance import Guidance
from untrainable.models import create_model

BATCH = 16
LAYERS = {"target_layers": ["layers.*.linear"], "guide_layers": ["layers.*.linear"]}


def _models() -> tuple[torch.nn.Module, torch.nn.Module]:
    # No BatchNorm, no dropout: the only batch statistic left is the CKA.
    # Layers wider than the batch: one process compares in sample space from
    # the guide's Gram matrices, the gathered batch from its activations.
    torch.manual_seed(0)
    target = create_model("fcn", input_shape=(12,), num_classes=5, depth=3, width=64, batch_norm=False)
    torch.manual_seed(1)
    guide = create_model("fcn", input_shape=(12,), num_classes=5, depth=2, width=96, batch_norm=False)
    return target, guide


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    return torch.randn(BATCH, 12, generator=generator), torch.randint(0, 5, (BATCH,), generator=generator)


def _step(target: torch.nn.Module, model: torch.nn.Module, guide: torch.nn.Module, x, y, gather) -> dict:
    guidance = Guidance(model, guide, gather=gather, **LAYERS).train()
    out = guidance(x)
    task_loss = F.cross_entropy(out.output, y)
    (task_loss + out.guidance_loss).backward()
    return {
        "task_loss": task_loss.detach(),
        "guidance_loss": out.guidance_loss.detach(),
        "grads": {name: p.grad.clone() for name, p in target.named_parameters()},
    }


def _ranks_step(rank: int, world: int) -> dict:
    x, y = _batch()
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    results = {}
    for scope, gather in (("global", distributed.gather_for_similarity), ("local", None)):
        target, guide = _models()
        model = torch.nn.parallel.DistributedDataParallel(target)
        results[scope] = _step(target, model, guide, x[rows], y[rows], gather)
    # A bool mask travels too (gloo has no bool all-gather).
    mask = torch.tensor([rank % 2 == 0, True])
    results["mask"] = distributed.gather_for_similarity(mask)
    return results


@pytest.fixture(scope="module")
def two_ranks() -> list[dict]:
    return run_ranks(_ranks_step, 2)


@pytest.fixture(scope="module")
def one_process() -> dict:
    target, guide = _models()
    x, y = _batch()
    return _step(target, target, guide, x, y, None)


@pytest.mark.slow
def test_global_scope_matches_one_process_on_the_whole_batch(two_ranks, one_process):
    for rank in two_ranks:
        assert torch.allclose(rank["global"]["guidance_loss"], one_process["guidance_loss"], atol=1e-5)
    # The global task loss is the mean of the per-rank means (equal shards).
    mean_task = sum(r["global"]["task_loss"] for r in two_ranks) / 2
    assert torch.allclose(mean_task, one_process["task_loss"], atol=1e-5)
    for rank in two_ranks:
        for name, grad in one_process["grads"].items():
            assert torch.allclose(rank["global"]["grads"][name], grad, atol=1e-5), name


@pytest.mark.slow
def test_local_scope_is_a_different_estimator(two_ranks, one_process):
    # Per-rank CKA on 8 examples is not CKA on 16: loss and gradients differ.
    assert not torch.allclose(two_ranks[0]["local"]["guidance_loss"], one_process["guidance_loss"], atol=1e-4)
    differences = [
        (two_ranks[0]["local"]["grads"][name] - grad).abs().max().item() for name, grad in one_process["grads"].items()
    ]
    assert max(differences) > 1e-4


@pytest.mark.slow
def test_no_gloo_thread_outlives_the_process_group(two_ranks):
    # A backend thread alive at the interpreter's shutdown may take the GIL there and abort the process (tests/ranks.py).
    assert [rank["threads_left"] for rank in two_ranks] == [0, 0]


@pytest.mark.slow
def test_bool_masks_are_gathered(two_ranks):
    expected = torch.tensor([True, True, False, True])
    for rank in two_ranks:
        assert rank["mask"].dtype == torch.bool
        assert torch.equal(rank["mask"], expected)


def test_single_process_gather_is_the_identity():
    x = torch.randn(3, 2, requires_grad=True)
    assert distributed.gather_for_similarity(x) is x
    info = distributed.setup("cpu")
    assert info.world_size == 1
    assert distributed.shard_indices(5, distributed.DistInfo(1, 2, 1, torch.device("cpu"))) == [1, 3]


def _setup_ddp_teardown(rank: int, folder: str, port: int) -> None:
    """A rank as `untrainable train` under torchrun is one: `setup`, a DDP model, a step, then `teardown`."""
    import os

    from ranks import native_threads

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    before = native_threads()
    info = distributed.setup("cpu", timeout_s=120)
    model = distributed.wrap(torch.nn.Linear(4, 2), info)
    model(torch.ones(3, 4)).sum().backward()
    del model
    distributed.teardown()
    torch.save({"threads_left": native_threads() - before}, os.path.join(folder, f"rank{rank}.pt"))


@pytest.mark.slow
def test_a_training_process_under_torchrun_leaves_no_gloo_thread_behind(tmp_path):
    # DDP imports torch._dynamo when built; `setup` imports it first, or the group's threads outlive `teardown`.
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_setup_ddp_teardown, args=(str(tmp_path), port), nprocs=2, join=True)
    assert [torch.load(tmp_path / f"rank{r}.pt")["threads_left"] for r in range(2)] == [0, 0]
