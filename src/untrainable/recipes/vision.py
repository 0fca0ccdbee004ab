"""Vision study on Fashion-MNIST: FCNs and a plain ConvNet guided by ResNets and a ViT, trained or untrained.

Two experiments, run into sub-folders of one output folder:

- `vision-fcn`: the Deep FCN alone, with an untrained or a trained ResNet-18,
  with the trained ResNet-18 for the first 150 steps only ("guidance as
  initialisation"), and with a trained ViT; the Wide FCN alone and with a
  trained or untrained ResNet-18; the guides alone for reference. Afterwards:
  error consistency between the Deep FCN, the Deep FCN guided by each trained
  guide and the two guides, and guide-by-target layer similarity at the start
  and end of one guided run.
- `vision-convnet`: a plain ConvNet (ResNet-34 without skips) alone and with a
  trained or untrained ResNet-50; ResNet-50 alone for reference.

`vision-canvas` sets the Wide FCN where a ConvNet's prior matters: each
image at a random but fixed place on a CANVAS x CANVAS canvas, the FCN alone,
guided by a trained or untrained ResNet-18, and the ResNet-18 alone.

The arms' single-run configs are `configs/vision_*.toml`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from untrainable.analysis import (
    dataset_labels,
    error_consistency_summary,
    layer_names,
    similarity_matrix,
)
from untrainable.build import build_model
from untrainable.checkpoint import load_weights
from untrainable.config import RunConfig, load_config, shipped_config
from untrainable.data import load_data
from untrainable.experiment import Arm, Experiment, register_experiment
from untrainable.pairing import spread_pairs
from untrainable.plots import plot_loss_curves, plot_matrix
from untrainable.trainer import RunResult

FIRST_STEPS = 150  # "guidance as initialisation": the paper's ~150 steps (here 150 of 1240)
SIMILARITY_EXAMPLES = 500  # validation images behind each layer-similarity map
SEEDS = (0, 1, 2)
CANVAS = 56  # vision-canvas: 28 x 28 images placed on a 56 x 56 canvas
# `--quick` checks the pipeline, not the results: one seed, and these arms
# left out because they only repeat code paths the other arms already take.
QUICK_SKIPS = ("deep-fcn+untrained-resnet18", "wide-fcn", "wide-fcn+trained-resnet18", "plain34+untrained-resnet50")


def _quick(config: RunConfig) -> RunConfig:
    """Tiny data, one epoch, narrow models: checks the whole pipeline in about a minute on a free CPU."""
    shrink = {
        "deep_fcn": {"depth": 6, "width": 64},
        "wide_fcn": {"width": 128},
        "resnet18": {"width": 4},
        "resnet50": {"width": 4},
        "plain34": {"width": 4},
        "vit_tiny": {"dim": 16, "depth": 2, "heads": 2},
    }
    config = config.with_args("data", train_size=128, val_size=64)
    config = config.with_section("data", batch_size=32, train_eval_size=64)
    config = config.with_section("train", epochs=1, progress=False)
    config = config.with_args("model", **shrink.get(config.model.name, {}))
    if config.guide is not None:
        config = config.with_args("guide", **shrink.get(config.guide.name, {}))
    return config


def _load(name: str, quick: bool) -> RunConfig:
    config = shipped_config(f"vision_{name}")
    return _quick(config) if quick else config


def _similarity_maps(out: Path, results: dict[str, list[RunResult]], arm: str) -> dict[str, Any]:
    """Guide-by-target layer similarity (CKA on validation images) at the start and end of the arm's first seed.

    Start: the target rebuilt with the run's seed (its initial weights); end:
    the run's final weights (model.pt). The guide is the one the run used.
    """
    folder = results[arm][0].folder
    config = load_config(folder / "config.json")
    data = load_data(config.data.name, **config.data.args)
    seed = config.train.seed
    n = min(SIMILARITY_EXAMPLES, len(data.val))
    x = data.val.tensors[0][:n]
    guide = build_model(config.guide, data, seed)
    g = config.guidance
    rows = layer_names(guide, g.guide_layers)
    target = build_model(config.model, data, seed)
    cols = layer_names(target, g.target_layers)
    report: dict[str, Any] = {"arm": arm, "seed": seed, "examples": n, "guide_layers": rows, "target_layers": cols}
    for when in ("start", "end"):
        if when == "end":
            target.load_state_dict(load_weights(folder / "model.pt"))
        matrix = similarity_matrix(target, guide, x, g.target_layers, g.guide_layers, g.similarity)
        report[when] = matrix.tolist()
        plot_matrix(
            matrix,
            [f"guide {r}" for r in rows],
            [f"target {c}" for c in cols],
            out / f"layer_similarity_{when}.png",
            title=f"{arm} (seed {seed}): linear CKA, guide x target layers, {when} of training",
            vmin=0.0,
            vmax=1.0,
        )
    (out / "layer_similarity.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def _error_consistency(out: Path, results: dict[str, list[RunResult]], arms: list[str]) -> dict[str, Any]:
    """Cohen's kappa between the arms' test-set errors, seed k against seed k, as JSON and a PNG matrix."""
    config = load_config(results[arms[0]][0].folder / "config.json")
    labels = dataset_labels(load_data(config.data.name, **config.data.args).test)
    summary = error_consistency_summary({arm: [r.folder for r in results[arm]] for arm in arms}, labels)
    (out / "error_consistency.json").write_text(json.dumps(summary, indent=1) + "\n")
    plot_matrix(
        summary["mean"],
        arms,
        arms,
        out / "error_consistency.png",
        title=f"Error consistency (Cohen's kappa) on the test set, mean over {summary['seeds']} seeds",
        vmin=0.0,
        vmax=1.0,
    )
    return summary


def _after(
    experiment: Experiment, similarity_arm: str, consistency_arms: list[str] | None
) -> Callable[[Path, dict[str, Any], dict[str, list[RunResult]]], None]:
    """The experiment's analysis after its table: loss curves per arm, similarity maps, error consistency."""

    def after(out: Path, table: dict[str, Any], results: dict[str, list[RunResult]]) -> None:
        plot_loss_curves(
            {name: [r.history for r in runs] for name, runs in results.items()},
            out / "loss_curves.png",
            title=experiment.name,
        )
        maps = _similarity_maps(out, results, similarity_arm)
        paired = _mean_paired(maps)
        table["layer_similarity"] = {
            "arm": similarity_arm,
            "mean_paired_start": paired[0],
            "mean_paired_end": paired[1],
        }
        table.setdefault("notes", []).append(
            f"Layer similarity ({similarity_arm}, seed {maps['seed']}, {maps['examples']} validation images): mean CKA over "
            f"the guided layer pairs {paired[0]:.2f} at the start, {paired[1]:.2f} at the end "
            "(layer_similarity_start.png, layer_similarity_end.png)."
        )
        if consistency_arms:
            summary = _error_consistency(out, results, consistency_arms)
            table["error_consistency"] = {k: summary[k] for k in ("names", "mean", "std", "seeds")}
            names, mean, std = summary["names"], summary["mean"], summary["std"]
            cells = [
                f"{names[i]} vs {names[j]} {mean[i][j]:.2f} ± {std[i][j]:.2f}"
                for i in range(len(names))
                for j in range(i + 1, len(names))
            ]
            table.setdefault("notes", []).append(
                "Error consistency (Cohen's kappa, test set, mean ± std over seeds): "
                + "; ".join(cells)
                + " (error_consistency.png)."
            )

    return after


