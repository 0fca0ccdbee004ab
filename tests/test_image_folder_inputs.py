"""Awkward inputs to the image_folder data set: oversized and 16-bit images, empty or wrong roots."""

from __future__ import annotations

import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import untrainable.data.image_folder as image_folder_module
from untrainable.data.image_folder import eight_bit, image_folder, load_image


def write_tree(root, classes=("cat", "dog"), per_class=4):
    """Small random RGB PNGs, `per_class` of them in each class sub-folder."""
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(root / name / f"{i}.png")


def png_claiming(path, width, height):
    """A 4 x 4 PNG whose header (IHDR) claims width x height pixels, its CRC recomputed so Pillow trusts it."""
    Image.new("L", (4, 4)).save(path)
    data = bytearray(path.read_bytes())
    # Bytes 8:16 are IHDR's length and type, 16:24 its width and height; its CRC (29:33) covers bytes 12:29.
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("side", [20000, 10000])  # above twice Pillow's limit (an error), and above it (a warning)
def test_an_image_above_pillows_pixel_limit_is_refused_by_path_or_skipped(tmp_path, side):
    write_tree(tmp_path)
    huge = tmp_path / "cat" / "huge.png"
    png_claiming(huge, side, side)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="1 unreadable") as error:
            image_folder(str(tmp_path), image_size=4)
    message = str(error.value)
    assert str(huge) in message and f"image too large: {side} x {side} pixels" in message
    assert "Pillow's limit" in message and "skip_bad = true" in message and "resize" in message
    assert "\n" not in message
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]
    with pytest.warns(UserWarning, match="skipping 1 unreadable image") as skipped:
        data = image_folder(str(tmp_path), image_size=4, val_fraction=0.25, skip_bad=True)
    assert any(str(huge) in str(w.message) and "too large" in str(w.message) for w in skipped)
    kept = {str(p) for split in (data.train, data.val, data.test) for p in split.paths}
    assert len(kept) == 8 and str(huge) not in kept


def test_loading_an_image_above_pillows_limit_names_the_file(tmp_path, monkeypatch):
    huge = tmp_path / "huge.png"
    png_claiming(huge, 20000, 20000)
    with pytest.raises(ValueError, match="image too large: 20000 x 20000 pixels") as error:
        load_image(huge, image_size=4)
    assert str(huge) in str(error.value)
    # Where the header cannot be read again for W x H, Pillow's pixel count still says why.
    monkeypatch.setattr(image_folder_module, "_claimed_size", lambda path: None)
    with pytest.raises(ValueError, match="image too large: 400000000 pixels, above Pillow's limit"):
        load_image(huge, image_size=4)


def test_16_bit_greyscale_pngs_scale_to_0_255(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.array([[0, 65535], [32768, 65535]], dtype=np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"
    x = load_image(path, image_size=2)  # same size: no resampling, the values are exact
    assert x.shape == (3, 2, 2)
    expected = torch.tensor([[0.0, 1.0], [128 / 255, 1.0]])
    for channel in x:
        torch.testing.assert_close(channel, expected)


def test_a_tree_of_16_bit_pngs_loads_as_grey_not_white(tmp_path):
    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        for i in range(4):
            values = np.full((4, 4), 16384 * i, dtype=np.uint16)  # 0, 1/4, 1/2, 3/4 of full scale
            Image.fromarray(values).save(tmp_path / name / f"{i}.png")
    data = image_folder(str(tmp_path), image_size=4, val_fraction=0.25, mean=0.0, std=1.0)
    means = sorted(round(float(x.mean()), 2) for split in (data.train, data.val, data.test) for x, _ in split)
    assert means == [0.0, 0.0, 0.25, 0.25, 0.5, 0.5, 0.75, 0.75]


def test_eight_bit_handles_32_bit_and_float_modes():
    as_int = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32))
    assert as_int.mode == "I"
    assert np.asarray(eight_bit(as_int)).tolist() == [[0, 128, 255]]
    with pytest.raises(ValueError, match=r"values -1\.\.70000 are outside 0\.\.65535"):
        eight_bit(Image.fromarray(np.array([[-1, 70000]], dtype=np.int32)))
    with pytest.raises(ValueError, match="mode F"):
        eight_bit(Image.fromarray(np.zeros((2, 2), dtype=np.float32)))
    rgb = Image.new("RGB", (2, 2), (10, 20, 30))
    assert eight_bit(rgb) is rgb


