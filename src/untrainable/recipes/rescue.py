"""The untrainable regime: a 48-block Deep FCN that trains slowly or not at all alone, and what guidance does to it.

`untrainable run rescue` is a study of four experiments, run in order:

- `rescue-lr` and `rescue-lr-256`: the FCN alone (width 1024, and the
  controls' width 256) under a small sweep of optimisers and learning rates;
  the best final validation accuracy at each width picks that width's
  baseline, so the FCN "fails alone" only after its own training was tuned.
- `rescue`: the headline, width 1024, 5 seeds: the FCN alone with the chosen
  optimiser; + an untrained ResNet-18; + the same guide for the first 150
  steps only ("guidance as initialisation"), then alone.
- `rescue-controls`: width 256 (16x cheaper hidden layers), 5 seeds: the
  same three arms and every control: a trained ResNet-18 guide, guidance for
  a longer first stretch, the guide fed Gaussian noise, and knowledge
  distillation from the untrained and the trained ResNet-18.

`rescue-alpha` (width 256, 3 seeds) sets the adaptive alpha (the guidance
gradient held at the task gradient's norm, `adaptive_alpha.AdaptiveAlpha`)
against the constant alpha 1 and the first 150 steps.

`rescue-depth` maps where the FCN stops training alone and how far guidance
moves that limit, with per-layer gradient norms from the same runs;
`rescue-convnet` does the same for a plain (skip-less) ConvNet and its ResNet;
`rescue-guides` asks whether two untrained guides (a ResNet-18 and a ViT)
rescue the FCN better together than each alone.
The single-run config is `configs/rescue_deep_fcn.toml`.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any, Callable

from untrainable.config import RunConfig, shipped_config
from untrainable.experiment import Arm, Experiment, register_experiment
from untrainable.trainer import RunResult

SEEDS = (0, 1, 2, 3, 4)
QUICK_SEEDS = (0, 1, 2)
SWEEP_SEEDS = (0, 1)
SWEEP_EPOCHS = 8
# (optimiser, learning rate) tried for the FCN alone; SGD with momentum 0.9.
SWEEP = (("adam", 1e-4), ("adam", 3e-4), ("adam", 1e-3), ("adam", 3e-3), ("sgd", 1e-2))
FIRST_STEPS = (150, 300)  # guidance as initialisation: the paper's ~150 steps, and a longer stretch
CONTROL_WIDTH = 256
CONTROL_EPOCHS = 15
DEPTHS = (8, 16, 24, 32, 48)
DEPTH_SEEDS = (0, 1, 2)
GRAD_NORM_STEPS = [1, 10, 50]  # per-layer gradient norms: at initialisation and after a few steps
ADAPTIVE_ARM = "deep-fcn+untrained-resnet18-adaptive"


def _sweep_name(optimiser: str, lr: float) -> str:
    return f"deep-fcn-{optimiser}-lr{lr:g}"


def _with_optimiser(config: RunConfig, optimiser: str, lr: float) -> RunConfig:
    return config.with_section("optim", name=optimiser, lr=lr, fused=optimiser != "sgd")


def _first(config: RunConfig, steps: int) -> RunConfig:
    return config.with_section("guidance", schedule="first_steps", steps=steps)


def _resnet(guided: RunConfig) -> RunConfig:
    """The guide's architecture trained alone: the trained guide (Adam 1e-3, the FCN's data and length)."""
    return guided.replace(model=guided.guide, guide=None).with_section("optim", name="adam", lr=1e-3, fused=False)


def _kd(guided: RunConfig) -> RunConfig:
    """Distillation from the guide's logits instead of guidance (alpha 0): the paper's contrast."""
    return guided.with_section("guidance", alpha=0.0).with_section("distill", weight=1.0, temperature=4.0)


def chosen_optimiser(sweep: dict[str, Any]) -> tuple[str, float, str]:
    """(optimiser, lr, arm) of the sweep row with the best mean final validation accuracy (first wins ties)."""
    best = max(sweep["rows"], key=lambda row: row["val_accuracy"][0])
    for optimiser, lr in SWEEP:
        if _sweep_name(optimiser, lr) == best["arm"]:
            return optimiser, lr, best["arm"]
    raise ValueError(f"sweep row {best['arm']!r} is not in the sweep {SWEEP}")


def sweep_experiment(width: int | None = None) -> Experiment:
    """The FCN alone under each optimiser and learning rate of SWEEP: width 1024 (`rescue-lr`), or `width`.

    At the controls' width (`rescue-lr-256`) the sweep runs as long as the
    controls (CONTROL_EPOCHS), so their baseline is tuned at its own size.
    """
    alone = shipped_config("rescue_deep_fcn").replace(guide=None).with_section("train", epochs=SWEEP_EPOCHS)
    name, used_by = "rescue-lr", "`rescue`"
    if width is not None:
        alone = alone.with_args("model", width=width).with_section("train", epochs=CONTROL_EPOCHS)
        name, used_by = f"rescue-lr-{width}", "`rescue-controls`"
    return Experiment(
        name=name,
        description=(
            f"Learning-rate sweep of the Deep FCN alone ({_shape(alone)}), {alone.train.epochs} epochs, seeds "
            f"{SWEEP_SEEDS}; Adam, and SGD with momentum 0.9, constant rate. The best mean final validation accuracy "
            f"picks the baseline of {used_by}."
        ),
        arms=[Arm(_sweep_name(o, lr), _with_optimiser(alone, o, lr)) for o, lr in SWEEP],
        seeds=SWEEP_SEEDS,
    )


def _shape(config: RunConfig) -> str:
    a = config.model.args
    return f"{a['depth']} blocks x {a['width']}"


def _core_arms(guided: RunConfig, optimiser: str, lr: float, first: tuple[int, ...]) -> list[Arm]:
    arms = [
        Arm("deep-fcn", _with_optimiser(guided.replace(guide=None), optimiser, lr)),
        Arm("deep-fcn+untrained-resnet18", guided),
    ]
    arms += [Arm(f"deep-fcn+untrained-resnet18-first{n}", _first(guided, n)) for n in first]
    return arms


def _describe(guided: RunConfig, optimiser: str, lr: float, chosen_by: str) -> str:
    return (
        f"Fashion-MNIST ({guided.data.args['train_size']} training images, batch {guided.data.batch_size}, "
        f"{guided.train.epochs} epochs), test top-1 accuracy, mean ± std over seeds. Deep FCN {_shape(guided)} "
        "(BatchNorm, dropout 0.1). `deep-fcn`: alone, "
        f"{optimiser} lr {lr:g} ({chosen_by}). Guided arms: Adam lr 1e-3, ResNet-18 (width {guided.guide.args['width']}, "
        f"small stem), linear CKA between the FCN's linear outputs and the ResNet's block outputs, even spread, "
        f"alpha {guided.guidance.alpha:g}; `firstN`: guided for the first N steps, then alone. "
        "Δ / std: difference to `deep-fcn` in pooled seed standard deviations (more than 2 counts as an effect)."
    )


def headline_experiment(sweep: dict[str, Any]) -> Experiment:
    """Width 1024, 5 seeds: the FCN alone (best of the sweep), + untrained ResNet-18, + the same for 150 steps."""
    optimiser, lr, arm = chosen_optimiser(sweep)
    guided = shipped_config("rescue_deep_fcn")
    experiment = Experiment(
        name="rescue",
        description=_describe(guided, optimiser, lr, f"best validation accuracy of the sweep, `{arm}`"),
        arms=_core_arms(guided, optimiser, lr, FIRST_STEPS[:1]),
        seeds=SEEDS,
        baseline="deep-fcn",
    )
    experiment.after = _curves_after(experiment.name, FIRST_STEPS[:1])
    return experiment


def controls_experiment(sweep: dict[str, Any]) -> Experiment:
    """Width 256, 5 seeds: the core arms plus trained guide, longer first stretch, noise inputs, distillation."""
    optimiser, lr, arm = chosen_optimiser(sweep)
    guided = (
        shipped_config("rescue_deep_fcn")
        .with_args("model", width=CONTROL_WIDTH)
        .with_section("train", epochs=CONTROL_EPOCHS)
    )
    arms = [Arm("resnet18", _resnet(guided))]
    arms += _core_arms(guided, optimiser, lr, FIRST_STEPS)
    arms += [
        Arm("deep-fcn+trained-resnet18", guided, guide_from="resnet18"),
        Arm("deep-fcn+noise-untrained-resnet18", guided.with_section("guidance", guide_input="noise", cache="none")),
        Arm("deep-fcn+kd-untrained-resnet18", _kd(guided)),
        Arm("deep-fcn+kd-trained-resnet18", _kd(guided), guide_from="resnet18"),
    ]
    experiment = Experiment(
        name="rescue-controls",
        description=_describe(
            guided, optimiser, lr, f"best validation accuracy of the width-{CONTROL_WIDTH} sweep, `{arm}`"
        )
        + " `noise`: the guide sees Gaussian noise of the images' shape instead of the images. `kd`: no guidance; "
        "distillation from the ResNet's logits (temperature 4, weight 1). `resnet18`: the guide trained alone (the trained guide).",
        arms=arms,
        seeds=SEEDS,
        baseline="deep-fcn",
    )
    experiment.after = _curves_after(experiment.name, FIRST_STEPS)
    return experiment


# The FCN alone in the main job: the optimiser and rate the width-256 sweep chose
# (`rescue-lr-256`: Adam 3e-3, best mean validation accuracy; results/rescue/).
QUICK_BASELINE = ("adam", 3e-3)


def quick_experiment() -> Experiment:
    """The main job: 48 x 256, 10 epochs, 3 seeds; alone at QUICK_BASELINE and at Adam 1e-3, guided at Adam 1e-3.

    About 2 minutes on 2 cores with 2 processes (133 s measured).
    """
    guided = shipped_config("rescue_deep_fcn").with_args("model", width=CONTROL_WIDTH).with_section("train", epochs=10)
    optimiser, lr = QUICK_BASELINE
    experiment = Experiment(
        name="rescue-quick",
        description=_describe(guided, optimiser, lr, "the choice of the full study's width-256 sweep, `rescue-lr-256`")
        + " `deep-fcn-adam-lr0.001`: alone with the guided arms' own optimiser, so that guidance is the only difference.",
        arms=_quick_arms(guided, optimiser, lr),
        seeds=QUICK_SEEDS,
        baseline="deep-fcn",
    )
    experiment.after = _curves_after(experiment.name, FIRST_STEPS[:1])
    return experiment


def _quick_arms(guided: RunConfig, optimiser: str, lr: float) -> list[Arm]:
    """The core arms, with the FCN alone also at the guided arms' own optimiser (guidance the only difference)."""
    arms = _core_arms(guided, optimiser, lr, FIRST_STEPS[:1])
    same = Arm(_sweep_name("adam", 1e-3), _with_optimiser(guided.replace(guide=None), "adam", 1e-3))
    return arms[:1] + [same] + arms[1:]


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


