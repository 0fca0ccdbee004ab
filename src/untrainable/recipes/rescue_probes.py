"""Probes around the rescue, at 10 to 12 epochs: depth, a plain ConvNet, two guides at once, adaptive alpha.

`rescue-depth` maps where the FCN stops training alone and how far guidance
moves that limit, with per-layer gradient norms from the same runs
(`rescue-depth-long` redoes it at the long horizon, with early stopping);
`rescue-convnet` does the same for a plain (skip-less) ConvNet and its ResNet;
`rescue-guides` asks whether two untrained guides (a ResNet-18 and a ViT)
rescue the FCN better together than each alone; `rescue-alpha` sets the
adaptive alpha against the constant alpha 1 and the first 150 steps.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any, Callable

from untrainable.config import shipped_config
from untrainable.experiment import Arm, Experiment, register_experiment
from untrainable.recipes.rescue import LONG_EPOCHS, _with_optimiser
from untrainable.recipes.rescue_short import (
    ADAPTIVE_ARM,
    CONTROL_WIDTH,
    DEPTH_SEEDS,
    DEPTHS,
    FIRST_STEPS,
    GRAD_NORM_STEPS,
    QUICK_BASELINE,
    QUICK_SEEDS,
    _core_arms,
    _curves_after,
    _describe,
)
from untrainable.trainer import RunResult


def alpha_experiment(quick: bool = False) -> Experiment:
    """48 x 256, 10 epochs, 3 seeds: alone (QUICK_BASELINE), constant alpha 1, the first 150 steps, adaptive alpha.

    The adaptive arm keeps the rule's defaults. `quick`: width 32, guide
    width 4, 256 images, 1 epoch, one seed, alpha measured every 2 steps so
    its 4 steps see two measurements.
    """
    guided = shipped_config("rescue_deep_fcn").with_args("model", width=CONTROL_WIDTH).with_section("train", epochs=10)
    adaptive = {"schedule": "adaptive"}
    if quick:
        guided = (
            guided.with_args("model", width=32)
            .with_args("guide", width=4)
            .with_args("data", train_size=256, val_size=128)
            .with_section("train", epochs=1, progress=False)
        )
        adaptive["adapt_every"] = 2
    arms = _core_arms(guided, *QUICK_BASELINE, FIRST_STEPS[:1])
    arms.append(Arm(ADAPTIVE_ARM, guided.with_section("guidance", **adaptive)))
    rule = arms[-1].config.guidance
    experiment = Experiment(
        name="rescue-alpha" + ("-quick" if quick else ""),
        description=_describe(guided, *QUICK_BASELINE, "as in `rescue --quick`, the width-256 sweep's choice")
        + f" `adaptive`: alpha starts at {rule.alpha:g} and is measured every {rule.adapt_every} steps as "
        f"min({rule.adapt_ratio:g} ||grad task loss|| / ||grad guidance loss at alpha 1||, {rule.alpha_max:g}) "
        f"on the FCN's parameters, averaged with momentum {rule.adapt_momentum:g} (bias-corrected).",
        arms=arms,
        seeds=(0,) if quick else QUICK_SEEDS,
        baseline="deep-fcn",
    )
    curves = _curves_after(experiment.name, FIRST_STEPS[:1])

    def after(out: Path, table: dict[str, Any], results: dict[str, list[RunResult]]) -> None:
        curves(out, table, results)
        _alpha_after(experiment.name, out, table, results)

    experiment.after = after
    return experiment


def alpha_by_step(folder: Path) -> list[float]:
    """The alpha of every training step of a run, in step order (from its metrics.jsonl)."""
    records = [json.loads(line) for line in (Path(folder) / "metrics.jsonl").read_text().splitlines()]
    return [r["alpha"] for r in sorted((r for r in records if "kind" not in r), key=lambda r: r["step"])]


def _alpha_after(name: str, out: Path, table: dict[str, Any], results: dict[str, list[RunResult]]) -> None:
    """alpha.png: alpha per step of the guided arms; a note with the adaptive arm's alpha, mean over seeds."""
    from untrainable.plots import plot_per_step

    series = {arm: [alpha_by_step(r.folder) for r in runs] for arm, runs in results.items() if "+" in arm}
    plot_per_step(series, out / "alpha.png", "alpha", title=f"{name}: alpha per step, mean and range over seeds")
    adaptive = series[ADAPTIVE_ARM]
    length = min(len(run) for run in adaptive)
    mean = [statistics.mean(run[i] for run in adaptive) for i in range(length)]
    table.setdefault("notes", []).append(
        f"Adaptive alpha, mean over seeds: {mean[0]:.3g} at step 1, {max(mean):.3g} at most, {mean[-1]:.3g} at the "
        f"last step, {statistics.mean(mean):.3g} on average over the run (alpha.png)."
    )


