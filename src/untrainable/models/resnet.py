"""ResNets and their plain twins (He et al. 2016), for small and ImageNet-sized images.

`residual=False` removes every skip connection and keeps every other layer,
giving the "plain" network of He et al. 2016 (Fig. 3, middle): the deep
network that trains badly on its own and that a guide can pull along.

Hookable module paths: `stem`, `layer{1..4}`, `layer{s}.{b}` (one block; its
output is after the final ReLU), `layer{s}.{b}.conv1` / `.bn1` / ...,
`layer{s}.{b}.shortcut` (residual nets, where the shape changes), `pool`
(B, C, 1, 1) and the head `fc` (B, num_classes).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from untrainable.models.registry import register_model

STEMS = ("small", "imagenet")


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    # No bias: every conv is followed by a BatchNorm, whose shift plays that role.
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def _conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


def _shortcut(in_channels: int, out_channels: int, stride: int) -> nn.Module | None:
    """Projection for the skip path where the shape changes (option B of He et al.)."""
    if stride == 1 and in_channels == out_channels:
        return None
    return nn.Sequential(_conv1x1(in_channels, out_channels, stride), nn.BatchNorm2d(out_channels))


class BasicBlock(nn.Module):
    """Two 3x3 convs, with or without the skip: (B, C_in, H, W) -> (B, C_out, H/s, W/s)."""

    expansion = 1

    def __init__(self, in_channels: int, channels: int, stride: int = 1, residual: bool = True):
        super().__init__()
        out_channels = channels * self.expansion
        self.residual = residual
        self.conv1 = _conv3x3(in_channels, channels, stride)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = _conv3x3(channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        # A plain block has no skip path at all, so it has no projection either.
        self.shortcut = _shortcut(in_channels, out_channels, stride) if residual else None

    def forward(self, x: Tensor) -> Tensor:
        # Functional ReLUs: a shared nn.ReLU module would fire its hooks twice per block.
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + (x if self.shortcut is None else self.shortcut(x))
        return F.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4), with or without the skip."""

    expansion = 4

    def __init__(self, in_channels: int, channels: int, stride: int = 1, residual: bool = True):
        super().__init__()
        out_channels = channels * self.expansion
        self.residual = residual
        self.conv1 = _conv1x1(in_channels, channels)
        self.bn1 = nn.BatchNorm2d(channels)
        # Stride on the 3x3 conv (ResNet v1.5), as in most current implementations.
        self.conv2 = _conv3x3(channels, channels, stride)
        self.bn2 = nn.BatchNorm2d(channels)
        self.conv3 = _conv1x1(channels, out_channels)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.shortcut = _shortcut(in_channels, out_channels, stride) if residual else None

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.residual:
            out = out + (x if self.shortcut is None else self.shortcut(x))
        return F.relu(out)


def _stem(in_channels: int, width: int, stem: str) -> nn.Sequential:
    if stem == "small":
        # 28x28 / 32x32 inputs: keep full resolution into layer1.
        return nn.Sequential(_conv3x3(in_channels, width), nn.BatchNorm2d(width), nn.ReLU())
    return nn.Sequential(
        nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(),
        nn.MaxPool2d(3, stride=2, padding=1),
    )


class ResNet(nn.Module):
    """A four-stage ResNet (or plain net) returning logits (B, num_classes) from (B, C, H, W)."""

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        blocks_per_stage: Sequence[int],
        in_channels: int = 3,
        num_classes: int = 10,
        width: int = 64,
        stem: str = "small",
        residual: bool = True,
    ):
        super().__init__()
        self.residual = residual
        self.stem = _stem(in_channels, width, stem)
        channels = width
        for stage, num_blocks in enumerate(blocks_per_stage, start=1):
            stage_width = width * 2 ** (stage - 1)
            stride = 1 if stage == 1 else 2
            layers = []
            for index in range(num_blocks):
                layers.append(block(channels, stage_width, stride if index == 0 else 1, residual))
                channels = stage_width * block.expansion
            self.add_module(f"layer{stage}", nn.Sequential(*layers))
        self.num_stages = len(blocks_per_stage)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for stage in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{stage}")(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def _validate(input_shape: tuple[int, ...], num_classes: int, width: int, stem: str) -> None:
    if len(input_shape) != 3 or any(int(s) < 1 for s in input_shape):
        raise ValueError(f"input_shape must be (channels, height, width) of positive ints, got {input_shape!r}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if width < 1:
        raise ValueError(f"width (base channels) must be >= 1, got {width}")
    if stem not in STEMS:
        raise ValueError(f"stem must be one of {STEMS}, got {stem!r}")


def _build(
    block: type[BasicBlock] | type[Bottleneck],
    blocks_per_stage: Sequence[int],
    residual: bool,
    input_shape: tuple[int, ...],
    num_classes: int,
    width: int,
    stem: str,
) -> ResNet:
    _validate(tuple(input_shape), num_classes, width, stem)
    return ResNet(block, blocks_per_stage, int(input_shape[0]), num_classes, width, stem, residual)


@register_model("resnet18")
def resnet18(
    input_shape: tuple[int, ...] = (3, 32, 32),
    num_classes: int = 10,
    width: int = 64,
    stem: str = "small",
) -> nn.Module:
    """ResNet-18: BasicBlocks [2, 2, 2, 2] with skip connections."""
    return _build(BasicBlock, (2, 2, 2, 2), True, input_shape, num_classes, width, stem)


@register_model("resnet34")
def resnet34(
    input_shape: tuple[int, ...] = (3, 32, 32),
    num_classes: int = 10,
    width: int = 64,
    stem: str = "small",
) -> nn.Module:
    """ResNet-34: BasicBlocks [3, 4, 6, 3] with skip connections."""
    return _build(BasicBlock, (3, 4, 6, 3), True, input_shape, num_classes, width, stem)


@register_model("resnet50")
def resnet50(
    input_shape: tuple[int, ...] = (3, 32, 32),
    num_classes: int = 10,
    width: int = 64,
    stem: str = "small",
) -> nn.Module:
    """ResNet-50: Bottlenecks [3, 4, 6, 3] with skip connections."""
    return _build(Bottleneck, (3, 4, 6, 3), True, input_shape, num_classes, width, stem)


@register_model("plain18")
def plain18(
    input_shape: tuple[int, ...] = (3, 32, 32),
    num_classes: int = 10,
    width: int = 64,
    stem: str = "small",
) -> nn.Module:
    """Plain-18: ResNet-18 without skip connections."""
    return _build(BasicBlock, (2, 2, 2, 2), False, input_shape, num_classes, width, stem)


@register_model("plain34")
def plain34(
    input_shape: tuple[int, ...] = (3, 32, 32),
    num_classes: int = 10,
    width: int = 64,
    stem: str = "small",
) -> nn.Module:
    """Plain-34: ResNet-34 without skip connections."""
    return _build(BasicBlock, (3, 4, 6, 3), False, input_shape, num_classes, width, stem)


@register_model("plain50")
def plain50(
    input_shape: tuple[int, ...] = (3, 32, 32),
    num_classes: int = 10,
    width: int = 64,
    stem: str = "small",
) -> nn.Module:
    """Plain-50: ResNet-50 without skip connections."""
    return _build(Bottleneck, (3, 4, 6, 3), False, input_shape, num_classes, width, stem)
