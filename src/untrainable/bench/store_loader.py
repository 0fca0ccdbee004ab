"""The image store against the JPEG folder on the same images: images/s per worker and per core at 224.

    nice python -m untrainable.bench.store_loader --tree /tmp/store_bench --out results/data

writes `store.json` and `store.md` into `--out`. It generates a tree of
ImageNet-sized JPEGs (as `untrainable.bench.loader` does, reused when there),
packs it at 224 with `untrainable pack`'s code and, when litdata is importable,
into litdata's optimized format too (the same decoded uint8 images), then
measures each path in turn, every round over all of them, so that a change in
the machine's load falls on all alike:

- per worker: training batches (64, shuffled) that one DataLoader worker
  delivers while the main process only takes them; the training augmentation
  (random-resized crop and flip) runs on the batch where the model runs (on
  the GPU in a GPU run), not in the workers;
- per core: one process on one thread that loads the batches and applies the
  training augmentation itself, so every stage runs on that core.

Cores an H100 would need: images/s of a step (batch 64 over the step's
estimated time, README "Paper-scale runs") over the per-worker rate, plus the
training process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, RandomSampler

from untrainable.bench.loader import machine, make_tree, skipped
from untrainable.data.image_folder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolderDataset,
    decoded,
    find_images,
    train_augment,
)
from untrainable.data.image_store import ImageStoreDataset, Normalise
from untrainable.data.pack import pack

try:  # optional: measured against when installed
    from litdata import StreamingDataset, optimize  # type: ignore[import-not-found, unused-ignore]
except ImportError:  # pragma: no cover - depends on the environment
    StreamingDataset = None
BATCH = 64
# Estimated ms per step at batch 64 on one H100 SXM (README.md, "Paper-scale runs"; no GPU measured them).
STEPS_MS = {"paper-resnet18 (ResNet-18 alone)": 3.9, "paper-deep-fcn (guided by an untrained ResNet-18)": 9.9}


if StreamingDataset is not None:

    class LitdataImages(StreamingDataset):  # type: ignore[misc, valid-type]
        """litdata's StreamingDataset of packed uint8 (3, S, S) images: (image, label) items, as the store's."""

        def __getitem__(self, index: Any) -> tuple[torch.Tensor, int]:
            item = super().__getitem__(index)
            return item["image"], item["label"]


def _litdata_item(job: tuple[int, str, int, int]) -> dict[str, Any]:
    index, path, label, size = job
    image = torch.from_numpy(np.ascontiguousarray(decoded(path, size).transpose(2, 0, 1)))
    return {"image": image, "label": label, "index": index}


def pack_litdata(paths: list[Path], labels: list[int], out: Path, size: int, workers: int) -> float:
    """Write the images decoded as `pack` decodes them in litdata's optimized format; the seconds it took."""
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    jobs = [(i, str(path), label, size) for i, (path, label) in enumerate(zip(paths, labels))]
    optimize(fn=_litdata_item, inputs=jobs, output_dir=str(out), chunk_bytes="64MB", num_workers=workers)
    return time.perf_counter() - start


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def timed_rate(batches: Iterable[Any], skip: int, timed: int, transform: Callable[[Tensor], Tensor] | None) -> float:
    """Images per second over `timed` batches after the first `skip` (made while the workers started).

    `transform`, when given, runs here on each batch (prepare and augment, on this core).
    """
    iterator = iter(batches)
    for _ in range(skip):
        next(iterator)
    start, count = time.perf_counter(), 0
    for _ in range(timed):
        x = next(iterator)[0]
        if transform is not None:
            x = transform(x)
        count += x.shape[0]
    return count / (time.perf_counter() - start)


def map_loader(dataset: ImageFolderDataset | ImageStoreDataset, workers: int, batches: int, seed: int) -> DataLoader:
    """Shuffled training batches of a map-style data set, `batches` of them (several epochs if needed)."""
    sampler = RandomSampler(dataset, num_samples=batches * BATCH, generator=torch.Generator().manual_seed(seed))
    context = "fork" if workers else None  # litdata sets the default to spawn; every path gets the same
    return DataLoader(dataset, BATCH, sampler=sampler, num_workers=workers, multiprocessing_context=context)