@register_experiment("rescue-alpha")
def rescue_alpha(quick: bool = False) -> Experiment:
    """The rescue at width 256 with an adaptive alpha, against the constant alpha 1 and the first 150 steps."""
    return alpha_experiment(quick)


def depth_experiment(quick: bool = False, long: bool = False) -> Experiment:
    """Depth 8 to 48 at width 256, alone vs + untrained ResNet-18, with per-layer gradient norms.

    `long`: LONG_EPOCHS epochs with early stopping, depths up to 64 (`rescue-depth-long`).
    """
    guided = (
        shipped_config("rescue_deep_fcn")
        .with_args("model", width=CONTROL_WIDTH)
        .with_section("train", epochs=LONG_EPOCHS if long else 10, grad_norm_steps=GRAD_NORM_STEPS)
    )
    if long:
        guided = guided.with_section("train", early_stopping=True)
    depths = DEPTHS + ((64,) if long else ())
    if quick:
        guided = (
            guided.with_args("model", width=32)
            .with_args("data", train_size=256, val_size=128)
            .with_section("train", epochs=1, progress=False)
        )
        guided = guided.with_args("guide", width=4)
        depths = (4, 8)
    arms = []
    for depth in depths:
        at_depth = guided.with_args("model", depth=depth)
        arms += [
            Arm(f"deep-fcn-d{depth}", at_depth.replace(guide=None)),
            Arm(f"deep-fcn-d{depth}+untrained-resnet18", at_depth),
        ]
    experiment = Experiment(
        name="rescue-depth" + ("-long" if long else "") + ("-quick" if quick else ""),
        description=(
            f"Depth map: the Deep FCN (width {guided.model.args['width']}, BatchNorm, dropout 0.1) at depths "
            f"{', '.join(map(str, depths))}, alone and with an untrained ResNet-18 guide (alpha 1), Adam lr 1e-3, "
            f"{guided.train.epochs} epochs on {guided.data.args['train_size']} Fashion-MNIST images; test accuracy, mean ± std "
            f"over seeds. Per-layer gradient norms logged at steps {', '.join(map(str, GRAD_NORM_STEPS))}."
        ),
        arms=arms,
        seeds=(0,) if quick else DEPTH_SEEDS,
    )
    experiment.after = _depth_after(depths)
    return experiment


