"""`untrainable tune` as a new user meets it: every mistake is one line naming the flag or file, exit 2, before any
work, and nothing the user had is overwritten; a failed worker leaves the finished trials' best.toml."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from tiny import tiny_config
from untrainable.cli import main
from untrainable.compare import finish_study
from untrainable.config import from_dict
from untrainable.config_toml import to_toml
from untrainable.space import load_space
from untrainable.tune import Settings, open_study, prepare

SPACE = '[space]\n"optim.lr" = { low = 1e-4, high = 1e-2, log = true }\n'


def _files(tmp_path: Path, space: str = SPACE, guided: bool = False) -> tuple[Path, Path]:
    config = tiny_config()
    if guided:
        data = config.to_dict() | {
            "name": "tiny-guided",
            "guide": {"name": "fcn", "args": {"depth": 2, "width": 16}},
            "guidance": {"target_layers": ["layers.*.linear"], "guide_layers": ["layers.*.linear"]},
        }
        config = from_dict(type(config), data)
    config_file = tmp_path / ("guided.toml" if guided else "tiny.toml")
    config_file.write_text(to_toml(config))
    space_file = tmp_path / "space.toml"
    space_file.write_text(space)
    return config_file, space_file


def _tune(tmp_path: Path, *flags: str, trials: int = 1) -> list[str]:
    config, space = _files(tmp_path)
    return [
        "tune",
        "--config",
        str(config),
        "--space",
        str(space),
        "--trials",
        str(trials),
        "--tune-seeds",
        "0",
        *flags,
    ]


def _refused(capsys: pytest.CaptureFixture[str], code: int, *expected: str) -> str:
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and all(e in err for e in expected), err
    return err


def _finished_study(folder: Path, values: list[float]) -> None:
    """A study folder whose trials finished, made without training (Optuna trials and their trial.json)."""
    import optuna

    settings = Settings(trials=len(values), tune_seeds=(0,))
    space = load_space(_files(folder.parent)[1])
    prepare(folder, tiny_config(), space, settings)
    study = open_study(folder, None, folder.name)
    lr = optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)
    for i, value in enumerate(values):
        name = f"trial-{i:04d}"
        study.add_trial(
            optuna.trial.create_trial(
                params={"optim.lr": 1e-3 * (i + 1)},
                distributions={"optim.lr": lr},
                value=value,
                user_attrs={"folder": name},
            )
        )
        (folder / "trials" / name).mkdir(parents=True)
        (folder / "trials" / name / "trial.json").write_text(json.dumps({"per_seed": {"0": value}}))


# ---------------------------------------------------------------- refused before any work


@pytest.mark.parametrize(
    "url, expected",
    [
        ("foo://bar", "Can't load plugin"),
        ("not a url", "Could not parse"),
        ("sqlite:///MISSING/studies.db", "unable to open database file"),
        ("postgresql://user:secret@localhost/db", "driver is not installed"),
    ],
)
def test_a_bad_storage_is_one_line_before_the_study_folder(
    tmp_path: Path, url: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("sqlalchemy")
    if url.startswith("postgresql"):
        with pytest.raises(ImportError):  # the case: no driver installed here
            import psycopg2  # type: ignore[import-not-found]  # noqa: F401
    url = url.replace("MISSING", str(tmp_path / "missing"))
    out = tmp_path / "study"
    code = main(_tune(tmp_path, "--out", str(out), "--storage", url))
    err = _refused(capsys, code, "--storage", expected)
    assert "secret" not in err  # a password is never printed
    assert not out.exists()


def test_a_float_range_for_an_integer_model_argument_names_the_space_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = _tune(tmp_path, "--out", str(tmp_path / "study"))
    Path(flags[4]).write_text('[space]\n"model.args.width" = { low = 16.0, high = 64.0 }\n')
    _refused(capsys, main(flags), flags[4], "model.args.width", "16.0 is not int")
    assert not (tmp_path / "study").exists()


def test_a_step_that_does_not_divide_its_range_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flags = _tune(tmp_path, "--out", str(tmp_path / "study"))
    Path(flags[4]).write_text('[space]\n"optim.warmup_steps" = { low = 0, high = 7, step = 2 }\n')
    _refused(capsys, main(flags), flags[4], "optim.warmup_steps: step 2 does not divide the range 0..7", "high 6 or 8")


@pytest.mark.parametrize("damage", ["cut", "garbage"])
def test_a_damaged_journal_names_its_line_and_is_left_as_it_was(
    tmp_path: Path, damage: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "study"
    _finished_study(out, [0.5])
    journal = out / "journal.log"
    text = journal.read_bytes()
    damaged = text[:-20] if damage == "cut" else text + b"garbage{\n"
    journal.write_bytes(damaged)
    lines = damaged.count(b"\n") + (damage == "cut")
    code = main(_tune(tmp_path, "--out", str(out), trials=2))
    _refused(capsys, code, str(journal), f"line {lines} of {lines} is not a whole record", "same command")
    assert journal.read_bytes() == damaged and not (out / "trials" / "trial-0001").exists()


@pytest.mark.parametrize("kind", ["user-files", "train-run", "empty-flag", "a-file"])
def test_out_never_writes_over_what_tune_did_not_write(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    flags = _tune(tmp_path)
    out = tmp_path / "mine"
    if kind == "user-files":
        out.mkdir()
        (out / "best.toml").write_text("my own\n")
        (out / "trials.json").write_text("[1]\n")
    elif kind == "train-run":
        assert main(["train", "--config", flags[2], "--out", str(out)]) == 0
        capsys.readouterr()
    elif kind == "a-file":
        out.write_text("a file\n")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    monkeypatch.chdir(tmp_path)
    code = main([*flags, "--out", "" if kind == "empty-flag" else str(out)])
    _refused(capsys, code, "--out")
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize(
    "content, expected", [("{}", "no valid config, space, settings"), ("[1, 2]", "is not a study file")]
)
def test_a_damaged_study_file_is_one_line_naming_it(
    tmp_path: Path, content: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "study"
    _finished_study(out, [0.5])
    (out / "study.json").write_text(content)
    _refused(capsys, main(["tune", "--worker", str(out)]), str(out / "study.json"), expected)
    _refused(capsys, main(_tune(tmp_path, "--out", str(out))), str(out / "study.json"), expected)


def test_a_lower_budget_is_refused_and_best_toml_counts_the_finished_trials(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "study"
    _finished_study(out, [0.5, 0.7, 0.6])
    _refused(capsys, main(_tune(tmp_path, "--out", str(out), trials=1)), "--trials 1", "budget of 3 trials")
    assert json.loads((out / "study.json").read_text())["settings"]["trials"] == 3
    assert main(_tune(tmp_path, "--out", str(out), trials=3)) == 0
    assert "the best of 3 finished trials" in (out / "best.toml").read_text()


def test_a_copied_study_folder_continues_its_own_study(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "study"
    _finished_study(out, [0.5, 0.7])
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert main(_tune(tmp_path, "--out", str(copy), trials=2)) == 0, capsys.readouterr().err
    assert "the best of 2 finished trials" in (copy / "best.toml").read_text()
    code = main(_tune(tmp_path, "--out", str(copy), "--study-name", "other", trials=2))
    _refused(capsys, code, "--study-name other", "records the study 'study'")


def test_the_storage_is_recorded_and_another_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("sqlalchemy")
    url = f"sqlite:///{tmp_path / 'studies.db'}"
    out = tmp_path / "study"
    assert main(_tune(tmp_path, "--out", str(out), "--storage", url)) == 0  # one trial of 5 steps
    assert json.loads((out / "study.json").read_text())["storage"] == url
    capsys.readouterr()
    _refused(capsys, main(_tune(tmp_path, "--out", str(out), trials=2)), "no --storage", f"give --storage {url}")
    _refused(capsys, main(["tune", "--worker", str(out)]), "no --storage", f"give --storage {url}")
    assert not (out / "journal.log").exists() and not (out / "trials" / "trial-0001").exists()


def test_the_guided_space_takes_only_fields_the_baseline_lacks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    guided, space = _files(tmp_path, guided=True)
    twin = tmp_path / "twin.toml"
    twin.write_text('[space]\n"guidance.alpha" = { low = 0.1, high = 10.0, log = true }\n'
                    '"optim.weight_decay" = { low = 1e-6, high = 1e-3, log = true }\n')  # fmt: skip
    out = tmp_path / "cmp"
    args = ["tune", "--compare", str(guided), "--space", str(space), "--guided-space", str(twin), "--trials", "1"]
    _refused(
        capsys, main([*args, "--seeds", "1", "--out", str(out)]), str(twin), "optim.weight_decay: not a guidance field"
    )
    assert not out.exists()


def test_a_comparison_never_writes_over_a_folder_it_did_not_make(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    guided, space = _files(tmp_path, guided=True)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "table.md").write_text("my table\n")
    args = ["tune", "--compare", str(guided), "--space", str(space), "--guided-space", str(space), "--trials", "1"]
    _refused(capsys, main([*args, "--out", str(out)]), f"--out {out}: holds table.md but no study")
    assert [p.name for p in out.iterdir()] == ["table.md"]


def test_a_stopped_tune_names_the_same_command_not_train_resume() -> None:
    from untrainable.cli import build_parser
    from untrainable.cli_tune import continue_with
    from untrainable.trainer import TrainingInterrupted

    argv = ["tune", "--config", "my config.toml", "--space", "s.toml", "--trials", "4", "--out", "runs/t"]
    args = build_parser().parse_args(argv)
    args.argv = argv
    stopped = TrainingInterrupted("stopped at step 7; checkpoint written to X; continue with --resume", signal.SIGTERM)
    again = continue_with(stopped, args)
    assert str(again) == (
        "stopped at step 7; checkpoint written to X; continue the study with the same command: "
        "untrainable tune --config 'my config.toml' --space s.toml --trials 4 --out runs/t"
    )
    assert again.signum == signal.SIGTERM  # type: ignore[attr-defined]  # exit 143


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--seeds", "3"], "--seeds: only with --compare"),
        (["--worker-index", "1"], "--worker-index: only with --worker"),
        (["--worker", "STUDY"], "--space, --trials, --out: not with --worker"),
    ],
)
def test_flags_that_would_be_ignored_are_refused(
    tmp_path: Path, flags: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "study"
    args = _tune(tmp_path, "--out", str(out))
    if "--worker" in flags:
        args = [a for a in args if a != "--config" and not a.endswith("tiny.toml")]
    _refused(capsys, main([*args, *[str(out) if f == "STUDY" else f for f in flags]]), expected)
    assert not out.exists()


def test_optunas_importance_warnings_become_one_line_notes(tmp_path: Path) -> None:
    out = tmp_path / "study"
    _finished_study(out, [0.5, 0.5, 0.5])  # equal values: Optuna warns the importances are equal
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        summary = finish_study(open_study(out, None, "study"), out, "alone")
    assert summary["notes"] and all("\n" not in note for note in summary["notes"])


# ---------------------------------------------------------------- local workers stopped or killed


def _start(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    here = Path(__file__).resolve().parent  # the package, and the tests' importable models
    env["PYTHONPATH"] = os.pathsep.join([str(here.parent / "src"), str(here), env.get("PYTHONPATH", "")])
    return subprocess.Popen(
        [sys.executable, "-m", "untrainable", "tune", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _workers_of(proc: subprocess.Popen) -> list[int]:
    """The spawned worker processes of a `tune --workers K` process (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    return [int(pid) for pid in children if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()]


def _wait_for_checkpoint(proc: subprocess.Popen, out: Path) -> None:
    deadline = time.time() + 240
    while not list(out.glob("trials/trial-*/seed0/checkpoints/step-*.pt")):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)


