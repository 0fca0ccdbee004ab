"""Building a run's parts from its config: data, models, guides and their weights, guidance, optimiser, device."""

from __future__ import annotations

import collections.abc
import inspect
import numbers
import os
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from untrainable import distributed
from untrainable.adaptive_alpha import ADAPTIVE, AdaptiveAlpha
from untrainable.capture import resolve_layers
from untrainable.checkpoint import CheckpointError, read_weights
from untrainable.config import ConfigError, DataSpec, GuidanceSpec, GuideSpec, ModelSpec, RunConfig
from untrainable.data import DataSplits, load_data
from untrainable.data.registry import DATASETS
from untrainable.guidance import Guidance, Guide
from untrainable.models import create_model
from untrainable.models.imported import build_imported, import_callable, is_import_path
from untrainable.models.registry import MODELS
from untrainable.optim import make_lr_schedule, make_optimizer
from untrainable.schedule import AlphaSchedule


def check_args(where: str, builder: Callable[..., Any], args: dict[str, Any]) -> None:
    """Raise ConfigError naming `where.args.KEY` when `builder` takes no argument KEY, or not of that value's type.

    The expected type is the parameter's annotation, else its default's type;
    the message lists the accepted arguments with their types.
    """
    params = inspect.signature(builder).parameters
    try:
        hints = typing.get_type_hints(builder)
    except Exception:  # an annotation that does not evaluate: fall back on the defaults
        hints = {}
    expected = {
        name: hints.get(name, type(p.default) if p.default not in (inspect.Parameter.empty, None) else None)
        for name, p in params.items()
    }
    accepted = ", ".join(f"{name} ({_type_name(t)})" if t is not None else name for name, t in expected.items())
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    for key, value in args.items():
        if key not in params and open_ended:
            continue
        if key not in params:
            raise ConfigError(
                f"{_field(where, 'args.' + key)}: not an argument of {builder.__name__}; accepted: {accepted}"
            )
        if expected[key] is not None and _fits(value, expected[key]) is False:
            raise ConfigError(
                f"{_field(where, 'args.' + key)}: {value!r} is not {_type_name(expected[key])}; "
                f"accepted arguments of {builder.__name__}: {accepted}"
            )


def _field(where: str, sub: str) -> str:
    """The name of a field of `where` as the user wrote it: `guide.checkpoint` in a config, `--guide-checkpoint` as a flag.

    `where` is a config section (`model`, `guides[1].model`) or a command-line
    flag (`--guide`, whose fields are the flags `--guide-args` and `--guide-checkpoint`).
    """
    if not where.startswith("--"):
        return f"{where}.{sub}"
    head, _, key = sub.partition(".")
    return where if head == "name" else f"{where}-{head}" + (f" {key}" if key else "")


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) if isinstance(hint, type) else str(hint).replace("typing.", "")


def _fits(value: Any, hint: Any) -> bool | None:
    """Whether a config value fits a type annotation; None where this check cannot tell (it then lets it pass)."""
    origin, members = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        verdicts = [_fits(value, member) for member in members]
        return True if True in verdicts else (None if None in verdicts else False)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, (str, os.PathLike))
    if origin in (tuple, list, collections.abc.Sequence) and not isinstance(value, str):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and members and members[-1] is not Ellipsis:
            if len(members) != len(value):
                return False
            verdicts = [_fits(v, m) for v, m in zip(value, members)]
        else:
            verdicts = [_fits(v, members[0]) for v in value] if members else []
        return False if False in verdicts else (None if None in verdicts else True)
    if origin in (tuple, list, collections.abc.Sequence):
        return False
    return None


def build_data(spec: DataSpec, where: str = "data") -> DataSplits:
    """The registered data set a `[data]` section names, its arguments checked first."""
    check_args(where, DATASETS.get(spec.name), spec.args)
    try:
        return load_data(spec.name, **spec.args)
    except (TypeError, ValueError) as err:  # a value the data set refuses: it names the argument
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{_field(where, 'args')}: {err}") from None


