"""MNIST-1D (Greydanus 2020), generated offline by the `mnist1d` package."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import TensorDataset

from untrainable.data.registry import DataSplits, register_dataset


@register_dataset("mnist1d")
def mnist1d(num_samples: int = 5000, val_size: int = 500, train_size: int | None = None, seed: int = 42) -> DataSplits:
    """MNIST-1D: 10 classes of 40-sample 1-D signals; 80/20 train/test, validation carved from train.

    The `mnist1d` package generates the data from its templates (nothing is
    downloaded). `seed` seeds the generator (42 reproduces the package's
    standard set); the validation split is a seeded draw from the training part.
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise ImportError("MNIST-1D needs the mnist1d package: pip install mnist1d") from err
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 10:
        raise ValueError(
            f"num_samples must be an integer >= 10 (the generator draws per class, 10 classes), got {num_samples!r}"
        )
    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    raw = make_dataset(args)
    x, y = raw["x"].astype(np.float32), raw["y"].astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    if not 0 < val_size < len(x):
        raise ValueError(f"val_size must be in (0, {len(x)}), got {val_size}")
    val, train = order[:val_size], order[val_size:]
    if train_size is not None:
        if not 0 < train_size <= len(train):
            raise ValueError(f"train_size must be in (0, {len(train)}], got {train_size}")
        train = train[:train_size]

    def tensors(xs: np.ndarray, ys: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.from_numpy(xs), torch.from_numpy(ys))

    return DataSplits(
        train=tensors(x[train], y[train]),
        val=tensors(x[val], y[val]),
        test=tensors(raw["x_test"].astype(np.float32), raw["y_test"].astype(np.int64)),
        input_shape=(x.shape[1],),
        num_classes=10,
        meta={"seed": seed, "num_samples": num_samples},
    )