def _worker_flags(tmp_path: Path, trials: int) -> tuple[list[str], Path]:
    config = tiny_config(epochs=4, max_steps=None).replace(name="tiny")
    (tmp_path / "tiny.toml").write_text(to_toml(config))
    (tmp_path / "space.toml").write_text(SPACE)
    out = tmp_path / "study"
    flags = ["--config", str(tmp_path / "tiny.toml"), "--space", str(tmp_path / "space.toml"), "--out", str(out)]
    return [*flags, "--trials", str(trials), "--tune-seeds", "0", "--pruner", "none", "--workers", "2"], out


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the workers through /proc")
def test_a_worker_killed_leaves_best_toml_and_one_line(tmp_path: Path) -> None:
    flags, out = _worker_flags(tmp_path, trials=2)
    proc = _start(flags)
    _wait_for_checkpoint(proc, out)
    os.kill(_workers_of(proc)[0], signal.SIGKILL)
    stdout, stderr = (s.decode() for s in proc.communicate(timeout=300))
    assert proc.returncode == 2, stderr
    (line,) = [line for line in stderr.splitlines() if "error" in line or "Warning" in line]  # a font cache note aside
    assert "tuning worker 0: killed by signal 9" in line and "Traceback" not in stdout + stderr, stderr
    trials = json.loads((out / "trials.json").read_text())  # the other worker ran the killed one's trial again
    complete = sum(t["state"] == "complete" for t in trials)
    assert (out / "best.toml").exists() and f"hold the {complete} finished trials; the study is done" in stderr


