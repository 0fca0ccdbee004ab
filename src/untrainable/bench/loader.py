"""Measure the image_folder loader on a generated ImageNet-like tree: index time, images per second per worker.

    python -m untrainable.bench.loader --tree /tmp/imagenet_like --out results/data

writes `loader.json` and `loader.md` into `--out`. The tree (JPEGs of about
500 x 375, quality 90, smooth noise that compresses like photographs, plus a
few 1600 x 1200 ones where JPEG draft decoding applies at 224) is generated
once and reused.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image, features
from torch.utils.data import DataLoader

from untrainable.bench.measure import cpu_model
from untrainable.data.image_folder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageFolderDataset,
    _resized_crop,
    eight_bit,
    image_folder,
    normalize,
)
from untrainable.data.image_index import scan_tree

LEVELS = ("none", "header", "decode")


def photo(seed: int, width: int, height: int) -> Image.Image:
    """Smooth random colour (coarse, middle and fine noise), an RGB (H, W) picture that compresses like a photo."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, height // 24), max(2, width // 24), 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC), dtype=np.int16)
    middle = rng.integers(68, 188, (height // 4, width // 4, 3), dtype=np.uint8)
    base += np.asarray(Image.fromarray(middle).resize((width, height), Image.Resampling.BILINEAR), dtype=np.int16) - 128
    base += rng.normal(0, 10, (height, width, 3)).astype(np.int16)
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def _write_one(job: tuple[str, int, int, int]) -> int:
    path, seed, width, height = job
    photo(seed, width, height).save(path, "JPEG", quality=90)
    return os.path.getsize(path)


def make_tree(root: Path, images: int, classes: int, size: tuple[int, int], processes: int) -> dict:
    """`images` JPEGs in `classes` folders (a quarter of them portrait), unless a finished tree is already there."""
    done = root / ".complete.json"
    if done.exists() and json.loads(done.read_text())["images"] == images:
        return json.loads(done.read_text())
    width, height = size
    jobs = []
    for i in range(images):
        folder = root / f"class{i % classes:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        w, h = (height, width) if i % 4 == 3 else (width, height)
        jobs.append((str(folder / f"img{i:07d}.JPEG"), i, w, h))
    start = time.perf_counter()
    with multiprocessing.Pool(processes) as pool:
        sizes = pool.map(_write_one, jobs, chunksize=64)
    record = {"images": images, "classes": classes, "size": list(size), "mean_kB": round(np.mean(sizes) / 1e3, 1)}
    record["seconds_to_generate"] = round(time.perf_counter() - start, 1)
    done.write_text(json.dumps(record))
    return record


def time_index(root: Path, cache_dir: Path) -> dict:
    """Seconds to set up image_folder at each verification level: with no index yet (cold), then from it (cached)."""
    start = time.perf_counter()
    files = len(scan_tree(root).files)
    out = {"files": files, "stat_scan_s": round(time.perf_counter() - start, 2)}
    for level in LEVELS:
        for state in ("cold", "cached"):
            start = time.perf_counter()
            image_folder(str(root), image_size=224, val_fraction=0.01, verify=level, index_cache=str(cache_dir / level))
            out[f"{level}_{state}_s"] = round(time.perf_counter() - start, 2)
            print(f"  index {level} {state}: {out[f'{level}_{state}_s']} s", flush=True)
    return out


def loader_rate(dataset: ImageFolderDataset, batch_size: int, workers: int, shuffle: bool, batches: int) -> float:
    """Images per second a DataLoader delivers in steady state, over `batches` batches.

    The batches ready at the start (each worker prefetches 2, made while the
    first one was awaited) are left out, so the timed ones arrive as fast as
    the workers make them; `batches` should be a multiple of `workers`.
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers, drop_last=True)
    iterator = iter(loader)
    for _ in range(skipped(workers)):
        next(iterator)
    start, count = time.perf_counter(), 0
    for _ in range(batches):
        count += next(iterator)[0].shape[0]
    return count / (time.perf_counter() - start)


def skipped(workers: int) -> int:
    return 2 * workers + 1


def stages(paths: list[Path], image_size: int) -> dict:
    """Milliseconds per image of each stage of one load, in this process: decode, resize + crop, normalise."""
    totals = np.zeros(3)
    for path in paths:
        t0 = time.perf_counter()
        with Image.open(path) as image:
            image = eight_bit(image).convert("RGB")
        t1 = time.perf_counter()
        array = _resized_crop(image, image_size)
        t2 = time.perf_counter()
        normalize(torch.from_numpy(array).permute(2, 0, 1).contiguous(), IMAGENET_MEAN, IMAGENET_STD)
        totals += [t1 - t0, t2 - t1, time.perf_counter() - t2]
    per_image = [round(float(t) / len(paths) * 1e3, 2) for t in totals]
    return dict(zip(("decode_ms", "resize_crop_ms", "to_tensor_normalise_ms"), per_image))


def throughput(tree: Path, large: Path, batches: int, repeats: int) -> list[dict]:
    """Images/s of the training loader (shuffled, batch 64) and the evaluation one (in order, batch 512).

    Each case runs `repeats` times; its row gives the median and every run.
    """
    train = image_folder(str(tree), image_size=224, val_fraction=0.01, verify="none", index_cache="none").train
    big = image_folder(str(large), image_size=224, val_fraction=0.05, verify="none", index_cache="none").train
    cases = [("train", tree, 224, 64, True, w, False) for w in (1, 2)]
    cases += [("eval", tree, 224, 512, False, w, False) for w in (0, 1, 2)]
    cases += [("train", tree, 224, 64, True, 1, True), ("eval", tree, 224, 512, False, 1, True)]
    cases += [("train", tree, 112, 64, True, 1, d) for d in (False, True)]
    cases += [("train", large, 224, 64, True, 1, d) for d in (False, True)]
    rows = []
    for kind, root, size, batch, shuffle, workers, draft in cases:
        source = big if root == large else train
        dataset = ImageFolderDataset(source.paths, source.labels, size, IMAGENET_MEAN, IMAGENET_STD, draft=draft)
        timed = batches if batch == 64 else max(2, batches // 6)
        # A small tree (a smoke test) still gives batches to time.
        batch = min(batch, len(dataset) // (skipped(workers) + max(workers, 1)))
        n = min(timed, len(dataset) // batch - skipped(workers))
        # Workers start together and keep in step: timing a multiple of their number counts whole rounds.
        n -= n % max(workers, 1)
        runs = [round(loader_rate(dataset, batch, workers, shuffle, n), 1) for _ in range(repeats)]
        rate = float(np.median(runs))
        row = {"batches": kind, "tree": root.name, "image_size": size, "batch_size": batch, "workers": workers}
        row |= {"draft": draft, "images_timed": n * batch, "images_per_s": round(rate, 1)}
        row["images_per_s_per_worker"] = round(rate / max(workers, 1), 1)
        row["images_per_s_runs"] = runs
        rows.append(row)
        print(f"  {row}", flush=True)
    return rows


def machine() -> dict:
    """The CPU, load, and the versions that decide decoding speed (Pillow, libjpeg-turbo)."""
    return {
        "cpu": cpu_model()[0],
        "cores": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pillow": PIL.__version__,
        "libjpeg_turbo": features.check_feature("libjpeg_turbo"),
    }


def workers_needed(rate_per_worker: float, rates: list[float]) -> dict:
    return {str(int(r)): math.ceil(r / rate_per_worker) for r in rates}


def table(record: dict) -> str:
    index = record["index"]
    lines = ["| verify | cold (s) | cached (s) |", "|---|---|---|"]
    lines += [f"| {lv} | {index[f'{lv}_cold_s']} | {index[f'{lv}_cached_s']} |" for lv in LEVELS]
    lines += [f"\nStat scan alone: {index['stat_scan_s']} s for {index['files']} files.\n"]
    lines += [
        "| batches | tree | size | batch | workers | draft | images/s: median (runs) | per worker |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in record["throughput"]:
        lines.append(
            f"| {r['batches']} | {r['tree']} | {r['image_size']} | {r['batch_size']} | {r['workers']} | "
            f"{'yes' if r['draft'] else 'no'} | {r['images_per_s']} ({', '.join(map(str, r['images_per_s_runs']))}) | "
            f"{r['images_per_s_per_worker']} |"
        )
    lines += [f"\nStages of one load, ms per image (one process): {record['stages']}"]
    lines += [f"\nWorkers needed at {record['rate_per_worker']} images/s each: {record['workers_needed']}"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, required=True, help="folder for the generated tree (kept, reused)")
    parser.add_argument("--out", type=Path, required=True, help="folder for loader.json and loader.md")
    parser.add_argument("--images", type=int, default=20000)
    parser.add_argument("--large-images", type=int, default=704, help="1600 x 1200 JPEGs, for draft decoding")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--batches", type=int, default=40, help="training batches timed per case")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each throughput case (median reported)")
    parser.add_argument("--rates", type=float, nargs="+", default=[3000, 10000], help="images/s to feed")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one core per loading process, the main one included
    record = {"command": " ".join(["python -m untrainable.bench.loader", *sys.argv[1:]]), "machine": machine()}
    print("generating", flush=True)
    record["tree"] = make_tree(args.tree / "tree", args.images, args.classes, (500, 375), os.cpu_count() or 1)
    record["large_tree"] = make_tree(args.tree / "large", args.large_images, 8, (1600, 1200), os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as cache:
        record["index"] = time_index(args.tree / "tree", Path(cache))
    record["stages"] = stages(sorted((args.tree / "tree").glob("class0000/*"))[:200], 224)
    record["throughput"] = throughput(args.tree / "tree", args.tree / "large", args.batches, args.repeats)
    per_worker = next(r for r in record["throughput"] if r["batches"] == "train" and r["workers"] == 1)
    record["rate_per_worker"] = per_worker["images_per_s"]
    record["workers_needed"] = workers_needed(record["rate_per_worker"], args.rates)
    record["load_average_1min_at_end"] = os.getloadavg()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "loader.json").write_text(json.dumps(record, indent=1) + "\n")
    (args.out / "loader.md").write_text(table(record))
    print(table(record), flush=True)


if __name__ == "__main__":
    main()