def _mean_paired(maps: dict[str, Any]) -> tuple[float, float]:
    """Mean similarity over the guided pairs (the paper's even spread), at the start and the end."""
    rows, cols = maps["guide_layers"], maps["target_layers"]
    pairs = spread_pairs(cols, rows)
    return tuple(  # type: ignore[return-value]
        sum(maps[when][rows.index(p.guide)][cols.index(p.target)] for p in pairs) / len(pairs)
        for when in ("start", "end")
    )


def fcn_experiment(quick: bool = False) -> Experiment:
    """Deep and Wide FCNs alone and guided by ResNet-18 (trained or not) or a trained ViT; the guides alone."""
    deep = _load("deep_fcn", quick)
    deep_vit = _load("deep_fcn_vit", quick)
    wide = _load("wide_fcn", quick)
    resnet = deep.replace(model=deep.guide, guide=None)
    vit = deep_vit.replace(model=deep_vit.guide, guide=None)
    first_steps = 2 if quick else FIRST_STEPS
    first = deep.with_section("guidance", schedule="first_steps", steps=first_steps)
    arms = [
        Arm("resnet18", resnet),
        Arm("vit", vit),
        Arm("deep-fcn", deep.replace(guide=None)),
        Arm("deep-fcn+untrained-resnet18", deep),
        Arm("deep-fcn+trained-resnet18", deep, guide_from="resnet18"),
        Arm(f"deep-fcn+trained-resnet18-first{first_steps}", first, guide_from="resnet18"),
        Arm("deep-fcn+trained-vit", deep_vit, guide_from="vit"),
        Arm("wide-fcn", wide.replace(guide=None)),
        Arm("wide-fcn+trained-resnet18", wide, guide_from="resnet18"),
        Arm("wide-fcn+untrained-resnet18", wide),
    ]
    if quick:
        arms = [arm for arm in arms if arm.name not in QUICK_SKIPS]
    d, w = deep.model.args, wide.model.args
    experiment = Experiment(
        name="vision-fcn" + ("-quick" if quick else ""),
        description=(
            f"Fashion-MNIST ({deep.data.args['train_size']} training images, {deep.train.epochs} epochs), test top-1 accuracy "
            f"(mean ± std over seeds). Deep FCN: {d['depth']} x {d['width']}; Wide FCN: {w['depth']} x {w['width']}. "
            f"Guides: ResNet-18 (width {deep.guide.args['width']}) and a ViT (dim {deep_vit.guide.args['dim']}, depth "
            f"{deep_vit.guide.args['depth']}), untrained (the run's seed) or trained (the guide's own arm, same seed). "
            "Linear CKA between the FCN's linear outputs and the ResNet's block outputs (ViT: block outputs), "
            f"guide layers spread over the target's, alpha {deep.guidance.alpha:g}; "
            f"`first{first_steps}`: guided for the first {first_steps} steps only."
        ),
        arms=arms,
        seeds=(0,) if quick else SEEDS,
    )
    experiment.after = _after(
        experiment,
        similarity_arm="deep-fcn+trained-resnet18",
        consistency_arms=["deep-fcn", "deep-fcn+trained-resnet18", "deep-fcn+trained-vit", "resnet18", "vit"],
    )
    return experiment


