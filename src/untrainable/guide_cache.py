"""The frozen guide's activations kept per training example, so its forward can be skipped.

The guide is frozen, so on data without random augmentation it gives the
same activations for an example every time it sees it: after the first epoch
its forward is wasted work. `GuideCache` keeps those activations by example
index (in memory, or in memory-mapped `.npy` files), and `IndexedDataset`
hands the trainer each example's index.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from untrainable.sequence import pad_time

STORAGES = ("memory", "disk")


class IndexedDataset(Dataset):
    """The items of `dataset` with their index appended: `(x, y, index)`."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Any, ...]:
        item = self.dataset[index]
        return (*item, index) if isinstance(item, (tuple, list)) else (item, index)


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    # NumPy has no bfloat16: such activations are stored as float32 on disk.
    return np.dtype(np.float16) if dtype == torch.float16 else np.dtype(np.float32)


class GuideCache:
    """Guide activations by layer for `size` examples, filled the first time each is seen.

        cache = GuideCache(len(train_set), "memory")
        acts = cache.activations(index, x, guidance.run_guide)  # the guide runs on unseen examples only
        out = guidance(x, guide_activations=acts)

    Valid only when the guide sees an example identically every time: no
    random augmentation of the inputs and `guide_input = "same"`. The trainer
    enforces both.

    Args:
        size: number of examples (indices run over 0..size-1).
        storage: `memory` (CPU tensors, in the activations' dtype) or `disk`
            (memory-mapped `.npy` files in `folder`, float32 or float16;
            the page cache keeps what fits in RAM).
        folder: where the disk cache lives. An existing cache there is reused
            when it describes the same layers (a resumed run); otherwise it
            is replaced.
    """

    def __init__(self, size: int, storage: str = "memory", folder: str | Path | None = None) -> None:
        if storage not in STORAGES:
            raise ValueError(f"guide cache storage {storage!r} is not one of {', '.join(STORAGES)}")
        if storage == "disk" and folder is None:
            raise ValueError("a disk guide cache needs a folder")
        self.size = size
        self.storage = storage
        self.folder = Path(folder) if folder is not None else None
        self.layers: dict[str, Any] = {}
        self.filled: Any = None
        self.hits = 0  # examples served from the cache
        self.misses = 0  # examples the guide had to run on

    def activations(
        self, index: Tensor, x: Tensor, run_guide: Callable[[Tensor], dict[str, Tensor]]
    ) -> dict[str, Tensor]:
        """The guide's activations on the batch x of examples `index`, running the guide only on unseen ones.

        The guide runs in eval mode, where each example's activations do not
        depend on the rest of the batch, so running it on the unseen rows
        alone gives the same values.
        """

        def guide_on(rows: Tensor) -> dict[str, Tensor]:
            # A packed RNN's output stops at the batch's longest row: pad
            # sequences to the input's length so every batch stores alike.
            acts = run_guide(rows)
            if rows.dim() == 2:
                acts = {name: pad_time(act, rows.shape[1]) if act.dim() == 3 else act for name, act in acts.items()}
            return acts

        if self.filled is None:
            self._open_existing()
        if self.filled is None:
            acts = guide_on(x)
            self.store(index, acts)
            self.misses += int(index.numel())
            return acts
        found = self._filled(index)
        if not bool(found.all()):
            missing = ~found
            self.store(index[missing], guide_on(x[missing.to(x.device)]))
        self.misses += int((~found).sum())
        self.hits += int(found.sum())
        return self._read(index, x.device)

    def _filled(self, index: Tensor) -> Tensor:
        if self.storage == "memory":
            return self.filled[index.cpu()]
        return torch.from_numpy(np.asarray(self.filled[index.cpu().numpy()]))

    def _read(self, index: Tensor, device: torch.device | str) -> dict[str, Tensor]:
        if self.storage == "memory":
            rows = index.cpu()
            return {name: store[rows].to(device, non_blocking=True) for name, store in self.layers.items()}
        rows = index.cpu().numpy()
        return {
            name: torch.from_numpy(np.ascontiguousarray(store[rows])).to(device) for name, store in self.layers.items()
        }

    def store(self, index: Tensor, activations: dict[str, Tensor]) -> None:
        """Keep the activations (batch, ...) of the examples `index` (batch,)."""
        if self.filled is None:
            self._allocate(activations)
        if self.storage == "memory":
            rows = index.cpu()
            for name, act in activations.items():
                self.layers[name][rows] = act.detach().to("cpu", self.layers[name].dtype)
            self.filled[rows] = True
            return
        rows = index.cpu().numpy()
        for name, act in activations.items():
            store = self.layers[name]
            store[rows] = act.detach().float().cpu().numpy().astype(store.dtype, copy=False)
        # Rows first, then the flags: a process killed in between leaves the
        # rows marked missing, never garbage marked filled.
        self.filled[rows] = True

    def nbytes(self) -> int:
        """Bytes the stored activations take (allocated size)."""
        return sum(int(store.nbytes) for store in self.layers.values())

    def _allocate(self, activations: dict[str, Tensor]) -> None:
        if self.storage == "memory":
            self.layers = {
                name: torch.empty((self.size, *act.shape[1:]), dtype=act.dtype) for name, act in activations.items()
            }
            self.filled = torch.zeros(self.size, dtype=torch.bool)
            return
        assert self.folder is not None
        if self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True)
        manifest = []
        for i, (name, act) in enumerate(activations.items()):
            shape = (self.size, *act.shape[1:])
            dtype = _numpy_dtype(act.dtype)
            self.layers[name] = np.lib.format.open_memmap(
                self.folder / f"layer{i:03d}.npy", mode="w+", dtype=dtype, shape=shape
            )
            manifest.append({"name": name, "file": f"layer{i:03d}.npy", "shape": list(shape), "dtype": dtype.str})
        self.filled = np.lib.format.open_memmap(
            self.folder / "filled.npy", mode="w+", dtype=np.bool_, shape=(self.size,)
        )
        _write_atomic(self.folder / "manifest.json", json.dumps({"size": self.size, "layers": manifest}, indent=1))

    def _open_existing(self) -> None:
        """Reopen a disk cache written by an earlier (interrupted) process of the same run.

        One of another size is replaced without a word; a damaged one (a torn
        manifest.json, files that do not match it) is named in a warning and rebuilt.
        """
        if self.storage != "disk" or self.folder is None or not (self.folder / "manifest.json").exists():
            return
        path = self.folder / "manifest.json"
        try:
            opened = _open_stores(self.folder, path, self.size)
        except ValueError as err:
            warnings.warn(f"the guide cache {path} is damaged: {err}; rebuilding it", stacklevel=3)
            return
        if opened is not None:
            self.layers, self.filled = opened


