"""Search spaces for tuning: config fields by their dotted `--set` paths, each a range or a list of choices.

A space file is TOML with one `[space]` table:

    [space]
    "optim.name" = { choices = ["adam", "sgd"] }
    "optim.lr" = { low = 1e-4, high = 1e-1, log = true }
    "optim.warmup_steps" = { low = 0, high = 300, step = 50 }
    "optim.grad_clip" = { choices = ["none", 0.5, 1.0] }

A range is `low` and `high` (inclusive), optionally `log = true` (log-uniform)
or `step`; it draws integers for an integer field, numbers for a number field
and, under a model's or data set's `args`, integers when both ends are
integers. `"none"` in a list of choices is "not set" (TOML has no null) for a
field that may be unset. Every path, range and value is checked against the
config before any trial runs (`Space.check`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from untrainable.config import ConfigError, RunConfig, from_dict, set_dotted

KEYS = ("low", "high", "log", "step", "choices")
NONE = "none"


@dataclass(frozen=True)
class Param:
    """One tuned field: `kind` "int" or "float" (a range low..high, inclusive) or "choice"."""

    path: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        """The value an Optuna trial draws for this field (a retried trial gets its earlier value back)."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.path, list(self.choices))
        assert self.low is not None and self.high is not None  # a range: checked when read
        if self.kind == "int":
            return trial.suggest_int(self.path, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.path, float(self.low), float(self.high), step=self.step, log=self.log)

    def to_dict(self) -> dict[str, Any]:
        if self.kind == "choice":
            return {"choices": [NONE if c is None else c for c in self.choices]}
        out: dict[str, Any] = {"low": self.low, "high": self.high}
        if self.log:
            out["log"] = True
        if self.step is not None:
            out["step"] = self.step
        return out

    def describe(self) -> str:
        if self.kind == "choice":
            return f"{self.path} in {{{', '.join(NONE if c is None else f'{c}' for c in self.choices)}}}"
        how = "log-uniform" if self.log else (f"step {self.step:g}" if self.step is not None else "uniform")
        return f"{self.path} {self.kind} {self.low:g}..{self.high:g} ({how})"


@dataclass(frozen=True)
class Space:
    """The tuned fields, in file order; `source` names the file(s) in error messages."""

    params: tuple[Param, ...]
    source: str

    @property
    def paths(self) -> list[str]:
        return [p.path for p in self.params]

    def suggest(self, trial: Any) -> dict[str, Any]:
        """{dotted path: value} drawn by `trial` for every field."""
        return {p.path: p.suggest(trial) for p in self.params}

    def to_dict(self) -> dict[str, Any]:
        return {p.path: p.to_dict() for p in self.params}

    def with_extra(self, extra: "Space") -> "Space":
        """This space and `extra`'s fields (a guided twin's: the base space plus alpha, steps...).

        A field in both must have the same range in both: the twin is tuned over
        what the base is, and more.
        """
        mine = {p.path: p for p in self.params}
        for p in extra.params:
            if p.path in mine and mine[p.path] != p:
                raise ConfigError(
                    f"{extra.source}: {p.path}: {p.describe()} differs from {self.source}'s {mine[p.path].describe()}; "
                    "a fair comparison tunes a field over the same range in both arms: use the same range or leave it out"
                )
        return Space(
            self.params + tuple(p for p in extra.params if p.path not in mine), f"{self.source} + {extra.source}"
        )

    def apply(self, config: RunConfig, values: dict[str, Any]) -> RunConfig:
        """`config` with `values` ({dotted path: value}) set, validated again."""
        data = copy.deepcopy(config.to_dict())
        for path, value in values.items():
            set_dotted(data, path, value)
        return from_dict(RunConfig, data)

    def check(self, config: RunConfig) -> None:
        """Refuse, in one line naming the file and the path, a field the config lacks or a value it refuses.

        Every choice and both ends of every range are set on `config` in turn, the other fields at their first
        choice or low end (fields that depend on each other, a schedule and its steps, are checked together).
        """
        guided = bool(config.guide_entries())
        first = {p.path: _probes(p)[0][1] for p in self.params}
        for p in self.params:
            section = p.path.split(".")[0]
            if section in ("guidance", "guides") and not guided:
                raise ConfigError(
                    f"{self.source}: {p.path}: the config has no guide, so this field changes nothing; "
                    "leave it out of the space (tune guidance fields in the guided config's space)"
                )
            for label, value in _probes(p):
                try:
                    self.apply(config, {**first, p.path: value})
                except ConfigError as err:
                    raise ConfigError(
                        f"{self.source}: {p.path}: {label} {value!r} is refused by the config ({err})"
                    ) from None


def _probes(p: Param) -> list[tuple[str, Any]]:
    if p.kind == "choice":
        return [("choice", c) for c in p.choices]
    cast = int if p.kind == "int" else float
    assert p.low is not None and p.high is not None  # a range: checked when read
    return [("low", cast(p.low)), ("high", cast(p.high))]


