"""`untrainable tune`: space files refused before any trial, pruning, restarts, shared workers, the fair comparison."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiny import TINY_GUIDED_TOML as TINY
from untrainable.cli import main
from untrainable.compare import compare, run_workers, tune, unguided, verdict
from untrainable.config import ConfigError, RunConfig, from_dict, load_config, shipped_config
from untrainable.config_toml import to_toml
from untrainable.space import load_space
from untrainable.tune import Settings, counts, open_study, prepare, work

SPACE = """
[space]
"optim.lr" = { low = 1e-4, high = 1e-2, log = true }
"optim.lr_schedule" = { choices = ["constant", "cosine"] }
"""
GUIDED_SPACE = """
[space]
"guidance.alpha" = { low = 0.1, high = 10.0, log = true }
"""


def _files(tmp_path: Path, epochs: int = 3, space: str = SPACE) -> tuple[Path, Path]:
    config = tmp_path / "tiny.toml"
    config.write_text(TINY.replace("EPOCHS", str(epochs)))
    space_file = tmp_path / "space.toml"
    space_file.write_text(space)
    return config, space_file


def _alone(tmp_path: Path, epochs: int = 3) -> tuple[RunConfig, Path, Path]:
    config, space = _files(tmp_path, epochs)
    return unguided(load_config(config)), config, space


def _trial_files(study_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((study_dir / "trials").glob("trial-*/trial.json"))]


# ---------------------------------------------------------------- space files


@pytest.mark.parametrize(
    "entry, expected",
    [
        ('"optim.rate" = { low = 1e-4, high = 1e-2 }', "optim.rate: not a config field"),
        ('"optim.lr" = { low = 1e-2, high = 1e-4, log = true }', "optim.lr: the range 0.01..0.0001 is empty"),
        ('"optim.lr" = { low = 0.0, high = 1e-2, log = true }', "optim.lr: a log-uniform range needs low > 0"),
        ('"optim.lr" = { low = -1.0, high = 1e-2 }', "optim.lr: low -1.0 is refused by the config"),
        ('"optim.lr_schedule" = { choices = ["constant", "linear"] }', "optim.lr_schedule: choice 'linear' is refused"),
        ('"optim.lr_schedule" = { choices = [] }', "optim.lr_schedule: choices: expected a non-empty list"),
        ('"optim.warmup_steps" = { low = 0.5, high = 10 }', "optim.warmup_steps: an integer field takes integer"),
        ('"optim.name" = { low = 1, high = 2 }', "optim.name: a range needs a number field"),
        ('"optim.lr" = { low = 1e-4, high = 1e-2, spread = 2 }', "optim.lr: unknown key(s) ['spread']"),
        ('"optim" = { choices = ["adam"] }', "optim: not a config field: optim is a table of fields"),
        ('"guidance.alpha" = { low = 0.1, high = 1.0 }', "guidance.alpha: the config has no guide"),
    ],
)
def test_space_errors_are_one_line_naming_the_path_before_any_trial(
    tmp_path: Path, entry: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config, space = _files(tmp_path, space=f"[space]\n{entry}\n")
    alone = tmp_path / "alone.toml"
    alone.write_text(to_toml(unguided(load_config(config))))
    out = tmp_path / "study"
    code = main(["tune", "--config", str(alone), "--space", str(space), "--trials", "2", "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and str(space) in err and expected in err, err
    assert not out.exists()  # refused before the study or any trial was made


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--trials", "0"], "--trials: expected a number >= 1, got 0"),
        (["--trials", "2", "--workers", "0"], "--workers: expected a number >= 1, got 0"),
        (["--trials", "2", "--tune-seeds", "1", "1"], "--tune-seeds: expected distinct seeds"),
        (["--trials", "2", "--guided-space", "SPACE"], "--guided-space: only with --compare"),
        ([], "untrainable tune needs --trials"),
    ],
)
def test_bad_flags_are_one_line_before_any_study(
    tmp_path: Path, flags: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config, space = _files(tmp_path)
    out = tmp_path / "study"
    flags = [str(space) if flag == "SPACE" else flag for flag in flags]
    code = main(["tune", "--config", str(config), "--space", str(space), "--out", str(out), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and expected in err, err
    assert not out.exists()


def test_the_comparison_refuses_a_guided_config_without_guide(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config, space = _files(tmp_path)
    alone = tmp_path / "alone.toml"
    alone.write_text(to_toml(unguided(load_config(config))))
    args = ["tune", "--compare", str(alone), "--space", str(space), "--guided-space", str(space)]
    assert main([*args, "--trials", "2", "--out", str(tmp_path / "cmp")]) == 2
    assert "has no [guide] or [[guides]]" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()


def test_space_of_the_guided_twin_must_keep_the_base_ranges(tmp_path: Path) -> None:
    config, space = _files(tmp_path)
    twin = tmp_path / "twin.toml"
    twin.write_text('[space]\n"optim.lr" = { low = 1e-3, high = 1e-1, log = true }\n')
    with pytest.raises(ConfigError, match=r"optim.lr: .*differs from .*same range in both arms"):
        load_space(space).with_extra(load_space(twin))


def test_none_in_choices_unsets_an_optional_field(tmp_path: Path) -> None:
    _, space = _files(tmp_path, space='[space]\n"optim.grad_clip" = { choices = ["none", 1.0] }\n')
    (param,) = load_space(space).params
    assert param.choices == (None, 1.0)


@pytest.mark.parametrize("name", ["rescue_deep_fcn", "mnist1d_two_guides", "paper_transformer_lm"])
def test_a_config_written_as_toml_reads_back_the_same(name: str) -> None:
    config = shipped_config(name)
    import tomllib

    again = from_dict(RunConfig, tomllib.loads(to_toml(config, ["a comment"])))
    assert again.to_dict() == config.to_dict()


def test_the_shipped_rescue_spaces_pass_the_rescue_config() -> None:
    from importlib import resources

    folder = resources.files("untrainable") / "configs"
    guided = shipped_config("rescue_deep_fcn").with_section("optim", fused=False)
    base = load_space(folder / "space_rescue.toml")
    base.check(unguided(guided))
    full = base.with_extra(load_space(folder / "space_rescue_guided.toml"))
    full.check(guided)
    assert {"optim.name", "optim.lr", "optim.lr_schedule", "optim.warmup_steps", "optim.grad_clip"} <= set(base.paths)
    assert {"guidance.alpha", "guidance.steps"} <= set(full.paths) - set(base.paths)


# ---------------------------------------------------------------- pruning


def test_a_hopeless_trial_is_pruned_and_its_folder_says_so(tmp_path: Path) -> None:
    import optuna

    config, _, space_file = _alone(tmp_path, epochs=4)
    config = config.with_section("optim", lr=0.5)  # outside the space: not enqueued (an enqueued trial is never pruned)
    study_dir = tmp_path / "study"
    settings = Settings(trials=5, tune_seeds=(0,), prune_after=1)
    space = load_space(space_file)
    prepare(study_dir, config, space, settings)
    study = open_study(study_dir, None, "s")
    distributions = {
        "optim.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
        "optim.lr_schedule": optuna.distributions.CategoricalDistribution(["constant", "cosine"]),
    }
    for _ in range(4):  # four finished trials that reached 100 % validation accuracy at every epoch
        study.add_trial(
            optuna.trial.create_trial(
                params={"optim.lr": 1e-3, "optim.lr_schedule": "constant"},
                distributions=distributions,
                value=1.0,
                intermediate_values={epoch: 1.0 for epoch in range(1, 5)},
            )
        )
    work(study_dir, None, "s", log=lambda line: None)
    n = counts(study)
    assert n["pruned"] == 1 and n["complete"] == 4
    (note,) = _trial_files(study_dir)
    assert note["state"] == "pruned" and note["pruned_at"] == "seed 0, epoch 2"  # the first epoch it may be pruned
    run = study_dir / "trials" / "trial-0004" / "seed0"
    history = json.loads((run / "history.json").read_text())
    assert [entry["epoch"] for entry in history] == [1, 2]  # stopped there, its logs kept
    assert (run / "metrics.jsonl").stat().st_size > 0 and not (run / "result.json").exists()
    assert study.trials[4].intermediate_values == {e["epoch"]: e["val_accuracy"] for e in history}


# ---------------------------------------------------------------- restarts and workers


def _start_tune(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-m", "untrainable", "tune", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "stopped"])
def test_a_study_killed_mid_trial_finishes_with_its_trials_and_no_duplicate(tmp_path: Path, sig: int) -> None:
    """Killed: its trial is found RUNNING with a dead worker. Stopped: the run checkpoints, the trial is marked failed."""
    config, _, space = _alone(tmp_path, epochs=12)
    alone = tmp_path / "alone.toml"
    alone.write_text(to_toml(config))
    out = tmp_path / "study"
    args = ["--config", str(alone), "--space", str(space), "--trials", "2", "--tune-seeds", "0", "--out", str(out)]
    args += ["--pruner", "none"]
    first = _start_tune(args)
    checkpoints = out / "trials" / "trial-0000" / "seed0" / "checkpoints"
    while not list(checkpoints.glob("step-*.pt")):  # the first trial is under way
        assert first.poll() is None, first.stdout.read().decode()
        time.sleep(0.05)
    first.send_signal(sig)
    stopped = first.communicate()[0].decode()
    assert first.returncode == (-signal.SIGKILL if sig == signal.SIGKILL else 128 + signal.SIGTERM), stopped
    again = _start_tune(args)
    log = again.communicate()[0].decode()
    assert again.returncode == 0, log
    if sig == signal.SIGKILL:
        assert "trial 0 failed: its worker" in log
    else:
        assert "trial 0 failed (interrupted)" in stopped
    assert "trial 0 will be run again" in log
    study = open_study(out, None, "study")
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == 2 and states.count("FAIL") == 1, states  # N finished, the dead one not counted
    retry = next(t for t in study.trials if t.system_attrs.get("failed_trial") == 0)
    assert retry.params == study.trials[0].params and retry.user_attrs["folder"] == "trial-0000"
    folders = [t.user_attrs["folder"] for t in study.trials if t.state.name == "COMPLETE"]
    assert len(set(folders)) == 2  # no trial finished twice
    records = [json.loads(line) for line in (checkpoints.parent / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("kind") == "resume" for r in records)  # resumed from its checkpoint, not started over
    steps = [r["step"] for r in records if "kind" not in r]
    assert steps == sorted(set(steps))  # every step logged once


@pytest.mark.slow
def test_two_local_workers_never_run_a_trial_twice(tmp_path: Path) -> None:
    config, _, space = _alone(tmp_path, epochs=4)
    study_dir = tmp_path / "study"
    settings = Settings(trials=6, tune_seeds=(0,), pruner="none")
    prepare(study_dir, config, load_space(space), settings)
    run_workers(study_dir, None, "shared", workers=2, log=lambda line: None)
    study = open_study(study_dir, None, "shared")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 6  # exactly the budget: none asked twice
    notes = _trial_files(study_dir)
    assert sorted(note["number"] for note in notes) == list(range(6))
    assert len({note["worker"] for note in notes}) == 2  # both workers pulled trials
    for note in notes:
        folder = study_dir / "trials" / f"trial-{note['number']:04d}" / "seed0"
        meta = json.loads((folder / "meta.json").read_text())
        records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        assert not any(r.get("kind") == "resume" for r in records)
        steps = [r["step"] for r in records if "kind" not in r]
        assert steps == list(range(1, len(steps) + 1))  # each step once: trained by one worker, never restarted
        assert meta["seed"] == 0
    params = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(set(params)) == 6  # differently seeded samplers, constant liar: no values drawn twice


def test_a_worker_joins_a_study_by_its_folder_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """What a cluster job runs: `untrainable tune --worker STUDY_DIR` finds the study's name and settings there."""
    config, _, space = _alone(tmp_path, epochs=1)
    study_dir = tmp_path / "folder"
    prepare(study_dir, config, load_space(space), Settings(trials=2, tune_seeds=(0,)), "named-study")
    assert main(["tune", "--worker", str(study_dir)]) == 0
    assert "2 trial(s) run by this worker" in capsys.readouterr().out
    assert [t.state.name for t in open_study(study_dir, None, "named-study").trials] == ["COMPLETE"] * 2