@pytest.mark.parametrize("root", ["", "   "])
def test_an_empty_root_is_refused_and_does_not_scan_the_current_folder(tmp_path, monkeypatch, root):
    write_tree(tmp_path)
    monkeypatch.chdir(tmp_path)  # a valid tree here, which an empty root must not pick up
    with pytest.raises(ValueError, match="data.args.root is empty") as error:
        image_folder(root, image_size=4)
    assert "one sub-folder per class" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ValueError, match="data.args.test_root is empty"):
        image_folder(str(tmp_path), image_size=4, test_root=root)


def test_a_missing_root_or_a_file_as_root_names_the_field_and_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.args.root") as error:
        image_folder(str(tmp_path / "missing"))
    assert str(tmp_path / "missing") in str(error.value) and "does not exist" in str(error.value)
    a_file = tmp_path / "labels.csv"
    a_file.write_text("cat,0\n")
    with pytest.raises(NotADirectoryError, match="data.args.root") as error:
        image_folder(str(a_file))
    assert str(a_file) in str(error.value) and "is a file, not a folder" in str(error.value)
    write_tree(tmp_path / "tree")
    with pytest.raises(FileNotFoundError, match="data.args.test_root"):
        image_folder(str(tmp_path / "tree"), test_root=str(tmp_path / "no_test"))


def _paths(data):
    return sorted(str(p) for split in (data.train, data.val, data.test) for p in split.paths)


def test_a_symlink_back_to_the_root_or_into_a_class_folder_is_not_followed_and_is_named(tmp_path):
    root, store = tmp_path / "tree", tmp_path / "store"
    write_tree(root)
    (root / "everything").symlink_to(root, target_is_directory=True)  # root/everything -> root
    (root / "cat" / "again.png").symlink_to(root / "dog" / "0.png")  # one image under two labels
    write_tree(store, classes=("bird",))
    (root / "bird").symlink_to(store / "bird", target_is_directory=True)  # a class kept elsewhere: followed
    with pytest.warns(UserWarning, match="2 symlink") as caught:
        data = image_folder(str(root), image_size=4, val_fraction=0.25)
    (message,) = [str(w.message) for w in caught if "symlink" in str(w.message)]
    assert message.startswith(f"image folder {root}: 2 symlink(s) lead back into the tree and are not followed")
    assert "everything/" in message and "cat/again.png" in message
    assert data.meta["classes"] == ["bird", "cat", "dog"] and data.num_classes == 3
    paths = _paths(data)
    assert len(paths) == 12 and not any("everything" in p or "again" in p for p in paths)


def test_an_empty_class_folder_is_a_class_only_with_a_warning_naming_it(tmp_path):
    write_tree(tmp_path)
    (tmp_path / "emu").mkdir()
    with pytest.warns(UserWarning, match=r"class folder\(s\) emu hold no images; each is still a class"):
        data = image_folder(str(tmp_path), image_size=4, val_fraction=0.25)
    assert data.meta["classes"] == ["cat", "dog", "emu"]


def test_a_self_looping_symlink_is_refused_by_path_or_skipped_with_skip_bad(tmp_path):
    write_tree(tmp_path)
    loop = tmp_path / "cat" / "loop.png"
    loop.symlink_to(loop)
    with pytest.raises(ValueError, match=r"1 unreadable image\(s\): .*loop.png \(\[Errno \d+\] Too many levels"):
        image_folder(str(tmp_path), image_size=4, val_fraction=0.25)
    with pytest.warns(UserWarning, match=r"skipping 1 unreadable image\(s\) of 9: .*loop.png"):
        data = image_folder(str(tmp_path), image_size=4, val_fraction=0.25, skip_bad=True)
    assert len(_paths(data)) == 8 and str(loop) not in _paths(data)