def litdata_loader(folder: Path, workers: int, seed: int) -> DataLoader:
    dataset = LitdataImages(str(folder), shuffle=True, drop_last=True, seed=seed)
    return DataLoader(dataset, BATCH, num_workers=workers, multiprocessing_context="fork" if workers else None)


def _same_pixels(folder: ImageFolderDataset, store: ImageStoreDataset, lit: Path | None, n: int) -> dict[str, bool]:
    """Whether the store's first `n` items equal the folder's, and litdata's images the store's pixels."""
    to_float = Normalise(IMAGENET_MEAN, IMAGENET_STD)
    checks = {"store_equals_folder": all(torch.equal(folder[i][0], to_float(store[i][0][None])[0]) for i in range(n))}
    if lit is not None:
        raw = StreamingDataset(str(lit))
        items = [raw[i] for i in range(n)]
        checks["litdata_equals_store"] = all(torch.equal(it["image"], store.pixels(it["index"])) for it in items)
    return checks


Case = tuple[Callable[[int, int], Iterable[Any]], Callable[[Tensor], Tensor] | None]


def measure(cases: dict[str, Case], timed: int, repeats: int) -> dict[str, Any]:
    """Per worker (1 worker; the main process only takes batches) and per core (0 workers; this process also
    prepares and augments each batch) rates of each case: (batch maker (workers, round) -> batches, prepare).

    Rounds interleave the cases; each case's figure is the median of its rounds.
    """
    runs: dict[str, dict[str, list[float]]] = {name: {"per_worker": [], "per_core": []} for name in cases}
    for r in range(repeats):
        for name, (batches, prepare) in cases.items():
            on_core = (lambda x: train_augment(prepare(x))) if prepare is not None else train_augment
            for key, workers, transform in (("per_worker", 1, None), ("per_core", 0, on_core)):
                rate = timed_rate(batches(workers, r), skipped(workers), timed, transform)
                runs[name][key].append(round(rate, 1))
                print(f"  round {r} {name} {key}: {rate:.1f} images/s", flush=True)
    return {
        name: {key: float(np.median(values)) for key, values in rates.items()}
        | {f"{key}_runs": values for key, values in rates.items()}
        for name, rates in runs.items()
    }