def _write_atomic(path: Path, text: str) -> None:
    """Write `text` to a temporary file beside `path`, fsync, then rename: a reader never sees half of it."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temporary, "w") as f:
        f.write(text + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def _manifest_problem(manifest: Any) -> str | None:
    """What is wrong with the structure of a disk cache's manifest.json, or None where it is sound."""
    if not isinstance(manifest, dict):
        return f"expected a JSON object, got {type(manifest).__name__}"
    size, layers = manifest.get("size"), manifest.get("layers")
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        return f"'size' is {size!r}, expected a number of examples >= 1"
    if not isinstance(layers, list) or not layers:
        return f"'layers' is {str(layers)[:40]}, expected a list of layers"
    for i, entry in enumerate(layers):
        if not isinstance(entry, dict) or set(entry) != {"name", "file", "shape", "dtype"}:
            return f"layers[{i}] is not an object of name, file, shape and dtype"
        if not isinstance(entry["name"], str) or not isinstance(entry["dtype"], str):
            return f"layers[{i}]: name and dtype must be text"
        if entry["file"] != f"layer{i:03d}.npy":
            return f"layers[{i}].file is {str(entry['file'])[:40]!r}, expected 'layer{i:03d}.npy'"
        shape = entry["shape"]
        if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) for n in shape):
            return f"layers[{i}].shape is {str(shape)[:40]}, expected a list of sizes"
        if not shape or shape[0] != size:
            return f"layers[{i}].shape {shape} does not start with the cache's size {size}"
    return None


def _open_stores(folder: Path, path: Path, size: int) -> tuple[dict[str, Any], Any] | None:
    """(layers, filled) memory-mapped from a disk cache, None when it holds another number of examples.

    Raises ValueError saying what is damaged: the manifest, or a file that does not match it.
    """
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"not readable JSON ({err})") from None
    problem = _manifest_problem(manifest)
    if problem is not None:
        raise ValueError(problem)
    if manifest["size"] != size:
        return None
    expected = [(entry["file"], tuple(entry["shape"]), entry["dtype"]) for entry in manifest["layers"]]
    stores = []
    for name, shape, dtype in [*expected, ("filled.npy", (size,), np.dtype(np.bool_).str)]:
        try:
            store = np.load(folder / name, mmap_mode="r+")
        except (OSError, ValueError) as err:
            raise ValueError(f"{name} does not load ({err})") from None
        if store.shape != shape or store.dtype.str != dtype:
            raise ValueError(f"{name} holds {store.dtype.str} {store.shape}, expected {dtype} {shape}")
        stores.append(store)
    return {entry["name"]: store for entry, store in zip(manifest["layers"], stores)}, stores[-1]
