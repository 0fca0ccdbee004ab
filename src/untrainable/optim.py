"""Optimisers and learning-rate schedules by name: the allowed choices live here."""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import torch
from torch import nn


def _sgd(
    params: Iterable[nn.Parameter], lr: float, weight_decay: float, momentum: float, fused: bool
) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def _adam(
    params: Iterable[nn.Parameter], lr: float, weight_decay: float, momentum: float, fused: bool
) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def _adamw(
    params: Iterable[nn.Parameter], lr: float, weight_decay: float, momentum: float, fused: bool
) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {"adam": _adam, "adamw": _adamw, "sgd": _sgd}
FUSED_OPTIMIZERS = ("adam", "adamw")

# Decay factor at `progress` in [0, 1] of the steps after warm-up.
LR_SCHEDULES: dict[str, Callable[[float], float]] = {
    "constant": lambda progress: 1.0,
    "cosine": lambda progress: 0.5 * (1.0 + math.cos(math.pi * progress)),
    "step": lambda progress: 0.1 ** ((progress >= 0.5) + (progress >= 0.75)),  # x0.1 at 50% and 75%
}


def _lookup(table: dict[str, Any], kind: str, name: str) -> Any:
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; valid: {', '.join(table)}")
    return table[name]


def make_optimizer(
    name: str,
    params: Iterable[nn.Parameter],
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    fused: bool = False,
) -> torch.optim.Optimizer:
    """The optimiser `name` (one of OPTIMIZERS) over `params`; `momentum` is SGD's, `fused` Adam's."""
    return _lookup(OPTIMIZERS, "optimizer", name)(
        params, lr=lr, weight_decay=weight_decay, momentum=momentum, fused=fused
    )


def make_lr_schedule(
    name: str, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over `warmup_steps`, then the decay `name` (one of LR_SCHEDULES) until `total_steps`."""
    decay = _lookup(LR_SCHEDULES, "learning-rate schedule", name)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return decay(min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
