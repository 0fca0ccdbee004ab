"""Model constructors outside the registry, named by import path in tests (`importable_models:mlp`)."""

from torch import nn


def mlp(in_features: int = 40, width: int = 32, classes: int = 10) -> nn.Module:
    """(batch, in_features) -> (batch, classes), two hidden layers."""
    return nn.Sequential(
        nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, classes)
    )


def not_a_model(size: int = 3) -> list[int]:
    return [0] * size


class Factory:
    """A dotted attribute after the colon: `importable_models:Factory.small`."""

    @staticmethod
    def small() -> nn.Module:
        return mlp(width=8)
