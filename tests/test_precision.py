"""Mixed precision: bf16 autocast for the models, the similarity always in float32."""

from __future__ import annotations

import pytest
import torch

from untrainable.config import RunConfig, from_dict
from untrainable.guidance import Guidance
from untrainable.models import create_model
from untrainable.similarity import linear_cka, linear_cka_unbiased, rsa
from untrainable.trainer import train


@pytest.mark.parametrize("measure", [linear_cka, linear_cka_unbiased, rsa])
def test_similarity_is_float32_under_bf16_autocast(measure):
    torch.manual_seed(0)
    x = torch.randn(32, 20).bfloat16().requires_grad_(True)
    y = torch.randn(32, 30).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = measure(x, y)
    assert value.dtype == torch.float32
    # The same as computing in float32 from the bf16 values, outside autocast.
    reference = measure(x.detach().float(), y.float())
    assert torch.allclose(value, reference, atol=1e-6)
    value.backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()


def test_guided_forward_in_bf16_runs_models_in_bf16_and_cka_in_float32():
    torch.manual_seed(0)
    target = create_model("fcn", input_shape=(12,), num_classes=3, depth=2, width=16)
    guide = create_model("fcn", input_shape=(12,), num_classes=3, depth=2, width=8)
    guidance = Guidance(target, guide, target_layers=["layers.*.linear"], guide_layers=["layers.*.linear"]).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = guidance(torch.randn(16, 12))
    assert out.output.dtype == torch.bfloat16
    assert out.guidance_loss.dtype == torch.float32
    assert all(sim.dtype == torch.float32 for sim in out.similarities.values())
    out.guidance_loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in target.parameters() if p.grad is not None)


def _config(precision: str) -> RunConfig:
    return from_dict(
        RunConfig,
        {
            "model": {"name": "fcn", "args": {"depth": 2, "width": 16}},
            "data": {
                "name": "mnist1d",
                "args": {"num_samples": 400, "val_size": 40},
                "batch_size": 16,
                "train_eval_size": 20,
            },
            "guide": {"name": "cnn1d", "args": {"channels": 4, "depth": 2}},
            "train": {"epochs": 1, "max_steps": 3, "precision": precision, "progress": False},
        },
    )


def test_bf16_training_run_on_cpu(tmp_path):
    result = train(_config("bf16"), tmp_path)
    assert result.final["steps"] == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_fp16_needs_a_gpu(tmp_path):
    with pytest.raises(ValueError, match="fp16"):
        train(_config("fp16"), tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp16_with_grad_scaler_on_gpu(tmp_path):
    result = train(_config("fp16"), tmp_path)
    assert result.final["steps"] == 3


def test_autocast_refuses_an_unknown_precision_naming_the_allowed_ones():
    from untrainable.step import autocast

    with pytest.raises(ValueError, match="fp32, bf16, fp16"):
        autocast(torch.device("cpu"), "fp8")
    with autocast(torch.device("cpu"), "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16


def test_config_choices_come_from_their_owners():
    from untrainable import config, guide_cache, step, tasks

    assert set(config.TASKS) == set(tasks.TASKS)
    assert config.GUIDE_CACHES == ("none", *guide_cache.STORAGES)
    assert config.PRECISIONS == step.PRECISIONS
