"""MNIST-1D (Greydanus 2020), generated offline by the `mnist1d` package, and kept once generated."""

from __future__ import annotations

import functools
import os
import uuid
from importlib.metadata import version

import numpy as np
import torch
from torch.utils.data import TensorDataset

from untrainable.data.registry import DataSplits, cache_dir, register_dataset

ARRAYS = {"x": (np.float32, 2), "y": (np.int64, 1), "x_test": (np.float32, 2), "y_test": (np.int64, 1)}


@register_dataset("mnist1d")
def mnist1d(num_samples: int = 5000, val_size: int = 500, train_size: int | None = None, seed: int = 42) -> DataSplits:
    """MNIST-1D: 10 classes of 40-sample 1-D signals; 80/20 train/test, validation carved from train.

    The `mnist1d` package generates the data from its templates (nothing is
    downloaded). `seed` seeds the generator (42 reproduces the package's
    standard set); the validation split is a seeded draw from the training part.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 10:
        raise ValueError(
            f"num_samples must be an integer >= 10 (the generator draws per class, 10 classes), got {num_samples!r}"
        )
    raw = _generated(num_samples, seed)
    x, y = raw["x"], raw["y"]
    order = np.random.default_rng(seed).permutation(len(x))
    if not 0 < val_size < len(x):
        raise ValueError(f"val_size must be in (0, {len(x)}), got {val_size}")
    val, train = order[:val_size], order[val_size:]
    if train_size is not None:
        if not 0 < train_size <= len(train):
            raise ValueError(f"train_size must be in (0, {len(train)}], got {train_size}")
        train = train[:train_size]

    def tensors(xs: np.ndarray, ys: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.tensor(xs), torch.tensor(ys))  # copies: the cached arrays stay untouched

    return DataSplits(
        train=tensors(x[train], y[train]),
        val=tensors(x[val], y[val]),
        test=tensors(raw["x_test"], raw["y_test"]),
        input_shape=(x.shape[1],),
        num_classes=10,
        meta={"seed": seed, "num_samples": num_samples},
    )


@functools.lru_cache(maxsize=4)
def _generated(num_samples: int, seed: int) -> dict[str, np.ndarray]:
    """The generator's arrays (x, y, x_test, y_test), read-only: from this process, the cache folder, or generated.

    Generating takes seconds (5,000 series: about 2 s); the arrays go to
    `cache_dir("mnist1d")` as .npz (data only, written atomically, checked in
    type and shape when read: a file that fails is generated again).
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise ImportError("MNIST-1D needs the mnist1d package: pip install mnist1d") from err
    path = cache_dir("mnist1d") / f"n{num_samples}-seed{seed}-mnist1d{version('mnist1d')}.npz"
    raw = _read(path, num_samples)
    if raw is None:
        args = get_dataset_args()
        args.num_samples, args.seed = num_samples, seed
        made = make_dataset(args)
        raw = {key: np.ascontiguousarray(made[key], dtype=kind) for key, (kind, _) in ARRAYS.items()}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}.npz")
            np.savez(tmp, x=raw["x"], y=raw["y"], x_test=raw["x_test"], y_test=raw["y_test"])
            os.replace(tmp, path)
        except OSError:  # a cache that cannot be written only costs the next process the generation
            pass
    for array in raw.values():
        array.flags.writeable = False  # shared by every data set built from it in this process
    return raw


def _read(path: os.PathLike[str], num_samples: int) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None where the file is missing or not what it should be."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            raw = {key: stored[key] for key in ARRAYS}
    except (OSError, ValueError, KeyError, EOFError):
        return None
    sound = all(raw[k].dtype == kind and raw[k].ndim == ndim for k, (kind, ndim) in ARRAYS.items())
    sound = sound and len(raw["x"]) == len(raw["y"]) and len(raw["x_test"]) == len(raw["y_test"])
    sound = sound and len(raw["x"]) + len(raw["x_test"]) == num_samples and raw["x"].shape[1:] == raw["x_test"].shape[1:]
    return raw if sound else None
