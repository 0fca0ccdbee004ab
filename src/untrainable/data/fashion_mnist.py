"""Fashion-MNIST (Xiao et al. 2017) read from its IDX files, with a seeded validation split."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from untrainable.data.registry import DataSplits, register_dataset

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"
ROOT_ENV = "UNTRAINABLE_FASHION_MNIST"
FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip

# IDX type byte -> big-endian numpy dtype ("THE IDX FILE FORMAT", LeCun et al.'s MNIST page).
IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
GZIP_MAGIC = b"\x1f\x8b"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parse an IDX file (gzipped or not) into an array of its declared shape and type.

    Header: two zero bytes, a type byte, the number of dimensions, then each
    dimension as a big-endian uint32; the data follow, big-endian. Returns the
    array in native byte order. Raises ValueError on a bad header or a file
    whose size does not match its header.
    """
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == GZIP_MAGIC:  # detect by content, not by name
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as error:
            raise ValueError(f"{path}: corrupt gzip stream ({error})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (magic number must start with two zero bytes)")
    type_code, ndim = raw[2], raw[3]
    if type_code not in IDX_DTYPES:
        raise ValueError(
            f"{path}: unknown IDX type code 0x{type_code:02x}; known: "
            + ", ".join(f"0x{code:02x}" for code in IDX_DTYPES)
        )
    header_size = 4 + 4 * ndim
    if len(raw) < header_size:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, {ndim} dimensions declared)")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[type_code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header_size != expected:
        raise ValueError(
            f"{path}: truncated or padded IDX data: {len(raw) - header_size} bytes, "
            f"header says {shape} of {dtype} = {expected} bytes"
        )
    data = np.frombuffer(raw, dtype, offset=header_size).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def _resolve_root(root: str | None) -> Path:
    return Path(root or os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


def _check_files(root: Path) -> None:
    missing = [name for name in FILES.values() if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"Fashion-MNIST files missing in {root}: {', '.join(missing)}.\n"
            "Install them with `apt-get install dataset-fashion-mnist` "
            f"(puts them in {DEFAULT_ROOT}),\n"
            f"or place {', '.join(FILES.values())} in a directory and pass it as `root`\n"
            f"or set the environment variable {ROOT_ENV} to it."
        )


def _read_pair(root: Path, images: str, labels: str) -> tuple[np.ndarray, np.ndarray]:
    x, y = read_idx(root / FILES[images]), read_idx(root / FILES[labels])
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(
            f"{root}: {FILES[images]} {x.shape} and {FILES[labels]} {y.shape} must be (N, H, W) images and (N,) labels"
        )
    bad = np.flatnonzero((y < 0) | (y >= len(CLASSES)))
    if len(bad):
        raise ValueError(
            f"{root / FILES[labels]}: label {int(y[bad[0]])} at index {int(bad[0])} ({len(bad)} such) is not a class "
            f"index in [0, {len(CLASSES) - 1}]; replace the file with the data set's own"
        )
    return x, y


def place_on_canvas(images: np.ndarray, size: int, seed: int, indices: np.ndarray | None = None) -> np.ndarray:
    """(N, H, W) images each placed at a random but fixed position on a zero (N, size, size) canvas.

    The position of image i depends only on `seed` and i, so it is the same in
    every run and does not move with the train/validation split. With `indices`
    (K,), only those images are placed: (K, size, size), each where it would be
    among all N.
    """
    n, h, w = images.shape
    if size < max(h, w):
        raise ValueError(f"canvas must be at least the images' size {max(h, w)}, got {size}")
    rng = np.random.default_rng(seed)
    rows, cols = rng.integers(0, size - h + 1, n), rng.integers(0, size - w + 1, n)
    if indices is not None:
        images, rows, cols = images[indices], rows[indices], cols[indices]
    canvas = np.zeros((len(images), size, size), dtype=images.dtype)
    # Every image's (h, w) window at once: canvas[k, rows[k] + i, cols[k] + j] = images[k, i, j].
    k = np.arange(len(images))[:, None, None]
    canvas[k, rows[:, None, None] + np.arange(h)[None, :, None], cols[:, None, None] + np.arange(w)[None, None, :]] = (
        images
    )
    return canvas


def split_indices(n: int, val_size: int, train_size: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (train, val) index arrays into range(n) from one seeded permutation.

    Validation takes the first `val_size` of the permutation, so it does not
    change with `train_size`; training takes `train_size` (or all) of the rest.
    """
    if not 0 <= val_size < n:
        raise ValueError(f"val_size must be in [0, {n}) ({n} training images), got {val_size}")
    rest = n - val_size
    if train_size is not None and not 1 <= train_size <= rest:
        raise ValueError(f"train_size must be in [1, {rest}] (after {val_size} validation images), got {train_size}")
    order = np.random.default_rng(seed).permutation(n)
    val, train = order[:val_size], order[val_size:]
    return (train if train_size is None else train[:train_size]), val


@register_dataset("fashion_mnist")
def fashion_mnist(
    root: str | None = None,
    train_size: int | None = None,
    val_size: int = 5000,
    seed: int = 0,
    normalize: bool = True,
    canvas: int = 28,
) -> DataSplits:
    """Fashion-MNIST 28x28 grey images, 10 classes; validation carved from the training set.

    `canvas` > 28 places each image at a random but fixed position on a black
    canvas x canvas image (positions seeded by `seed`, the test set's apart):
    a task where a ConvNet's translation prior matters and an FCN must learn
    every position from the training images.

    `root` defaults to $UNTRAINABLE_FASHION_MNIST, then /usr/share/datasets/fashion-mnist
    (Debian package dataset-fashion-mnist). Images are float32 (N, 1, 28, 28) in [0, 1],
    standardised with the mean and std of the training split when `normalize`;
    labels are int64. The 10k test images are only ever the test split.
    """
    root_path = _resolve_root(root)
    _check_files(root_path)
    train_x, train_y = _read_pair(root_path, "train_images", "train_labels")
    test_x, test_y = _read_pair(root_path, "test_images", "test_labels")
    train_idx, val_idx = split_indices(len(train_x), val_size, train_size, seed)
    shape = train_x.shape[1:]
    if canvas != shape[0] or canvas != shape[1]:
        # Only the images a split keeps are placed, each at its position among all 60,000.
        train_part = place_on_canvas(train_x, canvas, seed, train_idx)
        val_part = place_on_canvas(train_x, canvas, seed, val_idx)
        test_x = place_on_canvas(test_x, canvas, seed + 1)
        shape = (canvas, canvas)
    else:
        train_part, val_part = train_x[train_idx], train_x[val_idx]

    def images(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(x.astype(np.float32) / 255.0).unsqueeze(1)

    splits = {
        "train": (images(train_part), train_y[train_idx]),
        "val": (images(val_part), train_y[val_idx]),
        "test": (images(test_x), test_y),
    }
    meta: dict = {"classes": list(CLASSES), "root": str(root_path), "canvas": canvas}
    if normalize:
        # Statistics of the training split only, so nothing leaks from val/test.
        mean, std = splits["train"][0].mean().item(), splits["train"][0].std().item()
        std = std if std > 0 else 1.0  # constant images (toy data only) have no scale to remove
        splits = {k: ((x - mean) / std, y) for k, (x, y) in splits.items()}
        meta.update(mean=mean, std=std)
    datasets = {k: TensorDataset(x, torch.from_numpy(y.astype(np.int64))) for k, (x, y) in splits.items()}
    return DataSplits(
        train=datasets["train"],
        val=datasets["val"],
        test=datasets["test"],
        input_shape=(1, *shape),
        num_classes=len(CLASSES),
        meta=meta,
    )
