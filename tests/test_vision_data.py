"""IDX parsing, the Fashion-MNIST builder and the image-folder loader, on tiny files made here."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch
from PIL import Image

from untrainable.data.fashion_mnist import FILES, fashion_mnist, read_idx
from untrainable.data.image_folder import (
    horizontal_flip,
    image_folder,
    random_resized_crop,
    train_augment,
)


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode an array as IDX: two zero bytes, type code, ndim, big-endian dims and data."""
    codes = {np.dtype("uint8"): 0x08, np.dtype("int16"): 0x0B, np.dtype("float32"): 0x0D}
    header = bytes([0, 0, codes[array.dtype], array.ndim])
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


@pytest.mark.parametrize("dtype", ["uint8", "int16", "float32"])
def test_read_idx_plain_and_gz(tmp_path, dtype):
    array = np.arange(24).reshape(2, 3, 4).astype(dtype)
    if dtype != "uint8":
        array = array - 5  # negative values check the signed types
    (tmp_path / "plain").write_bytes(idx_bytes(array))
    (tmp_path / "packed.gz").write_bytes(gzip.compress(idx_bytes(array)))
    for name in ("plain", "packed.gz"):
        read = read_idx(tmp_path / name)
        assert read.dtype == array.dtype and read.shape == array.shape
        np.testing.assert_array_equal(read, array)


def test_read_idx_rejects_bad_files(tmp_path):
    good = idx_bytes(np.zeros((3, 2), np.uint8))
    bad = {
        "magic": b"\x01\x00" + good[2:],
        "type": good[:2] + b"\x07" + good[3:],
        "truncated": good[:-1],
        "header": good[:6],
        "gzip": gzip.compress(good)[:-8],
    }
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError):
            read_idx(tmp_path / name)


def write_fake_fashion(root, n_train=40, n_test=10):
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test_images": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "test_labels": (np.arange(n_test) % 10).astype(np.uint8),
    }
    # The image index is written into pixel (0, 0) so splits can be told apart.
    arrays["train_images"][:, 0, 0] = np.arange(n_train)
    for key, array in arrays.items():
        (root / FILES[key]).write_bytes(gzip.compress(idx_bytes(array)))


def test_fashion_mnist_splits(tmp_path):
    write_fake_fashion(tmp_path)
    data = fashion_mnist(root=str(tmp_path), train_size=20, val_size=8, seed=1, normalize=False)
    assert (len(data.train), len(data.val), len(data.test)) == (20, 8, 10)
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10
    assert len(data.meta["classes"]) == 10
    x, y = data.train.tensors
    assert x.dtype == torch.float32 and x.shape == (20, 1, 28, 28) and y.dtype == torch.int64
    assert 0.0 <= x.min() and x.max() <= 1.0
    train_ids, val_ids = (
        set((split.tensors[0][:, 0, 0, 0] * 255).round().long().tolist()) for split in (data.train, data.val)
    )
    assert len(train_ids) == 20 and len(val_ids) == 8 and not train_ids & val_ids
    # The validation set is the same whatever the training size.
    again = fashion_mnist(root=str(tmp_path), train_size=5, val_size=8, seed=1, normalize=False)
    assert torch.equal(again.val.tensors[0], data.val.tensors[0])


def test_fashion_mnist_normalises_with_train_stats(tmp_path):
    write_fake_fashion(tmp_path)
    data = fashion_mnist(root=str(tmp_path), val_size=5)
    x = data.train.tensors[0]
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1.0) < 1e-4


def test_fashion_mnist_env_root_and_bad_sizes(tmp_path, monkeypatch):
    write_fake_fashion(tmp_path)
    monkeypatch.setenv("UNTRAINABLE_FASHION_MNIST", str(tmp_path))
    assert len(fashion_mnist(val_size=4).train) == 36
    with pytest.raises(ValueError):
        fashion_mnist(val_size=40)
    with pytest.raises(ValueError):
        fashion_mnist(val_size=4, train_size=37)