def _depth_after(depths: tuple[int, ...]) -> Callable[[Path, dict[str, Any], dict[str, list[RunResult]]], None]:
    def after(out: Path, table: dict[str, Any], results: dict[str, list[RunResult]]) -> None:
        from untrainable.plots import plot_depth_map, plot_grad_norms

        by_arm = {row["arm"]: row for row in table["rows"]}
        curve = {
            kind: [by_arm[f"deep-fcn-d{d}{suffix}"]["test_accuracy"] for d in depths]
            for kind, suffix in (("alone", ""), ("+ untrained ResNet-18", "+untrained-resnet18"))
        }
        plot_depth_map(list(depths), curve, out / "depth_map.png", title="Deep FCN test accuracy against depth")
        deepest = max(depths)
        norms = {
            kind: grad_norms_by_layer([r.folder for r in results[f"deep-fcn-d{deepest}{suffix}"]])
            for kind, suffix in (("alone", ""), ("guided", "+untrained-resnet18"))
        }
        plot_grad_norms(
            norms,
            out / "grad_norms.png",
            title=f"Depth {deepest}: gradient norm of each linear layer's weight, median over seeds",
        )
        summary = {
            kind: {str(step): _spread(values) for step, values in steps.items()} for kind, steps in norms.items()
        }
        table["grad_norms"] = {"depth": deepest, "per_layer": norms, "first_over_last": summary}
        cells = [
            f"{kind} step {step}: {ratio:.3g}"
            for kind, steps in summary.items()
            for step, ratio in steps.items()
            if ratio is not None
        ]
        table.setdefault("notes", []).append(
            f"Depth {deepest}, gradient norm of the first linear layer over the last's (median over seeds): "
            + "; ".join(cells)
            + " (grad_norms.png; depth_map.png)."
        )

    return after


