"""The data-set registry and the splits every data builder returns."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import Tensor
from torch.utils.data import Dataset

from untrainable.registry import Registry


@dataclass
class DataSplits:
    """Train, validation and test sets of one task.

        `train_transform`, when set, is applied to each training batch of inputs
        (random augmentation written with torch ops); evaluation batches are not
        transformed. `extra_test` holds further held-out sets reported beside the test
    set (for example longer sequences). `input_shape` excludes the batch
    dimension; for token data it is `(max_len,)` and `num_classes` is the size of
    the output vocabulary. `meta` carries anything else a recipe needs
    (`vocab_size`, `pad_id`, ...). `prepare`, when set, turns every batch of
    inputs (training and evaluation, `(B, ...)`) into what the model takes, on
    the device the model runs on and before `train_transform`: a store's uint8
    pixels into normalised floats, so that loader workers move a quarter of the bytes.
    """

    train: Dataset
    val: Dataset
    test: Dataset
    input_shape: tuple[int, ...]
    num_classes: int
    train_transform: Callable[[Tensor], Tensor] | None = None
    prepare: Callable[[Tensor], Tensor] | None = None
    extra_test: dict[str, Dataset] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


DATASETS: Registry[DataSplits] = Registry("dataset")
register_dataset = DATASETS.register


def cache_dir(name: str) -> Path:
    """`$XDG_CACHE_HOME/untrainable/NAME`, or `~/.cache/untrainable/NAME`: what a data set keeps between processes."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(base) if os.path.isabs(base) else Path.home() / ".cache") / "untrainable" / name


def load_data(name: str, **kwargs: Any) -> DataSplits:
    """Build the registered data set `name` with its keyword arguments."""
    return DATASETS.create(name, **kwargs)


def list_datasets() -> list[str]:
    return DATASETS.names()


class Prepared(Dataset):
    """Items of `dataset` with `prepare` applied to each input (as a batch of one): for code that reads items."""

    def __init__(self, dataset: Dataset, prepare: Callable[[Tensor], Tensor] | None):
        self.dataset, self.prepare = dataset, prepare

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple:
        x, *rest = self.dataset[i]
        return (x if self.prepare is None else self.prepare(x[None])[0], *rest)
