"""Config files: TOML or JSON read into the typed sections of config.py, overridden, saved and compared.

Generic over the dataclasses it fills: it knows nothing of config.py's
sections, which build RunConfig from what it reads (config.load_config).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any, Union

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from untrainable.errors import ConfigError


def _check_type(where: str, value: Any, hint: Any) -> Any:
    """Coerce a parsed value to a field's type hint, or raise ConfigError."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(where, value, option)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return from_dict(hint, value, where)
    if hint is Any:
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)[:1] or (Any,)
        return [_check_type(f"{where}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table of values, got {value!r}")
        return dict(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass `cls` from nested dicts; unknown keys name the valid ones."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or cls.__name__}: expected a table, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {unknown}; valid keys: {', '.join(fields)}")
    missing = [
        name
        for name, f in fields.items()
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(f"{where or 'config'}: missing required key(s) {missing}")
    kwargs = {
        name: _check_type(f"{where}.{name}" if where else name, value, hints[name]) for name, value in data.items()
    }
    # Sections validate as part of RunConfig (in its __post_init__), where each field's path is known.
    return cls(**kwargs)


def read_table(path: str | Path, overrides: dict[str, Any] | None = None, overrides_label: str = "override") -> Any:
    """The table of sections in a .toml or .json config file, with dotted-key overrides set (an error names the key)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    if path.suffix not in (".json", ".toml"):
        raise ConfigError(f"config file {path}: use a .toml or .json file")
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"config file {path} is not valid {path.suffix[1:].upper()}: {err}; fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {path}: expected a table of sections (model, data, ...), got {type(data).__name__}"
        )
    for key, value in (overrides or {}).items():
        try:
            set_dotted(data, key, value)
        except ConfigError as err:
            raise ConfigError(f"{overrides_label} {key}: {err}") from None
    return data


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """data['a']['b'] = value for key 'a.b', creating tables on the way."""
    *parents, last = key.split(".")
    node = data
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{part!r} is not a table")
    node[last] = value


def save_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(json.dumps(config.to_dict(), indent=2) + "\n")


def config_differences(saved: dict[str, Any], config: Any, ignore: tuple[str, ...] = ()) -> list[str]:
    """Dotted keys whose values differ between a saved config.json and `config` (keys in `ignore` skipped).

    A key that the saved file lacks counts as its default: a field added
    since the run was made, left at its default, is no difference.
    """
    current = json.loads(json.dumps(config.to_dict()))

    def walk(a: Any, b: Any, path: str) -> list[str]:
        if path in ignore:
            return []
        if isinstance(a, dict) and isinstance(b, dict):
            found = []
            for key in sorted(set(a) | set(b)):
                where = f"{path}.{key}" if path else key
                # A field newer than the saved file: that run had its default.
                older = key not in a and key in b and _json_default(type(config), where) == b[key]
                found += [] if older else walk(a.get(key), b.get(key), where)
            return found
        return [] if a == b else [path]

    return walk(saved, current, "")


_NO_DEFAULT = object()


def _json_default(root: type, path: str) -> Any:
    """The default of a dotted field of `root` (`guidance.gram_dtype`) as config.json holds it; a marker if none."""
    cls: Any = root
    default: Any = _NO_DEFAULT
    for name in path.split("."):
        if not dataclasses.is_dataclass(cls):
            return _NO_DEFAULT
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if name not in fields:
            return _NO_DEFAULT
        f = fields[name]
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = _NO_DEFAULT
        hint = typing.get_type_hints(cls)[name]
        cls = next((t for t in (hint, *typing.get_args(hint)) if dataclasses.is_dataclass(t)), None)
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        default = dataclasses.asdict(default)
    return default if default is _NO_DEFAULT else json.loads(json.dumps(default))
