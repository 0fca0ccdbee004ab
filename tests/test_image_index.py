"""The image_folder index: cached on disk, invalidated by changed files, shared across ranks; verification levels."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from untrainable.data.image_folder import find_images, image_folder, load_image


def photo(width=64, height=48, seed=0):
    """A smooth random RGB image, which compresses like a photograph."""
    coarse = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)


def jpeg_bytes(width=64, height=48, seed=0):
    buffer = io.BytesIO()
    photo(width, height, seed).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def write_tree(root, per_class=4):
    for c, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            (root / name / f"{i}.jpg").write_bytes(jpeg_bytes(seed=10 * c + i))


def all_paths(data):
    return {str(p) for split in (data.train, data.val, data.test) for p in split.paths}


@pytest.fixture
def opened(monkeypatch):
    """The files Image.open is called on from here on."""
    calls = []
    real = Image.open

    def counting(fp, *args, **kwargs):
        calls.append(str(fp))
        return real(fp, *args, **kwargs)

    monkeypatch.setattr(Image, "open", counting)
    return calls


def refuse_opening(monkeypatch):
    def refuse(fp, *args, **kwargs):
        raise AssertionError(f"opened {fp}")

    monkeypatch.setattr(Image, "open", refuse)


def test_the_index_is_written_once_and_a_second_start_opens_no_image(tmp_path, monkeypatch):
    write_tree(tmp_path / "tree")
    cache = tmp_path / "cache"
    first = image_folder(str(tmp_path / "tree"), image_size=8, val_fraction=0.25, index_cache=str(cache))
    (stored_file,) = cache.glob("*.json")
    stored = json.loads(stored_file.read_text())
    assert stored["root"] == str((tmp_path / "tree").resolve()) and stored["level"] == "header"
    assert stored["classes"] == ["cat", "dog"] and stored["labels"] == [0] * 4 + [1] * 4
    assert stored["files"][:2] == ["cat/0.jpg", "cat/1.jpg"] and len(stored["sizes"]) == len(stored["mtimes"]) == 8
    assert stored["bad"] == {}
    refuse_opening(monkeypatch)
    second = image_folder(str(tmp_path / "tree"), image_size=8, val_fraction=0.25, index_cache=str(cache))
    assert [list(map(str, s.paths)) for s in (second.train, second.val, second.test)] == [
        list(map(str, s.paths)) for s in (first.train, first.val, first.test)
    ]


def test_the_cached_verdicts_of_bad_files_are_kept(tmp_path, monkeypatch):
    write_tree(tmp_path)
    (tmp_path / "cat" / "fake.jpg").write_bytes(b"not an image")
    cache = str(tmp_path / "cache")
    with pytest.raises(ValueError, match="1 unreadable image"):
        image_folder(str(tmp_path), image_size=8, index_cache=cache)
    refuse_opening(monkeypatch)
    with pytest.raises(ValueError, match="1 unreadable image.*fake.jpg"):
        image_folder(str(tmp_path), image_size=8, index_cache=cache)
    with pytest.warns(UserWarning, match="skipping 1 unreadable image"):
        data = image_folder(str(tmp_path), image_size=8, val_fraction=0.25, index_cache=cache, skip_bad=True)
    assert len(all_paths(data)) == 8


@pytest.mark.parametrize("change", ["touch", "add", "remove", "spoil"])
def test_a_changed_added_or_removed_file_invalidates_the_index(tmp_path, opened, change):
    tree, cache = tmp_path / "tree", str(tmp_path / "cache")
    write_tree(tree)
    image_folder(str(tree), image_size=8, val_fraction=0.25, index_cache=cache)
    assert len(opened) == 8
    opened.clear()
    target = tree / "dog" / "2.jpg"
    if change == "touch":
        stat = target.stat()
        os.utime(target, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    elif change == "add":
        target = tree / "dog" / "new.jpg"
        target.write_bytes(jpeg_bytes(seed=99))
    elif change == "remove":
        target.unlink()
    else:
        target.write_bytes(b"broken")
    if change == "spoil":
        with pytest.raises(ValueError, match="1 unreadable image") as error:
            image_folder(str(tree), image_size=8, val_fraction=0.25, index_cache=cache)
        assert str(target) in str(error.value)
        return
    data = image_folder(str(tree), image_size=8, val_fraction=0.25, index_cache=cache)
    # Only the new or changed file is opened again; the others keep their verdicts.
    assert opened == ([] if change == "remove" else [str(target)])
    assert (str(target) in all_paths(data)) == (change != "remove")
    (stored_file,) = (tmp_path / "cache").glob("*.json")
    stored = json.loads(stored_file.read_text())
    assert ("dog/new.jpg" in stored["files"]) == (change == "add")
    assert ("dog/2.jpg" in stored["files"]) == (change != "remove")
    if change == "touch":
        assert stored["mtimes"][stored["files"].index("dog/2.jpg")] == target.stat().st_mtime_ns


def bad_tree(root):
    """A good tree plus a non-image, a JPEG cut in its header and a JPEG cut in its pixel data."""
    write_tree(root)
    data = jpeg_bytes(seed=50)
    (root / "cat" / "notes.jpg").write_bytes(b"not an image")
    (root / "cat" / "cut_header.jpg").write_bytes(data[:200])
    (root / "dog" / "cut_pixels.jpg").write_bytes(data[: len(data) * 3 // 4])
    return {"notes": str(root / "cat" / "notes.jpg"), "cut_header": str(root / "cat" / "cut_header.jpg")} | {
        "cut_pixels": str(root / "dog" / "cut_pixels.jpg")
    }


@pytest.mark.parametrize(
    "verify, caught", [("header", {"notes", "cut_header"}), ("decode", {"notes", "cut_header", "cut_pixels"})]
)
def test_each_verify_level_catches_what_it_reads(tmp_path, verify, caught):
    bad = bad_tree(tmp_path)
    with pytest.warns(UserWarning, match=f"skipping {len(caught)} unreadable image") as skipped:
        data = image_folder(str(tmp_path), image_size=8, val_fraction=0.25, skip_bad=True, verify=verify)
    message = " ".join(str(w.message) for w in skipped)
    assert {name for name, path in bad.items() if path in message} == caught
    assert {name for name, path in bad.items() if path in all_paths(data)} == set(bad) - caught


def test_header_verification_decodes_nothing(tmp_path, monkeypatch):
    write_tree(tmp_path)

    def refuse(self):
        raise AssertionError("decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)
    image_folder(str(tmp_path), image_size=8, val_fraction=0.25, index_cache="none")
    with pytest.raises(AssertionError, match="decoded"):
        image_folder(str(tmp_path), image_size=8, val_fraction=0.25, index_cache="none", verify="decode")


def test_verify_none_opens_nothing_and_a_bad_file_fails_when_loaded(tmp_path, monkeypatch):
    bad = bad_tree(tmp_path)
    real_open = Image.open
    refuse_opening(monkeypatch)
    data = image_folder(str(tmp_path), image_size=8, val_fraction=0.25, skip_bad=True, verify="none")
    assert set(bad.values()) <= all_paths(data)
    monkeypatch.setattr(Image, "open", real_open)
    for name in ("cut_pixels", "notes"):  # an OSError from Pillow's decoder, and its UnidentifiedImageError
        with pytest.raises(ValueError) as error:
            load_image(bad[name], image_size=8)
        assert str(error.value).startswith(f"{bad[name]}: cannot read this image (")
        assert "data.args.verify" in str(error.value) and "\n" not in str(error.value)
    with pytest.raises(ValueError, match=r"cut_pixels.jpg: cannot read this image \(image file is truncated"):
        load_image(bad["cut_pixels"], image_size=8)


@pytest.mark.parametrize("verify", ["full", "", None, 1])
def test_a_bad_verify_value_is_one_clear_error(tmp_path, verify):
    write_tree(tmp_path)
    with pytest.raises(ValueError, match="data.args.verify") as error:
        image_folder(str(tmp_path), image_size=8, verify=verify)
    message = str(error.value)
    assert "'header', 'decode', 'none'" in message and repr(verify) in message and "\n" not in message


@pytest.mark.parametrize("index_cache", ["", "  ", 3])
def test_a_bad_index_cache_is_one_clear_error(tmp_path, index_cache):
    write_tree(tmp_path)
    with pytest.raises(ValueError, match="data.args.index_cache") as error:
        image_folder(str(tmp_path), image_size=8, index_cache=index_cache)
    assert "'none'" in str(error.value) and "\n" not in str(error.value)


def test_the_default_cache_is_under_xdg_cache_home_and_none_writes_nothing(tmp_path, monkeypatch):
    write_tree(tmp_path / "tree")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    image_folder(str(tmp_path / "tree"), image_size=8, val_fraction=0.25, index_cache="none")
    assert not (tmp_path / "xdg").exists()
    image_folder(str(tmp_path / "tree"), image_size=8, val_fraction=0.25)
    assert len(list((tmp_path / "xdg" / "untrainable" / "image_index").glob("*.json"))) == 1
    # A level of its own: decoding does not reuse the header verdicts.
    image_folder(str(tmp_path / "tree"), image_size=8, val_fraction=0.25, verify="decode")
    assert len(list((tmp_path / "xdg" / "untrainable" / "image_index").glob("*.json"))) == 2


def test_an_unwritable_cache_warns_and_the_data_still_loads(tmp_path):
    write_tree(tmp_path / "tree")
    (tmp_path / "a_file").write_text("")
    with pytest.warns(UserWarning, match="cannot write the image index .*data.args.index_cache"):
        data = image_folder(
            str(tmp_path / "tree"), image_size=8, val_fraction=0.25, index_cache=str(tmp_path / "a_file")
        )
    assert len(all_paths(data)) == 8


def test_the_listing_keeps_the_order_of_sorted_paths(tmp_path):
    # The seeded val/test carve permutes positions: the order must not change with the scan.
    for name in ("a-b.png", "a/b.png", "a/c/d.png", "B.png", "a.png", "z.JPG", "a/.hidden.png", "a/x.txt"):
        (tmp_path / "cat" / name).parent.mkdir(parents=True, exist_ok=True)
        photo(4, 4).save(tmp_path / "cat" / name, "PNG")
    (tmp_path / "dog").mkdir()
    photo(4, 4).save(tmp_path / "loose.png", "PNG")  # in no class folder: a symlink to it counts
    os.symlink(tmp_path / "loose.png", tmp_path / "dog" / "linked.png")
    os.symlink(tmp_path / "cat" / "a", tmp_path / "dog" / "linked_folder")  # not entered, as rglob does not
    paths, labels, classes = find_images(tmp_path)
    expected = [
        p
        for name in ("cat", "dog")
        for p in sorted((tmp_path / name).rglob("*"))
        if p.suffix.lower() in (".png", ".jpg", ".jpeg") and p.is_file() and not p.name.startswith(".")
    ]
    assert paths == expected and labels == [0] * 6 + [1] and classes == ["cat", "dog"]


def test_draft_keeps_the_shape_and_decodes_no_smaller_than_the_crop(tmp_path, monkeypatch):
    path = tmp_path / "photo.jpg"
    photo(500, 375).save(path, quality=90)
    sources = []
    real_resize = Image.Image.resize

    def recording(self, size, *args, **kwargs):
        sources.append(self.size)
        return real_resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording)
    # 375 // 224 = 1: no reduced scale fits, so the draft changes nothing.
    torch.testing.assert_close(load_image(path, 224, draft=True), load_image(path, 224), rtol=0, atol=0)
    for size, drafted in [(112, (250, 188)), (64, (125, 94)), (40, (63, 47))]:
        sources.clear()
        full, reduced = load_image(path, size), load_image(path, size, draft=True)
        assert sources == [(500, 375), drafted] and min(drafted) >= size
        assert reduced.shape == full.shape == (3, size, size)
        # The same extent of the same picture, a shade apart: a few of 255 levels at most.
        assert (reduced - full).abs().mean() < 0.005 and (reduced - full).abs().max() < 0.03
    png = tmp_path / "photo.png"
    photo(100, 80).save(png)
    torch.testing.assert_close(load_image(png, 32, draft=True), load_image(png, 32), rtol=0, atol=0)


def test_image_folder_passes_draft_to_its_data_sets(tmp_path):
    write_tree(tmp_path)
    data = image_folder(str(tmp_path), image_size=8, val_fraction=0.25, draft=True)
    assert data.train.draft and data.val.draft and data.test.draft
    assert data.train[0][0].shape == (3, 8, 8)


RANK_SCRIPT = """
import json, os, sys, time, warnings
import torch.distributed as dist
from PIL import Image
from untrainable.data.image_folder import image_folder

