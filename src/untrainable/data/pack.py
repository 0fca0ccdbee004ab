"""Pack an image folder into an image store: decoded uint8 images, resized once, in memory-mappable shards.

    untrainable pack IMAGE_FOLDER --out STORE --size 256

Every image is decoded as `image_folder` decodes it (Pillow, 16-bit greyscale
scaled to 8 bits, RGB), its shorter side resized to `size` and centre-cropped
to `size` x `size` (the aspect is not kept: `image_folder` crops the same square
before any augmentation). The store's layout:

    STORE/store.json            classes, size, parts; per shard its file, count, bytes and SHA-256; labels
    STORE/train-00000.npy       uint8 (count, 3, size, size), NumPy's .npy format (np.load(..., mmap_mode="r"))
    STORE/train-00000.json      the shard's record: its source files (with sizes and mtimes), labels, skipped files
    STORE/val-*.npy, test-*.npy the folder's val/ and test/ trees, where it has them (same layout as image_folder)

Shard k of a part holds the images `k * shard_size` to `(k + 1) * shard_size - 1`
of the part's sorted listing, less any skipped. Each shard and record is
written to a temporary file and renamed, so a killed pack leaves whole shards:
the same command then packs only the shards missing (or whose source files
changed), and store.json, written last, marks the store finished. Before it
is written, every shard is read back and its SHA-256 checked against its record.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from tqdm import tqdm

from untrainable.checkpoint import write_atomic
from untrainable.data.image_folder import DECODE_ERRORS, _layout, _listed, _reason, checked_folder, decoded

FORMAT = "untrainable-image-store"
VERSION = 1
MANIFEST = "store.json"
PLAN = "pack.json"  # the plan of a pack under way; store.json replaces it once the pack is done
PARTS = ("train", "val", "test")
CHUNK = 8  # images handed to a packing process at a time


def shard_name(part: str, k: int) -> str:
    return f"{part}-{k:05d}"


def sha256_of(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def _plan(root: Path, size: int, shard_size: int) -> dict[str, Any]:
    """What a pack of `root` writes: each part's files (relative to root), labels, sizes and mtimes; the classes."""
    tree, val_root, test_root = _layout(root, None)
    listing, labels, classes = _listed(tree, None)
    parts = {"train": (tree, listing, labels)}
    for name, other in (("val", val_root), ("test", test_root)):
        if other is not None:
            other_listing, other_labels, _ = _listed(Path(other), classes)
            parts[name] = (Path(other), other_listing, other_labels)
    return {
        "format": FORMAT,
        "version": VERSION,
        "source": str(root.resolve()),
        "size": size,
        "shard_size": shard_size,
        "classes": classes,
        "parts": {
            name: {
                "root": str(folder.resolve()),
                "files": part.files,
                "labels": part_labels,
                "sizes": part.sizes,
                "mtimes": part.mtimes,
            }
            for name, (folder, part, part_labels) in parts.items()
        },
    }


def _identity(plan: dict[str, Any]) -> str:
    """A digest of what a plan packs (the files and labels, the size, the shard size): not sizes nor mtimes."""
    parts = {name: [part["root"], part["files"], part["labels"]] for name, part in plan["parts"].items()}
    key = [plan["source"], plan["size"], plan["shard_size"], plan["classes"], parts]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _claim(out: Path, plan: dict[str, Any]) -> dict[str, Any] | None:
    """Check that `out` is new, empty, or a pack of this same plan; the finished manifest where it is one.

    Another store, another pack under way, or a folder of other files is refused in one line.
    """
    identity = _identity(plan)
    for name, what in ((MANIFEST, "the image store"), (PLAN, "an unfinished pack")):
        found = _read_json(out / name)
        if found is not None and found.get("identity") == identity:
            return found if name == MANIFEST else None
        if found is not None or (out / name).exists():
            of = f" of {found.get('source')} at size {found.get('size')}" if found is not None else ""
            raise ValueError(
                f"--out {out} holds {what}{of}, not a pack of {plan['source']} at size {plan['size']} with shard size "
                f"{plan['shard_size']} (or the folder's listing changed); give another --out, or remove {out} first"
            )
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"--out {out} is not empty and holds no image store; give a new or empty folder")
    return None


