"""Images in one sub-folder per class, loaded lazily with Pillow, plus batch augmentations in torch.

Expected layouts (class names are sub-folder names, sorted to give indices):

    root/<class>/<image>.png|jpg|jpeg                 one tree: val and test are carved from it
    root/train/<class>/...                             the same, when train/ is root's only folder
    root/train/<class>/...  root/val/<class>/...       ImageNet-style: val/ is the test set
    root/train/...  root/test/...                      test/ is the test set
    root/train/...  root/val/...  root/test/...        val/ validates, test/ tests

Hidden folders and files (`.ipynb_checkpoints`, `.DS_Store`) are ignored, and so are symlinks that lead back
into the tree (with a warning); an empty class folder is still a class, with a warning that names it. 16-bit greyscale PNGs are
scaled to 8 bits; images above Pillow's pixel limit count as unreadable (refused, or skipped with skip_bad).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import re
import struct
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from untrainable.data.image_index import ImageListing, default_cache_dir, scan_tree, verdicts
from untrainable.data.registry import DataSplits, register_dataset

# ImageNet channel statistics, the usual default for RGB photographs.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYOUT = (
    "expected one sub-folder per class with .png/.jpg/.jpeg images inside "
    "(root/<class>/<image>), or root/train/<class>/..., alone or beside root/val/ or root/test/"
)
SPLITS = ("train", "val", "test")
VERIFY = ("header", "decode", "none")
SIXTEEN_BIT_MAX = 65535
# What reading a damaged file can raise in Pillow's plugins and decoders (and this module's ValueErrors);
# anything else (an AssertionError, a MemoryError) is not the file's fault and is not caught.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError, ZeroDivisionError, struct.error)


def _listed(root: Path, classes: Sequence[str] | None) -> tuple[ImageListing, list[int], list[str]]:
    """A tree's listing, its labels as indices of `classes` (by default its sorted sub-folders), and the classes."""
    if not root.is_dir():
        if root.exists():
            raise NotADirectoryError(f"image folder {root} is a file, not a folder; {LAYOUT}")
        raise FileNotFoundError(f"image folder {root} does not exist; {LAYOUT}")
    listing = scan_tree(root)
    if classes is None:
        classes = listing.classes
        used = set(listing.labels)
        empty = [name for label, name in enumerate(classes) if label not in used]
        if empty and listing.files:
            warnings.warn(
                f"image folder {root}: class folder(s) {', '.join(empty)} hold no images; each is still a class "
                "(num_classes counts it, with no example); add its images or remove the folder",
                stacklevel=3,
            )
    else:
        unknown = sorted(set(listing.classes) - set(classes))
        if unknown:
            raise ValueError(f"{root} has classes not in the training set: {', '.join(unknown)}")
    index = {name: i for i, name in enumerate(classes)}
    if not listing.files:
        raise ValueError(f"no images found under {root}; {LAYOUT}")
    labels = [index[listing.classes[label]] for label in listing.labels]
    return listing, labels, list(classes)


def find_images(
    root: str | os.PathLike, classes: Sequence[str] | None = None
) -> tuple[list[Path], list[int], list[str]]:
    """List (paths, labels, classes) of a class-per-sub-folder tree.

    `classes` fixes the name -> index map (for a test tree that must follow the
    training tree's); by default it is the sorted sub-folder names.
    """
    root = Path(root)
    listing, labels, classes = _listed(root, classes)
    return [root / name for name in listing.files], labels, classes


def checked_folder(value: str | os.PathLike, field: str) -> Path:
    """`value` as the path of an existing folder, or a one-line error naming `field` (e.g. `data.args.root`)."""
    if not str(value).strip():
        # Path("") is ".", which would quietly scan whatever folder the command runs in.
        raise ValueError(f"{field} is empty; {LAYOUT}; set {field} to the folder that holds them")
    path = Path(value)
    relative = "" if path.is_absolute() else f" (relative to the current folder {Path.cwd()})"
    if not path.exists():
        raise FileNotFoundError(f"{field}: image folder {path}{relative} does not exist; {LAYOUT}; check the path")
    if not path.is_dir():
        raise NotADirectoryError(
            f"{field}: {path}{relative} is a file, not a folder; {LAYOUT}; set {field} to the folder that holds them"
        )
    return path


