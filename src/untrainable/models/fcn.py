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
    flattened: (batch, *input_shape) -> (batch, num_classes). `first_width`,
    when given, is the width of the first block alone (the paper's Deep FCN
    opens with 2048 units, then runs at 1024).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        depth: int,
        width: int,
        batch_norm: bool = True,
        dropout: float = 0.0,
        first_width: int | None = None,
    ) -> None:
        super().__init__()
        first_width = width if first_width is None else first_width
        if depth < 1 or width < 1 or first_width < 1 or in_features < 1 or num_classes < 1:
            raise ValueError(
                "FCN needs depth, width, first_width, in_features, num_classes >= 1; "
                f"got {depth}, {width}, {first_width}, {in_features}, {num_classes}"
            )
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        blocks = []
        widths = [first_width] + [width] * (depth - 1)
        for i, out_features in enumerate(widths):
            parts: OrderedDict[str, nn.Module] = OrderedDict(
                linear=nn.Linear(in_features if i == 0 else widths[i - 1], out_features)
            )
            if batch_norm:
                parts["norm"] = nn.BatchNorm1d(out_features)
            parts["act"] = nn.ReLU()
            if dropout > 0:
                parts["drop"] = nn.Dropout(dropout)
            blocks.append(nn.Sequential(parts))
        self.layers = nn.ModuleList(blocks)
        self.head = nn.Linear(widths[-1], num_classes)

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
    first_width: int | None = None,
) -> FCN:
    """The paper's Deep FCN: linear, BN, ReLU, dropout 0.1, repeated (the paper: 48 blocks, 2048 then 1024 wide)."""
    return FCN(_features(input_shape), num_classes, depth, width, batch_norm, dropout, first_width)


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
