"""The CUDA paths: autocast through Guidance and the trainer, the guide cache, checkpoints across devices, nccl.

Every test here is marked `gpu` and skipped where torch sees no CUDA device
(tests/conftest.py, and the module's own skipif so the file stands alone);
the two-process ones need two GPUs. `bash scripts/gpu_check.sh` runs them.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from test_torchrun import CONFIG, torchrun
from untrainable import distributed
from untrainable.checkpoint import CheckpointManager, load_checkpoint, load_weights
from untrainable.config import RunConfig, from_dict, load_config, save_config
from untrainable.guidance import Guidance
from untrainable.guide_cache import GuideCache
from untrainable.models import create_model
from untrainable.trainer import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
two_gpus = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2 or not dist.is_nccl_available(),
    reason="needs 2 CUDA devices and nccl",
)
HALF = [torch.float16, torch.bfloat16]
IMAGE_LAYERS = {"target_layers": ["layers.*.linear"], "guide_layers": ["layer*.*"]}


def _image_models(device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A Deep FCN without dropout (the only randomness left is none) and a narrow ResNet-18, on `device`."""
    torch.manual_seed(0)
    target = create_model("deep_fcn", input_shape=(1, 28, 28), depth=4, width=64, dropout=0.0)
    guide = create_model("resnet18", input_shape=(1, 28, 28), width=4, stem="small")
    return target.to(device), guide.to(device)


def _half_supported(dtype: torch.dtype) -> bool:
    return dtype is not torch.bfloat16 or torch.cuda.is_bf16_supported()


# ---------------------------------------------------------------- autocast


@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
def test_guided_forward_under_autocast_runs_the_models_in_half_and_the_cka_in_float32(dtype):
    if not _half_supported(dtype):
        pytest.skip("this GPU has no bf16")
    cuda = torch.device("cuda")
    target, guide = _image_models(cuda)
    guidance = Guidance(target, guide, **IMAGE_LAYERS).train()
    x = torch.randn(32, 1, 28, 28, device=cuda)
    reference = guidance(x).guidance_loss.detach()
    with torch.autocast("cuda", dtype=dtype):
        out = guidance(x)
    assert out.output.dtype == dtype
    assert out.guidance_loss.dtype == torch.float32
    assert all(s.dtype == torch.float32 and s.device.type == "cuda" for s in out.similarities.values())
    # Half-precision activations, float32 similarity: close to the float32 forward.
    assert torch.allclose(out.guidance_loss, reference, rtol=0.05, atol=0.05), (out.guidance_loss, reference)
    out.guidance_loss.backward()
    grads = [p.grad for p in target.parameters() if p.grad is not None]
    assert grads and all(g.device.type == "cuda" and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in guide.parameters()), "the guide stays frozen"


def _config(**changes: Any) -> RunConfig:
    """A small guided MNIST-1D run; `changes` are dotted keys (`train.precision`)."""
    data: dict[str, Any] = {
        "model": {"name": "fcn", "args": {"depth": 2, "width": 32}},
        "data": {"name": "mnist1d", "args": {"num_samples": 400, "val_size": 40}, "batch_size": 16},
        "guide": {"name": "cnn1d", "args": {"channels": 4, "depth": 2}},
        "guidance": {"alpha": 1.0},
        "optim": {"lr": 3e-3},
        "train": {"epochs": 1, "max_steps": 4, "device": "cuda", "progress": False},
    }
    data["data"]["train_eval_size"] = 20
    for key, value in changes.items():
        section, name = key.split(".")
        data[section][name] = value
    return from_dict(RunConfig, data)


def _records(folder: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _steps(folder: Path) -> list[dict[str, Any]]:
    return [r for r in _records(folder) if "kind" not in r]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_the_trainer_trains_guided_in_half_precision_on_the_gpu(precision, tmp_path):
    if not _half_supported(torch.bfloat16 if precision == "bf16" else torch.float16):
        pytest.skip("this GPU has no bf16")
    result = train(_config(**{"train.precision": precision}), tmp_path)
    assert result.final["steps"] == 4
    steps = _steps(tmp_path)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["guidance_loss"]) for r in steps)
    assert math.isfinite(result.final["test"]["loss"]) and 0.0 <= result.final["test"]["accuracy"] <= 1.0