def convnet_experiment(quick: bool = False) -> Experiment:
    """A plain ConvNet alone and guided by ResNet-50, trained or not; ResNet-50 alone."""
    guided = _load("convnet", quick)
    arms = [
        Arm("resnet50", guided.replace(model=guided.guide, guide=None)),
        Arm("plain34", guided.replace(guide=None)),
        Arm("plain34+trained-resnet50", guided, guide_from="resnet50"),
        Arm("plain34+untrained-resnet50", guided),
    ]
    if quick:
        arms = [arm for arm in arms if arm.name not in QUICK_SKIPS]
    experiment = Experiment(
        name="vision-convnet" + ("-quick" if quick else ""),
        description=(
            f"Fashion-MNIST ({guided.data.args['train_size']} training images, {guided.train.epochs} epochs), test top-1 accuracy "
            f"(mean ± std over seeds). Plain ConvNet: ResNet-34 without skip connections (width {guided.model.args['width']}); "
            f"guide: ResNet-50 (width {guided.guide.args['width']}), untrained (the run's seed) or trained (its own arm, same seed). "
            f"Linear CKA between block outputs, block i to block i (16 each), alpha {guided.guidance.alpha:g}."
        ),
        arms=arms,
        seeds=(0,) if quick else SEEDS,
    )
    experiment.after = _after(experiment, similarity_arm="plain34+trained-resnet50", consistency_arms=None)
    return experiment


@register_experiment("vision")
def vision(quick: bool = False) -> list[Experiment]:
    """Fashion-MNIST: Deep/Wide FCN + ResNet-18 or ViT guide, plain ConvNet + ResNet-50 guide, error consistency."""
    return [fcn_experiment(quick), convnet_experiment(quick)]


def canvas_experiment(quick: bool = False) -> Experiment:
    """The Wide FCN on images placed at random on a CANVAS x CANVAS canvas: alone, guided (trained or not), the ResNet."""
    wide = (
        _load("wide_fcn", quick)
        .with_args("data", canvas=CANVAS)
        .with_section("guidance", cache="memory")
        .with_section("train", early_stopping=True)
    )
    w = wide.model.args
    experiment = Experiment(
        name="vision-canvas" + ("-quick" if quick else ""),
        description=(
            f"Fashion-MNIST on a {CANVAS} x {CANVAS} canvas: each 28 x 28 image at a random but fixed position "
            f"({wide.data.args['train_size']} training images, batch {wide.data.batch_size}, {wide.train.epochs} epochs, "
            f"Adam lr {wide.optim.lr:g}, cosine decay). Test top-1 accuracy at the last epoch and at the best validation "
            f"epoch, mean ± std over seeds. Wide FCN {w['depth']} x {w['width']} (BatchNorm); guide ResNet-18 (width "
            f"{wide.guide.args['width']}, small stem), untrained (the run's seed) or trained (its own arm, same seed); "
            f"linear CKA between the FCN's linear outputs and the ResNet's block outputs, alpha {wide.guidance.alpha:g}. "
            "Δ / std: difference to `wide-fcn` in pooled seed standard deviations."
        ),
        arms=[
            Arm("resnet18", wide.replace(model=wide.guide, guide=None)),
            Arm("wide-fcn", wide.replace(guide=None)),
            Arm("wide-fcn+trained-resnet18", wide, guide_from="resnet18"),
            Arm("wide-fcn+untrained-resnet18", wide),
        ],
        seeds=(0,) if quick else SEEDS,
        baseline="wide-fcn",
    )
    return experiment


@register_experiment("vision-canvas")
def vision_canvas(quick: bool = False) -> Experiment:
    """The Wide FCN where it overfits: Fashion-MNIST at random places on a canvas, alone and guided by ResNet-18."""
    return canvas_experiment(quick)