def _field_hint(path: str) -> Any:
    """The type hint of a dotted RunConfig path; Any under a dict field (a model's args); ConfigError if none."""
    cls: Any = RunConfig
    hint: Any = None
    parts = path.split(".")
    for i, name in enumerate(parts):
        if hint is not None and typing.get_origin(_strip_optional(hint)) is dict:
            return Any  # a key of `args`: any name the model or data set takes
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(f"{'.'.join(parts[:i])} is not a table of fields")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if name not in fields:
            where = ".".join(parts[:i]) or "the config"
            raise ConfigError(f"{where} has no field {name!r} (its fields: {', '.join(fields)})")
        hint = typing.get_type_hints(cls)[name]
        cls = next((t for t in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(t)), None)
    if cls is not None and dataclasses.is_dataclass(cls):
        raise ConfigError(f"{path} is a table of fields, not a value; name one of its fields")
    return hint


def _strip_optional(hint: Any) -> Any:
    if typing.get_origin(hint) in (Union, types.UnionType):
        options = [t for t in typing.get_args(hint) if t is not type(None)]
        return options[0] if len(options) == 1 else hint
    return hint


def _optional(hint: Any) -> bool:
    return typing.get_origin(hint) in (Union, types.UnionType) and type(None) in typing.get_args(hint)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _param(path: str, spec: Any, source: str) -> Param:
    """One `[space]` entry, checked in shape (the config checks its values later)."""

    def fail(message: str) -> ConfigError:
        return ConfigError(f"{source}: {path}: {message}")

    try:
        hint = _field_hint(path)
    except ConfigError as err:
        raise fail(f"not a config field: {err}; use the dotted path that --set takes, e.g. optim.lr") from None
    if not isinstance(spec, dict):
        raise fail(
            f"expected a table like {{ low = 1e-4, high = 1e-2, log = true }} or {{ choices = [...] }}, got {spec!r}"
        )
    unknown = sorted(set(spec) - set(KEYS))
    if unknown:
        raise fail(f"unknown key(s) {unknown}; a range takes low, high, log, step; a list takes choices")
    if "choices" in spec:
        if set(spec) != {"choices"}:
            raise fail("give either choices or a range (low, high), not both")
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise fail(f"choices: expected a non-empty list of values, got {choices!r}")
        none_ok = _optional(hint) and _strip_optional(hint) is not str
        values = tuple(None if (c == NONE and none_ok) else c for c in choices)
        if any(not isinstance(c, (str, int, float, bool)) and c is not None for c in values):
            raise fail(f"choices: each choice must be a string, number or boolean, got {choices!r}")
        if len(set(map(repr, values))) != len(values):
            raise fail(f"choices: {choices!r} names a value twice")
        return Param(path, "choice", choices=values)
    if "low" not in spec or "high" not in spec:
        raise fail("a range needs both low and high (or give choices = [...])")
    low, high, log, step = spec["low"], spec["high"], spec.get("log", False), spec.get("step")
    if not (_number(low) and _number(high)) or not all(map(math.isfinite, (low, high))):
        raise fail(f"low and high must be numbers, got {low!r} and {high!r}")
    if not isinstance(log, bool):
        raise fail(f"log: expected true or false, got {log!r}")
    if not low < high:
        raise fail(f"the range {low!r}..{high!r} is empty; low must be below high")
    if log and low <= 0:
        raise fail(f"a log-uniform range needs low > 0, got {low!r}")
    if step is not None and (not _number(step) or step <= 0):
        raise fail(f"step: expected a number > 0, got {step!r}")
    if log and step is not None:
        raise fail("give log or step, not both (Optuna draws a log-uniform range without steps)")
    field_type = _strip_optional(hint)
    if field_type is int or (field_type is Any and all(isinstance(v, int) for v in (low, high, step or 1))):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high, step or 1)):
            raise fail(f"an integer field takes integer low, high and step, got {low!r}, {high!r}, {step!r}")
        return Param(path, "int", low, high, log, step)
    if field_type is float or field_type is Any:
        return Param(path, "float", float(low), float(high), log, None if step is None else float(step))
    name = getattr(field_type, "__name__", str(field_type))
    raise fail(f"a range needs a number field, but this field holds {name}; give choices = [...] instead")


def load_space(path: str | Path) -> Space:
    """Read a space file; a bad entry is one ConfigError naming the file and the path."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"space file {path} " + ("is a folder, not a file" if path.is_dir() else "does not exist"))
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"space file {path} is not valid TOML: {err}; fix the file") from None
    extra = sorted(set(data) - {"space"})
    if extra or not isinstance(data.get("space"), dict) or not data["space"]:
        raise ConfigError(
            f'space file {path}: expected one [space] table of fields, e.g. "optim.lr" = {{ low = 1e-4, high = 1e-2, log = true }}'
            + (f"; unknown table(s) {extra}" if extra else "")
        )
    return Space(tuple(_param(key, spec, str(path)) for key, spec in data["space"].items()), str(path))


def space_from_dict(data: dict[str, Any], source: str) -> Space:
    """A space from `Space.to_dict()` (as a study folder records it)."""
    return Space(tuple(_param(key, spec, source) for key, spec in data.items()), source)
