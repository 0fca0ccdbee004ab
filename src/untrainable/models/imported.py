"""Models by import path: `name = "package.module:callable"` builds `callable(**args)`, any library's or the user's.

Hydra's `_target_` idea kept to one string: `torchvision.models:resnet18`,
`timm:create_model` with `args = { model_name = "vit_base_patch16_224" }`,
`torch.nn:Linear` with `args = { in_features = 40, out_features = 10 }`.
Nothing is filled in from the data: the callable gets `args` exactly.
A config that names an import path runs that module's code when the model
is built, as Hydra's `_target_` does: read such a config before you run it.
"""

from __future__ import annotations

import importlib
import importlib.util
import traceback
from typing import Any, Callable

from torch import nn

from untrainable.errors import CallableError, ConfigError


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
    except Exception as err:  # the module's own code failed (a syntax error, an exception at its top level)
        raise ConfigError(
            f"{where}: importing module {module_name!r} ({_origin(module_name)}) raised {type(err).__name__} "
            f"at {_raised_at(err)}: {_first_line(err)}; fix that module (--debug shows its traceback)"
        ) from err
    for i, part in enumerate(attribute.split(".")):
        if not hasattr(target, part):
            owner = ".".join([module_name] + attribute.split(".")[:i])
            raise ConfigError(f"{where}: {owner!r} has no attribute {part!r}; check the name after ':'")
        target = getattr(target, part)
    if not callable(target):
        raise ConfigError(f"{where}: {name!r} is a {type(target).__name__}, not a callable that builds a model")
    return target


def _origin(module_name: str) -> str:
    try:
        spec = importlib.util.find_spec(module_name)
    except Exception:  # only a detail for the message
        spec = None
    return str(spec.origin) if spec is not None and spec.origin else "file unknown"


def _raised_at(err: BaseException) -> str:
    """`file:line` where `err` was raised: a syntax error's own position, else its traceback's last frame."""
    if isinstance(err, SyntaxError) and err.filename:
        return f"{err.filename}:{err.lineno}"
    frames = traceback.extract_tb(err.__traceback__)
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "an unknown place"


def _first_line(err: BaseException) -> str:
    text = err.msg if isinstance(err, SyntaxError) and err.msg else str(err)
    return (text.strip().splitlines() or [type(err).__name__])[0]


def build_imported(name: str, args: dict[str, Any], where: str) -> nn.Module:
    """`callable(**args)` for an import path, refused unless it returns an `nn.Module`.

    Arguments the call itself refuses are a ConfigError naming `where.args`;
    an exception raised inside the callable is a CallableError carrying it.
    """
    builder = import_callable(name, f"{where}.name")
    try:
        model = builder(**args)
    except Exception as err:
        if err.__traceback__ is None or err.__traceback__.tb_next is None:  # no frame of the callable ran
            raise ConfigError(f"{where}.args: {err}") from None
        raise CallableError(
            f"{where}.name: {name!r} raised {type(err).__name__} inside that callable: {_first_line(err)}; "
            "this is an error in the code the config names, not in a config value (its traceback follows)",
            err,
        ) from err
    if not isinstance(model, nn.Module):
        raise ConfigError(
            f"{where}.name: {name!r} returned a {type(model).__name__}, not a torch.nn.Module; name a model constructor"
        )
    return model
