"""MNIST-1D kept once generated: the same arrays as the generator's, a damaged cache file generated again."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from untrainable.data import load_data
from untrainable.data import mnist1d as module
from untrainable.data.registry import cache_dir


@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """An empty cache folder and an empty in-process cache."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    module._generated.cache_clear()
    yield tmp_path / "untrainable" / "mnist1d"
    module._generated.cache_clear()


def _generator(num_samples: int, seed: int) -> dict:
    """The oracle: the mnist1d package's own arrays."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, seed
    return make_dataset(args)


def _splits_equal(a, b) -> bool:
    return all(
        torch.equal(x, y) for name in ("train", "val", "test") for x, y in zip(getattr(a, name).tensors, getattr(b, name).tensors)
    )


def test_a_cached_data_set_is_the_generators_and_another_process_reads_it(fresh, monkeypatch):
    first = load_data("mnist1d", num_samples=200, val_size=20, seed=3)
    (path,) = fresh.glob("n200-seed3-*.npz")
    raw = _generator(200, 3)
    assert np.array_equal(first.test.tensors[0].numpy(), raw["x_test"].astype(np.float32))
    assert np.array_equal(first.test.tensors[1].numpy(), raw["y_test"].astype(np.int64))
    module._generated.cache_clear()  # as a new process: only the file is left
    monkeypatch.setattr("mnist1d.data.make_dataset", lambda args: pytest.fail("generated again"))
    assert _splits_equal(load_data("mnist1d", num_samples=200, val_size=20, seed=3), first)
    assert path.parent == cache_dir("mnist1d")


def test_a_data_set_built_from_the_cache_may_be_changed_without_changing_the_next(fresh):
    first = load_data("mnist1d", num_samples=200, val_size=20)
    first.test.tensors[0].zero_()
    again = load_data("mnist1d", num_samples=200, val_size=20)
    assert again.test.tensors[0].abs().sum() > 0


@pytest.mark.parametrize(
    "damage",
    [
        lambda path: path.write_bytes(b"not an npz file"),
        lambda path: np.savez(path, x=np.zeros((3, 40), np.float32)),  # keys missing
        lambda path: np.savez(path, x=np.zeros((3, 40)), y=np.zeros(3), x_test=np.zeros((1, 40)), y_test=np.zeros(1)),
    ],
    ids=["garbage", "keys-missing", "wrong-types-and-sizes"],
)
def test_a_damaged_cache_file_is_generated_again(fresh, damage):
    reference = load_data("mnist1d", num_samples=200, val_size=20)
    (path,) = fresh.glob("n200-*.npz")
    damage(path)
    module._generated.cache_clear()
    assert _splits_equal(load_data("mnist1d", num_samples=200, val_size=20), reference)
    assert module._read(path, 200) is not None  # written again, sound
