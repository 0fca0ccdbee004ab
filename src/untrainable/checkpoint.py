"""Checkpoints written atomically, checked on load, the last few kept; final weights also as safetensors."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from untrainable import distributed

_MAGIC = b"UNTRAINABLE-CKPT-1\n"
_DIGEST = 64  # hex characters of a sha256
_CONFIG_KEY = "untrainable_config"  # the run's config, as JSON, in a .safetensors file's metadata


class CheckpointError(RuntimeError):
    """A checkpoint file is truncated, corrupted, or not a checkpoint."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write `state` to `path` atomically: a temporary file, fsync, then rename.

    The file holds a header and a sha256 of the payload, so a truncated or
    altered file is detected on load instead of half-loaded.
    """
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    return write_atomic(Path(path), _MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)


def save_safetensors(weights: dict[str, torch.Tensor], path: str | Path, config: dict[str, Any] | None = None) -> Path:
    """Write a state dict's tensors to a `.safetensors` file atomically, the run's config in its metadata.

    Tensors are copied to the CPU (tied weights become two copies: the format
    stores no shared storage); entries that are not tensors are left out.
    """
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in weights.items() if isinstance(v, torch.Tensor)}
    metadata = {"format": "pt"} | ({_CONFIG_KEY: json.dumps(config)} if config is not None else {})
    return write_atomic(Path(path), safetensors.torch.save(tensors, metadata=metadata))


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write `data` (text as UTF-8) to a temporary file beside `path`, fsync, then rename: a reader never sees half a file."""
    path = Path(path)
    data = data.encode() if isinstance(data, str) else data
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def temporary_files(path: Path) -> list[Path]:
    """The temporary files (`.NAME.tmp-PID`) that killed `save_checkpoint` writes to `path` left; NAME may be a glob."""
    return sorted(p for p in path.parent.glob(f".{path.name}.tmp-*") if p.name.rpartition("-")[2].isdigit())


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`, verifying its checksum."""
    path = Path(path)
    data = path.read_bytes()
    header = len(_MAGIC) + _DIGEST + 1
    if not data.startswith(_MAGIC) or len(data) < header:
        raise CheckpointError(f"{path} is not an untrainable checkpoint or its header is truncated")
    digest, payload = data[len(_MAGIC) : header - 1].decode(errors="replace"), data[header:]
    if hashlib.sha256(payload).hexdigest() != digest:
        raise CheckpointError(f"{path} is truncated or corrupted (checksum mismatch, {len(payload)} payload bytes)")
    try:  # weights and plain types only: a file that names any other object is refused before it can run
        state = torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path} holds objects other than weights and plain values; refused without loading it "
            "(only checkpoints written by untrainable, or plain state_dicts, are read)"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as err:
        raise CheckpointError(f"{path} has a checkpoint header but no readable payload ({_short(err)})") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        got = "a dict without a 'model' state_dict" if isinstance(state, dict) else f"a {type(state).__name__}"
        raise CheckpointError(
            f"{path} holds {got}, not an untrainable checkpoint; give a run's model.pt or a checkpoint"
        )
    _check_state_dict(state["model"], path, "'model'")
    _check_config(state.get("config"), path, "its 'config'")
    return state


_TRAINING_STATE: dict[str, type | tuple[type, ...]] = {
    "model": dict,
    "optimizer": dict,
    "lr_schedule": dict,
    "scaler": dict,
    "step": int,
    "epoch": int,
    "batch": int,
    "history": list,
    "rng": (dict, list),
}
_OPTIONAL_STATE: dict[str, type | tuple[type, ...]] = {"best": (dict, type(None)), "seconds": (int, float), "config": (dict, type(None))}


def check_training_state(state: dict[str, Any], path: Path) -> dict[str, Any]:
    """`state` (as `load_checkpoint` gives it) when it holds what resuming a run needs, else CheckpointError naming `path`."""
    problems = [f"no {key!r}" for key in _TRAINING_STATE if key not in state]
    for key, kind in (_TRAINING_STATE | _OPTIONAL_STATE).items():
        value = state.get(key)
        if key in state and (not isinstance(value, kind) or isinstance(value, bool)):
            expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            problems.append(f"{key!r} is a {type(value).__name__}, not {expected}")
    if problems:
        raise CheckpointError(
            f"{path} is not a training checkpoint ({'; '.join(problems[:4])}); it cannot resume a run"
        )
    return state


def _check_state_dict(state: Any, path: Path, what: str) -> None:
    """Refuse a state dict whose keys are not names or whose values are not tensors (bar a module's extra state)."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: {what} is a {type(state).__name__}, not a state_dict of tensors")
    for key, value in state.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: {what} has a key {key!r} that is not a parameter name")
        if not isinstance(value, torch.Tensor) and not key.endswith("_extra_state"):
            raise CheckpointError(f"{path}: {what} entry {key!r} is a {type(value).__name__}, not a tensor")


def _check_config(config: Any, path: Path, what: str) -> None:
    """Refuse a stored run config that is not a table whose `model` is a table naming a model."""
    if config is None:
        return
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict) or not isinstance(model.get("name", ""), str):
        raise CheckpointError(
            f"{path}: {what} is not a run's config (expected a JSON object with a 'model' table, "
            f"got {_short(config, 80)}); the file was not written by untrainable"
        )


def _short(value: Any, limit: int = 200) -> str:
    return " ".join(str(value).split())[:limit]


def read_weights(path: str | Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A model state dict and the config of the run that saved it (None if unknown).

    Reads a `.safetensors` file, a checkpoint of ours (its `model` entry), or
    a plain `torch.save`d state dict (weights and plain values only). Raises
    CheckpointError naming the file when it is none of these; nothing in a
    file can run code.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder, not a weights file")
    if path.suffix == ".safetensors":
        try:
            with safetensors.safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                state = {key: f.get_tensor(key) for key in f.keys()}
        except (safetensors.SafetensorError, OSError) as err:
            raise CheckpointError(f"{path} is not a readable .safetensors file: {' '.join(str(err).split())}") from None
        config = None
        if _CONFIG_KEY in metadata:
            try:
                config = json.loads(metadata[_CONFIG_KEY])
            except json.JSONDecodeError as err:
                raise CheckpointError(f"{path}: its metadata {_CONFIG_KEY!r} is not valid JSON ({err.msg})") from None
            _check_config(config, path, f"its metadata {_CONFIG_KEY!r}")
        return state, config
    with open(path, "rb") as f:
        ours = f.read(len(_MAGIC)) == _MAGIC
    if ours:
        saved = load_checkpoint(path)
        return saved["model"], saved.get("config")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path} holds objects other than weights and plain values; refused without loading it "
            "(give a run's model.pt or model.safetensors, or a plain state_dict)"
        ) from None
    except (RuntimeError, EOFError, ValueError) as err:
        raise CheckpointError(f"{path} is not a weights file ({_short(err)})") from None
    state = state.get("model", state) if isinstance(state, dict) else state
    _check_state_dict(state, path, "the state_dict")
    return state, None


def load_weights(path: str | Path) -> dict[str, Any]:
    """A model state dict from any file `read_weights` reads."""
    return read_weights(path)[0]


class CheckpointManager:
    """Numbered checkpoints in one folder, keeping the newest `keep`."""

    def __init__(self, folder: str | Path, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.folder = Path(folder)
        self.keep = keep

    def paths(self) -> list[Path]:
        """Checkpoint files, oldest first."""
        return sorted(self.folder.glob("step-*.pt"))

    def set_aside(self) -> list[Path]:
        """Checkpoints renamed `*.corrupt` by an earlier load: their presence means the run did start."""
        return sorted(self.folder.glob("step-*.pt.corrupt"))

    def remove_leftovers(self, *others: Path) -> list[Path]:
        """Delete temporary files left by a write that was killed before its rename.

        Those of the checkpoints, and of the files `others` written with
        `save_checkpoint` (a run's model.pt): only names `.NAME.tmp-PID`.
        """
        leftovers = temporary_files(self.folder / "step-*.pt") + [t for p in others for t in temporary_files(p)]
        for path in leftovers:
            path.unlink(missing_ok=True)
        return leftovers

    def save(self, state: dict[str, Any], step: int) -> Path:
        path = save_checkpoint(state, self.folder / f"step-{step:09d}.pt")
        for old in self.paths()[: -self.keep]:
            old.unlink()
        return path

    def load_latest(
        self, map_location: str | torch.device = "cpu", quarantine: bool = True
    ) -> tuple[dict[str, Any], Path] | None:
        """The newest checkpoint that loads, or None when the folder holds none.

        A truncated or corrupted newer one is reported, renamed to
        `*.corrupt` (kept for inspection, no longer counted among the kept
        checkpoints; only with `quarantine`, which one process of a
        distributed run does) and the previous good one is used.

        Raises:
            CheckpointError: checkpoints exist but none of them loads; the run
                must not silently start again from scratch.
        """
        paths = self.paths()
        errors = []
        for path in reversed(paths):
            try:
                return check_training_state(load_checkpoint(path, map_location), path), path
            except CheckpointError as err:
                errors.append(str(err))
                warnings.warn(f"skipping checkpoint: {err}; falling back to the previous one", stacklevel=2)
                if quarantine:
                    os.replace(path, path.with_name(path.name + ".corrupt"))
        if errors:
            raise CheckpointError("no checkpoint in " + str(self.folder) + " loads: " + "; ".join(errors))
        return None

    def load_latest_on_every_rank(
        self, dist_info: distributed.DistInfo, map_location: str | torch.device = "cpu"
    ) -> tuple[dict[str, Any], Path] | None:
        """`load_latest` in every process: rank 0 first sets aside corrupted files, then the others read what is left."""
        loaded = None
        if dist_info.rank == 0:
            loaded = self.load_latest(map_location=map_location)
        distributed.barrier(dist_info)
        if dist_info.rank != 0:
            loaded = self.load_latest(map_location=map_location, quarantine=False)
        return loaded
