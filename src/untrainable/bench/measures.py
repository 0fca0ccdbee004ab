"""The guided step's time per similarity measure at the rescue's shapes, beside the unguided step.

`untrainable bench --measures` times, on the same batch and in turns
(round-robin, so that load from other processes falls on all alike):
the Deep FCN's training step alone, and the guided step with each
registered measure, the guide's activations read from a filled memory
cache as the rescue runs it (`guidance.cache = "memory"`). Every step is
the trainer's own `step.train_step`.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable

import torch

from untrainable import distributed
from untrainable.bench.cases import Case, build_case
from untrainable.bench.measure import machine, time_variants
from untrainable.guidance import Guidance
from untrainable.guide_cache import GuideCache
from untrainable.similarity import list_similarities
from untrainable.step import StepParts, train_step
from untrainable.tasks import get_task

UNGUIDED = "unguided"


def rescue_case(quick: bool = False) -> Case:
    """The width-128 rescue's pair: Deep FCN 48 x 128 on 28 x 28 inputs, ResNet-18 width 8's 8 blocks, batch 64."""
    mnist = (1, 28, 28)
    depth, width, batch = (4, 16, 8) if quick else (48, 128, 64)
    return Case(
        f"deep_fcn {depth}x{width}<-resnet18 blocks 28x28 b{batch}",
        "deep_fcn",
        {"input_shape": mnist, "depth": depth, "width": width, "batch_norm": True, "dropout": 0.1},
        "resnet18",
        {"input_shape": mnist, "width": 2 if quick else 8, "stem": "small"},
        batch,
        mnist,
        repeats=1 if quick else 15,
        target_layers=("layers.*.linear",),
        guide_layers=("layer*.*",),
    )


def measure_steps(case: Case, device: torch.device, names: list[str]) -> dict[str, Callable[[], None]]:
    """One closure per measure (and UNGUIDED), each a full optimisation step of the trainer on the same batch."""
    target, guide, x, y = build_case(case, device)
    optimizer = torch.optim.Adam(target.parameters(), lr=1e-4)
    index = torch.arange(case.batch)
    numbers = itertools.count(1)

    def step(**terms: Any) -> Callable[[], None]:
        batch = (x, y, index) if terms else (x, y)
        parts = StepParts(
            model=target,
            target=target,
            optimizer=optimizer,
            task=get_task("classification"),
            device=device,
            dist_info=distributed.DistInfo(0, 1, 0, torch.device("cpu")),
            scaler=torch.amp.GradScaler("cuda", enabled=False),
            precision="fp32",
            **terms,
        )

        def run() -> None:
            train_step(parts, batch, next(numbers))

        return run

    steps = {UNGUIDED: step()}
    for name in names:
        guidance = Guidance(
            target, guide, similarity=name, target_layers=case.target_layers, guide_layers=case.guide_layers
        ).train()
        cache = GuideCache(case.batch, "memory")
        cache.activations(index, x, guidance.run_guide)  # filled once, as after the first epoch
        steps[name] = step(guidance=guidance, guide_cache=cache)
    return steps


def run_measures(quick: bool, device: torch.device) -> dict[str, Any]:
    """Median ms per step of the unguided step and the guided step with each measure, with ratios."""
    case = rescue_case(quick)
    names = list_similarities()
    timing = time_variants(measure_steps(case, device, names), case.repeats, device)
    unguided, cka = timing[UNGUIDED], timing["cka"]
    rows = [
        {"measure": name, "ms": timing[name] * 1e3, "x_unguided": timing[name] / unguided, "x_cka": timing[name] / cka}
        for name in [UNGUIDED, *names]
    ]
    return {"machine": machine(), "device": str(device), "case": case.name, "repeats": case.repeats, "rows": rows}


def format_measures(results: dict[str, Any]) -> str:
    """The per-measure table in Markdown."""
    lines = [
        f"Step time per similarity, {results['case']} (median of {results['repeats']}, {results['device']})",
        "",
        "| similarity | step ms | x unguided | x cka |",
        "|---|---|---|---|",
    ]
    for row in results["rows"]:
        lines.append(f"| {row['measure']} | {row['ms']:.1f} | {row['x_unguided']:.2f} | {row['x_cka']:.2f} |")
    return "\n".join(lines)
