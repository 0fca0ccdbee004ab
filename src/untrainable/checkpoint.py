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
    return _write_atomic(Path(path), _MAGIC + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)


def save_safetensors(weights: dict[str, torch.Tensor], path: str | Path, config: dict[str, Any] | None = None) -> Path:
    """Write a state dict's tensors to a `.safetensors` file atomically, the run's config in its metadata.

    Tensors are copied to the CPU (tied weights become two copies: the format
    stores no shared storage); entries that are not tensors are left out.
    """
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in weights.items() if isinstance(v, torch.Tensor)}
    metadata = {"format": "pt"} | ({_CONFIG_KEY: json.dumps(config)} if config is not None else {})
    return _write_atomic(Path(path), safetensors.torch.save(tensors, metadata=metadata))


def _write_atomic(path: Path, data: bytes) -> Path:
    """Write `data` to a temporary file beside `path`, fsync, then rename: a reader never sees half a file."""
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
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path} holds objects other than weights and plain values; refused without loading it "
            "(only checkpoints written by untrainable, or plain state_dicts, are read)"
        ) from None


def read_weights(path: str | Path) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A model state dict and the config of the run that saved it (None if unknown).

    Reads a `.safetensors` file, a checkpoint of ours (its `model` entry), or
    a plain `torch.save`d state dict (weights and plain values only). Raises
    CheckpointError naming the file when it is none of these; nothing in a
    file can run code.
    """
    path = Path(path).expanduser()
    if path.suffix == ".safetensors":
        try:
            with safetensors.safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                state = {key: f.get_tensor(key) for key in f.keys()}
        except (safetensors.SafetensorError, OSError) as err:
            raise CheckpointError(f"{path} is not a readable .safetensors file: {' '.join(str(err).split())}") from None
        config = json.loads(metadata[_CONFIG_KEY]) if _CONFIG_KEY in metadata else None
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
    except (RuntimeError, EOFError) as err:
        raise CheckpointError(f"{path} is not a weights file ({' '.join(str(err).split())[:200]})") from None
    return (state.get("model", state) if isinstance(state, dict) else state), None


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
                return load_checkpoint(path, map_location), path
            except CheckpointError as err:
                errors.append(str(err))
                warnings.warn(f"skipping checkpoint: {err}; falling back to the previous one", stacklevel=2)
                if quarantine:
                    os.replace(path, path.with_name(path.name + ".corrupt"))
        if errors:
            raise CheckpointError("no checkpoint in " + str(self.folder) + " loads: " + "; ".join(errors))
        return None