def test_fashion_mnist_on_a_canvas_keeps_each_image_whole_at_a_fixed_position(tmp_path):
    write_fake_fashion(tmp_path)
    plain = fashion_mnist(root=str(tmp_path), train_size=20, val_size=8, seed=1, normalize=False)
    data = fashion_mnist(root=str(tmp_path), train_size=20, val_size=8, seed=1, normalize=False, canvas=56)
    assert data.input_shape == (1, 56, 56) and data.meta["canvas"] == 56
    positions = set()
    for image, big in zip(plain.train.tensors[0][:, 0], data.train.tensors[0][:, 0]):
        assert big.sum().item() == pytest.approx(image.sum().item(), rel=1e-5)  # nothing cropped
        rows, cols = torch.nonzero(big, as_tuple=True)
        top, left = rows.min().item(), cols.min().item()
        window = big[top : top + 28, left : left + 28]
        if window.shape == (28, 28) and torch.equal(window, image):
            positions.add((top, left))
    assert len(positions) > 10  # images sit at many places, each intact
    fewer = fashion_mnist(root=str(tmp_path), train_size=5, val_size=8, seed=1, normalize=False, canvas=56)
    assert torch.equal(fewer.val.tensors[0], data.val.tensors[0])  # positions do not move with the split
    assert torch.equal(fewer.train.tensors[0], data.train.tensors[0][:5])
    with pytest.raises(ValueError, match="canvas must be at least"):
        fashion_mnist(root=str(tmp_path), val_size=8, canvas=20)


def test_fashion_mnist_labels_out_of_range_name_the_file(tmp_path):
    write_fake_fashion(tmp_path)
    labels = (np.arange(40) % 10).astype(np.uint8)
    labels[7] = 200
    (tmp_path / FILES["train_labels"]).write_bytes(gzip.compress(idx_bytes(labels)))
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte.gz: label 200 at index 7 .*\[0, 9\]"):
        fashion_mnist(root=str(tmp_path), val_size=8)