def build_model(spec: ModelSpec, data: DataSplits, seed: int, where: str = "model") -> nn.Module:
    """Create a model, seeded by `spec.seed` (or `seed`), and load `spec.checkpoint` when given, checked to fit.

    A registered name gets `input_shape`, `num_classes` and `vocab_size` from
    the data where it takes them; an import path (`package.module:callable`)
    is called with `spec.args` alone (see `models.imported`).
    """
    imported = is_import_path(spec.name)
    builder = import_callable(spec.name, _field(where, "name")) if imported else MODELS.get(spec.name)
    kwargs = dict(spec.args)
    if not imported:
        check_args(where, builder, spec.args)
        accepted = inspect.signature(builder).parameters
        known = {
            "input_shape": data.input_shape,
            "num_classes": data.num_classes,
            "vocab_size": data.meta.get("vocab_size"),
        }
        kwargs = {k: v for k, v in known.items() if k in accepted and v is not None} | kwargs
        if "input_shape" in kwargs:
            kwargs["input_shape"] = tuple(kwargs["input_shape"])
    elif _has_signature(builder):  # one without (a C extension's) is called as it is
        check_args(where, builder, spec.args)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed if spec.seed is not None else seed)
        try:
            model = build_imported(spec.name, kwargs, where) if imported else create_model(spec.name, **kwargs)
        except TypeError as err:
            raise ConfigError(f"{_field(where, 'args')}: {err}") from None
    if spec.checkpoint:
        model.load_state_dict(checked_weights(spec, model, _field(where, "checkpoint")))
    check_runs_on(model, data, spec.name, kwargs.get("input_shape"), where)
    return model


def _has_signature(builder: Callable[..., Any]) -> bool:
    try:
        inspect.signature(builder)
    except (TypeError, ValueError):
        return False
    return True


def check_runs_on(
    model: nn.Module, data: DataSplits, name: str, input_shape: tuple[int, ...] | None, where: str
) -> None:
    """Run `model` once on two training examples, so a model that does not fit the data is refused before training.

    Raises ConfigError naming `where.args`, the shape the data gives and the
    `input_shape` the model was built for; torch's own message is kept in it
    (and the traceback under --debug), so a fault of the model itself still shows.
    """
    n = min(2, len(data.train))  # type: ignore[arg-type]
    if n == 0:
        return
    was_training = model.training
    model.eval()  # no BatchNorm statistics or dropout touched, no gradients
    with torch.random.fork_rng(devices=[]):  # nor the random numbers the run will draw
        x = torch.stack([torch.as_tensor(data.train[i][0]) for i in range(n)])
        x = data.prepare(x) if data.prepare is not None else x
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model(x)
    except RuntimeError as err:
        built_for = f"; the model was built for input_shape {tuple(input_shape)}" if input_shape is not None else ""
        reason = " ".join(str(err).split())
        raise ConfigError(
            f"{_field(where, 'args')}: a {name!r} model does not run on the data's examples (shape {tuple(x.shape[1:])}, "
            f"{x.dtype}{built_for}): {reason[:300]}; make {_field(where, 'args')} fit the data "
            "(input_shape, num_classes and vocab_size are taken from the data when left out)"
        ) from err
    finally:
        model.train(was_training)


def checked_weights(spec: ModelSpec, model: nn.Module, where: str) -> dict[str, Any]:
    """The state dict in `spec.checkpoint`, refused with a ConfigError naming what does not fit `model`."""
    path = Path(spec.checkpoint).expanduser()
    try:
        state, saved = read_weights(path)
    except CheckpointError as err:
        raise ConfigError(f"{where}: {err}") from None
    except Exception as err:  # torch's own message suggests unsafe loading: never pass it on
        raise ConfigError(
            f"{where}: {path} is not a model checkpoint ({type(err).__name__}); "
            "give a run's model.pt or model.safetensors, or a saved state_dict"
        ) from None
    saved_name = (saved or {}).get("model", {}).get("name")
    if saved_name is not None and saved_name != spec.name:
        raise ConfigError(
            f"{where}: {path} holds a {saved_name!r} model, not {spec.name!r}; set the model name to {saved_name!r} or give another file"
        )
    if not isinstance(state, dict):
        raise ConfigError(f"{where}: {path} holds a {type(state).__name__}, not a state_dict")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and hasattr(state[k], "shape") and state[k].shape != v.shape
    ]
    # Integers copied into float parameters would load silently (and guide toward nothing).
    dtypes = [
        f"{k} {state[k].dtype} vs {v.dtype}"
        for k, v in expected.items()
        if k in state and torch.is_tensor(state[k]) and v.is_floating_point() and not state[k].is_floating_point()
    ]
    problems = [
        f"{label}: {', '.join(items[:5])}{' ...' if len(items) > 5 else ''}"
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shapes (file vs model)", shapes),
            ("types (file vs model)", dtypes),
        )
        if items
    ]
    if problems:
        raise ConfigError(f"{where}: {path} does not fit a {spec.name!r} model with these args ({'; '.join(problems)})")
    broken = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not v.isfinite().all()]
    if broken:
        raise ConfigError(
            f"{where}: {path} holds NaN or inf in {', '.join(broken[:5])}{' ...' if len(broken) > 5 else ''}; "
            "these weights cannot guide or train: give the checkpoint of a run that did not diverge"
        )
    return state


