"""One guided optimisation step, shared by the trainer and the benchmark."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor, nn

from untrainable import distributed
from untrainable.distillation import Distillation
from untrainable.guidance import Guidance
from untrainable.guide_cache import GuideCache
from untrainable.tasks import Classification, padding_mask


class NonFiniteError(FloatingPointError):
    """A NaN or inf in the inputs or a loss term; the message names the step and the term."""


PRECISIONS = ("fp32", "bf16", "fp16")
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for `fp32` (none), `bf16` or `fp16` on `device`; any other name is a ValueError."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_AUTOCAST_DTYPES[precision])


def check_finite(step: int, info: distributed.DistInfo, **terms: Tensor) -> None:
    """Raise NonFiniteError naming the step and the first term with a NaN or inf.

    `step` is numbered as in metrics.jsonl (the first step is 1). Under DDP
    every rank learns that some rank failed, so none waits forever in the
    next collective; the message says which rank saw it first.
    """
    flags = [torch.is_floating_point(v) and not _all_finite(v) for v in terms.values()]
    # On the process group's device: nccl reduces CUDA tensors only.
    bad = torch.tensor(flags, dtype=torch.int32, device=info.device)
    if info.world_size > 1:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    for i, (name, value) in enumerate(terms.items()):
        if bad[i].item():
            where = f" (rank {info.rank})" if info.world_size > 1 else ""
            shown = value.detach().float().flatten()
            shown = shown[~torch.isfinite(shown)][:4].tolist() if flags[i] else "on another rank"
            raise NonFiniteError(
                f"step {step}: {name} is not finite{where}: {shown}; the run stops, its checkpoints are kept"
            )


def _all_finite(value: Tensor) -> bool:
    """Whether every element is finite; a NaN or inf makes the sum non-finite, and a sum costs a fraction of isfinite.

    Only when the sum is not finite (a NaN, an inf, or finite values whose sum overflows) is each element checked.
    """
    return bool(torch.isfinite(value.detach().sum(dtype=torch.float32))) or bool(torch.isfinite(value).all())


def grad_norm(parameters: list[nn.Parameter]) -> Tensor:
    """The global L2 norm of the parameters' gradients (0 when there are none)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach().float()) for g in grads]))


def layer_grad_norms(model: nn.Module) -> dict[str, float]:
    """`grad_norm/NAME` for every weight matrix or kernel (dim >= 2) of the model, before the update."""
    return {
        f"grad_norm/{name}": float(torch.linalg.vector_norm(p.grad.detach().float()))
        for name, p in model.named_parameters()
        if p.grad is not None and p.dim() >= 2
    }


@dataclass
class StepParts:
    """What one optimisation step uses.

    `model` is what runs forward (the target, maybe DDP-wrapped); `target` is
    the bare module whose parameters the optimiser updates. `guidance`,
    `distillation` and `guide_cache` are optional loss terms and their cache;
    `train_transform` augments a batch of inputs before the forward.
    """

    model: nn.Module
    target: nn.Module
    optimizer: torch.optim.Optimizer
    task: Classification
    device: torch.device
    dist_info: distributed.DistInfo
    scaler: torch.amp.GradScaler | None = None
    guidance: Guidance | None = None
    distillation: Distillation | None = None
    guide_cache: GuideCache | None = None
    train_transform: Callable[[Tensor], Tensor] | None = None
    precision: str = "fp32"
    grad_clip: float | None = None
    pad_id: int | None = None


def _losses(
    parts: StepParts, batch: tuple[Tensor, ...], step: int
) -> tuple[dict[str, Tensor], float, dict[str, Tensor]]:
    """Forward under autocast: the loss terms, alpha and the per-pair similarities, checked finite."""
    x, y = batch[0].to(parts.device, non_blocking=True), batch[1].to(parts.device, non_blocking=True)
    raw_x = x
    if parts.train_transform is not None:
        x = parts.train_transform(x)
    zero = torch.zeros((), device=parts.device)
    similarities: dict[str, Tensor] = {}
    with autocast(parts.device, parts.precision):
        if parts.guidance is not None:
            cached = None
            if parts.guide_cache is not None and parts.guidance.alpha != 0.0:
                cached = parts.guide_cache.activations(batch[-1], x, parts.guidance.run_guide)
            out = parts.guidance(x, mask=padding_mask(x, parts.pad_id), guide_activations=cached)
            output, guidance_loss, alpha, similarities = out.output, out.guidance_loss, out.alpha, out.similarities
        else:
            output, guidance_loss, alpha = parts.model(x), zero, 0.0
        terms = {"task_loss": parts.task.loss(output, y), "guidance_loss": guidance_loss}
        terms["distill_loss"] = parts.distillation(x, output) if parts.distillation is not None else zero
    # Checked before any weight changes, so the last checkpoint and the
    # weights in memory are both still good when the run stops.
    check_finite(step, parts.dist_info, input=raw_x, **terms)
    return terms, alpha, similarities


def train_step(
    parts: StepParts, batch: tuple[Tensor, ...], step: int, log_grad_norms: bool = False
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """One guided optimisation step on `batch` = (x, y[, index]), numbered `step` (the first is 1).

    Returns the step's record (`loss`, `task_loss`, `guidance_loss`, `alpha`,
    `lr`, and `distill_loss`, `grad_norm/*`, `skipped_overflow` when they
    apply) and the per-pair similarities as detached scalar tensors.
    """
    terms, alpha, similarities = _losses(parts, batch, step)
    loss = terms["task_loss"] + terms["guidance_loss"] + terms["distill_loss"]
    scaler = parts.scaler if parts.scaler is not None else torch.amp.GradScaler("cuda", enabled=False)
    params = list(parts.target.parameters())
    parts.optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if scaler.is_enabled():
        # fp16: GradScaler skips a step whose gradients overflow and lowers
        # the scale; that is recorded below, not hidden.
        scale_before = scaler.get_scale()
        if parts.grad_clip:
            scaler.unscale_(parts.optimizer)
    else:
        check_finite(step, parts.dist_info, gradient=grad_norm(params))
    if parts.grad_clip:
        torch.nn.utils.clip_grad_norm_(params, parts.grad_clip)
    # Before the update and after clipping (unscaled under fp16 only when clipping unscales).
    norms = layer_grad_norms(parts.target) if log_grad_norms else {}
    lr = parts.optimizer.param_groups[0]["lr"]  # the rate this step uses
    scaler.step(parts.optimizer)
    scaler.update()
    record: dict[str, Any] = {"step": step, "loss": float(loss.detach()), "alpha": alpha, "lr": lr}
    record.update(
        {
            name: float(value.detach())
            for name, value in terms.items()
            if name != "distill_loss" or parts.distillation is not None
        }
    )
    record.update(norms)
    if scaler.is_enabled() and scaler.get_scale() < scale_before:
        record["skipped_overflow"] = 1
    return record, similarities