def test_fashion_mnist_missing_files_names_package(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        fashion_mnist(root=str(tmp_path))
    message = str(error.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert str(tmp_path) in message and "UNTRAINABLE_FASHION_MNIST" in message
    assert all(name in message for name in FILES.values())


def write_pngs(root, classes=("cat", "dog"), per_class=6, size=(12, 10)):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            # Mix formats: every third image is a JPEG.
            suffix = "jpg" if i % 3 == 2 else "png"
            Image.fromarray(pixels).save(root / name / f"{i}.{suffix}")


def test_image_folder_single_tree(tmp_path):
    write_pngs(tmp_path)
    data = image_folder(str(tmp_path), image_size=8, val_fraction=0.25, seed=0)
    assert (len(data.train), len(data.val), len(data.test)) == (6, 3, 3)
    assert data.input_shape == (3, 8, 8) and data.num_classes == 2
    assert data.meta["classes"] == ["cat", "dog"]
    x, y = data.train[0]
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32 and y in (0, 1)
    paths = [set(map(str, split.paths)) for split in (data.train, data.val, data.test)]
    assert not (paths[0] & paths[1] or paths[0] & paths[2] or paths[1] & paths[2])


def test_image_folder_imagenet_layout(tmp_path):
    write_pngs(tmp_path / "train", per_class=5)
    write_pngs(tmp_path / "val", per_class=2)
    data = image_folder(str(tmp_path), image_size=6, val_fraction=0.2, mean=0.0, std=1.0, augment=False)
    assert (len(data.train), len(data.val), len(data.test)) == (8, 2, 4)
    assert data.train_transform is None
    x, _ = data.test[0]
    assert 0.0 <= x.min() and x.max() <= 1.0


def test_augmentations_keep_shape():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 8, 8)
    assert random_resized_crop(x).shape == x.shape
    assert train_augment(x).shape == x.shape
    # A full-size crop is the identity; flipping with p=1 mirrors every image.
    torch.testing.assert_close(random_resized_crop(x, scale=(1.0, 1.0), ratio=(1.0, 1.0)), x)
    torch.testing.assert_close(horizontal_flip(x, p=1.0), x.flip(-1))
    torch.testing.assert_close(horizontal_flip(x, p=0.0), x)


def test_image_folder_transform_on_loaded_batch(tmp_path):
    write_pngs(tmp_path)
    data = image_folder(str(tmp_path), image_size=8, val_fraction=0.2)
    batch = torch.stack([data.train[i][0] for i in range(3)])
    assert data.train_transform(batch).shape == (3, 3, 8, 8)


def test_image_folder_errors_name_path_and_layout(tmp_path):
    with pytest.raises(FileNotFoundError, match="one sub-folder per class"):
        image_folder(str(tmp_path / "missing"))
    (tmp_path / "no_images" / "cat").mkdir(parents=True)
    (tmp_path / "no_images" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError) as error:
        image_folder(str(tmp_path / "no_images"))
    assert str(tmp_path / "no_images") in str(error.value)
    assert "one sub-folder per class" in str(error.value)


def test_image_folder_train_and_test_splits_are_recognised(tmp_path):
    write_pngs(tmp_path / "train", per_class=5)
    write_pngs(tmp_path / "test", per_class=2)
    data = image_folder(str(tmp_path), image_size=6, val_fraction=0.2, augment=False)
    assert data.meta["classes"] == ["cat", "dog"]  # not "test" vs "train"
    assert (len(data.train), len(data.val), len(data.test)) == (8, 2, 4)
    assert all("test" in str(path.parent.parent.name) for path in data.test.paths)


def test_image_folder_train_val_and_test(tmp_path):
    write_pngs(tmp_path / "train", per_class=5)
    write_pngs(tmp_path / "val", per_class=1)
    write_pngs(tmp_path / "test", per_class=2)
    data = image_folder(str(tmp_path), image_size=6, augment=False)
    assert (len(data.train), len(data.val), len(data.test)) == (10, 2, 4)
    assert {p.parent.parent.name for p in data.val.paths} == {"val"}


def test_image_folder_ignores_hidden_folders_and_files(tmp_path):
    write_pngs(tmp_path)
    write_pngs(tmp_path / ".ipynb_checkpoints", classes=("x",), per_class=2)
    write_pngs(tmp_path / "cat" / ".thumbs", classes=("y",), per_class=2)
    data = image_folder(str(tmp_path), image_size=8, val_fraction=0.25)
    assert data.meta["classes"] == ["cat", "dog"] and data.num_classes == 2
    assert len(data.train) + len(data.val) + len(data.test) == 12


def test_unreadable_images_are_reported_by_path_at_set_up(tmp_path):
    write_pngs(tmp_path)
    truncated = tmp_path / "dog" / "1.png"
    truncated.write_bytes(truncated.read_bytes()[:60])
    (tmp_path / "cat" / "fake.jpg").write_bytes(b"not an image")
    # The PNG is cut in its pixel data, after a whole header: only a full decode finds it.
    with pytest.raises(ValueError, match="2 unreadable") as error:
        image_folder(str(tmp_path), image_size=8, verify="decode")
    assert str(truncated) in str(error.value) and "skip_bad" in str(error.value)
    with pytest.warns(UserWarning, match="skipping 2 unreadable image"):
        data = image_folder(str(tmp_path), image_size=8, val_fraction=0.2, skip_bad=True, verify="decode")
    kept = {str(p) for split in (data.train, data.val, data.test) for p in split.paths}
    assert len(kept) == 11 and str(truncated) not in kept


def test_image_folder_lone_train_folder_is_the_tree(tmp_path):
    write_pngs(tmp_path / "train", per_class=6)
    data = image_folder(str(tmp_path), image_size=6, val_fraction=0.25, augment=False)
    assert data.meta["classes"] == ["cat", "dog"] and data.num_classes == 2  # not one class named "train"
    assert (len(data.train), len(data.val), len(data.test)) == (6, 3, 3)  # val and test carved, as for one tree
    held_out = image_folder(str(tmp_path), image_size=6, val_fraction=0.25, test_root=str(tmp_path / "train"))
    assert (len(held_out.train), len(held_out.val)) == (9, 3)


def test_image_folder_with_fewer_than_two_classes_is_refused(tmp_path):
    write_pngs(tmp_path / "one", classes=("cat",))
    with pytest.raises(ValueError, match="at least 2 classes") as error:
        image_folder(str(tmp_path / "one"), image_size=6)
    assert str(tmp_path / "one") in str(error.value) and "cat" in str(error.value)
    write_pngs(tmp_path / "empty_dog", classes=("cat",))
    (tmp_path / "empty_dog" / "dog").mkdir()  # a class folder without images is no class
    with pytest.raises(ValueError, match="at least 2 classes"):
        image_folder(str(tmp_path / "empty_dog"), image_size=6)
    write_pngs(tmp_path / "split" / "train", classes=("cat",))
    write_pngs(tmp_path / "split" / "val", classes=("cat",))
    with pytest.raises(ValueError, match="at least 2 classes") as error:
        image_folder(str(tmp_path / "split"), image_size=6)
    assert str(tmp_path / "split" / "train") in str(error.value)


def test_placing_some_images_on_the_canvas_puts_each_where_it_is_among_all():
    from untrainable.data.fashion_mnist import place_on_canvas

    images = np.arange(50 * 4 * 3, dtype=np.uint8).reshape(50, 4, 3) % 251 + 1  # no zero pixel: every one is found
    every = place_on_canvas(images, 9, seed=3)
    for i in range(50):
        r, c = np.argwhere(every[i])[0]
        assert (every[i, r : r + 4, c : c + 3] == images[i]).all() and every[i].astype(bool).sum() == 12
    some = np.array([7, 0, 49, 7])
    assert (place_on_canvas(images, 9, seed=3, indices=some) == every[some]).all()
