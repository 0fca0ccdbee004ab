"""The index of an image tree (its files, labels and verification verdicts), built once and cached on disk.

Listing a tree costs one `stat` of every file (os.scandir); verifying it costs
opening every file. The listing is redone at every start, since the files'
sizes and mtimes key the cache; the verdicts are kept in a JSON file per tree
and verification level under `default_cache_dir()`, and only files that are
new or changed since are opened again. Under torchrun the first process of
each machine (LOCAL_RANK 0) verifies and writes the file while the others
wait, then read it.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist

from untrainable.data.registry import cache_dir

EXTENSIONS = (".png", ".jpg", ".jpeg")
INDEX_VERSION = 1
# How long a process waits for the one that verifies (ImageNet fully decoded takes tens of minutes).
WAIT_S = 4 * 3600.0
POLL_S = 0.5

log = logging.getLogger(__name__)

# A file's verdict: None where it is usable, else why not.
Check = Callable[[Path], "str | None"]


@dataclass(frozen=True)
class ImageListing:
    """The image files of a class-per-sub-folder tree, in a fixed order (class, then path parts).

    `files[i]` is a POSIX path relative to `root`, `labels[i]` indexes `classes`
    (every visible sub-folder, sorted, empty ones included), `sizes[i]` and
    `mtimes[i]` (bytes, ns) are what key the cache (-1 for a file that cannot
    be stat'ed, such as a symlink that loops: verification then names it).
    """

    root: Path
    classes: list[str]
    files: list[str]
    labels: list[int]
    sizes: list[int]
    mtimes: list[int]


def _visible(entry: os.DirEntry) -> bool:
    return not entry.name.startswith(".")


def _inside(path: Path, folders: list[Path]) -> bool:
    return any(path == folder or folder in path.parents for folder in folders)


def _walk(
    folder: str, prefix: str, out: list[tuple[tuple[str, ...], int, int]], classes: list[Path], looped: list[str]
) -> None:
    """Append (path parts, size, mtime_ns) of the image files under `folder`, recursively.

    Like `Path.rglob`, symlinked sub-folders are not entered; symlinked files
    count, except those that lead into one of the tree's `classes` folders
    (resolved), which would count an image twice: their paths go to `looped`.
    """
    with os.scandir(folder) as entries:
        for entry in entries:
            if not _visible(entry):
                continue
            if entry.is_dir(follow_symlinks=False):
                _walk(entry.path, f"{prefix}{entry.name}/", out, classes, looped)
                continue
            if os.path.splitext(entry.name)[1].lower() not in EXTENSIONS:
                continue
            try:
                if not entry.is_file():
                    continue  # a folder named like an image, a broken symlink
                if entry.is_symlink() and _inside(Path(entry.path).resolve(), classes):
                    looped.append(f"{prefix}{entry.name}")
                    continue
                stat = entry.stat()
                size, mtime = stat.st_size, stat.st_mtime_ns
            except (OSError, RuntimeError):  # a symlink that loops: listed, so that verification names it
                size, mtime = -1, -1
            out.append((tuple(f"{prefix}{entry.name}".split("/")), size, mtime))


def _class_folders(root: Path, looped: list[str]) -> list[str]:
    """The visible sub-folders of `root`, sorted; a symlink among them that leads back into the tree, or to a
    folder that holds it, is not one (its images would count twice): its name goes to `looped`."""
    resolved = root.resolve()
    classes = []
    with os.scandir(root) as entries:
        for entry in entries:
            try:
                if not _visible(entry) or not entry.is_dir():
                    continue
            except OSError:  # a symlink that loops: no folder
                continue
            if entry.is_symlink():
                target = Path(entry.path).resolve()
                if _inside(target, [resolved]) or target in resolved.parents:
                    looped.append(f"{entry.name}/")
                    continue
            classes.append(entry.name)
    return sorted(classes)


def scan_tree(root: str | os.PathLike) -> ImageListing:
    """List a tree's image files with their sizes and mtimes: one stat each, no file opened.

    Symlinks that lead back into the tree are not followed, with a warning naming them.
    """
    root = Path(root)
    looped: list[str] = []
    classes = _class_folders(root, looped)
    folders = [(root / name).resolve() for name in classes]
    found: list[tuple[tuple[str, ...], int, int]] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        start = len(found)
        _walk(str(root / name), f"{name}/", found, folders, looped)
        found[start:] = sorted(found[start:])  # by path parts, the order Path sorting gives
        labels += [label] * (len(found) - start)
    if looped:
        shown = ", ".join(looped[:5]) + (" ..." if len(looped) > 5 else "")
        warnings.warn(
            f"image folder {root}: {len(looped)} symlink(s) lead back into the tree and are not followed "
            f"(each of their images would count twice, perhaps under two labels): {shown}; remove them to silence this",
            stacklevel=3,
        )
    return ImageListing(
        root=root,
        classes=classes,
        files=["/".join(parts) for parts, _, _ in found],
        labels=labels,
        sizes=[size for _, size, _ in found],
        mtimes=[mtime for _, _, mtime in found],
    )


def default_cache_dir() -> Path:
    """`$XDG_CACHE_HOME/untrainable/image_index`, or `~/.cache/untrainable/image_index`."""
    return cache_dir("image_index")


def cache_file(cache_dir: Path, root: Path, level: str) -> Path:
    """The index file of one tree (by its resolved path) at one verification level."""
    key = hashlib.sha256(f"{root.resolve()}\0{level}".encode()).hexdigest()[:32]
    return cache_dir / f"{key}.json"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _is_list_of(value: Any, kind: type) -> bool:
    return isinstance(value, list) and all(type(v) is kind for v in value)  # bools are not ints here


def _invalid(stored: Any) -> str | None:
    """What is wrong with the structure of a stored index (version INDEX_VERSION), or None where it is sound."""
    if not isinstance(stored, dict):
        return f"expected a JSON object, got {type(stored).__name__}"
    for key in ("root", "level"):
        if not isinstance(stored.get(key), str):
            return f"'{key}' is {_short(stored.get(key))}, expected a str"
    lists: tuple[tuple[str, type], ...] = (("classes", str), ("files", str), ("labels", int), ("sizes", int), ("mtimes", int))
    for key, of in lists:
        if not _is_list_of(stored.get(key), of):
            return f"'{key}' is {_short(stored.get(key))}, expected a list of {of.__name__}"
    lengths = {key: len(stored[key]) for key in ("files", "labels", "sizes", "mtimes")}
    if len(set(lengths.values())) > 1:
        return f"'files', 'labels', 'sizes' and 'mtimes' differ in length ({lengths})"
    if any(not 0 <= label < len(stored["classes"]) for label in stored["labels"]):
        return f"a label is outside 0..{len(stored['classes']) - 1}"
    bad = stored.get("bad")
    if not isinstance(bad, dict):
        return f"'bad' is {_short(bad)}, expected an object of file position -> reason"
    for key, reason in bad.items():
        if not (key.isdecimal() and int(key) < len(stored["files"])) or not isinstance(reason, str):
            return f"'bad' holds {_short(key)}: {_short(reason)}, expected a file position below {len(stored['files'])}"
    return None


def _read(path: Path, listing: ImageListing, level: str, warn: bool = True) -> dict[str, Any] | None:
    """The stored index at `path`, or None where it is missing, of another version, tree or level, or damaged.

    A damaged one (not JSON, or not of the index's structure) is named in a
    warning (unless `warn` is False) and rebuilt by the caller.
    """
    try:
        text = path.read_bytes()  # json.loads decodes it: a file of bad bytes is damaged, not an error here
    except OSError:  # none there, or no folder to hold one: built (and written, or warned about) by the caller
        return None
    try:
        stored = json.loads(text)
    except ValueError as err:
        problem: str | None = f"not readable JSON ({err})"
    else:
        if isinstance(stored, dict) and stored.get("version") != INDEX_VERSION:
            return None  # another version's: rebuilt without a word
        problem = _invalid(stored)
    if problem is not None:
        if warn:
            warnings.warn(f"the image index {path} is damaged: {problem}; rebuilding it", stacklevel=4)
        return None
    if stored["root"] != str(listing.root.resolve()) or stored["level"] != level:
        return None
    return stored


def _matches(stored: dict[str, Any] | None, listing: ImageListing) -> bool:
    return stored is not None and (stored["files"], stored["sizes"], stored["mtimes"]) == (
        listing.files,
        listing.sizes,
        listing.mtimes,
    )


def _write(path: Path, listing: ImageListing, level: str, bad: dict[int, str]) -> bool:
    """Store the index atomically (a temporary file, then os.replace); False, with a warning, where it cannot."""
    record = {
        "version": INDEX_VERSION,
        "root": str(listing.root.resolve()),
        "level": level,
        "classes": listing.classes,
        "files": listing.files,
        "labels": listing.labels,
        "sizes": listing.sizes,
        "mtimes": listing.mtimes,
        "bad": {str(i): reason for i, reason in sorted(bad.items())},
    }
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # unique across machines sharing it
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(json.dumps(record, separators=(",", ":")))
        os.replace(temporary, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        warnings.warn(
            f"cannot write the image index {path} ({err}); set data.args.index_cache to a writable folder or 'none'",
            stacklevel=4,
        )
        return False
    return True


def _verify(listing: ImageListing, check: Check, stored: dict[str, Any] | None) -> dict[int, str]:
    """Verdicts of every file: kept from `stored` where a file's size and mtime are unchanged, else checked."""
    known: dict[str, tuple[int, int, str | None]] = {}
    if stored is not None:
        stored_bad = stored["bad"]
        for i, (name, size, mtime) in enumerate(zip(stored["files"], stored["sizes"], stored["mtimes"])):
            known[name] = (size, mtime, stored_bad.get(str(i)))
    bad: dict[int, str] = {}
    opened, start = 0, time.perf_counter()
    for i, (name, size, mtime) in enumerate(zip(listing.files, listing.sizes, listing.mtimes)):
        if name in known and known[name][:2] == (size, mtime):
            reason = known[name][2]
        else:
            reason, opened = check(listing.root / name), opened + 1
        if reason is not None:
            bad[i] = reason
    seconds = time.perf_counter() - start
    log.info("image index: opened %d of %d files under %s in %.1f s", opened, len(listing.files), listing.root, seconds)
    return bad


def _stored_bad(stored: dict[str, Any]) -> dict[int, str]:
    return {int(i): reason for i, reason in stored["bad"].items()}


def _build(listing: ImageListing, level: str, check: Check, path: Path | None) -> dict[int, str]:
    """Verdicts from the cache where it matches the listing, else verified here (and stored)."""
    stored = _read(path, listing, level) if path is not None else None
    if _matches(stored, listing):
        return _stored_bad(stored)
    bad = _verify(listing, check, stored)
    if path is not None:
        _write(path, listing, level, bad)
    return bad


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def _process() -> tuple[bool, bool, bool]:
    """(whether this process verifies, whether several processes run, whether a process group joins them)."""
    grouped = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    several = grouped or int(os.environ.get("WORLD_SIZE", "1")) > 1
    rank = os.environ.get("LOCAL_RANK", os.environ.get("RANK"))
    if rank is None:
        rank = str(dist.get_rank()) if grouped else "0"
    return int(rank) == 0, several, grouped


def _wait_for(path: Path, listing: ImageListing, level: str) -> dict[int, str]:
    """Verdicts from the index file that another process is building, once it matches this listing."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        stored = _read(path, listing, level, warn=False)  # LOCAL_RANK 0 warns and rebuilds it
        if _matches(stored, listing):
            return _stored_bad(stored)
        time.sleep(POLL_S)
    raise TimeoutError(
        f"waited {WAIT_S:.0f} s for the image index {path} of {listing.root} that LOCAL_RANK 0 builds; "
        "check that process, or set data.args.index_cache to a folder every process can write, or 'none'"
    )


def verdicts(listing: ImageListing, level: str, check: Check | None, cache_dir: Path | None) -> dict[int, str]:
    """Why each unusable file of `listing` is unusable, by its position: `check` run once per file and cached.

    `level` names the verification (it keys the cache); `check=None` opens
    nothing and caches nothing. `cache_dir=None` keeps no cache (every
    process then verifies for itself). Under torchrun LOCAL_RANK 0 verifies
    and the others wait: at a barrier of a gloo group when a process group
    exists, else for the file.
    """
    if check is None:
        return {}
    builder, several, grouped = _process()
    if cache_dir is not None and several and not _writable(cache_dir):
        # Every process sees the same folder, so all of them take this branch: none waits for a file never written.
        warnings.warn(
            f"cannot write the image index folder {cache_dir}; every process verifies for itself "
            "(set data.args.index_cache to a writable folder)",
            stacklevel=2,
        )
        cache_dir = None
    path = cache_file(cache_dir, listing.root, level) if cache_dir is not None else None
    if path is None or not several:
        return _build(listing, level, check, path)
    if not grouped:
        return _build(listing, level, check, path) if builder else _wait_for(path, listing, level)
    # A group of its own: the default one times out (train.timeout_s) long before a large tree is verified.
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=WAIT_S))
    try:
        bad = _build(listing, level, check, path) if builder else None
        dist.barrier(group=group)
    finally:
        dist.destroy_process_group(group)
    if bad is None:
        stored = _read(path, listing, level)
        if _matches(stored, listing):
            return _stored_bad(stored)
        warnings.warn(f"the image index {path} was not written or does not match; verifying here", stacklevel=2)
        bad = _verify(listing, check, None)
    return bad
