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

A field may take a range (or choices) per value of a list of choices
earlier in the same file, its branches under `cases`:

    "optim.lr" = { given = "optim.name", cases = { adam = { low = 1e-5, high = 1e-2, log = true },
                                                   sgd = { low = 1e-3, high = 0.3, log = true } } }

Optuna sees one parameter per branch (`optim.lr|adam`, `optim.lr|sgd`), drawn
only when its branch is taken; a value with no case keeps the config's value.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from untrainable.config import ConfigError, RunConfig, from_dict, set_dotted

KEYS = ("low", "high", "log", "step", "choices")
CONDITION_KEYS = ("given", "cases")
NONE = "none"


def case_key(value: Any) -> str:
    """How a choice names its branch under `cases` (and in Optuna's parameter name): "none", "true", "0.5", "adam"."""
    if value is None:
        return NONE
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


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
    given: str | None = None  # a branch: drawn only when the field `given` takes the value named `case`
    case: str | None = None

    @property
    def name(self) -> str:
        """Optuna's name for it: the path, or `path|case` for a branch."""
        return self.path if self.given is None else f"{self.path}|{self.case}"

    def suggest(self, trial: Any) -> Any:
        """The value an Optuna trial draws for this field (a retried trial gets its earlier value back)."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.choices))
        assert self.low is not None and self.high is not None  # a range: checked when read
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), step=self.step, log=self.log)

    def contains(self, value: Any) -> bool:
        """Whether `value` is one this field can draw (a choice, or inside the range and on its steps)."""
        if self.kind == "choice":
            return any(c == value and (type(c) is type(value) or _number(c) and _number(value)) for c in self.choices)
        if not _number(value) or (self.kind == "int" and not isinstance(value, int)):
            return False
        assert self.low is not None and self.high is not None
        tol = 1e-9 * max(abs(self.low), abs(self.high))
        on_step = self.step is None or abs((value - self.low) / self.step - round((value - self.low) / self.step)) < 1e-6
        return bool(self.low - tol <= value <= self.high + tol and on_step)

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
        if self.given is not None:
            return f"{replace(self, given=None, case=None).describe()} when {self.given} = {self.case}"
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
        return list(dict.fromkeys(p.path for p in self.params))

    def active(self, values: dict[str, Any]) -> list[Param]:
        """The fields drawn for `values` ({dotted path: value}): every unconditional one and the branches taken."""
        return [p for p in self.params if p.given is None or case_key(values.get(p.given)) == p.case]

    def suggest(self, trial: Any) -> dict[str, Any]:
        """{dotted path: value} drawn by `trial` for every field (of a conditional one, the branch taken)."""
        values: dict[str, Any] = {}
        for p in self.params:  # a branch follows the field it depends on
            if p.given is None or case_key(values.get(p.given)) == p.case:
                values[p.path] = p.suggest(trial)
        return values

    def values(self, params: dict[str, Any]) -> dict[str, Any]:
        """{dotted path: value} of Optuna's parameters ({name: value}, a branch named `path|case`)."""
        return {p.path: params[p.name] for p in self.params if p.name in params}

    def to_params(self, values: dict[str, Any], source: str) -> dict[str, Any]:
        """Optuna's {name: value} for a point given as {dotted path: value}; ConfigError naming `source` if outside."""
        unknown = sorted(set(values) - set(self.paths))
        if unknown:
            raise ConfigError(f"{source}: {', '.join(unknown)}: not a field of the space ({self.source})")
        params = {}
        for p in self.active(values):
            if p.path not in values:
                raise ConfigError(f"{source}: no value for {p.path} (the space {self.source} tunes it)")
            if values[p.path] == NONE and not p.contains(NONE) and p.contains(None):
                values = values | {p.path: None}  # "none": unset, as in a space file
            if not p.contains(values[p.path]):
                raise ConfigError(
                    f"{source}: {p.path} = {values[p.path]!r} is outside the space's {p.describe()}; "
                    "widen the space or change the point"
                )
            params[p.name] = values[p.path]
        return params

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for p in self.params:
            if p.given is None:
                out[p.path] = p.to_dict()
            else:
                out.setdefault(p.path, {"given": p.given, "cases": {}})["cases"][p.case] = p.to_dict()
        return out

    def with_extra(self, extra: "Space") -> "Space":
        """This space and `extra`'s fields (a guided twin's: the base space plus alpha, steps...).

        A field in both must have the same range in both: the twin is tuned over
        what the base is, and more.
        """
        mine = {p.path: [q for q in self.params if q.path == p.path] for p in self.params}
        for path in extra.paths:
            theirs = [p for p in extra.params if p.path == path]
            if path in mine and mine[path] != theirs:
                raise ConfigError(
                    f"{extra.source}: {path}: {'; '.join(p.describe() for p in theirs)} differs from {self.source}'s "
                    f"{'; '.join(p.describe() for p in mine[path])}; a fair comparison tunes a field over the same "
                    "range in both arms: use the same range or leave it out"
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
        first = {p.path: _probes(p)[0][1] for p in self.params if p.given is None}
        for p in sorted(self.params, key=lambda p: p.given is None):  # a branch first, named in its own refusal
            section = p.path.split(".")[0]
            if section in ("guidance", "guides") and not guided:
                raise ConfigError(
                    f"{self.source}: {p.path}: the config has no guide, so this field changes nothing; "
                    "leave it out of the space (tune guidance fields in the guided config's space)"
                )
            branch = {} if p.given is None else {p.given: _case_value(self, p)}
            for label, value in _probes(p):
                below = {q.path: _probes(q)[0][1] for q in self.params if q.given == p.path and q.case == case_key(value)}
                try:
                    probe = self.apply(config, {**first, **branch, **below, p.path: value})
                    if ".args." in p.path:  # a dict field: its keys are checked by the builder's signature
                        _check_builder_args(probe)
                except ConfigError as err:
                    raise ConfigError(
                        f"{self.source}: {p.path}: {label} {value!r} is refused by the config ({err})"
                    ) from None


def _check_builder_args(config: RunConfig) -> None:
    """The args of the registered model, guides and data set checked against their builders (nothing is built)."""
    from untrainable.build import check_args
    from untrainable.data.registry import DATASETS
    from untrainable.models.registry import MODELS

    for where, spec in [("model", config.model), *((w, g.model) for w, g in config.guide_entries())]:
        if spec.name in MODELS:  # an import path's code is imported when the trial builds it
            check_args(where, MODELS.get(spec.name), spec.args)
    if config.data.name in DATASETS:
        check_args("data", DATASETS.get(config.data.name), config.data.args)
def _case_value(space: Space, p: Param) -> Any:
    parent = next(q for q in space.params if q.path == p.given and q.given is None)
    return next(c for c in parent.choices if case_key(c) == p.case)


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


def _params(data: dict[str, Any], source: str) -> tuple[Param, ...]:
    """A `[space]` table's fields: the unconditional ones, then each conditional field's branches."""
    plain = [_param(path, spec, source) for path, spec in data.items() if not _conditional(spec)]
    parents = {p.path: p for p in plain if p.kind == "choice"}
    branches = []
    for path, spec in data.items():
        if not _conditional(spec):
            continue

        def fail(message: str, path: str = path) -> ConfigError:
            return ConfigError(f"{source}: {path}: {message}")

        unknown = sorted(set(spec) - set(CONDITION_KEYS))
        if unknown or set(spec) != set(CONDITION_KEYS) or not isinstance(spec["cases"], dict) or not spec["cases"]:
            raise fail(
                "a conditional field is { given = FIELD, cases = { VALUE = { low, high, ... }, ... } }"
                + (f"; unknown key(s) {unknown}" if unknown else "")
            )
        parent = parents.get(spec["given"])
        if parent is None:
            raise fail(
                f"given = {spec['given']!r}: expected a field of this file with choices = [...] "
                f"(its fields with choices: {', '.join(parents) or 'none'})"
            )
        keys = [case_key(c) for c in parent.choices]
        for case, branch in spec["cases"].items():
            if case not in keys:
                raise fail(f"cases: {case!r} is not one of {parent.path}'s choices ({', '.join(keys)})")
            p = _param(f"{path}", branch, f"{source} (case {case})")
            branches.append(replace(p, given=parent.path, case=case))
    return tuple(plain + branches)


def _conditional(spec: Any) -> bool:
    return isinstance(spec, dict) and ("given" in spec or "cases" in spec)


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
    if step is not None and not _divides(step, low, high):
        below = low + math.floor((high - low) / step) * step
        raise fail(
            f"step {step!r} does not divide the range {low!r}..{high!r}, which Optuna would narrow to "
            f"{below:g}; make high {below:g} or {below + step:g}, or change the step"
        )
    field_type = _strip_optional(hint)
    if field_type is int or (field_type is Any and all(isinstance(v, int) for v in (low, high, step or 1))):
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high, step or 1)):
            raise fail(f"an integer field takes integer low, high and step, got {low!r}, {high!r}, {step!r}")
        return Param(path, "int", low, high, log, step)
    if field_type is float or field_type is Any:
        return Param(path, "float", float(low), float(high), log, None if step is None else float(step))
    name = getattr(field_type, "__name__", str(field_type))
    raise fail(f"a range needs a number field, but this field holds {name}; give choices = [...] instead")