def _decode(job: tuple[str, int]) -> tuple[np.ndarray | None, str | None]:
    """One image as uint8 (3, S, S), or None and why it cannot be read."""
    path, size = job
    try:
        return np.ascontiguousarray(decoded(path, size).transpose(2, 0, 1)), None
    except DECODE_ERRORS as err:
        return None, _reason(err)


def _source_stamps(part: dict[str, Any], lo: int, hi: int) -> list[list[Any]]:
    return [[part["files"][i], part["sizes"][i], part["mtimes"][i]] for i in range(lo, hi)]


def _done(out: Path, part: dict[str, Any], name: str, lo: int, hi: int) -> bool:
    """Whether shard k is on disk whole, packed from these very files (names, sizes and mtimes)."""
    record = _read_json(out / f"{name}.json")
    if record is None or record.get("sources") != _source_stamps(part, lo, hi):
        return False
    path = out / record["file"]
    return path.is_file() and path.stat().st_size == record.get("bytes")


def _write_shard(
    out: Path, name: str, images: np.ndarray, labels: list[int], sources: list[list[Any]], skipped: list[list[str]]
) -> None:
    """Write a shard (uint8 (n, 3, S, S)) and then its record, each to a temporary file renamed into place."""
    path = out / f"{name}.npy"
    temporary = out / f".{name}.npy.tmp"
    with open(temporary, "wb") as f:
        np.save(f, images)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
    record = {
        "file": path.name,
        "count": int(images.shape[0]),
        "bytes": path.stat().st_size,
        "sha256": sha256_of(path),  # read back from disk
        "labels": labels,
        "sources": sources,
        "skipped": skipped,
    }
    write_atomic(out / f"{name}.json", json.dumps(record))


@contextlib.contextmanager
def _decoder(processes: int) -> Iterator[Callable[[list[tuple[str, int]]], Iterator[Any]]]:
    """A map over images, in order: in `processes` worker processes, or here when there is one."""
    if processes <= 1:
        yield lambda jobs: map(_decode, jobs)
        return
    with multiprocessing.get_context().Pool(processes) as pool:
        yield lambda jobs: pool.imap(_decode, jobs, chunksize=CHUNK)


