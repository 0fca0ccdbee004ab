"""An image store (see `pack`) as a data set: decoded uint8 images read from memory-mapped shards.

Item i is uint8 (3, S, S); the data set's `prepare` (`Normalise`) turns a
batch of them, on the device the model runs on, into the very floats
`image_folder` gives for the same files when the store was packed at
S = image_size (the same decode, resize and crop, done once at pack time).
The splits are carved by the same seeded permutation and the training
augmentation is the same batch transform. A store packed larger than
image_size is resized to it on read (torch's antialiased bilinear on uint8).
A map-style data set: the trainer's sampler gives each rank its own indices
under torchrun or SLURM, and every DataLoader worker maps the shards itself
(nothing but their paths is pickled).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from untrainable.data.image_folder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    _channel_stats,
    carve,
    normalize,
    train_augment,
)
from untrainable.data.pack import FORMAT, MANIFEST, PLAN, VERSION, sha256_of
from untrainable.data.registry import DataSplits, register_dataset

VERIFY = ("size", "checksum")
REPACK = "pack it again into a new folder (untrainable pack IMAGE_FOLDER --out NEW --size S)"


class ImageStoreDataset(Dataset):
    """Images of a store's part: item i -> (uint8 tensor (3, image_size, image_size), int label).

    `Normalise` (the data set's `prepare`) turns a batch of them into what `image_folder` gives.

    `shards` are (path, count) of .npy files of uint8 (count, 3, S, S);
    `positions[i]` is item i's position in the part (all of them by default).
    """

    def __init__(
        self,
        shards: Sequence[tuple[str, int]],
        labels: Sequence[int],
        image_size: int,
        positions: Sequence[int] | np.ndarray | None = None,
    ):
        self.paths = [path for path, _ in shards]
        self.starts = np.cumsum([0] + [count for _, count in shards])
        self.labels = np.asarray(labels, dtype=np.int64)
        self.positions = np.arange(len(self.labels)) if positions is None else np.asarray(positions, dtype=np.int64)
        self.image_size = image_size
        self._maps: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": {}}  # a memory map pickles as its whole content: each process maps anew

    def __len__(self) -> int:
        return len(self.positions)

    def _shard(self, k: int) -> np.ndarray:
        if k not in self._maps:
            self._maps[k] = np.load(self.paths[k], mmap_mode="r")
        return self._maps[k]

    def pixels(self, i: int) -> Tensor:
        """Item i's stored pixels, uint8 (3, S, S)."""
        j = int(self.positions[i])
        k = int(np.searchsorted(self.starts, j, side="right")) - 1
        return torch.from_numpy(np.array(self._shard(k)[j - self.starts[k]]))

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x = self.pixels(i)
        if x.shape[-1] != self.image_size:  # uint8 in, uint8 out (torch's antialiased bilinear)
            x = F.interpolate(x[None], size=(self.image_size,) * 2, mode="bilinear", antialias=True)[0]
        return x, int(self.labels[self.positions[i]])


class Normalise:
    """uint8 pixels (B, C, H, W) -> float32 (B, C, H, W): x / 255, then (x - mean[c]) / std[c], as `image_folder` does.

    A data set's `prepare`: it runs where the model runs, so loader workers move uint8, a quarter of the bytes.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, x: Tensor) -> Tensor:
        return normalize(x.float().div_(255.0), self.mean, self.std)


def _damaged(root: Path, why: str) -> ValueError:
    return ValueError(f"data.args.root: the image store {root} is damaged: {why}; {REPACK}")


def read_manifest(root: Path) -> dict[str, Any]:
    """A store's store.json, its structure checked; a missing or damaged one refused in one line."""
    path = root / MANIFEST
    if not path.is_file():
        if (root / PLAN).is_file():
            raise ValueError(
                f"data.args.root: {root} holds an unfinished pack; run the same untrainable pack command to finish it"
            )
        raise ValueError(
            f"data.args.root: {root} is not an image store (no {MANIFEST}); make one with "
            f"untrainable pack IMAGE_FOLDER --out {root} --size 256"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise _damaged(root, f"{MANIFEST} is not readable JSON ({' '.join(str(err).split())})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _damaged(root, f"{MANIFEST} is not an image store's manifest")
    if manifest.get("version") != VERSION:
        raise ValueError(
            f"data.args.root: the image store {root} is of version {manifest.get('version')}, "
            f"this untrainable reads version {VERSION}; {REPACK}"
        )
    try:
        size, classes, parts = int(manifest["size"]), list(manifest["classes"]), dict(manifest["parts"])
        for name, part in parts.items():
            counts = [int(shard["count"]) for shard in part["shards"]]
            if sum(counts) != len(part["labels"]) or any(not 0 <= int(y) < len(classes) for y in part["labels"]):
                raise ValueError(f"part {name}: its shards' counts and its labels disagree")
    except (KeyError, TypeError, ValueError) as err:
        raise _damaged(root, f"{MANIFEST} lacks or misstates a field ({err})") from None
    if "train" not in parts or size < 1:
        raise _damaged(root, f"{MANIFEST} has no training part")
    return manifest


def check_shards(root: Path, manifest: dict[str, Any], verify: str) -> None:
    """Refuse, in one line, a shard that is missing, of another length or shape, or (with "checksum") altered."""
    size = manifest["size"]
    for part in manifest["parts"].values():
        for shard in part["shards"]:
            path = root / shard["file"]
            if not path.is_file():
                raise _damaged(root, f"shard {shard['file']} is missing")
            if path.stat().st_size != shard["bytes"]:
                raise _damaged(
                    root, f"shard {shard['file']} has {path.stat().st_size} bytes, expected {shard['bytes']}"
                )
            try:
                array = np.load(path, mmap_mode="r")
            except (OSError, ValueError) as err:
                raise _damaged(root, f"shard {shard['file']} is not readable ({' '.join(str(err).split())})") from None
            expected = (shard["count"], 3, size, size)
            if array.dtype != np.uint8 or array.shape != expected:
                raise _damaged(
                    root, f"shard {shard['file']} holds {array.dtype} {array.shape}, expected uint8 {expected}"
                )
            if verify == "checksum" and sha256_of(path) != shard["sha256"]:
                raise _damaged(root, f"shard {shard['file']} does not match its SHA-256 checksum")


@register_dataset("image_store")
def image_store(
    root: str,
    image_size: int = 224,
    val_fraction: float = 0.1,
    seed: int = 0,
    augment: bool = True,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    verify: str = "size",
) -> DataSplits:
    """A store written by `untrainable pack`: the splits, crops and augmentation of `image_folder`, without decoding.

    The store's val/ and test/ parts (packed from the folder's val/ and test/
    trees) are used as `image_folder` uses those trees; a seeded
    `val_fraction` of the training part makes up for each one missing.
    `verify`: "size" (every shard's length, shape and type, at once) or
    "checksum" (also every shard's SHA-256, which reads the whole store).
    """
    if verify not in VERIFY:
        raise ValueError(f"data.args.verify is {verify!r}; expected one of {', '.join(map(repr, VERIFY))}")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if not str(root).strip():
        raise ValueError("data.args.root is empty; set it to a folder written by untrainable pack")
    mean_c = _channel_stats(mean, IMAGENET_MEAN, "mean")
    std_c = _channel_stats(std, IMAGENET_STD, "std")
    if min(std_c) <= 0:
        raise ValueError(f"std must be positive, got {std!r}")
    store = Path(root)
    manifest = read_manifest(store)
    if manifest["size"] < image_size:
        raise ValueError(
            f"data.args.image_size {image_size} is larger than the image store {store}'s size {manifest['size']}; "
            f"pack it again with --size {image_size} or more, or set data.args.image_size <= {manifest['size']}"
        )
    check_shards(store, manifest, verify)
    parts = manifest["parts"]

    def dataset(name: str, positions: Sequence[int] | np.ndarray | None = None) -> ImageStoreDataset:
        shards = [(os.fspath(store / shard["file"]), shard["count"]) for shard in parts[name]["shards"]]
        return ImageStoreDataset(shards, parts[name]["labels"], image_size, positions)

    labels, classes = parts["train"]["labels"], manifest["classes"]
    present = [classes[i] for i in sorted(set(labels))]
    if len(present) < 2:
        raise ValueError(
            f"the image store {store} holds images of {len(present)} class(es) ({', '.join(present) or 'none'}); "
            "classification needs at least 2 classes"
        )
    held_out = [val_fraction] * (("val" not in parts) + ("test" not in parts))
    carved = [dataset("train", part) for part in (carve(len(labels), held_out, seed) if held_out else [None])]
    val = dataset("val") if "val" in parts else carved.pop(0)
    test = dataset("test") if "test" in parts else carved.pop(0)
    return DataSplits(
        train=carved.pop(0),
        val=val,
        test=test,
        input_shape=(3, image_size, image_size),
        num_classes=len(classes),
        train_transform=train_augment if augment else None,
        prepare=Normalise(mean_c, std_c),
        meta={"classes": classes, "mean": mean_c, "std": std_c, "root": str(store), "source": manifest["source"]},
    )