def test_a_study_in_an_rdb_instead_of_the_journal_file(tmp_path: Path) -> None:
    config, _, space = _alone(tmp_path, epochs=1)
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    study_dir = tmp_path / "study"
    tune(config, load_space(space), Settings(trials=2, tune_seeds=(0,)), study_dir, storage_url=url, log=lambda _: None)
    assert not (study_dir / "journal.log").exists() and (study_dir / "best.toml").exists()
    assert [t.state.name for t in open_study(study_dir, url, "study").trials] == ["COMPLETE"] * 2


# ---------------------------------------------------------------- best.toml and the comparison


def test_best_toml_reproduces_its_trials_validation_metric(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config, _, space = _alone(tmp_path, epochs=3)
    study_dir = tmp_path / "study"
    summary = tune(config, load_space(space), Settings(trials=2, tune_seeds=(3, 4)), study_dir, log=lambda line: None)
    note = json.loads((study_dir / "trials" / f"trial-{summary['best_trial']:04d}" / "trial.json").read_text())
    best = study_dir / "best.toml"
    assert "train.seed = 3 reproduces" in best.read_text()
    assert main(["train", "--config", str(best), "--out", str(tmp_path / "again")]) == 0
    capsys.readouterr()
    result = json.loads((tmp_path / "again" / "result.json").read_text())
    assert result["best"]["val"]["accuracy"] == note["per_seed"]["3"]
    assert {"optimisation_history.png", "param_importances.png"} <= {p.name for p in study_dir.glob("*.png")}


@pytest.mark.slow
def test_the_comparison_table_comes_from_seeds_the_tuning_did_not_use(tmp_path: Path) -> None:
    config_file, space = _files(tmp_path, epochs=2)
    twin = tmp_path / "twin.toml"
    twin.write_text(GUIDED_SPACE)
    guided = load_config(config_file)
    settings = Settings(trials=2, tune_seeds=(0, 1), pruner="none")
    out = tmp_path / "cmp"
    lines: list[str] = []
    _, folder, table = compare(
        guided, unguided(guided), load_space(space), load_space(twin), settings, out, seeds=2, log=lines.append
    )
    assert table["seeds"] == [2, 3] and table["tune_seeds"] == [0, 1]
    for arm in ("alone", "guided"):
        tuned = {p.name for p in (out / arm / "trials").glob("trial-*/seed*")}
        assert tuned == {"seed0", "seed1"}
        row = next(r for r in table["rows"] if r["arm"] == arm)
        results = [json.loads((out / "final" / arm / f"seed{s}" / "result.json").read_text()) for s in (2, 3)]
        assert row["per_seed_test"] == [r["test"]["accuracy"] for r in results]
        for s in (2, 3):
            assert json.loads((out / "final" / arm / f"seed{s}" / "config.json").read_text())["train"]["seed"] == s
    assert table["notes"][-1].startswith("Verdict: guided − alone = ")
    assert (folder / "table.md").read_text().count("| alone |") == 1
    assert sum(line.count("finished") for line in lines) == 4  # one progress line per finished trial


@pytest.mark.parametrize(
    "last, best, word",
    [
        (2.5, 3.0, "the guided arm leads"),
        (-2.5, -3.0, "the tuned baseline leads"),
        (2.5, 1.0, "no clear lead"),
        (None, 3.0, "no verdict"),
    ],
)
def test_the_verdict_asks_for_more_than_two_seed_stds_at_both_epochs(last, best, word) -> None:
    guided = {"arm": "guided", "vs_baseline": {"difference": 0.1, "sd": last}}
    guided["best_vs_baseline"] = {"difference": 0.1, "sd": best}
    line = verdict({"metric": "accuracy", "rows": [{"arm": "alone"}, guided]})
    assert line.startswith("Verdict: guided − alone = +0.100")
    assert word in line
