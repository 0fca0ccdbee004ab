"""One paper-scale config's training step measured on a device, beside `paper_estimates`' numbers for its shapes.

    python -m untrainable.bench.paper_measure paper_deep_fcn [--device cuda] [--steps 200] [--tiny] [--out FILE.json]

The config's target and guide are built at full size as a bench `Case`
(`paper_case`): its batch, image size, layers, precision (autocast) and
fused Adam. Both models are untrained: what a step costs does not depend on
the weights, so a trained guide's checkpoint is not needed. The bench's own
steps (`variants.case_steps`, which run the trainer's `step.train_step`)
are timed by `measure.time_variants`: (a) the target alone and (c) guided,
taking turns `--steps` times after a warm-up (CUDA events on a GPU), then
each one's peak memory by `measure.step_peaks`. `paper_estimates.estimate`
gives the estimate for the same config and batch.

Memory on a GPU, in GiB: `in_use` is what stays allocated between steps
(weights, gradients, Adam's moments, the guide; and the bench's own buffers,
`bench_buffers`: the guide cache of one batch and the floor's random
tensors), `step` = in_use - bench_buffers + the guided step's peak above
in_use, the figure to compare with the estimate's states + kept.

`--tiny` shrinks the config to toy sizes (TINY: 32 x 32 images, batch 8,
narrow layers, the depths kept) and runs the same code, for a dry run on a
CPU; its numbers say that the code runs, nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from untrainable.bench.cases import Case
from untrainable.bench.measure import machine, step_peaks, time_variants
from untrainable.bench.paper_estimates import GPUS, IMAGENET_CLASSES, estimate, paper_config
from untrainable.bench.report import format_number
from untrainable.bench.run import bench_device, check_threads
from untrainable.bench.variants import case_steps
from untrainable.config import RunConfig

STEPS = 200
TINY_STEPS = 3
MEASURED = ("target", "guided")  # variants (a) and (c)
TINY_SHARED = {"data.args.image_size": 32, "data.batch_size": 8}
# Per config, the widths that make it a toy of the same shape (depths and layer pairs as shipped).
TINY = {
    "paper_deep_fcn": {"model.args.first_width": 64, "model.args.width": 32, "guide.args.width": 4},
    "paper_wide_fcn": {"model.args.width": 64, "guide.args.width": 4},
    "paper_plain50": {"model.args.width": 4, "guide.args.width": 4},
}
CONFIGS = tuple(TINY)
GIB = 2**30


def measured_config(name: str, tiny: bool = False) -> RunConfig:
    """The shipped config `name` without its guide's checkpoint, shrunk by TINY when `tiny`."""
    return paper_config(name, {**TINY_SHARED, **TINY[name]} if tiny else None)


def paper_case(config: RunConfig, steps: int) -> Case:
    """A bench Case of an image config's target and guide, untrained, at its batch, image size and precision."""
    if config.guide is None or config.data.name != "image_folder":
        raise ValueError(f"{config.name}: paper_case takes a guided config on image_folder data")
    size = int(config.data.args.get("image_size", 224))
    shape = (3, size, size)
    layers = config.guidance.target_layers, config.guidance.guide_layers
    return Case(
        name=config.name,
        target=config.model.name,
        target_args={**config.model.args, "input_shape": shape},
        guide=config.guide.name,
        guide_args={**config.guide.args, "input_shape": shape},
        batch=config.data.batch_size,
        input_shape=shape,
        num_classes=IMAGENET_CLASSES,
        repeats=steps,
        note="untrained weights; synthetic inputs",
        target_layers=tuple(layers[0]) if layers[0] else None,
        guide_layers=tuple(layers[1]) if layers[1] else None,
        precision=config.train.precision,
        fused=config.optim.fused,
    )


def measure(config: RunConfig, device: torch.device, steps: int) -> dict[str, Any]:
    """ms per step and peak memory of (a) and (c) for `config` on `device`, with the estimate for its shapes."""
    case = paper_case(config, steps)
    started = time.perf_counter()
    forecast = estimate(config, case.batch)
    estimated_s = time.perf_counter() - started
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    built = time.perf_counter()
    all_steps, info = case_steps(case, device)
    chosen = {name: all_steps[name] for name in MEASURED}
    built_s = time.perf_counter() - built
    timed = time.perf_counter()
    timing = time_variants(chosen, steps, device)
    timed_s = time.perf_counter() - timed
    in_use = torch.cuda.memory_allocated(device) / GIB if cuda else None
    peaks = step_peaks(chosen, device)
    buffers = (info["cache_mib"] * case.batch + info["products"]["buffers_mib"]) / 1024
    step = in_use - buffers + peaks["guided"] / 1024 if cuda and peaks["guided"] is not None else None
    first = next(iter(GPUS))
    return {
        "config": config.name,
        "device": str(device),
        "machine": machine(),
        "timing": "CUDA events" if cuda else "perf_counter",
        "batch": case.batch,
        "image_size": case.input_shape[-1],
        "precision": case.precision,
        "fused_adam": case.fused,
        "steps": steps,
        "pairs": info["pairs"],
        "ms": {name: seconds * 1e3 for name, seconds in timing.items()},
        "peak_mib": peaks,
        "gib": {
            "in_use": in_use,
            "bench_buffers": buffers,
            "step": step,
            "max_allocated": torch.cuda.max_memory_allocated(device) / GIB if cuda else None,
        },
        "estimate": {
            "ms": {gpu: forecast.total_seconds(gpu) * 1e3 for gpu in GPUS},
            f"parts_ms_{first}": {part: s * 1e3 for part, s in forecast.seconds[first].items()},
            "gib": forecast.gib,
            "params_m": {"target": forecast.target_params / 1e6, "guide": forecast.guide_params / 1e6},
        },
        "seconds": {"estimate": estimated_s, "build": built_s, "timing": timed_s},
    }


def describe(result: dict[str, Any]) -> str:
    """One line: the measured ms per step and memory beside the estimate's."""
    ms, est, step = result["ms"], result["estimate"], result["gib"]["step"]
    memory = f", step {format_number(step)} GiB" if step is not None else ""
    estimated = " / ".join(f"{format_number(value)} ms on {gpu}" for gpu, value in est["ms"].items())
    kept = est["gib"]["states"] + est["gib"]["kept"]
    return (
        f"guided {format_number(ms['guided'])} ms/step (target alone {format_number(ms['target'])}){memory}; "
        f"estimated {estimated}, {format_number(kept)} GiB"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", choices=CONFIGS, help="a shipped paper-scale config with a guide")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.add_argument("--steps", type=int, help=f"timed steps of each variant (default: {STEPS}; {TINY_STEPS} tiny)")
    parser.add_argument("--tiny", action="store_true", help="toy sizes, seconds on a CPU (numbers not meaningful)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--out", help="a JSON file for the result")
    args = parser.parse_args(argv)
    check_threads(args.threads)
    device = bench_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    steps = args.steps or (TINY_STEPS if args.tiny else STEPS)
    result = measure(measured_config(args.config, args.tiny), device, steps)
    result["tiny"] = args.tiny
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{args.config}: {describe(result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
