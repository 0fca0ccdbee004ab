"""Which similarity transfers the prior: the width-128 rescue guided through each of several measures.

`untrainable run rescue-distances` is a study of three experiments on the
48 x 128 Deep FCN of `rescue-quick` (Fashion-MNIST, 2,000 training images,
LONG_EPOCHS epochs, early stopping), guided by an untrained ResNet-18:

- `rescue-distances-tune`: for each measure of MEASURES, guidance for the
  first FIRST steps at every alpha of ALPHAS, on TUNE_SEEDS: the same grid
  and the same budget for each measure, since their 1 - similarity differ
  in scale. A measure's alpha is the one with the best mean validation
  accuracy at the best epoch (`rescue.choose`).
- `rescue-distances`: 5 seeds, the FCN alone (the setting `rescue-128`
  chose for it) and each measure guided for the first FIRST steps at its
  alpha; the tuning seeds' runs are reused (selection read validation only).
- `rescue-distances-throughout`: each measure guided for every step at the
  same alpha, beside the same FCN alone.

Every guided arm uses Adam at the rate `rescue-128` chose for CKA guidance
(QUICK_GUIDED), so the rate, if anything, favours `cka`.
"""

from __future__ import annotations

from typing import Any

from untrainable.config import RunConfig
from untrainable.experiment import Arm, Experiment, register_experiment
from untrainable.recipes.rescue import (
    QUICK_ALONE,
    QUICK_FIRST,
    QUICK_GUIDED,
    QUICK_WIDTH,
    SEEDS,
    _first,
    _setup,
    _with_optimiser,
    alone_name,
    base_config,
    choose,
    verdict,
)

MEASURES = ("cka", "procrustes", "cca", "cka_rbf")
# Run in this order, alpha-major, so that a study cut short has every measure at the first ones.
ALPHAS = (3.0, 1.0, 10.0)
TUNE_SEEDS = (0,)
FIRST = QUICK_FIRST
TUNE, MAIN, THROUGHOUT = "rescue-distances-tune", "rescue-distances", "rescue-distances-throughout"


def _guided(measure: str, alpha: float) -> RunConfig:
    lr = QUICK_GUIDED[0]
    base = base_config(QUICK_WIDTH)
    return _with_optimiser(base, "adam", lr).with_section("guidance", alpha=alpha, similarity=measure)


def _arm(measure: str, alpha: float | None = None, first: bool = True) -> str:
    return (
        f"deep-fcn+{measure}" + (f"-alpha{alpha:g}" if alpha is not None else "") + (f"-first{FIRST}" if first else "")
    )


def _description(extra: str) -> str:
    return (
        _setup(base_config(QUICK_WIDTH)).replace("linear CKA", "the named similarity")
        + f" Guided arms: Adam lr {QUICK_GUIDED[0]:g} (chosen by `rescue-128` for CKA guidance). "
        + extra
    )


def tune_experiment() -> Experiment:
    """Every measure at every alpha of ALPHAS, guided for the first FIRST steps, on TUNE_SEEDS."""
    return Experiment(
        name=TUNE,
        description=_description(
            f"Guidance for the first {FIRST} steps at alpha {', '.join(f'{a:g}' for a in ALPHAS)} for each of "
            f"{', '.join(MEASURES)}: the same grid and budget for each measure."
        ),
        arms=[Arm(_arm(m, a), _first(_guided(m, a), FIRST)) for a in ALPHAS for m in MEASURES],
        seeds=TUNE_SEEDS,
    )


def chosen_alphas(tune: dict[str, Any]) -> dict[str, float]:
    """Each measure's alpha: the best mean validation accuracy at the best epoch over the tuning seeds."""
    out = {}
    for measure in MEASURES:
        arm = choose(tune, [_arm(measure, a) for a in ALPHAS])
        out[measure] = next(a for a in ALPHAS if _arm(measure, a) == arm)
    return out


def _alone() -> Arm:
    return Arm("deep-fcn", _with_optimiser(base_config(QUICK_WIDTH).replace(guide=None), *QUICK_ALONE))


def main_experiment(tune: dict[str, Any]) -> Experiment:
    """The FCN alone and each measure guided for the first FIRST steps at its alpha, 5 seeds."""
    alphas = chosen_alphas(tune)
    arms = [_alone()] + [
        Arm(_arm(m), _first(_guided(m, alphas[m]), FIRST), runs_in=f"{TUNE}/{_arm(m, alphas[m])}") for m in MEASURES
    ]
    return _with_verdict(
        Experiment(
            name=MAIN,
            description=_description(
                f"`deep-fcn` alone: `{alone_name(*QUICK_ALONE)}` (the choice of `rescue-128`). Each measure guided for "
                f"the first {FIRST} steps, then alone, at its alpha chosen on validation from "
                f"{', '.join(f'{a:g}' for a in ALPHAS)} (seed {', '.join(map(str, TUNE_SEEDS))}): "
                + ", ".join(f"`{m}` {alphas[m]:g}" for m in MEASURES)
                + ". Δ / std: difference to `deep-fcn` in pooled seed standard deviations (more than 2: an effect)."
            ),
            arms=arms,
            seeds=SEEDS,
            baseline="deep-fcn",
        )
    )


def throughout_experiment(tune: dict[str, Any]) -> Experiment:
    """Each measure guided at every step, at the alpha chosen for the first FIRST steps, beside the FCN alone."""
    alphas = chosen_alphas(tune)
    arms = [Arm("deep-fcn", _alone().config, runs_in=f"{MAIN}/deep-fcn")]
    arms += [Arm(_arm(m, first=False), _guided(m, alphas[m])) for m in MEASURES]
    return _with_verdict(
        Experiment(
            name=THROUGHOUT,
            description=_description(
                "Each measure guided at every step at the alpha chosen for it on the first-steps arms: "
                + ", ".join(f"`{m}` {alphas[m]:g}" for m in MEASURES)
                + ". `deep-fcn` alone as in `rescue-distances` (its runs reused)."
            ),
            arms=arms,
            seeds=SEEDS,
            baseline="deep-fcn",
        )
    )


def _with_verdict(experiment: Experiment) -> Experiment:
    def after(out: Any, table: dict[str, Any], results: Any) -> None:
        table["notes"].extend(verdict(table))

    experiment.after = after
    return experiment


@register_experiment("rescue-distances")
def rescue_distances(quick: bool = False) -> list[Any]:
    """The width-128 rescue guided through cka, procrustes, cca and cka_rbf, each at its own alpha, 5 seeds."""
    return [
        tune_experiment(),
        lambda tables: main_experiment(tables[TUNE]),
        lambda tables: throughout_experiment(tables[TUNE]),
    ]