mode, root, cache, out = sys.argv[1:]
if mode == "group":
    dist.init_process_group("gloo")
rank = int(os.environ["RANK"])
if rank == 0:
    time.sleep(2)  # the other rank reaches the index first and must wait, not build
opened = []
real_open = Image.open
Image.open = lambda fp, *a, **k: opened.append(str(fp)) or real_open(fp, *a, **k)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    data = image_folder(root, image_size=8, val_fraction=0.25, index_cache=cache, skip_bad=True)
record = {"opened": len(opened), "train": sorted(map(str, data.train.paths)), "warnings": [str(w.message) for w in caught]}
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump(record, f)
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["group", "env"])  # a gloo process group (barrier), or torchrun's env alone (file)
def test_under_torchrun_rank_0_builds_the_index_and_rank_1_reads_it(tmp_path, mode):
    write_tree(tmp_path / "tree")
    (tmp_path / "tree" / "cat" / "fake.jpg").write_bytes(b"not an image")
    (tmp_path / "script.py").write_text(textwrap.dedent(RANK_SCRIPT))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "script.py"]
    command += [mode, str(tmp_path / "tree"), str(tmp_path / "cache"), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["opened"] for r in ranks] == [9, 0], "only rank 0 opened the images"
    assert ranks[0]["train"] == ranks[1]["train"] and len(ranks[0]["train"]) == 4
    for record in ranks:  # both know the bad file from the one index
        assert [w for w in record["warnings"] if "skipping 1 unreadable image" in w and "fake.jpg" in w]
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1