def _claimed_size(path: Path) -> tuple[int, int] | None:
    """(W, H) that a file's header claims, read without Pillow's pixel limit (Image.open refuses before telling)."""
    Image.init()
    try:
        with open(path, "rb") as fp:
            prefix = fp.read(16)
            for factory, accept in Image.OPEN.values():
                verdict = accept(prefix) if accept else True
                if verdict and not isinstance(verdict, str):
                    fp.seek(0)
                    return factory(fp, str(path)).size
    except Exception:  # only a detail for the message: any failure falls back to Pillow's pixel count
        return None
    return None


def _too_large(err: Exception, size: tuple[int, int] | None = None) -> str:
    """Why an image is refused, from Pillow's decompression-bomb error or warning and the claimed (W, H)."""
    if size is not None:
        claimed = f"{size[0]} x {size[1]} pixels"
    else:
        count = re.search(r"(\d+) pixels", str(err))
        claimed = f"{count.group(1)} pixels" if count else "too many pixels"
    return f"image too large: {claimed}, above Pillow's limit of {Image.MAX_IMAGE_PIXELS} pixels"


@contextlib.contextmanager
def open_image(path: str | os.PathLike) -> Iterator[Image.Image]:
    """Image.open, refusing images above Pillow's pixel limit (`PIL.Image.MAX_IMAGE_PIXELS`) with a ValueError.

    Pillow raises DecompressionBombError (not an OSError) above twice the
    limit and only warns above it; both would otherwise escape the scan, and a
    warned-about image is too slow and large to decode on every step anyway.
    """
    bomb = (Image.DecompressionBombError, Image.DecompressionBombWarning)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
    except bomb as err:
        raise ValueError(_too_large(err, _claimed_size(Path(path)))) from None
    with image:
        try:
            yield image
        except Image.DecompressionBombError as err:  # a frame larger than the header (GIF, MPO), met while decoding
            raise ValueError(_too_large(err)) from None


def eight_bit(image: Image.Image) -> Image.Image:
    """The image with 8-bit channels, ready for `convert`: 16-bit greyscale scaled by 255 / 65535.

    Pillow's own `convert` clips 16-bit values ("I;16", "I") at 255, which
    turns nearly every pixel white. "I" (32-bit) holds 16-bit data in files
    this module reads (older Pillow opens 16-bit PNGs so) and is refused
    outside 0..65535; float "F" has no agreed range and is refused. Other
    modes are returned as they are.
    """
    if image.mode == "F":
        raise ValueError("float images (mode F) are not supported; save them as 8- or 16-bit PNGs")
    if image.mode != "I" and not image.mode.startswith("I;16"):
        return image
    values = np.asarray(image)
    lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
    if lo < 0 or hi > SIXTEEN_BIT_MAX:
        raise ValueError(
            f"32-bit greyscale (mode I) values {lo}..{hi} are outside 0..{SIXTEEN_BIT_MAX}; save as 8- or 16-bit PNGs"
        )
    return Image.fromarray(np.round(values * (255 / SIXTEEN_BIT_MAX)).astype(np.uint8))


def unreadable_reason(path: Path, verify: str, image_size: int) -> str | None:
    """Why Pillow cannot read a file or this module cannot use it (too large, float), or None where it can.

    `verify="header"` opens the file and reads its header (format, size,
    mode), which catches non-images, cut headers and images too large;
    `"decode"` also decodes the pixels (JPEGs at reduced size, to keep it
    quick), which catches files cut or corrupted in their pixel data.
    """
    try:
        with open_image(path) as image:
            if verify == "decode":
                image.draft("RGB", (image_size, image_size))
                image.load()
                eight_bit(image)
            elif image.mode == "F":
                eight_bit(image)  # refuses float images, known from the header alone
    except DECODE_ERRORS as err:
        return _reason(err)
    return None