@pytest.mark.slow
def test_workers_whose_trials_fail_end_in_one_line_and_exit_2(tmp_path: Path) -> None:
    flags, out = _worker_flags(tmp_path, trials=2)
    config = tiny_config().to_dict() | {"model": {"name": "importable_models:not_a_model"}}  # fails when built
    (tmp_path / "tiny.toml").write_text(to_toml(from_dict(type(tiny_config()), config)))
    proc = _start(flags)
    stdout, stderr = (s.decode() for s in proc.communicate(timeout=300))
    assert proc.returncode == 2, stderr
    (line,) = [line for line in stderr.splitlines() if "error" in line or "Warning" in line]
    assert "tuning worker 0: FAILED (exit 1)" in line and "run the same command again to continue" in line, stderr
    assert "Traceback" not in stdout + stderr and stdout.count("[tuning worker 0] error: ") == 1, stdout


@pytest.mark.slow
def test_sigterm_with_two_workers_exits_143_naming_the_command_that_continues(tmp_path: Path) -> None:
    flags, out = _worker_flags(tmp_path, trials=2)
    proc = _start(flags)
    _wait_for_checkpoint(proc, out)
    proc.send_signal(signal.SIGTERM)
    _, stderr = (s.decode() for s in proc.communicate(timeout=300))
    assert proc.returncode == 143, stderr
    (line,) = [line for line in stderr.splitlines() if "interrupted" in line or "Warning" in line]
    assert (
        "--resume" not in line
        and f"continue the study with the same command: untrainable tune {' '.join(flags)}" in line
    )