def cores_needed(rates: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """Per path and step: images/s the step takes, workers that deliver it, cores (the workers + the trainer)."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for step, ms in STEPS_MS.items():
        need = BATCH / (ms / 1000)
        out[step] = {}
        for name, rate in rates.items():
            workers = math.ceil(need / rate["per_worker"])
            out[step][name] = {"images_per_s": round(need), "workers": workers, "cores": workers + 1}
    return out


def augment_rate(size: int, batches: int = 8) -> float:
    """Images per second that the training augmentation alone runs at on one core, on batches of 64."""
    x = torch.rand(BATCH, 3, size, size)
    train_augment(x)
    start = time.perf_counter()
    for _ in range(batches):
        train_augment(x)
    return BATCH * batches / (time.perf_counter() - start)


def table(record: dict[str, Any]) -> str:
    rates, jpeg = record["rates"], record["rates"]["jpeg_folder"]
    lines = [
        "| path | images/s per worker: median (runs) | per core, augmentation included: median (runs) | "
        "per worker vs JPEG | per core vs JPEG | on disk (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in rates.items():
        lines.append(
            f"| {name} | {r['per_worker']:.0f} ({', '.join(f'{v:.0f}' for v in r['per_worker_runs'])}) | "
            f"{r['per_core']:.0f} ({', '.join(f'{v:.0f}' for v in r['per_core_runs'])}) | "
            f"{r['per_worker'] / jpeg['per_worker']:.1f}x | {r['per_core'] / jpeg['per_core']:.1f}x | "
            f"{record['bytes'][name] / 1e6:.0f} |"
        )
    lines += ["", "| step on one H100 (estimated) | images/s | " + " | ".join(f"cores: {n}" for n in rates) + " |"]
    lines += ["|---|---|" + "---|" * len(rates)]
    for step, by_path in record["cores_needed"].items():
        first = next(iter(by_path.values()))
        cells = " | ".join(f"{v['cores']} ({v['workers']} workers + 1)" for v in by_path.values())
        lines.append(f"| {step}, {STEPS_MS[step]} ms | {first['images_per_s']} | {cells} |")
    lines += ["", f"Training augmentation alone, one core: {record['augment_alone_per_core']:.0f} images/s."]
    lines += [f"Ratios: {json.dumps({k: v for k, v in record.items() if 'ratio' in k})}"]
    lines += [f"Same pixels: {json.dumps(record['checks'])}. Packing: {json.dumps(record['packing'])}"]
    return "\n".join(lines) + "\n"


def build(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Case]]:
    """Generate and pack the tree; the record so far and each path's case for `measure`."""
    size, cores = args.image_size, os.cpu_count() or 1
    tree = args.tree / "tree"
    record: dict[str, Any] = {"tree": make_tree(tree, args.images, args.classes, (500, 375), cores)}
    paths, labels, _ = find_images(tree)
    store_dir = args.tree / f"store-{size}"
    manifest = pack(tree, store_dir, size, processes=cores, progress=False)
    record["packing"] = {"store_s": manifest["seconds"], "store_images": manifest["parts"]["train"]["count"]}
    folder = ImageFolderDataset(paths, labels, size, IMAGENET_MEAN, IMAGENET_STD)
    shards = [(str(store_dir / s["file"]), s["count"]) for s in manifest["parts"]["train"]["shards"]]
    store = ImageStoreDataset(shards, manifest["parts"]["train"]["labels"], size)
    to_float = Normalise(IMAGENET_MEAN, IMAGENET_STD)
    record["bytes"] = {"jpeg_folder": _bytes(tree), "image_store": _bytes(store_dir)}
    total = skipped(1) + args.batches
    cases: dict[str, Case] = {
        "jpeg_folder": (lambda w, r: map_loader(folder, w, total, r), None),
        "image_store": (lambda w, r: map_loader(store, w, total, r), to_float),
    }
    lit = None
    if StreamingDataset is not None and not args.no_litdata:
        lit = args.tree / f"litdata-{size}"
        record["packing"]["litdata_s"] = round(pack_litdata(paths, labels, lit, size, cores), 1)
        record["bytes"]["litdata"] = _bytes(lit)
        if len(paths) // BATCH < total:
            raise ValueError(f"--images {len(paths)}: litdata reads one epoch, {total * BATCH} images are needed")
        cases["litdata"] = (lambda w, r: litdata_loader(lit, w, r), to_float)
    record["checks"] = _same_pixels(folder, store, lit, min(16, len(paths)))
    return record, cases


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, required=True, help="folder for the tree and its packed copies (reused)")
    parser.add_argument("--out", type=Path, required=True, help="folder for store.json and store.md")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batches", type=int, default=24, help="batches timed per run")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over every path (median reported)")
    parser.add_argument("--no-litdata", action="store_true", help="leave litdata out even where installed")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one core per loading process, the main one included
    record: dict[str, Any] = {"command": " ".join(["python -m untrainable.bench.store_loader", *sys.argv[1:]])}
    record |= {"machine": machine(), "niceness": os.nice(0), "wall_start": time.strftime("%Y-%m-%d %H:%M:%S")}
    built, cases = build(args)
    record |= built
    record["load_average_1min_before_timing"] = os.getloadavg()[0]
    record["rates"] = measure(cases, args.batches, args.repeats)
    record["augment_alone_per_core"] = round(augment_rate(args.image_size), 1)
    jpeg, store = record["rates"]["jpeg_folder"], record["rates"]["image_store"]
    record["store_to_jpeg_ratio_per_worker"] = round(store["per_worker"] / jpeg["per_worker"], 2)
    record["store_to_jpeg_ratio_per_core"] = round(store["per_core"] / jpeg["per_core"], 2)
    if "litdata" in record["rates"]:
        record["litdata_to_store_ratio_per_worker"] = round(
            record["rates"]["litdata"]["per_worker"] / store["per_worker"], 2
        )
    record["cores_needed"] = cores_needed(record["rates"])
    record["load_average_1min_at_end"] = os.getloadavg()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "store.json").write_text(json.dumps(record, indent=1) + "\n")
    (args.out / "store.md").write_text(table(record))
    print(table(record), flush=True)


if __name__ == "__main__":
    main()
