"""MNIST-1D study: does a CNN guide, trained or untrained, keep an FCN from overfitting?"""

from __future__ import annotations

from untrainable.config import RunConfig, shipped_config
from untrainable.experiment import Arm, Experiment, register_experiment

FIRST_STEPS = 150  # "guidance as initialisation": the paper's ~150 steps
# The quick study trains 150 steps in all (1,300 examples, batch 128, 15 epochs): its first-N arm stops guiding after
# a third of them, where 150 would guide throughout and repeat the fcn+trained-cnn row.
QUICK_FIRST_STEPS = 50


def _quick(config: RunConfig) -> RunConfig:
    return config.with_args("data", num_samples=2000, val_size=300).with_section("train", epochs=15)


@register_experiment("mnist1d")
def mnist1d(quick: bool = False) -> Experiment:
    """MNIST-1D: CNN guide; FCN alone; FCN + untrained CNN; FCN + trained CNN; FCN + trained CNN for 150 steps (quick: 50)."""
    guided = shipped_config("mnist1d")
    if quick:
        guided = _quick(guided)
    alone = guided.replace(guide=None)
    cnn = alone.replace(model=guided.guide)
    first = QUICK_FIRST_STEPS if quick else FIRST_STEPS
    first_steps = guided.with_section("guidance", schedule="first_steps", steps=first)
    arms = [
        Arm("cnn-guide", cnn),
        Arm("fcn", alone),
        Arm("fcn+untrained-cnn", guided),
        Arm("fcn+trained-cnn", guided, guide_from="cnn-guide"),
        Arm(f"fcn+trained-cnn-first{first}", first_steps, guide_from="cnn-guide"),
    ]
    return Experiment(
        name="mnist1d" + ("-quick" if quick else ""),
        description=(
            "Test accuracy on MNIST-1D (mean ± std over seeds) of a 4x256 FCN alone and guided by a 3-layer 1-D CNN, "
            "untrained (seeded) or trained (the cnn-guide arm of the same seed); CKA on the linear/conv outputs, alpha 1."
        ),
        arms=arms,
    )


@register_experiment("mnist1d-explore")
def mnist1d_explore(quick: bool = False) -> Experiment:
    """MNIST-1D sweep on the validation split: alpha, pre/post-activation pairing, FCN depth, trained vs untrained guide."""
    base = shipped_config("mnist1d")
    if quick:
        base = _quick(base)
    cnn = base.replace(model=base.guide, guide=None)
    arms = [Arm("cnn-guide", cnn)]
    for depth in (4, 12):
        deep = base.with_args("model", depth=depth)
        prefix = f"fcn{depth}"
        arms += [
            Arm(f"{prefix}", deep.replace(guide=None)),
            Arm(f"{prefix}+untrained", deep),
            Arm(
                f"{prefix}+untrained-post",
                deep.with_section("guidance", target_layers=["layers.*.act"], guide_layers=["blocks.*.act"]),
            ),
        ]
        for alpha in (0.3, 1.0, 3.0):
            arms.append(
                Arm(f"{prefix}+trained-a{alpha:g}", deep.with_section("guidance", alpha=alpha), guide_from="cnn-guide")
            )
        arms.append(
            Arm(
                f"{prefix}+trained-post",
                deep.with_section("guidance", target_layers=["layers.*.act"], guide_layers=["blocks.*.act"]),
                guide_from="cnn-guide",
            )
        )
    return Experiment(
        name="mnist1d-explore" + ("-quick" if quick else ""),
        description=(
            "Choices for the MNIST-1D study, read on the validation column: FCN depth 4 or 12; guide untrained or "
            "trained; alpha 0.3, 1, 3; pairs on linear/conv outputs (pre-activation) or on ReLU outputs (-post)."
        ),
        arms=arms,
        seeds=(0, 1),
    )