def _pack_part(out: Path, plan: dict[str, Any], name: str, processes: int, skip_bad: bool, bar: tqdm) -> None:
    """Decode and write the shards of one part that are not on disk yet.

    The next shard decodes while one is written, and no more: at most two shards' images wait in memory.
    """
    part, size, shard_size = plan["parts"][name], plan["size"], plan["shard_size"]
    n = len(part["files"])
    bounds = [(k, k * shard_size, min(n, (k + 1) * shard_size)) for k in range((n + shard_size - 1) // shard_size)]
    todo = [(k, lo, hi) for k, lo, hi in bounds if not _done(out, part, shard_name(name, k), lo, hi)]
    bar.update(n - sum(hi - lo for _, lo, hi in todo))
    root = Path(part["root"])
    with _decoder(processes) as decode:

        def start(shard: int) -> Iterator[Any] | None:
            if shard >= len(todo):
                return None
            _, lo, hi = todo[shard]
            return decode([(str(root / part["files"][i]), size) for i in range(lo, hi)])

        pending = start(0)
        for shard, (k, lo, hi) in enumerate(todo):
            results, pending = pending, None
            assert results is not None
            images = np.empty((hi - lo, 3, size, size), dtype=np.uint8)
            labels: list[int] = []
            skipped: list[list[str]] = []
            for i, (array, reason) in zip(range(lo, hi), results):
                bar.update(1)
                if array is None:
                    if not skip_bad:
                        raise ValueError(
                            f"{root / part['files'][i]}: cannot read this image ({reason}); fix or remove it "
                            "and run the same command again (the shards written are kept), or pass --skip-bad"
                        )
                    skipped.append([part["files"][i], str(reason)])
                    continue
                images[len(labels)] = array
                labels.append(part["labels"][i])
            pending = start(shard + 1)
            _write_shard(out, shard_name(name, k), images[: len(labels)], labels, _source_stamps(part, lo, hi), skipped)


def _manifest(out: Path, plan: dict[str, Any]) -> dict[str, Any]:
    """store.json's content from the shard records, each shard's count and SHA-256 checked against its file on disk."""
    parts: dict[str, Any] = {}
    for name, part in plan["parts"].items():
        shards, labels, skipped = [], [], []
        for k in range((len(part["files"]) + plan["shard_size"] - 1) // plan["shard_size"]):
            record = _read_json(out / f"{shard_name(name, k)}.json")
            if record is None:
                raise ValueError(f"--out {out}: the record of shard {shard_name(name, k)} is missing; run again")
            count = np.load(out / record["file"], mmap_mode="r").shape[0]
            if count != record["count"] or count != len(record["labels"]):
                raise ValueError(
                    f"--out {out}: shard {record['file']} holds {count} images, its record {record['count']}; "
                    f"delete {shard_name(name, k)}.json and run the same command again"
                )
            if sha256_of(out / record["file"]) != record["sha256"]:
                raise ValueError(
                    f"--out {out}: shard {record['file']} does not match its checksum after writing "
                    f"(the disk?); delete {shard_name(name, k)}.json and run the same command again"
                )
            shards.append({key: record[key] for key in ("file", "count", "bytes", "sha256")})
            labels += record["labels"]
            skipped += record["skipped"]
        parts[name] = {"count": len(labels), "shards": shards, "labels": labels, "skipped": skipped}
    keep = ("format", "version", "source", "size", "shard_size", "classes", "identity")
    return {**{key: plan[key] for key in keep}, "crop": "centre", "layout": "uint8 (N, 3, size, size)", "parts": parts}


def pack(
    root: str | os.PathLike,
    out: str | os.PathLike,
    size: int,
    shard_size: int = 1024,
    processes: int | None = None,
    skip_bad: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Pack the image folder `root` into the store `out`, resuming a pack of the same folder; its manifest.

    `processes` decode in parallel (default: every core). An unreadable image
    stops the pack with one line naming it, or is left out (listed in the
    manifest's `skipped`) with `skip_bad`.
    """
    if size < 1:
        raise ValueError(f"--size must be >= 1, got {size}")
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    processes = processes or os.cpu_count() or 1
    if processes < 1:
        raise ValueError(f"--processes must be >= 1, got {processes}")
    source = checked_folder(root, "IMAGE_FOLDER")
    out = Path(out)
    plan = _plan(source, size, shard_size)
    plan["identity"] = _identity(plan)
    finished = _claim(out, plan)
    if finished is not None:
        return finished
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / PLAN, json.dumps(plan))
    for stale in out.glob(".*.tmp*"):  # temporary files of a pack that was killed
        stale.unlink(missing_ok=True)
    start = time.perf_counter()
    total = sum(len(part["files"]) for part in plan["parts"].values())
    with tqdm(total=total, unit="img", desc=f"pack {out.name}", disable=not progress, smoothing=0.1) as bar:
        for name in plan["parts"]:
            _pack_part(out, plan, name, processes, skip_bad, bar)
    manifest = _manifest(out, plan)
    manifest["seconds"] = round(time.perf_counter() - start, 1)
    write_atomic(out / MANIFEST, json.dumps(manifest))
    (out / PLAN).unlink(missing_ok=True)
    return manifest
