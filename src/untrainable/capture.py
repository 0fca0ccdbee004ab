"""Capture the outputs of chosen layers of an unmodified model with forward hooks."""

from __future__ import annotations

import fnmatch
from typing import Any, Callable, Iterable, Sequence

from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

# Wrappers that prefix every module path: DistributedDataParallel adds
# `module.`, torch.compile adds `_orig_mod.`.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

# The default layers: every module of these kinds, outermost first, except the
# output layer.
DEFAULT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.RNNBase,
    nn.MultiheadAttention,
)


def canonical_name(name: str) -> str:
    """Strip the prefixes that DDP (`module.`) and torch.compile (`_orig_mod.`) add."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, stripped = name[len(prefix) :], True
    return "" if name in ("module", "_orig_mod") else name


def named_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every submodule by its canonical path, in registration order (the root excluded)."""
    layers: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        key = canonical_name(name)
        if key and key not in layers:
            layers[key] = module
    return layers


def _is_attention(module: nn.Module) -> bool:
    return isinstance(module, nn.MultiheadAttention) or type(module).__name__.lower().endswith("attention")


def default_layers(model: nn.Module) -> list[str]:
    """The layers guided when none are named.

    The outputs of every Linear, Conv, RNN/LSTM/GRU and attention module (a
    class named `*Attention`), taking the outermost one where they nest (an
    attention module, not its projections), and leaving out the output layer:
    the last Linear or Conv of the model.
    """
    chosen: list[str] = []
    for name, module in named_layers(model).items():
        if any(name.startswith(parent + ".") for parent in chosen):
            continue
        if isinstance(module, DEFAULT_TYPES) or _is_attention(module):
            chosen.append(name)
    if chosen and isinstance(named_layers(model)[chosen[-1]], (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        chosen.pop()
    if not chosen:
        raise ValueError(
            f"{type(model).__name__} has no Linear, Conv, RNN or attention layer to guide "
            "besides its output layer; name the layers explicitly"
        )
    return chosen


def _match(pattern: str, name: str) -> bool:
    """Glob on module paths: `*` matches within one path segment, `**` any number of segments."""
    return _match_parts(pattern.split("."), name.split("."))


def _match_parts(pattern: list[str], parts: list[str]) -> bool:
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_match_parts(pattern[1:], parts[i:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pattern[0]) and _match_parts(pattern[1:], parts[1:])


def resolve_layers(
    model: nn.Module,
    layers: Sequence[str] | None = None,
    types: Iterable[type[nn.Module] | str] | None = None,
) -> list[str]:
    """Turn names, globs and module types into a list of canonical module paths.

    Args:
        model: the model, possibly wrapped by DDP or torch.compile.
        layers: exact paths (`blocks.0.fc`) or globs (`blocks.*.fc`); wrapper
            prefixes are accepted. Order is kept; globs expand in model order.
        types: module classes or class names (`"Linear"`) to take everywhere.
    Returns:
        The selected paths, each once. With neither argument, `default_layers`.
    Raises:
        KeyError listing the valid paths when a name or glob matches nothing.
    """
    available = named_layers(model)
    if layers is None and types is None:
        return default_layers(model)
    chosen: list[str] = []
    for pattern in layers or []:
        pattern = canonical_name(pattern)
        if any(ch in pattern for ch in "*?["):
            hits = [name for name in available if _match(pattern, name)]
        else:
            hits = [pattern] if pattern in available else []
        if not hits:
            raise KeyError(
                f"no layer of {type(model).__name__} matches {pattern!r}; valid layers: " + ", ".join(available)
            )
        chosen.extend(hit for hit in hits if hit not in chosen)
    if types is not None:
        type_list = list(types)
        names = {t for t in type_list if isinstance(t, str)}
        classes = tuple(t for t in type_list if not isinstance(t, str))
        hits = [
            name
            for name, module in available.items()
            if type(module).__name__ in names or (classes and isinstance(module, classes))
        ]
        if not hits:
            kinds = sorted({type(m).__name__ for m in available.values()})
            raise KeyError(
                f"no layer of {type(model).__name__} has type {type_list}; types present: " + ", ".join(kinds)
            )
        chosen.extend(hit for hit in hits if hit not in chosen)
    return chosen


def as_activation(output: object) -> Tensor:
    """The activation tensor in a module's output.

    Tensors pass through; tuples and lists give their first element (RNNs
    return `(sequence, h)`, nn.MultiheadAttention `(output, weights)`); a
    PackedSequence is padded back to (batch, time, features) with zeros.
    (LayerCapture also moves the batch first for time-first modules.)
    """
    if isinstance(output, PackedSequence):
        padded, _ = pad_packed_sequence(output, batch_first=True)
        return padded
    if isinstance(output, (tuple, list)) and output:
        return as_activation(output[0])
    if isinstance(output, Tensor):
        return output
    raise TypeError(f"cannot take an activation from a module output of type {type(output).__name__}")


def _packed(output: object) -> bool:
    if isinstance(output, (tuple, list)) and output:
        return _packed(output[0])
    return isinstance(output, PackedSequence)


class LayerCapture:
    """Records the outputs of chosen layers of a model, hooks registered once.

    The model is not modified beyond the forward hooks, which `remove()`
    takes away. Activations are recorded only while `active` is true, so
    plain forwards (evaluation, other code) keep nothing alive.

        capture = LayerCapture(model, ["blocks.*.fc"])
        output, activations = capture.run(x)
        activations["blocks.0.fc"]  # (batch, ...)
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Sequence[str] | None = None,
        types: Iterable[type[nn.Module] | str] | None = None,
    ) -> None:
        self.model = model
        self.names = resolve_layers(model, layers, types)
        self.activations: dict[str, Any] = {}
        self.active = False
        self._transform: Callable[[str, Tensor], Any] | None = None
        modules = named_layers(model)
        self._handles = [modules[name].register_forward_hook(self._hook(name)) for name in self.names]

    def _hook(self, name: str) -> Callable[[nn.Module, tuple[Any, ...], object], None]:
        def record(module: nn.Module, inputs: tuple[Any, ...], output: object) -> None:
            if self.active:
                act = as_activation(output)
                # RNNs and nn.MultiheadAttention default to (time, batch, features):
                # the examples must come first. A PackedSequence is padded batch-first.
                if getattr(module, "batch_first", True) is False and act.dim() == 3 and not _packed(output):
                    act = act.transpose(0, 1)
                self.activations[name] = act if self._transform is None else self._transform(name, act)

        return record

    def run(self, *inputs: Any, transform: Callable[[str, Tensor], Any] | None = None) -> tuple[Any, dict[str, Any]]:
        """The model's output on `inputs` and the captured layers' activations, (batch, ...) each, by name.

        Gradients follow the caller's mode (wrap in torch.no_grad() for a
        frozen model). `transform(name, activation)`, when given, is applied
        in the hook as each layer finishes and its result kept instead, so a
        large activation can be reduced and freed before the next layer runs.
        Raises ValueError naming the layers that did not run (a choice of layers, not a fault).
        """
        self._transform = transform
        try:
            with self.recording():
                output = self.model(*inputs)
        finally:
            self._transform = None
        activations, self.activations = self.activations, {}
        missing = [name for name in self.names if name not in activations]
        if missing:
            raise ValueError(
                f"layers {missing} of {type(self.model).__name__} did not run in its forward; choose layers that do"
            )
        return output, activations

    def recording(self) -> "_Recording":
        """Context manager: clear, record during the block, keep the results."""
        return _Recording(self)

    def clear(self) -> None:
        self.activations = {}

    def remove(self) -> None:
        """Take the hooks off the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


class _Recording:
    def __init__(self, capture: LayerCapture) -> None:
        self.capture = capture

    def __enter__(self) -> LayerCapture:
        self.capture.clear()
        self.capture.active = True
        return self.capture

    def __exit__(self, *exc: object) -> None:
        self.capture.active = False