def _curves_after(
    name: str, first: tuple[int, ...]
) -> Callable[[Path, dict[str, Any], dict[str, list[RunResult]]], None]:
    def after(out: Path, table: dict[str, Any], results: dict[str, list[RunResult]]) -> None:
        from untrainable.plots import plot_by_step

        fcn_arms = {arm: [r.history for r in runs] for arm, runs in results.items() if arm.startswith("deep-fcn")}
        plot_by_step(
            fcn_arms,
            "val_accuracy",
            out / "rescue_curves.png",
            marks={f"guide disconnected (first{n})": n for n in first},
            title=f"{name}: validation accuracy per epoch, mean ± std over seeds",
        )
        table.setdefault("notes", []).append(
            "Validation curves with the step where each `firstN` guide is disconnected: rescue_curves.png."
        )

    return after


@register_experiment("rescue")
def rescue(quick: bool = False) -> Experiment | list[Any]:
    """The 48-block Deep FCN fails alone; an untrained ResNet-18 guide rescues it (LR sweep, headline, controls)."""
    if quick:
        return quick_experiment()
    return [
        sweep_experiment(),
        sweep_experiment(CONTROL_WIDTH),
        lambda tables: headline_experiment(tables["rescue-lr"]),
        lambda tables: controls_experiment(tables[f"rescue-lr-{CONTROL_WIDTH}"]),
    ]


def depth_experiment(quick: bool = False) -> Experiment:
    """Depth 8 to 64 at width 256, alone vs + untrained ResNet-18, with per-layer gradient norms."""
    guided = (
        shipped_config("rescue_deep_fcn")
        .with_args("model", width=CONTROL_WIDTH)
        .with_section("train", epochs=10, grad_norm_steps=GRAD_NORM_STEPS)
    )
    depths = DEPTHS
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
        name="rescue-depth" + ("-quick" if quick else ""),
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
