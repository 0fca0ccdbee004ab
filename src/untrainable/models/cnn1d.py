"""1-D convolutional networks for MNIST-1D: a plain CNN and a small ResNet."""

from __future__ import annotations

from collections import OrderedDict

from torch import Tensor, nn

from untrainable.models.registry import register_model


def _as_channels(x: Tensor) -> Tensor:
    """(batch, length) -> (batch, 1, length); (batch, channels, length) unchanged."""
    return x.unsqueeze(1) if x.dim() == 2 else x


def _in_channels(input_shape: tuple[int, ...]) -> tuple[int, int]:
    if len(input_shape) == 1:
        return 1, input_shape[0]
    if len(input_shape) == 2:
        return input_shape[0], input_shape[1]
    raise ValueError(f"1-D models take input_shape (length,) or (channels, length), got {input_shape}")


class CNN1d(nn.Module):
    """`depth` blocks of conv -> [BN] -> ReLU (stride 2 after the first), then a linear head.

    Layers: `blocks.{i}.conv`, `blocks.{i}.act`, `head`.
    (batch, length) or (batch, channels, length) -> (batch, num_classes).
    """

    def __init__(
        self, in_channels: int, length: int, num_classes: int, channels: int, depth: int, kernel: int, batch_norm: bool
    ) -> None:
        super().__init__()
        if depth < 1 or channels < 1 or kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"CNN1d needs depth, channels >= 1 and an odd kernel; got {depth}, {channels}, {kernel}")
        blocks = []
        for i in range(depth):
            stride = 1 if i == 0 else 2
            parts: OrderedDict[str, nn.Module] = OrderedDict(
                conv=nn.Conv1d(
                    in_channels if i == 0 else channels, channels, kernel, stride=stride, padding=kernel // 2
                )
            )
            if batch_norm:
                parts["norm"] = nn.BatchNorm1d(channels)
            parts["act"] = nn.ReLU()
            blocks.append(nn.Sequential(parts))
            length = (length + 2 * (kernel // 2) - kernel) // stride + 1
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Linear(channels * length, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = _as_channels(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x.flatten(1))


class BasicBlock1d(nn.Module):
    """conv-BN-ReLU-conv-BN plus a skip (1x1 conv when the shape changes), then ReLU."""

    def __init__(self, in_channels: int, channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm1d(channels)
        self.conv2 = nn.Conv1d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm1d(channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv1d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm1d(channels)
            )
        self.act = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        out = self.act(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet1d(nn.Module):
    """A small 1-D ResNet: stem conv, `depth` basic blocks (stride 2 from the second), average pool, head.

    Layers: `stem`, `blocks.{i}` (block outputs), `blocks.{i}.conv1`, `head`.
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int, depth: int) -> None:
        super().__init__()
        if depth < 1 or channels < 1:
            raise ValueError(f"ResNet1d needs depth and channels >= 1, got {depth}, {channels}")
        self.stem = nn.Sequential(
            nn.Conv1d(in_channels, channels, 5, padding=2, bias=False), nn.BatchNorm1d(channels), nn.ReLU()
        )
        self.blocks = nn.ModuleList(BasicBlock1d(channels, channels, 1 if i == 0 else 2) for i in range(depth))
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.stem(_as_channels(x))
        for block in self.blocks:
            x = block(x)
        return self.head(self.pool(x).flatten(1))


@register_model("cnn1d")
def cnn1d(
    input_shape: tuple[int, ...] = (40,),
    num_classes: int = 10,
    channels: int = 32,
    depth: int = 3,
    kernel: int = 5,
    batch_norm: bool = False,
) -> CNN1d:
    """A plain 1-D CNN (the MNIST-1D guide): conv-ReLU blocks and a linear head."""
    in_channels, length = _in_channels(input_shape)
    return CNN1d(in_channels, length, num_classes, channels, depth, kernel, batch_norm)


@register_model("resnet1d")
def resnet1d(
    input_shape: tuple[int, ...] = (40,), num_classes: int = 10, channels: int = 32, depth: int = 3
) -> ResNet1d:
    """A small 1-D ResNet for MNIST-1D."""
    in_channels, _ = _in_channels(input_shape)
    return ResNet1d(in_channels, num_classes, channels, depth)
