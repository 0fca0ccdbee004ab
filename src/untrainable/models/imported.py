"""Models by import path: `name = "package.module:callable"` builds `callable(**args)`, any library's or the user's.

Hydra's `_target_` idea kept to one string: `torchvision.models:resnet18`,
`timm:create_model` with `args = { model_name = "vit_base_patch16_224" }`,
`torch.nn:Linear` with `args = { in_features = 40, out_features = 10 }`.
Nothing is filled in from the data: the callable gets `args` exactly.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

from torch import nn

from untrainable.errors import ConfigError


def is_import_path(name: str) -> bool:
    """Whether a model name is `module:attribute` rather than a registered name."""
    return ":" in name


def check_import_path(name: str, where: str) -> None:
    """Refuse a malformed `module:attribute` string (without importing anything)."""
    module, _, attribute = name.partition(":")
    parts = module.split(".") + attribute.split(".")
    if not all(part.isidentifier() for part in parts):
        raise ConfigError(
            f"{where}: {name!r} is not an import path; write 'package.module:callable', e.g. 'torch.nn:Linear'"
        )


def import_callable(name: str, where: str) -> Callable[..., Any]:
    """The callable that `module:attribute` (attribute may be dotted, `module:Class.build`) names.

    Raises ConfigError naming `where` when the module does not import, the
    attribute is missing, or it is not callable.
    """
    check_import_path(name, where)
    module_name, _, attribute = name.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(
            f"{where}: module {module_name!r} does not import ({err}); install the package that provides it, "
            "or fix the name"
        ) from None
    for i, part in enumerate(attribute.split(".")):
        if not hasattr(target, part):
            owner = ".".join([module_name] + attribute.split(".")[:i])
            raise ConfigError(f"{where}: {owner!r} has no attribute {part!r}; check the name after ':'")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{where}: {name!r} is a {type(target).__name__}, not a callable that builds a model")
    return target


def build_imported(name: str, args: dict[str, Any], where: str) -> nn.Module:
    """`callable(**args)` for an import path, refused unless it returns an `nn.Module`."""
    model = import_callable(name, f"{where}.name")(**args)
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"{where}.name: {name!r} returned a {type(model).__name__}, not a torch.nn.Module; name a model constructor"
        )
    return model
