"""The `rescue-distances` study is built as described: one alpha grid per measure, chosen on validation, then 5 seeds."""

import untrainable.recipes  # noqa: F401  (registration)
from untrainable.experiment import EXPERIMENTS
from untrainable.recipes.rescue_distances import ALPHAS, FIRST, MAIN, MEASURES, TUNE, chosen_alphas


def _tune_table(best):
    """A tuning table whose validation accuracy at the best epoch is `best[(measure, alpha)]`."""
    return {
        "rows": [
            {"arm": f"deep-fcn+{m}-alpha{a:g}-first{FIRST}", "best_val_accuracy": (best.get((m, a), 0.1), 0.0)}
            for m in MEASURES
            for a in ALPHAS
        ]
    }


def test_every_measure_gets_the_same_grid_and_the_tuning_runs_are_reused():
    tune, main, throughout = EXPERIMENTS.create("rescue-distances")
    assert len(MEASURES) >= 4 and "procrustes" in MEASURES
    similarities = sorted((arm.config.guidance.similarity, arm.config.guidance.alpha) for arm in tune.arms)
    assert similarities == sorted((m, a) for m in MEASURES for a in ALPHAS)
    assert {arm.config.guidance.schedule for arm in tune.arms} == {"first_steps"}
    assert {arm.config.guidance.steps for arm in tune.arms} == {FIRST}
    assert len({arm.config.optim.lr for arm in tune.arms}) == 1  # one rate for every measure

    table = _tune_table({("procrustes", 10.0): 0.6, ("cka", 1.0): 0.5})
    assert chosen_alphas(table)["procrustes"] == 10.0 and chosen_alphas(table)["cka"] == 1.0
    built = main({TUNE: table})
    assert built.name == MAIN and built.baseline == "deep-fcn" and len(built.seeds) == 5
    assert built.arms[0].config.guide is None
    procrustes = next(arm for arm in built.arms if arm.name == f"deep-fcn+procrustes-first{FIRST}")
    assert procrustes.runs_in == f"{TUNE}/deep-fcn+procrustes-alpha10-first{FIRST}"
    assert procrustes.config.guidance.alpha == 10.0
    every_step = throughout({TUNE: table})
    assert {arm.config.guidance.schedule for arm in every_step.arms[1:]} == {"constant"}
    assert every_step.arms[0].runs_in == f"{MAIN}/deep-fcn"
