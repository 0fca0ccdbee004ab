"""What the subcommands' flags share: values given on the command line, --set, --out, and the SLURM flags."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def parse_value(text: str) -> Any:
    """A command-line value as JSON when it parses (numbers, booleans, lists), else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def json_args(text: str, flag: str) -> dict[str, Any]:
    """The keyword arguments given to `flag` as a JSON object, refused with a ConfigError naming the flag."""
    from untrainable.config import ConfigError

    example = f"""e.g. {flag} '{{"depth": 2, "width": 64}}'"""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(
            f"{flag}: not valid JSON ({err.msg} at column {err.colno}); give a JSON object, {example}"
        ) from None
    if not isinstance(value, dict):
        raise ConfigError(f"{flag}: expected a JSON object of keyword arguments, got {text!r}; {example}")
    return value


def out_folder(text: str | None, default: Path | None = None, flag: str = "--out") -> Path | None:
    """The folder `flag` names, refused in one line when empty or an existing file; `default` when not given."""
    from untrainable.config import ConfigError

    if text is None:
        return default
    if not text.strip():
        raise ConfigError(f"{flag} is empty; give a folder, e.g. {flag} runs/one (or drop {flag} for the default)")
    path = Path(text).expanduser()
    file = next((p for p in (path, *path.parents) if p.exists()), None)
    if file is not None and not file.is_dir():
        raise ConfigError(f"{flag} {text}: {file} is a file, not a folder; give {flag} a folder")
    return path


def cluster_settings(args: argparse.Namespace) -> Any:
    """The SLURM settings of `run` or `tune` `--executor slurm` (file, then flags over it), None for local runs."""
    from untrainable.cluster import FLAGS, load_cluster, require_slurm
    from untrainable.config import ConfigError

    flags = {name: getattr(args, name) for name in FLAGS}
    if args.executor == "local":
        given = [f"--{name.replace('_', '-')}" for name, value in flags.items() if value is not None]
        given += ["--cluster"] * (args.cluster is not None) + ["--detach"] * args.detach
        if given:
            raise ConfigError(f"{', '.join(given)}: only with --executor slurm (the local executor runs here)")
        return None
    if getattr(args, "jobs", 1) != 1:
        raise ConfigError("--jobs: only with --executor local; on SLURM, slurm.array_parallelism limits runs at once")
    settings = load_cluster(args.cluster, flags)
    require_slurm()
    return settings


def set_overrides(items: list[str] | None) -> dict[str, Any]:
    """The `--set KEY=VALUE` overrides as {dotted key: value}."""
    from untrainable.config import ConfigError

    overrides = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, e.g. --set train.epochs=5; got {item!r}")
        overrides[key] = parse_value(value)
    return overrides


def add_cluster_flags(p: argparse.ArgumentParser) -> None:
    """The flags that send a study's runs (`run`) or tuning workers (`tune`) to SLURM, each over the --cluster file."""
    p.add_argument(
        "--executor", choices=("local", "slurm"), default="local", help="where runs train: here, or as SLURM jobs"
    )
    p.add_argument("--cluster", metavar="FILE", help="SLURM settings: a TOML file with a [slurm] table")
    p.add_argument("--detach", action="store_true", help="SLURM: submit and return; the same command later collects")
    for name, kind, text in (
        ("partition", str, "SLURM partition"),
        ("account", str, "SLURM account"),
        ("qos", str, "SLURM quality of service"),
        ("time", str, "time limit per job, minutes or HH:MM:SS"),
        ("gpus_per_run", int, "GPUs per run (one task each)"),
        ("cpus_per_run", int, "CPUs per task"),
        ("array_parallelism", int, "array tasks running at once"),
        ("max_requeues", int, "requeues after a time limit"),
        ("stuck_after_s", int, "seconds a job may pend for a reason that cannot pass (PartitionConfig); 0: wait"),
    ):
        p.add_argument(f"--{name.replace('_', '-')}", type=kind, help=f"{text} (over --cluster)")

