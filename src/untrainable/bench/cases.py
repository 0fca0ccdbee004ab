"""The benchmark's cases: which target/guide pairs, at which input and batch sizes, and the kernel's shapes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from untrainable.models import create_model


@dataclass
class Case:
    """One target/guide pair at one input size and batch size."""

    name: str
    target: str
    target_args: dict[str, Any]
    guide: str
    guide_args: dict[str, Any]
    batch: int
    input_shape: tuple[int, ...]  # one example; token inputs are (length,)
    tokens: bool = False
    num_classes: int = 10
    repeats: int = 5
    note: str = ""
    target_layers: tuple[str, ...] | None = None  # None: the library's default layers
    guide_layers: tuple[str, ...] | None = None
    precision: str = "fp32"  # the trainer's train.precision: fp32, bf16 or fp16 (autocast)
    fused: bool = False  # Adam's fused update, as optim.fused (the paper-scale configs use it)


def cases(quick: bool = False) -> list[Case]:
    """The benchmark's pairs. Widths of the guide are reduced to fit a CPU; each case says so."""
    return _quick_cases() if quick else _mnist_cases() + _imagenet_cases() + [_sequence_case()]


def _quick_cases() -> list[Case]:
    """Tiny versions of an image pair and a sequence pair: seconds, numbers not meaningful."""
    mnist = (1, 28, 28)
    tiny_fcn = {"input_shape": mnist, "depth": 4, "width": 32}
    tiny_rnn = {"hidden": 8, "embed_dim": 8, "layers": 1}
    tiny_transformer = {"dim": 8, "depth": 1, "heads": 2, "max_len": 16}
    return [
        Case(
            "deep_fcn<-resnet18 28x28 (tiny)",
            "deep_fcn",
            tiny_fcn,
            "resnet18",
            {"input_shape": mnist, "width": 2},
            8,
            mnist,
            repeats=1,
        ),
        Case(
            "rnn<-transformer L=16 (tiny)",
            "rnn",
            tiny_rnn,
            "causal_transformer",
            tiny_transformer,
            4,
            (16,),
            tokens=True,
            num_classes=16,
            repeats=1,
        ),
    ]


def _mnist_cases() -> list[Case]:
    """Deep FCN guided by ResNet-18 on 28 x 28 inputs: at two batch sizes, and the rescue study's pair."""
    mnist = (1, 28, 28)
    found = [
        Case(
            f"deep_fcn<-resnet18 28x28 b{batch}",
            "deep_fcn",
            {"input_shape": mnist},
            "resnet18",
            {"input_shape": mnist, "width": 16},
            batch,
            mnist,
            repeats=5,
            note="ResNet-18 at width 16 of 64",
        )
        for batch in (64, 256)
    ]
    found.append(
        Case(
            "deep_fcn 48x1024<-resnet18 blocks 28x28 b64",
            "deep_fcn",
            {"input_shape": mnist, "depth": 48, "width": 1024},
            "resnet18",
            {"input_shape": mnist, "width": 8, "stem": "small"},
            64,
            mnist,
            repeats=5,
            note="the rescue study's pair: ResNet-18 at width 8 of 64, its 8 block outputs",
            target_layers=("layers.*.linear",),
            guide_layers=("layer*.*",),
        )
    )
    return found


def _imagenet_cases() -> list[Case]:
    """Deep FCN guided by ResNet-18 on 224 x 224 inputs at two batch sizes."""
    imagenet = (3, 224, 224)
    return [
        Case(
            f"deep_fcn<-resnet18 224x224 b{batch}",
            "deep_fcn",
            {"input_shape": imagenet},
            "resnet18",
            {"input_shape": imagenet, "width": 8, "stem": "imagenet"},
            batch,
            imagenet,
            repeats=3,
            note="ResNet-18 at width 8 of 64",
        )
        for batch in (64, 256)
    ]


def _sequence_case() -> Case:
    """An RNN guided by a causal transformer on token sequences of length 256."""
    return Case(
        "rnn<-transformer L=256 b64",
        "rnn",
        {},
        "causal_transformer",
        {"max_len": 256},
        64,
        (256,),
        tokens=True,
        num_classes=16,
        repeats=5,
    )


def build_case(case: Case, device: torch.device) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    """The case's target (in train mode) and guide, seeded, and one batch: x (batch, *input_shape) and its labels.

    Labels are (batch,) for images, (batch, length) for tokens.
    """
    torch.manual_seed(0)
    target_args = dict(case.target_args)
    guide_args = dict(case.guide_args)
    target_args.setdefault("num_classes", case.num_classes)
    guide_args.setdefault("num_classes", case.num_classes)
    target = create_model(case.target, **target_args).to(device).train()
    guide = create_model(case.guide, **guide_args).to(device)
    if case.tokens:
        x = torch.randint(1, case.num_classes, (case.batch, *case.input_shape), device=device)
        y = torch.randint(0, case.num_classes, (case.batch, *case.input_shape), device=device)
    else:
        x = torch.randn(case.batch, *case.input_shape, device=device)
        y = torch.randint(0, case.num_classes, (case.batch,), device=device)
    return target, guide, x, y


def kernel_shapes(quick: bool) -> list[tuple[int, int, int]]:
    """(n, d_target, d_guide) of typical pairs: an FCN layer against conv maps and a sequence layer."""
    if quick:
        return [(8, 32, 2 * 28 * 28)]
    return [(64, 256, 32 * 28 * 28), (256, 256, 32 * 28 * 28), (256, 256, 16 * 56 * 56), (64, 256 * 128, 256 * 64)]