def grad_norms_by_layer(folders: list[Path]) -> dict[int, list[float]]:
    """step -> the median over runs of each linear layer's weight-gradient norm, in layer order (from metrics.jsonl)."""
    per_step: dict[int, list[list[float]]] = {}
    for folder in folders:
        for line in (Path(folder) / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            keys = sorted(
                (k for k in record if k.startswith("grad_norm/layers.") and k.endswith(".linear.weight")),
                key=lambda k: int(k.split(".")[1]),
            )
            if keys:
                per_step.setdefault(int(record["step"]), []).append([record[k] for k in keys])
    return {step: [statistics.median(v) for v in zip(*runs)] for step, runs in sorted(per_step.items())}


def _spread(values: list[float]) -> float | None:
    return values[0] / values[-1] if values and values[-1] > 0 else None


@register_experiment("rescue-depth")
def rescue_depth(quick: bool = False) -> Experiment:
    """Where the Deep FCN stops training alone, how far an untrained guide moves that limit, and gradient norms."""
    return depth_experiment(quick)


def convnet_experiment(quick: bool = False) -> Experiment:
    """Plain-50 (no skips) alone and guided by ResNet-50, trained or untrained; ResNet-50 alone."""
    guided = shipped_config("rescue_convnet")
    if quick:
        guided = guided.with_args("data", train_size=128, val_size=64).with_section("train", epochs=1, progress=False)
        guided = guided.with_args("model", width=4).with_args("guide", width=4).with_section("data", train_eval_size=64)
    resnet = guided.replace(model=guided.guide, guide=None)
    experiment = Experiment(
        name="rescue-convnet" + ("-quick" if quick else ""),
        description=(
            f"Fashion-MNIST ({guided.data.args['train_size']} training images, {guided.train.epochs} epochs, Adam lr 1e-3), "
            f"test accuracy, mean ± std over seeds. Plain-50: ResNet-50 without skip connections (width {guided.model.args['width']}, "
            f"ImageNet stem); guide: ResNet-50 of the same shape, untrained (the run's seed) or trained (its own arm, same seed). "
            f"Linear CKA between block outputs, block i to block i (16 each), alpha {guided.guidance.alpha:g}. "
            "Δ / std: difference to `plain50` in pooled seed standard deviations."
        ),
        arms=[
            Arm("resnet50", resnet),
            Arm("plain50", guided.replace(guide=None)),
            Arm("plain50+trained-resnet50", guided, guide_from="resnet50"),
            Arm("plain50+untrained-resnet50", guided),
        ],
        seeds=(0,) if quick else DEPTH_SEEDS,
        baseline="plain50",
    )
    return experiment


@register_experiment("rescue-depth-long")
def rescue_depth_long(quick: bool = False) -> Experiment:
    """The depth map (8 to 64 blocks) at the long horizon (1,240 steps), early stopping on."""
    return depth_experiment(quick, long=True)


@register_experiment("rescue-convnet")
def rescue_convnet(quick: bool = False) -> Experiment:
    """A plain 50-layer ConvNet that trains worse than its ResNet, guided by a trained or untrained ResNet-50."""
    return convnet_experiment(quick)


def guides_experiment(quick: bool = False) -> Experiment:
    """48 x 256, 3 seeds: the FCN alone, + an untrained ResNet-18, + an untrained ViT, + both at once (alpha 1 each)."""
    resnet = shipped_config("rescue_deep_fcn").with_args("model", width=CONTROL_WIDTH).with_section("train", epochs=10)
    if quick:
        resnet = (
            resnet.with_args("model", depth=8, width=32)
            .with_args("data", train_size=256, val_size=128)
            .with_section("data", train_eval_size=64)
            .with_section("train", epochs=1, progress=False)
            .with_args("guide", width=4)
        )
    vit_guide = shipped_config("vision_deep_fcn_vit").guide
    if quick:
        vit_guide = dataclasses.replace(vit_guide, args={**vit_guide.args, "dim": 16, "depth": 2, "heads": 2})
    vit = resnet.replace(guide=vit_guide).with_section("guidance", guide_layers=["blocks.*"])
    # Each guide as it pulls alone, alpha 1: the loss is the plain sum of the two single-guide losses.
    # The guide cache holds one guide: with two, both run every step (the same numbers, more time).
    entries = [
        dataclasses.replace(config.guide_entries()[0][1], name=name)
        for name, config in (("resnet18", resnet), ("vit", vit))
    ]
    both = resnet.with_section("guidance", cache="none").with_guides(entries)
    a, r, v = resnet.model.args, resnet.guide.args, vit_guide.args
    experiment = Experiment(
        name="rescue-guides" + ("-quick" if quick else ""),
        description=(
            f"Fashion-MNIST ({resnet.data.args['train_size']} training images, batch {resnet.data.batch_size}, "
            f"{resnet.train.epochs} epochs), test top-1 accuracy, mean ± std over seeds. Deep FCN {a['depth']} blocks x "
            f"{a['width']} (BatchNorm, dropout 0.1); alone: {QUICK_BASELINE[0]} lr {QUICK_BASELINE[1]:g} (the width-256 sweep's "
            "choice, as in `rescue --quick`); guided arms: Adam lr 1e-3. Guides untrained (the run's seed, so "
            f"the two-guide arm uses the very guides of the one-guide arms): ResNet-18 (width {r['width']}, small stem), "
            f"its block outputs; ViT (dim {v['dim']}, depth {v['depth']}, patch {v['patch_size']}), its block outputs; "
            "each guide's layers spread evenly over the FCN's linear outputs (the first and last pulled by both in "
            "the two-guide arm), linear CKA. `+untrained-resnet18+untrained-vit`: both guides at alpha 1 each, the "
            "plain sum of the two single-guide losses. Δ / std: difference to `deep-fcn` in pooled seed standard "
            "deviations (more than 2 counts as an effect)."
        ),
        arms=[
            Arm("deep-fcn", _with_optimiser(resnet.replace(guide=None), *QUICK_BASELINE)),
            Arm("deep-fcn+untrained-resnet18", resnet),
            Arm("deep-fcn+untrained-vit", vit),
            Arm("deep-fcn+untrained-resnet18+untrained-vit", both),
        ],
        seeds=(0,) if quick else QUICK_SEEDS,
        baseline="deep-fcn",
    )
    return experiment


@register_experiment("rescue-guides")
def rescue_guides(quick: bool = False) -> Experiment:
    """Two untrained guides at once (ResNet-18 and ViT) against each alone, on the 48 x 256 Deep FCN."""
    return guides_experiment(quick)
