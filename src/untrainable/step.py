"""One guided optimisation step, shared by the trainer and the benchmark."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from untrainable import distributed
from untrainable.distillation import Distillation
from untrainable.guidance import Guidance, GuidanceOutput, NonFiniteError
from untrainable.guide_cache import GuideCache
from untrainable.tasks import Classification, padding_mask

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


def gradient_norm_of(loss: Tensor, parameters: list[nn.Parameter]) -> float:
    """L2 norm of d loss / d parameters, averaged over processes as DDP averages gradients.

    Taken with autograd.grad on a graph kept for the step's own backward, so
    no `.grad` changes and DDP's reducer does not run; every rank then holds
    the norm of the gradient DDP would apply for `loss`, the same number.
    A parameter the loss does not reach counts as a zero gradient.
    """
    grads = torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)
    flat = torch.cat(
        [(torch.zeros_like(p) if g is None else g).detach().float().flatten() for g, p in zip(grads, parameters)]
    )
    if distributed.is_distributed():
        torch.distributed.all_reduce(flat)
        flat /= torch.distributed.get_world_size()
    return float(torch.linalg.vector_norm(flat))


def adapt_alpha(
    guidance: Guidance,
    out: GuidanceOutput,
    task_loss: Tensor,
    parameters: Iterable[nn.Parameter],
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The guidance loss of the forward `out` at this step's alphas, and what was measured.

    Each guide whose schedule is an AdaptiveAlpha due at this forward gets a
    new alpha (see `adaptive_alpha.AdaptiveAlpha`) from the norm of the
    gradient of `task_loss` (taken once) and that of its own guide loss
    (`out.guide_losses[name]`, `out.unit_loss` for a single guide) on the
    target's `parameters`; this step already uses it. Returns (the sum over
    guides of alpha * guide loss, {`alpha` (the first guide's),
    `adapt/task_grad_norm`, `alpha/NAME` of each measured named guide, and
    `adapt/guide_grad_norm` for a single guide or `adapt/NAME/guide_grad_norm`
    for each measured guide among several}). With no guide due, (`out.guidance_loss`, {}). Call it
    after the forward and before the backward; under DDP every rank calls it
    at the same steps. With an fp16 `scaler` the gradients are taken of the
    scaled losses (the ratio does not change) and the norms reported unscaled.
    """
    due = [
        (guide, adaptive)
        for guide in guidance.guides
        if (adaptive := guide.adaptive) is not None
        and guidance.training
        and adaptive.due(guidance.step - 1)
        and guide.name in out.guide_losses
        and out.guide_losses[guide.name].requires_grad
    ]
    if not due:
        return out.guidance_loss, {}
    trained = [p for p in parameters if p.requires_grad]
    scale = scaler.get_scale() if scaler is not None and scaler.is_enabled() else 1.0
    task_norm = gradient_norm_of(task_loss * scale, trained) / scale
    several = len(guidance.guides) > 1
    alphas = dict(out.alphas)
    measured: dict[str, float] = {"adapt/task_grad_norm": task_norm}
    for guide, adaptive in due:
        guide_norm = gradient_norm_of(out.guide_losses[guide.name] * scale, trained) / scale
        alphas[guide.name] = adaptive.update(task_norm, guide_norm)
        if guide.name:
            measured[f"alpha/{guide.name}"] = alphas[guide.name]
        measured[f"adapt/{guide.name}/guide_grad_norm" if several else "adapt/guide_grad_norm"] = guide_norm
    measured["alpha"] = alphas[guidance.guides[0].name]
    # A guide skipped this step has alpha 0 and a zero loss: the sum is over every guide.
    loss = torch.stack([alphas[name] * unit for name, unit in out.guide_losses.items()]).sum()
    return loss, measured