def build_guides(config: RunConfig, data: DataSplits) -> list[nn.Module]:
    """The run's guide models in config order: the `[guide]` model, or each `[[guides]]` entry's."""
    return [build_model(spec.model, data, config.train.seed, where=where) for where, spec in config.guide_entries()]


def build_guidance(config: RunConfig, target: nn.Module, guides: nn.Module | Sequence[nn.Module]) -> Guidance | None:
    """The Guidance a config describes over its guide models (as `build_guides` gives them); None when none pulls.

    A guide at alpha 0 under a constant schedule never pulls and is left
    out: it may serve as the distillation teacher only.
    """
    models = [guides] if isinstance(guides, nn.Module) else list(guides)
    entries = config.guide_entries()
    if len(models) != len(entries):
        raise ValueError(f"the config has {len(entries)} guide(s) but {len(models)} guide model(s) were given")
    for (where, spec), model in zip(entries, models):
        if spec.pulls:
            _check_layers(where.removesuffix(".model") if config.guides else "guidance", spec, target, model)
    pulling = [
        Guide(
            model,
            name=spec.label,
            pairs=spec.pairs,
            target_layers=spec.target_layers,
            guide_layers=spec.guide_layers,
            schedule=build_schedule(spec),
            guide_input=spec.guide_input,
        )
        for model, (_, spec) in zip(models, entries)
        if spec.pulls
    ]
    if not pulling:
        return None
    g = config.guidance
    return Guidance(
        target,
        pulling,
        similarity=g.similarity,
        sequence_mode=g.sequence_mode,
        gather=distributed.gather_for_similarity if g.scope == "global" else None,
        gram_dtype=None if g.gram_dtype == "float32" else getattr(torch, g.gram_dtype),
    )


def _check_layers(where: str, spec: GuideSpec, target: nn.Module, guide: nn.Module) -> None:
    """Refuse, naming the config field, a layer name or glob of a guide's entry that matches no layer."""
    fields = [("target_layers", target, spec.target_layers), ("guide_layers", guide, spec.guide_layers)]
    for i, pair in enumerate(spec.pairs or []):
        fields += [(f"pairs[{i}]", target, pair[:1]), (f"pairs[{i}]", guide, pair[1:2])]
    for field, model, layers in fields:
        if layers:
            try:
                resolve_layers(model, layers)
            except KeyError as err:
                raise ConfigError(f"{where}.{field}: {err.args[0]}") from None


def build_schedule(g: GuidanceSpec | GuideSpec) -> AlphaSchedule | AdaptiveAlpha:
    """The alpha schedule a `[guidance]` section or a `[[guides]]` entry describes."""
    if g.schedule == ADAPTIVE:
        return AdaptiveAlpha(g.alpha, g.adapt_every, g.adapt_ratio, g.alpha_max, g.adapt_momentum)
    return AlphaSchedule(alpha=g.alpha, kind=g.schedule, steps=g.steps)


def build_optimizer(config: RunConfig, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimiser `config.optim` describes, over `params`."""
    o = config.optim
    return make_optimizer(o.name, params, lr=o.lr, weight_decay=o.weight_decay, momentum=o.momentum, fused=o.fused)


def build_lr_schedule(
    config: RunConfig, optimizer: torch.optim.Optimizer, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule `config.optim` describes, over `total_steps`."""
    return make_lr_schedule(config.optim.lr_schedule, optimizer, total_steps, config.optim.warmup_steps)


def pick_device(name: str) -> torch.device:
    """`train.device` as a torch device; `auto` is CUDA when present."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {name!r} but no CUDA device is available; use 'auto' or 'cpu'")
    return device