def _reason(err: BaseException) -> str:
    """A decoding error in one line: Pillow's own message where it is one of its kinds, else with the type."""
    message = " ".join(str(err).split())
    if isinstance(err, (OSError, SyntaxError, ValueError)) and message:
        return message
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def _drop_unreadable(
    paths: list[Path], labels: list[int], bad: dict[int, str], skip_bad: bool
) -> tuple[list[Path], list[int]]:
    """Refuse the unreadable files found at set-up by path, or skip them (with a count)."""
    if not bad:
        return paths, labels
    listed = "; ".join(f"{paths[i]} ({reason})" for i, reason in list(bad.items())[:5]) + (
        " ..." if len(bad) > 5 else ""
    )
    if not skip_bad:
        raise ValueError(
            f"{len(bad)} unreadable image(s): {listed}; fix, resize or remove them, or set data.args.skip_bad = true"
        )
    warnings.warn(f"skipping {len(bad)} unreadable image(s) of {len(paths)}: {listed}", stacklevel=3)
    kept = [i for i in range(len(paths)) if i not in bad]
    return [paths[i] for i in kept], [labels[i] for i in kept]


def load_image(path: str | os.PathLike, image_size: int, mode: str = "RGB", draft: bool = False) -> Tensor:
    """Read an image as float (C, S, S) in [0, 1]: shorter side resized to S, centre-cropped.

    16-bit greyscale is scaled to 8 bits first (see `eight_bit`). Any error while reading (a file cut in
    its pixel data, a corrupted one) is a one-line ValueError naming the file.
    `draft` lets a JPEG decode at 1/2, 1/4 or 1/8 scale where both sides stay
    >= S (`Image.draft`), so the resize still shrinks to S from the same
    extent of the picture: same shape and crop, the pixels a shade different
    from a full decode's where a scale applies.
    """
    try:
        array = decoded(path, image_size, mode, draft).astype(np.float32) / 255.0
    except DECODE_ERRORS as err:
        raise ValueError(
            f"{path}: cannot read this image ({_reason(err)}); fix or remove it, or set data.args.verify = "
            '"decode" to find such files at set-up (data.args.skip_bad = true then skips them)'
        ) from err
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def decoded(path: str | os.PathLike, image_size: int, mode: str = "RGB", draft: bool = False) -> np.ndarray:
    """The pixels `load_image` gives, as uint8 (S, S, C): shorter side resized to S, centre-cropped.

    Raises what Pillow raises on a damaged file (one of DECODE_ERRORS).
    """
    with open_image(path) as image:
        # Other formats ignore the draft; a JPEG's reduced image may cover a fraction of a pixel more.
        drafted = image.draft(image.mode, (image_size, image_size)) if draft else None
        extent = drafted[1] if drafted else None
        array = np.asarray(_resized_crop_image(eight_bit(image).convert(mode), image_size, extent))
    return array[:, :, None] if array.ndim == 2 else array  # single-channel modes come back as (S, S)


def _resized_crop(
    image: Image.Image, image_size: int, extent: tuple[float, float, float, float] | None = None
) -> np.ndarray:
    """Pixels as float (S, S) or (S, S, C) in [0, 1]: shorter side resized to S, centre-cropped."""
    return np.asarray(_resized_crop_image(image, image_size, extent), dtype=np.float32) / 255.0


def _resized_crop_image(
    image: Image.Image, image_size: int, extent: tuple[float, float, float, float] | None = None
) -> Image.Image:
    """The image's shorter side resized to S, centre-cropped to S x S.

    `extent` (left, top, right, bottom), by default the whole image, is the region resized.
    """
    left, top, right, bottom = extent if extent is not None else (0, 0, *image.size)
    w, h = right - left, bottom - top
    scale = image_size / min(w, h)
    new_w, new_h = max(image_size, round(w * scale)), max(image_size, round(h * scale))
    image = image.resize((new_w, new_h), Image.Resampling.BILINEAR, box=extent)
    left, top = (new_w - image_size) // 2, (new_h - image_size) // 2
    return image.crop((left, top, left + image_size, top + image_size))


