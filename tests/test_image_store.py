"""`untrainable pack` and the image_store data set: the folder's images and splits, resumable, verified, sharded by rank."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, DistributedSampler

import untrainable.data.pack as pack_module
from untrainable.cli import main
from untrainable.config import RunConfig, from_dict
from untrainable.data.image_folder import image_folder
from untrainable.data.image_store import image_store
from untrainable.data.pack import pack
from untrainable.trainer import train


def write_tree(root: Path, classes=("cat", "dog", "eel"), per_class=6, seed=0) -> Path:
    """Small JPEGs and PNGs of several sizes and both orientations, one sub-folder per class."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = (40, 28) if i % 2 else (26, 34)
            pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            kind = "png" if i % 3 == 0 else "jpg"
            Image.fromarray(pixels).save(root / name / f"{c}-{i}.{kind}")
    return root


def items(dataset, prepare=None):
    out = []
    for i in range(len(dataset)):
        x, y = dataset[i]
        out.append((x if prepare is None else prepare(x[None])[0], y))
    return out


def shard_digests(store: Path) -> list[str]:
    manifest = json.loads((store / "store.json").read_text())
    return [s["sha256"] for part in manifest["parts"].values() for s in part["shards"]]


@pytest.mark.parametrize("layout", ["one tree", "train and val"])
def test_the_store_gives_the_folders_images_labels_and_splits(tmp_path, layout):
    if layout == "one tree":
        root = write_tree(tmp_path / "tree")
    else:
        root = tmp_path / "tree"
        write_tree(root / "train")
        write_tree(root / "val", per_class=2, seed=1)  # val/ is then the test set, as image_folder reads it
    pack(root, tmp_path / "store", 20, shard_size=4, processes=1, progress=False)
    folder = image_folder(str(root), image_size=20, augment=False, index_cache="none", seed=3)
    store = image_store(str(tmp_path / "store"), image_size=20, augment=False, seed=3)
    assert store.meta["classes"] == folder.meta["classes"] and store.num_classes == folder.num_classes
    assert store.input_shape == folder.input_shape and store.train_transform is None
    for split in ("train", "val", "test"):
        expected, got = items(getattr(folder, split)), items(getattr(store, split), store.prepare)
        assert len(got) == len(expected) > 0
        for (x_f, y_f), (x_s, y_s) in zip(expected, got):
            assert y_s == y_f and x_s.dtype == torch.float32 and torch.equal(x_s, x_f)
    augmented = image_store(str(tmp_path / "store"), image_size=20)
    assert augmented.train_transform is image_folder(str(root), image_size=20, index_cache="none").train_transform


def test_a_store_packed_larger_is_resized_and_one_packed_smaller_is_refused(tmp_path):
    root = write_tree(tmp_path / "tree")
    pack(root, tmp_path / "store", 24, processes=1, progress=False)
    data = image_store(str(tmp_path / "store"), image_size=16)
    x, _ = data.train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.uint8
    with pytest.raises(ValueError) as err:
        image_store(str(tmp_path / "store"), image_size=32)
    assert "image_size 32 is larger than" in str(err.value) and "--size 32" in str(err.value)
    assert "\n" not in str(err.value)


def test_pack_then_train_from_the_store(tmp_path):
    root = write_tree(tmp_path / "tree", per_class=8)
    assert main(["pack", str(root), "--out", str(tmp_path / "store"), "--size", "16", "--quiet"]) == 0
    config = from_dict(
        RunConfig,
        {
            "name": "store",
            "model": {"name": "fcn", "args": {"depth": 2, "width": 16}},
            "data": {
                "name": "image_store",
                "args": {"root": str(tmp_path / "store"), "image_size": 16},
                "batch_size": 4,
            },
            "train": {"epochs": 1, "max_steps": 3, "progress": False},
        },
    )
    result = train(config, tmp_path / "run")
    assert result.final["steps"] == 3 and 0 <= result.final["test"]["accuracy"] <= 1


