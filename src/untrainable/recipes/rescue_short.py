"""The rescue at a short horizon (8 to 15 epochs): the study the long-horizon one (`rescue`) replaced.

`untrainable run rescue-short` runs, in order:

- `rescue-lr` and `rescue-lr-256`: the FCN alone (width 1024, and width 256)
  under a small sweep of optimisers and learning rates; the best final
  validation accuracy at each width picks that width's baseline.
- `rescue`: width 1024, 12 epochs, 5 seeds: the FCN alone with the chosen
  optimiser; + an untrained ResNet-18; + the same guide for the first 150
  steps only, then alone.
- `rescue-controls`: width 256, 15 epochs, 5 seeds: the same three arms and
  the controls (trained guide, first 300 steps, noise inputs, distillation).

Its lesson: at this horizon a fast, unstable rate looks best for the FCN
alone, and the guided arms are still climbing when training stops.
results/rescue/ keeps its tables as "at a short horizon".
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from untrainable.config import RunConfig, shipped_config
from untrainable.experiment import Arm, Experiment, register_experiment
from untrainable.recipes.rescue import _first, _kd, _resnet, _with_optimiser
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


# The FCN alone in the 10-epoch probes (rescue_probes.py): the optimiser and rate the width-256
# sweep chose (`rescue-lr-256`: Adam 3e-3, best mean final validation accuracy; results/rescue/).
QUICK_BASELINE = ("adam", 3e-3)


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


@register_experiment("rescue-short")
def rescue_short(quick: bool = False) -> list[Any]:
    """The 8-to-15-epoch rescue study: LR sweeps at widths 1024 and 256, the headline, the controls."""
    return [
        sweep_experiment(),
        sweep_experiment(CONTROL_WIDTH),
        lambda tables: headline_experiment(tables["rescue-lr"]),
        lambda tables: controls_experiment(tables[f"rescue-lr-{CONTROL_WIDTH}"]),
    ]