def test_a_run_stopped_by_a_jpeg_cut_in_its_pixels_names_it_and_starts_again_with_the_same_command(tmp_path, capsys):
    from untrainable.cli import main

    root = tmp_path / "images"
    write_tree(root, per_class=12)
    cut = root / "dog" / "cut_pixels.jpg"
    data = jpeg_bytes(seed=50)
    cut.write_bytes(data[: len(data) * 3 // 4])  # passes the default verify = "header"
    config = tmp_path / "images.toml"
    config.write_text(
        'name = "images"\n[model]\nname = "fcn"\nargs = { depth = 2, width = 16 }\n'
        f'[data]\nname = "image_folder"\nargs = {{ root = "{root}", image_size = 8, val_fraction = 0.2 }}\n'
        "batch_size = 2\n[train]\nepochs = 1\nprogress = false\n"
    )
    run = tmp_path / "run"
    command = ["train", "--config", str(config), "--out", str(run), "--set", "train.seed=3"]
    for attempt in (1, 2):  # the same command again: not refused by the folder, and it stops on the same file
        assert main(command) == 2
        err = capsys.readouterr().err
        assert f"error: {cut}: cannot read this image (image file is truncated" in err, err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert (run / "metrics.jsonl").stat().st_size > 0  # it trained some steps: it stopped mid-epoch
        assert not list((run / "checkpoints").glob("step-*.pt"))
    logged = (run / "metrics.jsonl").read_text()
    with pytest.warns(UserWarning, match=r"stopped before its first checkpoint.*kept as metrics.attempt2.jsonl"):
        assert main([*command, "--set", "data.args.verify=decode", "--set", "data.args.skip_bad=true"]) == 0
    assert (run / "metrics.attempt2.jsonl").read_text() == logged and (run / "metrics.attempt1.jsonl").exists()
    assert "skip_bad" not in json.loads((run / "config.attempt2.json").read_text())["data"]["args"]
    assert json.loads((run / "config.json").read_text())["data"]["args"]["skip_bad"] is True
    assert (run / "result.json").exists()


DAMAGES = {
    "bad-list": lambda s: s | {"bad": []},
    "bad-null": lambda s: s | {"bad": None},
    "bad-position-past-the-end": lambda s: s | {"bad": {"9999": "x"}},
    "bad-position-not-a-number": lambda s: s | {"bad": {"abc": "x"}},
    "bad-reason-not-text": lambda s: s | {"bad": {"0": 5}},
    "files-missing": lambda s: {k: v for k, v in s.items() if k != "files"},
    "files-a-number": lambda s: s | {"files": 5},
    "sizes-short": lambda s: s | {"sizes": s["sizes"][:-1]},
    "label-out-of-range": lambda s: s | {"labels": [7] * len(s["labels"])},
    "whole-file-null": lambda s: None,
    "torn": "torn",
    "not-text": "not-text",
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_index_is_named_in_a_warning_and_rebuilt(tmp_path, monkeypatch, damage):
    tree, cache = tmp_path / "tree", tmp_path / "cache"
    write_tree(tree)
    (tree / "cat" / "fake.jpg").write_bytes(b"not an image")
    load = dict(image_size=8, val_fraction=0.25, index_cache=str(cache), skip_bad=True)
    with pytest.warns(UserWarning, match="skipping 1 unreadable"):
        first = image_folder(str(tree), **load)
    (stored_file,) = cache.glob("*.json")
    text = stored_file.read_text()
    spoil = DAMAGES[damage]
    if spoil == "not-text":
        stored_file.write_bytes(b"\xff\xfe\x00garbage")
    else:
        stored_file.write_text(text[: len(text) // 2] if spoil == "torn" else json.dumps(spoil(json.loads(text))))
    with pytest.warns(UserWarning) as caught:
        again = image_folder(str(tree), **load)
    damaged = [str(w.message) for w in caught if str(w.message).startswith("the image index")]
    assert len(damaged) == 1 and damaged[0].startswith(f"the image index {stored_file} is damaged: ")
    assert damaged[0].endswith("; rebuilding it") and "\n" not in damaged[0]
    assert all_paths(again) == all_paths(first)
    assert json.loads(stored_file.read_text()) == json.loads(text)  # rebuilt as it was
    refuse_opening(monkeypatch)  # and read back at the next start, opening nothing
    with pytest.warns(UserWarning, match="skipping 1 unreadable"):
        image_folder(str(tree), **load)