def normalize(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Standardise channels: (..., C, H, W) -> same shape, (x - mean[c]) / std[c]."""
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - mean_t) / std_t


def random_resized_crop(
    x: Tensor,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Crop a random box per sample and resize it back: (B, C, H, W) -> (B, C, H, W).

    The box covers a fraction U(scale) of the area with aspect ratio
    log-uniform in `ratio` (Szegedy et al. 2015), clipped to the image
    instead of re-drawn. One batched affine grid + bilinear `grid_sample`.
    """
    b = x.shape[0]
    rand = functools.partial(torch.rand, b, device=x.device, dtype=x.dtype, generator=generator)
    area = scale[0] + (scale[1] - scale[0]) * rand()
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * rand())
    # Box sides as fractions of the image sides; also the affine scale factors.
    w = torch.sqrt(area * aspect).clamp(max=1.0)
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    # Box centre in [-1, 1] grid coordinates, kept inside the image.
    cx = (1 - w) * (2 * rand() - 1)
    cy = (1 - h) * (2 * rand() - 1)
    zero = torch.zeros_like(w)
    theta = torch.stack([torch.stack([w, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def horizontal_flip(x: Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    """Mirror each sample left-right with probability p: (B, C, H, W) -> (B, C, H, W)."""
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < p
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def train_augment(
    x: Tensor,
    scale: tuple[float, float] = (0.08, 1.0),
    flip_p: float = 0.5,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Training augmentation of a batch (B, C, H, W): random-resized crop, then horizontal flip.

    Batches arrive already normalised; both operations are per-channel affine
    combinations of pixels with weights summing to one, so they commute with
    normalisation and need not undo it.
    """
    return horizontal_flip(random_resized_crop(x, scale, generator=generator), flip_p, generator)


class ImageFolderDataset(Dataset):
    """Lazily opened images: item i -> (float tensor (C, S, S), int label)."""

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[int],
        image_size: int,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        mode: str = "RGB",
        draft: bool = False,
    ):
        self.paths, self.labels = list(paths), list(labels)
        self.image_size, self.mean, self.std, self.mode, self.draft = image_size, mean, std, mode, draft

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        x = load_image(self.paths[i], self.image_size, self.mode, self.draft)
        if self.mean is not None and self.std is not None:
            x = normalize(x, self.mean, self.std)
        return x, self.labels[i]


def carve(n: int, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Split range(n) by a seeded permutation: one held-out part per fraction, then the rest.

    Each held-out part gets round(fraction * n) items, at least one.
    """
    order = np.random.default_rng(seed).permutation(n)
    sizes = [max(1, round(f * n)) for f in fractions]
    if sum(sizes) >= n:
        raise ValueError(f"cannot carve {sizes} held-out images from {n} and keep any for training")
    bounds = np.cumsum([0, *sizes])
    return [order[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])] + [order[bounds[-1] :]]


def _channel_stats(value: float | Sequence[float] | None, default: Sequence[float], name: str) -> tuple[float, ...]:
    if value is None:
        return tuple(default)
    if isinstance(value, (int, float)):
        return (float(value),) * 3
    stats = tuple(float(v) for v in value)
    if len(stats) != 3:
        raise ValueError(f"{name} must be a number or 3 numbers (one per RGB channel), got {value}")
    return stats


def _layout(root: Path, test_root: str | None) -> tuple[Path, Path | None, str | None]:
    """The (training tree, validation tree or None, test tree or None) of a root, as the module docstring lays out."""
    splits = {name: root / name for name in SPLITS if (root / name).is_dir()}
    split_layout = "train" in splits and ("val" in splits or "test" in splits)
    # A lone train/ is the tree itself, not one class named "train".
    visible = [e for e in root.iterdir() if e.is_dir() and not e.name.startswith(".")]
    tree = splits["train"] if split_layout or (list(splits) == ["train"] and len(visible) == 1) else root
    if test_root is None and split_layout:
        test_root = str(splits.get("test", splits.get("val")))
    val_root = splits["val"] if split_layout and "val" in splits and "test" in splits else None
    return tree, val_root, test_root


def _cache_dir(index_cache: str | None, verify: str) -> Path | None:
    """The folder that `data.args.index_cache` names (the default one, none for "none", or a path), `verify` checked."""
    if verify not in VERIFY:
        raise ValueError(
            f"data.args.verify is {verify!r}; expected one of {', '.join(map(repr, VERIFY))} "
            "(how each image is checked at set-up)"
        )
    if index_cache is None:
        return default_cache_dir()
    if not isinstance(index_cache, str) or not index_cache.strip():
        raise ValueError(
            f"data.args.index_cache is {index_cache!r}; expected a folder for the image index, or 'none' for no cache"
        )
    return None if index_cache == "none" else Path(index_cache).expanduser()


def _usable_images(
    tree: Path, classes: Sequence[str] | None, verify: str, image_size: int, cache: Path | None, skip_bad: bool
) -> tuple[list[Path], list[int], list[str]]:
    """(paths, labels, classes) of a tree, its unreadable files (found at the `verify` level) refused or skipped."""
    listing, labels, classes = _listed(tree, classes)
    level = f"decode@{image_size}" if verify == "decode" else verify  # decode drafts JPEGs to image_size
    check = None if verify == "none" else functools.partial(unreadable_reason, verify=verify, image_size=image_size)
    bad = verdicts(listing, level, check, cache)
    paths = [tree / name for name in listing.files]
    return (*_drop_unreadable(paths, labels, bad, skip_bad), classes)


@register_dataset("image_folder")
def image_folder(
    root: str,
    image_size: int = 224,
    val_fraction: float = 0.1,
    test_root: str | None = None,
    seed: int = 0,
    augment: bool = True,
    mean: float | Sequence[float] | None = None,
    std: float | Sequence[float] | None = None,
    skip_bad: bool = False,
    verify: str = "header",
    index_cache: str | None = None,
    draft: bool = False,
) -> DataSplits:
    """RGB images in class sub-folders, resized and centre-cropped to image_size x image_size.

    With root/train and root/val or root/test, that folder is the test set (with
    both, val/ validates and test/ tests); otherwise the test set is `test_root`
    or, without one, a seeded `val_fraction` carved from the training tree
    (root, or root/train when it is root's only folder). Validation is
    otherwise a seeded `val_fraction` of the training tree, which needs
    images of at least 2 classes. Files are verified once, at the `verify` level: "header" (each opened, its
    header read, nothing decoded), "decode" (each fully decoded) or "none"
    (nothing opened: a bad file is then found only when a batch loads it, and
    the run stops there even with `skip_bad`). Unreadable files are refused
    by path, or skipped with a count when `skip_bad`. The verdicts are cached
    (see `image_index`) in `index_cache`, a folder (by default
    `~/.cache/untrainable/image_index`, or under `$XDG_CACHE_HOME`), or
    "none" for no cache. `draft` lets JPEGs decode at a reduced scale that
    still covers image_size (see `load_image`).
    `mean`/`std` default to ImageNet's (pass 0 and 1 for none). `augment` sets
    `train_transform` to random-resized crop + horizontal flip on batches.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    mean_c = _channel_stats(mean, IMAGENET_MEAN, "mean")
    std_c = _channel_stats(std, IMAGENET_STD, "std")
    if min(std_c) <= 0:
        raise ValueError(f"std must be positive, got {std!r}")
    cache = _cache_dir(index_cache, verify)

    root_path = checked_folder(root, "data.args.root")
    if test_root is not None:
        checked_folder(test_root, "data.args.test_root")
    tree, val_root, test_root = _layout(root_path, test_root)

    def scan(tree: Path | str, classes: Sequence[str] | None = None) -> tuple[list[Path], list[int], list[str]]:
        return _usable_images(Path(tree), classes, verify, image_size, cache, skip_bad)

    def dataset(chosen_paths: Sequence[Path], chosen_labels: Sequence[int]) -> ImageFolderDataset:
        return ImageFolderDataset(chosen_paths, chosen_labels, image_size, mean_c, std_c, draft=draft)

    paths, labels, classes = scan(tree)
    present = [classes[i] for i in sorted(set(labels))]
    if len(present) < 2:
        raise ValueError(
            f"{tree} holds images of {len(present)} class(es) ({', '.join(present) or 'none'}); "
            f"classification needs at least 2 classes: {LAYOUT}"
        )
    held_out = [val_fraction] * ((val_root is None) + (test_root is None))
    parts = carve(len(paths), held_out, seed) if held_out else [np.arange(len(paths))]
    carved = [dataset([paths[i] for i in part], [labels[i] for i in part]) for part in parts]
    val = dataset(*scan(val_root, classes)[:2]) if val_root is not None else carved.pop(0)
    test = dataset(*scan(test_root, classes)[:2]) if test_root is not None else carved.pop(0)
    return DataSplits(
        train=carved.pop(0),
        val=val,
        test=test,
        input_shape=(3, image_size, image_size),
        num_classes=len(classes),
        train_transform=train_augment if augment else None,
        meta={"classes": classes, "mean": mean_c, "std": std_c, "root": str(root_path)},
    )