def test_pack_resumes_after_an_interruption_writing_only_the_missing_shards(tmp_path, monkeypatch):
    root = write_tree(tmp_path / "tree")
    whole = pack(root, tmp_path / "whole", 12, shard_size=4, processes=1, progress=False)
    written: list[str] = []
    real = pack_module._write_shard

    def stop_after_two(out, name, *args):
        if len(written) == 2:
            raise KeyboardInterrupt  # killed while the third shard was being written
        written.append(name)
        real(out, name, *args)

    monkeypatch.setattr(pack_module, "_write_shard", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        pack(root, tmp_path / "store", 12, shard_size=4, processes=1, progress=False)
    assert not (tmp_path / "store" / "store.json").exists()
    with pytest.raises(ValueError, match="unfinished pack"):
        image_store(str(tmp_path / "store"), image_size=12)
    (tmp_path / "store" / ".train-00002.npy.tmp").write_bytes(b"half a shard")  # what a kill can leave
    monkeypatch.setattr(pack_module, "_write_shard", lambda out, name, *a: (written.append(name), real(out, name, *a)))
    resumed = pack(root, tmp_path / "store", 12, shard_size=4, processes=1, progress=False)
    assert written == ["train-00000", "train-00001", "train-00002", "train-00003", "train-00004"]
    assert shard_digests(tmp_path / "store") == shard_digests(tmp_path / "whole")
    assert resumed["parts"]["train"]["labels"] == whole["parts"]["train"]["labels"]
    assert not list((tmp_path / "store").glob(".*"))


@pytest.mark.slow
def test_pack_resumes_after_a_kill(tmp_path):
    root = write_tree(tmp_path / "tree", per_class=40)
    out = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    command = [sys.executable, "-m", "untrainable", "pack", str(root), "--out", str(out), "--size", "64"]
    process = subprocess.Popen([*command, "--shard-size", "2", "--processes", "1", "--quiet"], env=env)
    deadline = time.monotonic() + 120
    while not (out / "train-00001.json").exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    if (out / "store.json").exists():
        pytest.skip("the pack finished before it could be killed")
    # A shard is whole once its record is written (the kill may fall between the two renames: then it is redone).
    kept = {p.name: p.stat().st_mtime_ns for p in out.glob("train-*.npy") if p.with_suffix(".json").exists()}
    assert kept, "no shard was written before the kill"
    done = subprocess.run([*command, "--shard-size", "2", "--quiet"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert all((out / name).stat().st_mtime_ns == mtime for name, mtime in kept.items()), "whole shards are kept"
    fresh = pack(root, tmp_path / "fresh", 64, shard_size=2, processes=2, progress=False)
    assert shard_digests(out) == [s["sha256"] for s in fresh["parts"]["train"]["shards"]]


def test_a_damaged_shard_is_refused_in_one_line(tmp_path, capsys):
    root = write_tree(tmp_path / "tree")
    store = tmp_path / "store"
    pack(root, store, 12, shard_size=8, processes=1, progress=False)
    shard = store / "train-00001.npy"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # a flipped byte: same length, so only the checksum sees it
    shard.write_bytes(bytes(data))
    image_store(str(store), image_size=12)  # verify = "size" reads no pixels
    with pytest.raises(ValueError, match="train-00001.npy does not match its SHA-256"):
        image_store(str(store), image_size=12, verify="checksum")
    shard.write_bytes(bytes(data[:-100]))  # cut short
    config = tmp_path / "config.toml"
    config.write_text(
        f'[model]\nname = "fcn"\n[data]\nname = "image_store"\nargs = {{ root = "{store}", image_size = 12 }}\n'
    )
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train-00001.npy" in err and "damaged" in err and "untrainable pack" in err


def test_two_ranks_read_disjoint_indices_through_loader_workers(tmp_path):
    root = write_tree(tmp_path / "tree", per_class=8)
    pack(root, tmp_path / "store", 8, shard_size=5, processes=1, progress=False)
    train_set = image_store(str(tmp_path / "store"), image_size=8).train
    seen = []
    for rank in (0, 1):
        sampler = DistributedSampler(train_set, num_replicas=2, rank=rank, shuffle=True, seed=0, drop_last=True)
        loader = DataLoader(train_set, batch_size=3, sampler=sampler, num_workers=2)
        seen.append({hashlib.sha256(x.numpy().tobytes()).hexdigest() for xs, _ in loader for x in xs})
        assert len(seen[-1]) == len(sampler) == 10
    assert not seen[0] & seen[1]


def test_pack_refuses_to_overwrite_another_store_or_a_folder_of_other_files(tmp_path, capsys):
    root = write_tree(tmp_path / "tree")
    pack(root, tmp_path / "store", 12, processes=1, progress=False)
    again = pack(root, tmp_path / "store", 12, processes=1, progress=False)  # the same pack: nothing to do
    assert again["identity"] == json.loads((tmp_path / "store" / "store.json").read_text())["identity"]
    with pytest.raises(ValueError, match="holds the image store of .* at size 12, not a pack of .* at size 16"):
        pack(root, tmp_path / "store", 16, processes=1, progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main(["pack", str(root), "--out", str(tmp_path / "other"), "--size", "12", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not empty and holds no image store" in err


def test_a_bad_image_is_named_in_one_line_or_skipped_with_skip_bad(tmp_path, capsys):
    root = write_tree(tmp_path / "tree")
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    assert main(["pack", str(root), "--out", str(tmp_path / "store"), "--size", "12", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "broken.jpg: cannot read this image" in err and "--skip-bad" in err
    args = ["pack", str(root), "--out", str(tmp_path / "store"), "--size", "12", "--quiet", "--skip-bad"]
    assert main(args) == 0
    assert "1 unreadable image(s) skipped" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "store" / "store.json").read_text())
    assert [name for name, _ in manifest["parts"]["train"]["skipped"]] == ["dog/broken.jpg"]
    assert manifest["parts"]["train"]["count"] == 18


def test_the_data_set_pickles_its_paths_not_its_memory_maps(tmp_path):
    import pickle

    root = write_tree(tmp_path / "tree")
    pack(root, tmp_path / "store", 64, processes=1, progress=False)
    train_set = image_store(str(tmp_path / "store"), image_size=64).train
    train_set[0]  # maps its shard
    assert len(pickle.dumps(train_set)) < 20_000  # the shard holds 18 x 3 x 64 x 64 bytes
    assert torch.equal(pickle.loads(pickle.dumps(train_set))[0][0], train_set[0][0])


def test_layers_reads_the_stores_images_as_floats(tmp_path, capsys):
    root = write_tree(tmp_path / "tree")
    pack(root, tmp_path / "store", 16, processes=1, progress=False)
    data_args = json.dumps({"root": str(tmp_path / "store"), "image_size": 16})
    args = ["layers", "fcn", "resnet18", "--data", "image_store", "--data-args", data_args]
    assert main([*args, "--guide-args", '{"width": 4}', "--batch", "8"]) == 0
    assert "similarity" in capsys.readouterr().out