# ---------------------------------------------------------------- the guide cache


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_guide_cache_serves_the_guides_activations_on_the_device(precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    cuda = torch.device("cuda")
    target, guide = _image_models(cuda)
    guidance = Guidance(target, guide, **IMAGE_LAYERS).train()
    x, index = torch.randn(16, 1, 28, 28, device=cuda), torch.arange(16)
    cache = GuideCache(32, "memory")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
        cache.activations(index, x, guidance.run_guide)  # unseen: the guide runs, its activations are kept
        served = cache.activations(index, x, guidance.run_guide)  # seen: read from the cache
        fresh = guidance.run_guide(x)
        from_cache = guidance(x, guide_activations=served).guidance_loss
        direct = guidance(x).guidance_loss
    assert (cache.misses, cache.hits) == (16, 16)
    assert served.keys() == fresh.keys()
    for name, act in fresh.items():
        assert served[name].device == x.device and served[name].dtype == act.dtype
        torch.testing.assert_close(served[name], act, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(from_cache, direct, rtol=1e-3, atol=1e-3)


def test_a_run_with_the_guide_cache_on_the_gpu_trains_as_one_without(tmp_path):
    two_epochs = {"train.epochs": 2, "train.max_steps": None}
    cached = train(_config(**two_epochs, **{"guidance.cache": "memory"}), tmp_path / "cached")
    plain = train(_config(**two_epochs), tmp_path / "plain")
    (record,) = [r for r in _records(tmp_path / "cached") if r.get("kind") == "guide_cache"]
    steps = _steps(tmp_path / "cached")
    assert record["hits"] > 0, "the second epoch reads the cache"
    assert record["hits"] + record["misses"] == 16 * len(steps)
    assert cached.final["steps"] == plain.final["steps"] == len(steps)
    for with_cache, without in zip(steps, _steps(tmp_path / "plain")):
        for key in ("task_loss", "guidance_loss"):
            assert math.isclose(with_cache[key], without[key], abs_tol=1e-3), (with_cache["step"], key)


# ---------------------------------------------------------------- checkpoints across devices


def _on_the_cpu(*args: str, cwd: Path) -> None:
    """`python -m untrainable ARGS` in a process that sees no GPU."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "untrainable", *args]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def _latest(folder: Path) -> dict[str, Any]:
    loaded = CheckpointManager(folder / "checkpoints").load_latest(map_location="cpu", quarantine=False)
    assert loaded is not None, f"no checkpoint in {folder}"
    return loaded[0]


def _resumable() -> RunConfig:
    """Device `auto` (the config does not change between devices), fused Adam as the paper-scale configs use."""
    return _config(**{"train.device": "auto", "train.max_steps": 3, "train.epochs": 2, "optim.fused": True})


def _check_resumed(folder: Path) -> None:
    result = json.loads((folder / "result.json").read_text())
    assert result["steps"] == 6
    records = _records(folder)
    assert [r["step"] for r in records if r.get("kind") == "resume"] == [3]
    steps = [r for r in records if "kind" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(r["loss"]) for r in steps)
    weights = load_weights(folder / "model.pt")
    assert all(w.device.type == "cpu" and torch.isfinite(w.float()).all() for w in weights.values())


def test_a_run_checkpointed_on_the_gpu_resumes_on_the_cpu(tmp_path):
    folder = tmp_path / "run"
    train(_resumable(), folder)  # `auto`: on the GPU
    assert "cuda" in _latest(folder)["rng"], "written by a process with CUDA"
    assert any(t.is_cuda for t in _gpu_tensors(folder)), "the checkpoint holds CUDA tensors"
    _on_the_cpu(
        "train", "--config", "run/config.json", "--out", "run", "--resume", "--set", "train.max_steps=6", cwd=tmp_path
    )
    assert "cuda" not in _latest(folder)["rng"], "the resumed steps ran where no GPU was visible"
    _check_resumed(folder)


def test_a_run_checkpointed_on_the_cpu_resumes_on_the_gpu(tmp_path):
    save_config(_resumable(), tmp_path / "run.json")
    _on_the_cpu("train", "--config", "run.json", "--out", "run", cwd=tmp_path)
    folder = tmp_path / "run"
    assert "cuda" not in _latest(folder)["rng"]
    train(load_config(folder / "config.json", {"train.max_steps": 6}), folder, resume=True)
    assert "cuda" in _latest(folder)["rng"], "the resumed steps ran on the GPU"
    _check_resumed(folder)


def _gpu_tensors(folder: Path) -> list[torch.Tensor]:
    """The model's tensors of the newest checkpoint, loaded where they were saved."""
    newest = CheckpointManager(folder / "checkpoints").paths()[-1]
    return list(load_checkpoint(newest, map_location=None)["model"].values())


# ---------------------------------------------------------------- nccl: the global batch over two GPUs

BATCH = 16
FCN_LAYERS = {"target_layers": ["layers.*.linear"], "guide_layers": ["layers.*.linear"]}


def _fcn_models(device: torch.device) -> tuple[torch.nn.Module, torch.nn.Module]:
    # No BatchNorm, no dropout: the CKA is the only batch statistic.
    torch.manual_seed(0)
    target = create_model("fcn", input_shape=(12,), num_classes=5, depth=3, width=64, batch_norm=False)
    torch.manual_seed(1)
    guide = create_model("fcn", input_shape=(12,), num_classes=5, depth=2, width=96, batch_norm=False)
    return target.to(device), guide.to(device)


def _fcn_batch(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(2)
    x, y = torch.randn(BATCH, 12, generator=generator), torch.randint(0, 5, (BATCH,), generator=generator)
    return x.to(device), y.to(device)


def _guided_step(target, model, guide, x, y, gather) -> dict[str, Any]:
    guidance = Guidance(model, guide, gather=gather, **FCN_LAYERS).train()
    out = guidance(x)
    task_loss = F.cross_entropy(out.output, y)
    (task_loss + out.guidance_loss).backward()
    return {
        "task_loss": task_loss.detach().cpu(),
        "guidance_loss": out.guidance_loss.detach().cpu(),
        "grads": {name: p.grad.detach().cpu() for name, p in target.named_parameters()},
    }


def _nccl_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        device = torch.device("cuda", rank)
        x, y = _fcn_batch(device)
        rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
        target, guide = _fcn_models(device)
        model = torch.nn.parallel.DistributedDataParallel(target, device_ids=[rank])
        result = _guided_step(target, model, guide, x[rows], y[rows], distributed.gather_for_similarity)
        # nccl sends no bool tensors either: the mask travels as bytes.
        result["mask"] = distributed.gather_for_similarity(torch.tensor([rank % 2 == 0, True], device=device)).cpu()
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@two_gpus
def test_global_batch_cka_over_two_gpus_with_nccl_matches_one_gpu_on_the_whole_batch():
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_nccl_worker, args=(2, os.path.join(folder, "store"), folder), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(folder, f"rank{r}.pt")) for r in range(2)]
    cuda = torch.device("cuda", 0)
    target, guide = _fcn_models(cuda)
    one = _guided_step(target, target, guide, *_fcn_batch(cuda), None)
    for rank in ranks:
        assert torch.allclose(rank["guidance_loss"], one["guidance_loss"], atol=1e-4)
        assert torch.equal(rank["mask"], torch.tensor([True, True, False, True]))
        for name, grad in one["grads"].items():
            assert torch.allclose(rank["grads"][name], grad, atol=1e-4), name
    assert torch.allclose(sum(r["task_loss"] for r in ranks) / 2, one["task_loss"], atol=1e-4)


# The CPU torchrun test's run, on the GPUs.
TORCHRUN_CONFIG = CONFIG + 'device = "cuda"\n'


@two_gpus
def test_torchrun_on_two_gpus_trains_with_nccl_and_resumes_like_one_unbroken_run(tmp_path):
    (tmp_path / "run.toml").write_text(TORCHRUN_CONFIG)
    torchrun(tmp_path, "--config", "run.toml", "--out", "full")
    torchrun(tmp_path, "--config", "run.toml", "--out", "resumed", "--set", "train.max_steps=8")
    torchrun(tmp_path, "--config", "run.toml", "--out", "resumed", "--resume")
    full, resumed = (json.loads((tmp_path / f / "result.json").read_text()) for f in ("full", "resumed"))
    # 540 training examples, 2 ranks x batch 40: 6 steps an epoch.
    assert full["steps"] == resumed["steps"] == 12
    records = _records(tmp_path / "resumed")
    assert [r["step"] for r in records if r.get("kind") == "resume"] == [8]
    w_full, w_resumed = load_weights(tmp_path / "full" / "model.pt"), load_weights(tmp_path / "resumed" / "model.pt")
    for key in w_full:
        assert torch.allclose(w_full[key], w_resumed[key], atol=1e-5), key
