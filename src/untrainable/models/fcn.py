"""Fully connected networks: the paper's Deep FCN and Wide FCN, and plain MLPs."""

from __future__ import annotations

import math
from collections import OrderedDict

from torch import Tensor, nn

from untrainable.models.registry import register_model


class FCN(nn.Module):
    """A stack of `linear -> [BatchNorm] -> ReLU -> [dropout]` blocks and a linear head.

    Layers are addressable as `layers.{i}.linear`, `layers.{i}.norm`,
    `layers.{i}.act` (post-activation) and `head`. Inputs of any shape are
    flattened: (batch, *input_shape) -> (batch, num_classes).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        depth: int,
        width: int,
        batch_norm: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 1 or width < 1 or in_features < 1 or num_classes < 1:
            raise ValueError(
                f"FCN needs depth, width, in_features, num_classes >= 1; got {depth}, {width}, {in_features}, {num_classes}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        blocks = []
        for i in range(depth):
            parts: OrderedDict[str, nn.Module] = OrderedDict(linear=nn.Linear(in_features if i == 0 else width, width))
            if batch_norm:
                parts["norm"] = nn.BatchNorm1d(width)
            parts["act"] = nn.ReLU()
            if dropout > 0:
                parts["drop"] = nn.Dropout(dropout)
            blocks.append(nn.Sequential(parts))
        self.layers = nn.ModuleList(blocks)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)
        for block in self.layers:
            x = block(x)
        return self.head(x)


def _features(input_shape: tuple[int, ...]) -> int:
    return math.prod(input_shape)


@register_model("fcn")
def fcn(
    input_shape: tuple[int, ...] = (40,),
    num_classes: int = 10,
    depth: int = 4,
    width: int = 256,
    batch_norm: bool = True,
    dropout: float = 0.0,
) -> FCN:
    """A plain MLP: `depth` hidden layers of `width` units."""
    return FCN(_features(input_shape), num_classes, depth, width, batch_norm, dropout)


@register_model("deep_fcn")
def deep_fcn(
    input_shape: tuple[int, ...] = (1, 28, 28),
    num_classes: int = 10,
    depth: int = 24,
    width: int = 256,
    batch_norm: bool = True,
    dropout: float = 0.1,
) -> FCN:
    """The paper's Deep FCN: linear, BN, ReLU, dropout 0.1, repeated (the paper uses ~50)."""
    return FCN(_features(input_shape), num_classes, depth, width, batch_norm, dropout)


@register_model("wide_fcn")
def wide_fcn(
    input_shape: tuple[int, ...] = (1, 28, 28),
    num_classes: int = 10,
    depth: int = 3,
    width: int = 2048,
    batch_norm: bool = True,
    dropout: float = 0.0,
) -> FCN:
    """The paper's Wide FCN: 3 wide hidden layers with BN (the paper uses width 8192)."""
    return FCN(_features(input_shape), num_classes, depth, width, batch_norm, dropout)
