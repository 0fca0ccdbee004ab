"""Task losses and metrics: what the trainer optimises and reports, by task name."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100  # targets at positions that are not scored


class Classification:
    """One label per example: logits (batch, classes), labels (batch,)."""

    name = "classification"

    def loss(self, output: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(output.float(), y)

    def sums(self, output: Tensor, y: Tensor) -> dict[str, float]:
        """Additive statistics of a batch, to be summed over batches and finished by `metrics`."""
        return {
            "loss_sum": float(F.cross_entropy(output.float(), y, reduction="sum")),
            "correct": float((output.argmax(-1) == y).sum()),
            "count": float(y.numel()),
        }

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        count = max(sums["count"], 1.0)
        return {"loss": sums["loss_sum"] / count, "accuracy": sums["correct"] / count}


class Tokens(Classification):
    """A label per position, scored where the label is not -100: logits (batch, time, classes), labels (batch, time)."""

    name = "tokens"

    def loss(self, output: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(output.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)

    def sums(self, output: Tensor, y: Tensor) -> dict[str, float]:
        scored = y != IGNORE_INDEX
        loss_sum = F.cross_entropy(
            output.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )
        return {
            "loss_sum": float(loss_sum),
            "correct": float(((output.argmax(-1) == y) & scored).sum()),
            "count": float(scored.sum()),
        }


class LanguageModel(Tokens):
    """Next-token prediction; adds bits per token and perplexity."""

    name = "lm"

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        out = super().metrics(sums)
        out["bpc"] = out["loss"] / math.log(2)
        out["perplexity"] = math.exp(min(out["loss"], 50.0))
        return out


TASKS = {task.name: task for task in (Classification(), Tokens(), LanguageModel())}


def get_task(name: str) -> Classification:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]


def add_sums(total: dict[str, float], batch: dict[str, float]) -> dict[str, float]:
    for key, value in batch.items():
        total[key] = total.get(key, 0.0) + value
    return total


def padding_mask(x: Tensor, pad_id: int | None) -> Tensor | None:
    """(batch, time) True on real tokens, for token inputs with a padding id; else None."""
    if pad_id is None or torch.is_floating_point(x) or x.dim() != 2:
        return None
    return x != pad_id
