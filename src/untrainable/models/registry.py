"""The model registry: `register_model`, `create_model`, `list_models`."""

from __future__ import annotations

from typing import Any

from torch import nn

from untrainable.registry import Registry

MODELS: Registry[nn.Module] = Registry("model")
register_model = MODELS.register


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered model `name` with its keyword arguments."""
    return MODELS.create(name, **kwargs)


def list_models() -> list[str]:
    return MODELS.names()
