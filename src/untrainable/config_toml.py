"""Configs written as TOML files that `load_config` reads back to the same config (a tuned `best.toml`)."""

from __future__ import annotations

import json
import math
import re
import sys
from typing import Any, Sequence

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from untrainable.config import ConfigError, RunConfig, from_dict

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def to_toml(config: RunConfig, comments: Sequence[str] = ()) -> str:
    """The config as a TOML file that `load_config` reads back to the same config (checked), `comments` on top.

    Unset fields (None) are left out: each defaults to None. Raises
    ConfigError for a value TOML cannot hold (a None inside a model's args).
    """

    def key(name: str) -> str:
        return name if _BARE_KEY.fullmatch(name) else json.dumps(name)

    def value(v: Any, where: str) -> str:
        if v is None:
            raise ConfigError(f"{where}: TOML has no null; leave the key out of the file instead")
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v) if math.isfinite(v) else str(v)
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(value(x, f"{where}[{i}]") for i, x in enumerate(v)) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{key(k)} = {value(x, f'{where}.{k}')}" for k, x in v.items()) + " }"
        raise ConfigError(f"{where}: {v!r} cannot be written as TOML")

    def table(data: dict[str, Any], prefix: str, lines: list[str]) -> None:
        nested = []
        for name, v in data.items():
            where = f"{prefix}.{name}" if prefix else name
            if v is None:  # unset: its default (the round trip below checks it)
                continue
            if isinstance(v, dict) and name != "args" or (isinstance(v, list) and v and isinstance(v[0], dict)):
                nested.append((name, v))
            else:
                lines.append(f"{key(name)} = {value(v, where)}")
        for name, v in nested:
            where = f"{prefix}.{key(name)}" if prefix else key(name)
            for item in v if isinstance(v, list) else [v]:
                lines.append("")
                lines.append(f"[[{where}]]" if isinstance(v, list) else f"[{where}]")
                table(item, where, lines)

    lines = [f"# {line}" if line else "#" for line in comments]
    if lines:
        lines.append("")
    table(config.to_dict(), "", lines)
    text = "\n".join(lines) + "\n"
    again = from_dict(RunConfig, tomllib.loads(text))
    if json.dumps(again.to_dict(), sort_keys=True) != json.dumps(config.to_dict(), sort_keys=True):
        raise ConfigError(
            "the config does not survive a round trip through TOML; save it as JSON (config.json) instead"
        )
    return text