def _divides(step: float, low: float, high: float) -> bool:
    """Whether (high - low) is a whole number of steps, in decimal arithmetic as Optuna checks it."""
    from decimal import Decimal

    return (Decimal(str(high)) - Decimal(str(low))) % Decimal(str(step)) == 0


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
    return Space(_params(data["space"], str(path)), str(path))


def space_from_dict(data: dict[str, Any], source: str) -> Space:
    """A space from `Space.to_dict()` (as a study folder records it)."""
    return Space(_params(data, source), source)


def load_points(path: str | Path) -> tuple[tuple[str, dict[str, Any]], ...]:
    """Points to enqueue, from a file of `[[enqueue]]` tables of dotted paths and values: ((source, {path: value})).

    A point's optional `arm = "alone"` (or "guided") keeps it to that arm; without it, it goes to every
    arm whose space holds its fields. Each is checked against an arm's space when its study is prepared
    (`enqueued_points`).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--enqueue: {path} does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"--enqueue: {path} is not valid TOML: {err}; fix the file") from None
    points = data.get("enqueue")
    if set(data) != {"enqueue"} or not isinstance(points, list) or not points:
        raise ConfigError(
            f'--enqueue: {path}: expected [[enqueue]] tables of dotted paths and values, e.g. "optim.lr" = 3e-4'
        )
    out = []
    for k, point in enumerate(points, 1):
        if not isinstance(point, dict) or not point:
            raise ConfigError(f"--enqueue: {path}: point {k}: expected a table of dotted paths and values")
        if "arm" in point and not isinstance(point["arm"], str):
            raise ConfigError(f"--enqueue: {path}: point {k}: arm: expected an arm's name (alone, guided)")
        for key in set(point) - {"arm"}:
            try:
                _field_hint(key)
            except ConfigError as err:
                raise ConfigError(f"--enqueue: {path}: point {k}: {key}: not a config field: {err}") from None
        out.append((f"{path} point {k}", dict(point)))
    return tuple(out)


def config_values(config: RunConfig, paths: list[str]) -> dict[str, Any]:
    """{dotted path: the config's value} (None where the config leaves a field unset)."""
    values = {}
    for path in paths:
        node: Any = config.to_dict()
        for part in path.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        values[path] = node
    return values


def enqueued_points(
    config: RunConfig, space: Space, points: tuple[tuple[str, dict[str, Any]], ...], arm: str
) -> list[dict[str, Any]]:
    """The trials a study runs first: the config's own values (when the space holds them), then each point.

    A point gives some fields; the others keep the config's values. A point
    naming a field this space lacks, or another `arm`, belongs to another arm and is left out; a
    value outside the space is a ConfigError naming its source. Repeats are dropped.
    """
    own = config_values(config, space.paths)
    out: list[dict[str, Any]] = []
    mine = [(source, {k: v for k, v in p.items() if k != "arm"}) for source, p in points if p.get("arm", arm) == arm]
    candidates: list[tuple[str, dict[str, Any]]] = [("the config", {})]
    candidates += [(source, p) for source, p in mine if set(p) <= set(space.paths)]
    for source, point in candidates:
        values = own | point
        try:
            params = space.to_params(values, source)
        except ConfigError:
            if source == "the config":
                continue  # its values lie outside the space: nothing to enqueue
            raise
        if all(e["params"] != params for e in out):
            out.append({"source": source, "params": params})
    return out
