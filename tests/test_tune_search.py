"""The search protocol of `untrainable tune`: conditional spaces, enqueued trials, samplers, seed streams, budget curves."""

from __future__ import annotations

import itertools
import json
import random
import statistics
from pathlib import Path
from typing import Any

import optuna
import pytest

from tiny import TINY_GUIDED_TOML
from untrainable import budget, tune
from untrainable.compare import unguided
from untrainable.config import ConfigError, load_config, shipped_config
from untrainable.space import load_points, load_space
from untrainable.tune import Settings, open_study, prepare, work

CONDITIONAL = """
[space]
"optim.name" = { choices = ["adam", "sgd"] }
"optim.lr" = { given = "optim.name", cases = { adam = { low = 1e-4, high = 1e-2, log = true }, sgd = { low = 1e-3, high = 0.3, log = true } } }
"optim.warmup_steps" = { low = 0, high = 300, step = 50 }
"""


def _write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _config(tmp_path: Path) -> Any:
    return load_config(_write(tmp_path, "tiny.toml", TINY_GUIDED_TOML.replace("EPOCHS", "2")))


def _fake_trials(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replace training by a value read off the drawn values; returns the values each trial drew."""
    drawn: list[dict[str, Any]] = []

    def run_trial(study: Any, trial: Any, study_dir: Path, config: Any, space: Any, *args: Any) -> None:
        values = space.suggest(trial)
        drawn.append(values | {"enqueued": trial.user_attrs.get("enqueued")})
        value = float(values["optim.warmup_steps"]) + 0.5 * (values["optim.name"] == "adam")
        study.tell(trial, value)
        tune._note(study_dir, trial.user_attrs["folder"], {"state": "complete", "value": value, "seconds": 1.0})

    monkeypatch.setattr(tune, "run_trial", run_trial)
    return drawn


# ---------------------------------------------------------------- conditional spaces


def test_a_conditional_field_is_one_optuna_parameter_per_branch(tmp_path: Path) -> None:
    space = load_space(_write(tmp_path, "space.toml", CONDITIONAL))
    assert space.paths == ["optim.name", "optim.warmup_steps", "optim.lr"]
    names = [p.name for p in space.params]
    assert names == ["optim.name", "optim.warmup_steps", "optim.lr|adam", "optim.lr|sgd"]
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(12):
        trial = study.ask()
        values = space.suggest(trial)
        branch = f"optim.lr|{values['optim.name']}"
        assert set(trial.params) == {"optim.name", "optim.warmup_steps", branch}
        low, high = (1e-4, 1e-2) if values["optim.name"] == "adam" else (1e-3, 0.3)
        assert low <= values["optim.lr"] <= high
        assert space.values(trial.params) == values
        study.tell(trial, 0.0)
    again = tune.space_from_dict(space.to_dict(), "study.json")
    assert again.params == space.params


@pytest.mark.parametrize(
    "entry, expected",
    [
        ('"optim.lr" = { given = "optim.nam", cases = { adam = { low = 1e-4, high = 1e-2 } } }', "given = 'optim.nam'"),
        ('"optim.lr" = { given = "optim.name", cases = { adamw = { low = 1e-4, high = 1e-2 } } }', "'adamw' is not one"),
        ('"optim.lr" = { given = "optim.name" }', "a conditional field is { given = FIELD, cases"),
        ('"optim.lr" = { given = "optim.name", cases = { sgd = { low = 1.0, high = 0.1 } } }', "(case sgd): optim.lr"),
    ],
)
def test_a_bad_conditional_field_is_one_line_naming_the_file(tmp_path: Path, entry: str, expected: str) -> None:
    path = _write(tmp_path, "space.toml", f'[space]\n"optim.name" = {{ choices = ["adam", "sgd"] }}\n{entry}\n')
    with pytest.raises(ConfigError) as err:
        load_space(path)
    assert str(path) in str(err.value) and expected in str(err.value), err.value


def test_a_branch_is_checked_against_the_config_with_its_branch_taken(tmp_path: Path) -> None:
    config = unguided(_config(tmp_path))
    text = CONDITIONAL + '"optim.grad_clip" = { given = "optim.name", cases = { sgd = { low = -1.0, high = 1.0 } } }\n'
    with pytest.raises(ConfigError, match=r"optim.grad_clip: low -1.0 is refused"):
        load_space(_write(tmp_path, "space.toml", text)).check(config)


def test_the_shipped_rescue_spaces_are_conditional() -> None:
    from importlib import resources

    folder = resources.files("untrainable") / "configs"
    base = load_space(folder / "space_rescue.toml")
    full = base.with_extra(load_space(folder / "space_rescue_guided.toml"))
    names = {p.name for p in full.params}
    assert {"optim.lr|adam", "optim.lr|sgd", "guidance.steps|first_steps"} <= names
    full.check(shipped_config("rescue_deep_fcn").with_section("optim", fused=False))


# ---------------------------------------------------------------- enqueued trials


def test_the_config_and_the_enqueued_points_are_the_first_trials(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    drawn = _fake_trials(monkeypatch)
    config = unguided(_config(tmp_path))
    space = load_space(_write(tmp_path, "space.toml", CONDITIONAL))
    points_file = _write(
        tmp_path,
        "grid.toml",
        '[[enqueue]]\n"optim.name" = "sgd"\n"optim.lr" = 0.1\n\n'
        '[[enqueue]]\narm = "guided"\n"optim.lr" = 3e-3\n\n'
        '[[enqueue]]\n"optim.lr" = 1e-3\n',  # the config's own values again: enqueued once
    )
    prepare(tmp_path / "s", config, space, Settings(trials=4), arm="alone", points=load_points(points_file))
    work(tmp_path / "s", log=lambda line: None)
    assert drawn[0] == {"optim.name": "adam", "optim.lr": 1e-3, "optim.warmup_steps": 0, "enqueued": "the config"}
    assert drawn[1] == {
        "optim.name": "sgd", "optim.lr": 0.1, "optim.warmup_steps": 0, "enqueued": f"{points_file} point 1"
    }  # fmt: skip
    assert [d["enqueued"] for d in drawn[2:]] == [None, None]  # the guided point and the repeat are not enqueued


def test_an_enqueued_point_outside_the_space_names_its_file(tmp_path: Path) -> None:
    config = unguided(_config(tmp_path))
    space = load_space(_write(tmp_path, "space.toml", CONDITIONAL))
    points = load_points(_write(tmp_path, "grid.toml", '[[enqueue]]\n"optim.name" = "sgd"\n"optim.lr" = 3.0\n'))
    with pytest.raises(ConfigError, match=r"grid.toml point 1: optim.lr = 3.0 is outside the space's"):
        prepare(tmp_path / "s", config, space, Settings(trials=4), points=points)
    with pytest.raises(ConfigError, match=r"grid.toml: point 1: optim.rate: not a config field"):
        load_points(_write(tmp_path, "grid.toml", '[[enqueue]]\n"optim.rate" = 3.0\n'))


# ---------------------------------------------------------------- samplers and seeds


def test_startup_is_a_third_of_the_budget_at_least_five() -> None:
    assert [Settings(trials=n).startup_trials() for n in (4, 16, 24, 48)] == [5, 5, 8, 16]


@pytest.mark.parametrize(
    "name, cls",
    [("tpe", "TPESampler"), ("random", "RandomSampler"), ("qmc", "QMCSampler"), ("gp", "GPSampler")],
)
def test_each_sampler_is_optunas_own(name: str, cls: str) -> None:
    sampler = tune.make_sampler(Settings(trials=10, sampler=name), 3)
    assert type(sampler).__name__ == cls
    if name == "tpe":
        assert sampler._multivariate and sampler._group and sampler._n_startup_trials == 5


def test_three_processes_continuing_one_study_draw_distinct_values(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    drawn = _fake_trials(monkeypatch)
    config = unguided(_config(tmp_path))
    space = load_space(_write(tmp_path, "space.toml", CONDITIONAL))
    for trials in (2, 3, 4):  # the config's trial, then one drawn trial per process (a resumed run, a later job)
        prepare(tmp_path / "s", config, space, Settings(trials=trials))
        work(tmp_path / "s", log=lambda line: None)
    random_draws = [tuple(sorted(d.items())) for d in drawn if not d["enqueued"]]
    assert len(random_draws) == 3 and len(set(random_draws)) == 3, random_draws
    study = open_study(tmp_path / "s", None, "s")
    seeds = [study.user_attrs[f"process-{k}"]["seed"] for k in range(3)]
    assert study.user_attrs["processes"] == 3 and len(set(seeds)) == 3


def test_the_two_arms_first_random_draws_differ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drawn = _fake_trials(monkeypatch)
    config = unguided(_config(tmp_path))
    space = load_space(_write(tmp_path, "space.toml", CONDITIONAL))
    for arm in ("alone", "guided"):
        prepare(tmp_path / arm, config, space, Settings(trials=2, sampler_seed=7), arm=arm)
        work(tmp_path / arm, log=lambda line: None)
    alone, guided = (d for d in drawn if not d["enqueued"])
    assert alone != guided
    assert tune.seed_stream(7, "alone", 0) != tune.seed_stream(7, "guided", 0) != tune.seed_stream(7, "guided", 1)


# ---------------------------------------------------------------- budget curves and paired seeds


@pytest.mark.parametrize("maximize", [True, False])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_expected_best_matches_every_subset_enumerated(maximize: bool, seed: int) -> None:
    rng = random.Random(seed)
    values = [rng.choice([0.1, 0.2, 0.35, 0.5]) + rng.random() * (seed > 0) for _ in range(7)]  # ties when seed 0
    best = max if maximize else min
    oracle = [statistics.fmean(best(c) for c in itertools.combinations(values, n)) for n in range(1, 8)]
    assert budget.expected_best(values, maximize) == pytest.approx(oracle, rel=1e-12)


def test_the_bootstrap_band_holds_the_curve_and_best_so_far_only_improves() -> None:
    values = [0.1, 0.4, 0.3, 0.2, 0.45, 0.12, 0.33, 0.29]
    curve = budget.expected_best(values)
    low, high = budget.bootstrap_band(values, reps=300)
    assert all(lo <= c <= hi for lo, c, hi in zip(low, curve, high))
    assert curve[0] == pytest.approx(statistics.fmean(values)) and curve[-1] == max(values)
    assert budget.best_so_far([0.3, 0.1, 0.5, 0.4]) == [0.3, 0.3, 0.5, 0.5]
    assert budget.best_so_far([0.3, 0.1, 0.5], maximize=False) == [0.3, 0.1, 0.1]


def test_paired_seeds_count_wins_and_bracket_the_mean_difference() -> None:
    result = budget.paired([0.4, 0.5, 0.3, 0.45], [0.5, 0.55, 0.25, 0.6])
    assert result["wins"] == 3 and result["n"] == 4
    assert result["mean"] == pytest.approx(0.0625)
    assert result["ci95"][0] <= result["mean"] <= result["ci95"][1]
    assert budget.spans([1, 2, 3, 7, 9, 10]) == "1-3, 7, 9-10"


def test_budget_json_and_png_for_both_arms(tmp_path: Path) -> None:
    rng = random.Random(0)
    for arm, shift in (("alone", 0.0), ("guided", 0.3)):
        folder = tmp_path / arm
        folder.mkdir()
        (folder / "study.json").write_text(json.dumps({"settings": {"sampler": "random"}}))
        rows = [
            {"number": k, "state": "complete", "value": shift + rng.random() * 0.1, "folder": f"trial-{k}",
             "enqueued": "the config" if k == 0 else None}
            for k in range(12)
        ]  # fmt: skip
        (folder / "trials.json").write_text(json.dumps(rows))
    table = {
        "metric": "accuracy",
        "notes": [],
        "rows": [
            {"arm": "alone", "per_seed_test": [0.1, 0.2], "per_seed_best": [0.1, 0.2]},
            {"arm": "guided", "per_seed_test": [0.3, 0.4], "per_seed_best": [0.3, 0.4]},
        ],
    }
    budget.add_analysis(table, tmp_path, [tmp_path])
    data = json.loads((tmp_path / "budget.json").read_text())
    for arm in ("alone", "guided"):
        curve = data["arms"][arm]
        assert len(curve["values"]) == 11 and len(curve["expected_best"]) == 11  # the enqueued trial left out
    assert data["leads"]["guided"] == list(range(1, 12))
    assert (tmp_path / "budget.png").stat().st_size > 1000
    assert "the guided arm leads by more than the band at 1-11 trial(s)" in table["budget_verdict"]
    assert table["paired"]["last"]["wins"] == 2


@pytest.mark.slow
def test_repeats_tune_both_arms_again_under_other_seeds_and_the_table_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from untrainable.compare import compare

    _fake_trials(monkeypatch)
    guided = _config(tmp_path).with_section("train", epochs=1)
    space = load_space(_write(tmp_path, "space.toml", CONDITIONAL))
    twin = load_space(_write(tmp_path, "twin.toml", '[space]\n"guidance.alpha" = { low = 0.1, high = 10.0, log = true }\n'))
    settings = Settings(trials=6, tune_seeds=(0,), sampler="random")
    out = tmp_path / "cmp"
    _, _, table = compare(guided, unguided(guided), space, twin, settings, out, seeds=2, repeats=2, log=lambda _: None)
    for arm in ("alone", "guided"):
        first = json.loads((out / arm / "study.json").read_text())["settings"]["sampler_seed"]
        again = json.loads((out / "repeat-1" / arm / "study.json").read_text())["settings"]["sampler_seed"]
        assert (first, again) == (0, 1)
        assert len(table["tuning"][arm]["repeats"]) == 2
    data = json.loads((out / "budget.json").read_text())
    assert len(data["arms"]["alone"]["values"]) == 10  # 5 random draws per repeat, the enqueued config left out
    assert any("over 2 repeats" in note for note in table["notes"])
    assert table["paired"]["last"]["n"] == 2 and "cost" in table
    assert table["notes"][-1].startswith("Verdict: ") and "Budget curves" in table["notes"][-1]