@dataclass
class StepParts:
    """What one optimisation step uses.

    `model` is what runs forward (the target, maybe DDP-wrapped); `target` is
    the bare module whose parameters the optimiser updates. `guidance`,
    `distillation` and `guide_cache` are optional loss terms and their cache;
    `prepare` turns a batch of inputs into the model's (e.g. uint8 pixels into
    normalised floats), then `train_transform` augments it, before the forward.
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
    prepare: Callable[[Tensor], Tensor] | None = None
    precision: str = "fp32"
    grad_clip: float | None = None
    pad_id: int | None = None


def _losses(parts: StepParts, batch: tuple[Tensor, ...], step: int) -> tuple[dict[str, Tensor], GuidanceOutput | None]:
    """Forward under autocast: the loss terms, checked finite, and the guided forward's output."""
    x, y = batch[0].to(parts.device, non_blocking=True), batch[1].to(parts.device, non_blocking=True)
    raw_x = x = parts.prepare(x) if parts.prepare is not None else x
    if parts.train_transform is not None:
        x = parts.train_transform(x)
    zero = torch.zeros((), device=parts.device)
    out = None
    with autocast(parts.device, parts.precision):
        if parts.guidance is not None:
            cached = None
            guidance = parts.guidance
            if parts.guide_cache is not None and (guidance.alpha != 0.0 or guidance.measuring(guidance.guides[0])):
                cached = parts.guide_cache.activations(batch[-1], x, parts.guidance.run_guide)
            try:
                out = parts.guidance(x, mask=padding_mask(x, parts.pad_id), guide_activations=cached)
            except NonFiniteError as err:
                check_finite(step, parts.dist_info, input=raw_x)  # names a bad input first
                raise NonFiniteError(f"step {step}: {err}; the run stops, its checkpoints are kept") from None
            output, guidance_loss = out.output, out.guidance_loss
        else:
            output, guidance_loss = parts.model(x), zero
        terms = {"task_loss": parts.task.loss(output, y), "guidance_loss": guidance_loss}
        terms["distill_loss"] = parts.distillation(x, output) if parts.distillation is not None else zero
    # Checked before any weight changes, so the last checkpoint and the
    # weights in memory are both still good when the run stops.
    check_finite(step, parts.dist_info, input=raw_x, **terms)
    return terms, out


def guide_records(alphas: dict[str, float], guide_losses: dict[str, Tensor]) -> dict[str, float | Tensor]:
    """`alpha/NAME` and `guide_loss/NAME` (before alpha) of each named guide; none for a single unnamed guide."""
    records: dict[str, float | Tensor] = {f"alpha/{name}": alpha for name, alpha in alphas.items() if name}
    records.update({f"guide_loss/{name}": loss.detach() for name, loss in guide_losses.items() if name})
    return records


def train_step(
    parts: StepParts, batch: tuple[Tensor, ...], step: int, log_grad_norms: bool = False
) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """One guided optimisation step on `batch` = (x, y[, index]), numbered `step` (the first is 1).

    Returns the step's record (`loss`, `task_loss`, `guidance_loss`, `alpha`
    (the first guide's), `lr`, and `distill_loss`, `alpha/NAME` and
    `guide_loss/NAME` of each named guide, `grad_norm/*`, `adapt/*`,
    `skipped_overflow` when they apply) and the per-pair similarities as
    detached scalar tensors. `alpha` and `alpha/NAME` are the alphas the step
    used, an adaptive alpha measured at this step included.
    """
    terms, out = _losses(parts, batch, step)
    scaler = parts.scaler if parts.scaler is not None else torch.amp.GradScaler("cuda", enabled=False)
    params = list(parts.target.parameters())
    similarities: dict[str, Tensor] = {}
    logged: dict[str, float | Tensor] = {"alpha": 0.0}
    if parts.guidance is not None and out is not None:
        # Before the backward: an adaptive alpha measured now already weighs this step.
        terms["guidance_loss"], measured = adapt_alpha(parts.guidance, out, terms["task_loss"], params, scaler)
        similarities = out.similarities
        logged = {"alpha": out.alpha, **guide_records(out.alphas, out.guide_losses), **measured}
    loss = terms["task_loss"] + terms["guidance_loss"] + terms["distill_loss"]
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
    record: dict[str, Any] = {"step": step, "loss": float(loss.detach()), "alpha": logged.pop("alpha"), "lr": lr}
    record.update(
        {
            name: float(value.detach())
            for name, value in terms.items()
            if name != "distill_loss" or parts.distillation is not None
        }
    )
    record.update({name: float(value) for name, value in logged.items()})
    record.update(norms)
    if scaler.is_enabled() and scaler.get_scale() < scale_before:
        record["skipped_overflow"] = 1
    return record, similarities
