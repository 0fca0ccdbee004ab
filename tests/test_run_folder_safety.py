"""A run folder has one writer, is refused before anything is built, and survives torn logs, lost files and resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from tiny import tiny_config as _tiny
from untrainable import trainer
from untrainable.checkpoint import CheckpointError, CheckpointManager, load_weights, read_weights, save_safetensors
from untrainable.cli import main
from untrainable.config import ConfigError, ModelSpec, RunConfig, from_dict
from untrainable.runs import writer_lock


def _config(**train) -> RunConfig:
    return from_dict(
        RunConfig,
        {
            "name": "safety",
            "model": {"name": "fcn", "args": {"depth": 2, "width": 16}},
            "data": {"name": "mnist1d", "args": {"num_samples": 400, "val_size": 50}, "batch_size": 50},
            "guide": {"name": "cnn1d", "args": {"channels": 4}},
            "train": {"epochs": 2, "progress": False, **train},
        },
    )


def _write(path: Path, config: RunConfig) -> Path:
    path.write_text(json.dumps(config.to_dict()))
    return path


def _one_line(capsys, argv: list[str], code: int = 2) -> str:
    assert main(argv) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


# Weights: safetensors beside model.pt, read wherever a checkpoint is named.


def test_final_weights_are_also_written_as_safetensors_and_guide_a_run(tmp_path):
    trainer.train(_config(max_steps=3), tmp_path / "guide")
    state, saved = read_weights(tmp_path / "guide" / "model.safetensors")
    reference = load_weights(tmp_path / "guide" / "model.pt")
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)
    assert saved["model"]["name"] == "fcn"  # the run's config travels in the metadata
    spec = ModelSpec("fcn", {"depth": 2, "width": 16}, checkpoint=str(tmp_path / "guide" / "model.safetensors"))
    guide = trainer.build_model(spec, trainer.build_data(_config().data), 0)
    assert all(torch.equal(guide.state_dict()[k], reference[k]) for k in reference)


def test_a_damaged_safetensors_file_is_one_line_naming_it(tmp_path, capsys):
    bad = tmp_path / "guide.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{not json")
    err = _one_line(capsys, ["layers", "fcn", "fcn", "--guide-checkpoint", str(bad), "--batch", "8"])
    assert str(bad) in err and "safetensors" in err


def test_safetensors_keeps_tied_weights_as_copies(tmp_path):
    shared = torch.randn(3, 3)
    path = save_safetensors({"a": shared, "b": shared}, tmp_path / "tied.safetensors")
    state, config = read_weights(path)
    assert torch.equal(state["a"], state["b"]) and config is None


def test_guide_weights_holding_nan_are_refused_naming_the_tensor(tmp_path):
    trainer.train(_config(max_steps=2), tmp_path / "guide")
    state = load_weights(tmp_path / "guide" / "model.pt")
    state["layers.0.linear.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    spec = ModelSpec("fcn", {"depth": 2, "width": 16}, checkpoint=str(tmp_path / "nan.pt"))
    with pytest.raises(ConfigError, match=r"guide.checkpoint: .*nan.pt holds NaN or inf in layers.0.linear.weight"):
        trainer.build_model(spec, trainer.build_data(_config().data), 0, where="guide")


# One writer per folder.


def _hold_lock(folder: Path) -> subprocess.Popen:
    code = (
        "import sys, time; from untrainable.runs import writer_lock\n"
        f"with writer_lock({str(folder)!r}):\n    print('held', flush=True); time.sleep(600)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_writer_is_refused_naming_the_folder_and_the_holders_pid(tmp_path, capsys):
    holder = _hold_lock(tmp_path / "run")
    try:
        config = _write(tmp_path / "c.json", _config(max_steps=2))
        for extra in ([], ["--resume"]):
            err = _one_line(capsys, ["train", "--config", str(config), "--out", str(tmp_path / "run"), *extra])
            assert f"{tmp_path / 'run'} is being written by another process (PID {holder.pid})" in err
    finally:
        holder.kill()
        holder.wait()
    # The OS dropped the lock with the killed process: the folder can be written now.
    trainer.train(_config(max_steps=2), tmp_path / "run")
    assert (tmp_path / "run" / "result.json").exists()


def test_the_lock_is_held_for_the_whole_run_and_released_after(tmp_path, monkeypatch):
    seen = []

    def step_and_try(*args, **kwargs):
        with pytest.raises(BlockingIOError, match="another process"), writer_lock(tmp_path):
            pass
        seen.append(1)
        return original(*args, **kwargs)

    # flock locks belong to an open file: a second open in the same process is refused just as another process is.
    original = trainer.train_step
    monkeypatch.setattr(trainer, "train_step", step_and_try)
    trainer.train(_config(max_steps=2), tmp_path)
    assert seen == [1, 1]
    with writer_lock(tmp_path):
        pass


# Refusals come from the folder alone, before data and models are built.


@pytest.mark.parametrize("case", ["existing run", "changed config", "nothing to resume"])
def test_folder_refusals_come_before_the_data_is_built(tmp_path, monkeypatch, case):
    if case != "nothing to resume":
        trainer.train(_config(max_steps=2), tmp_path / "run")

    def no_data(*args, **kwargs):
        raise AssertionError("the data was built before the folder was checked")

    monkeypatch.setattr(trainer, "build_data", no_data)
    config, resume = _config(max_steps=2), True
    if case == "existing run":
        resume = False
    elif case == "changed config":
        config = config.with_section("optim", lr=0.05)
    started = time.perf_counter()
    with pytest.raises((FileExistsError, FileNotFoundError, ValueError)) as err:
        trainer.train(config, tmp_path / "run", resume=resume)
    assert str(tmp_path / "run") in str(err.value)
    assert time.perf_counter() - started < 5  # no set-up ran (a loose bound: the point is the monkeypatch)


def test_resume_into_a_folder_that_does_not_exist_is_refused(tmp_path, capsys):
    config = _write(tmp_path / "c.json", _config(max_steps=2))
    err = _one_line(capsys, ["train", "--config", str(config), "--out", str(tmp_path / "nowhere"), "--resume"])
    assert "holds no run to resume" in err and "drop --resume" in err
    assert not (tmp_path / "nowhere").exists()


def test_resume_without_config_json_compares_the_checkpoints_config(tmp_path):
    trainer.train(_config(max_steps=3, checkpoint_every=1, epochs=1), tmp_path)
    (tmp_path / "config.json").unlink()
    (tmp_path / "result.json").unlink()
    with pytest.raises(ValueError, match=r"checkpoints/step-.*differs in optim.lr"):
        trainer.train(
            _config(max_steps=5, checkpoint_every=1, epochs=1).with_section("optim", lr=0.05), tmp_path, resume=True
        )
    result = trainer.train(_config(max_steps=5, checkpoint_every=1, epochs=1), tmp_path, resume=True)
    assert json.loads((tmp_path / "config.json").read_text())["optim"]["lr"] == _config().optim.lr
    assert result.final["steps"] == 5


# Logs: a torn last line, a finished run resumed, an epoch cut by max_steps.


def test_a_torn_last_line_of_metrics_is_set_aside_and_the_run_resumes(tmp_path):
    trainer.train(_config(max_steps=3, checkpoint_every=1, epochs=1), tmp_path)
    (tmp_path / "result.json").unlink()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 1.2, "epo')  # what kill -9 in the middle of a write leaves
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train(_config(max_steps=5, checkpoint_every=1, epochs=1), tmp_path, resume=True)
    assert any("cut off" in str(w.message) for w in caught)
    assert (tmp_path / "metrics.jsonl.torn").read_text() == '{"step": 4, "loss": 1.2, "epo\n'
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "kind" not in r] == [1, 2, 3, 4, 5]


def test_a_damaged_line_inside_metrics_names_the_file_and_line(tmp_path):
    trainer.train(_config(max_steps=3, checkpoint_every=1, epochs=1), tmp_path)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    lines[1] = lines[1][:10]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is not a JSON record"):
        trainer.train(_config(max_steps=5, checkpoint_every=1, epochs=1), tmp_path, resume=True)


def test_resuming_a_finished_run_keeps_its_training_time(tmp_path):
    trainer.train(_config(max_steps=6), tmp_path)
    state, _ = CheckpointManager(tmp_path / "checkpoints").load_latest()
    again = trainer.train(_config(max_steps=6), tmp_path, resume=True).final["seconds"]
    assert again >= state["seconds"] > 0  # the time of the sessions before, not the few ms of this one


def test_an_epoch_cut_by_max_steps_and_resumed_has_one_history_entry(tmp_path):
    trainer.train(_config(max_steps=3), tmp_path)  # 5 steps an epoch: stops inside epoch 1
    history = trainer.train(_config(max_steps=10), tmp_path, resume=True).history
    assert [entry["epoch"] for entry in history] == [1, 2]
    assert [entry["step"] for entry in history] == [5, 10]


@pytest.mark.slow
def test_sigterm_exits_143_and_ctrl_c_130(tmp_path):
    config = _write(tmp_path / "c.json", _config(epochs=200, checkpoint_every=5))
    for signum, code in ((signal.SIGTERM, 143), (signal.SIGINT, 130)):
        out = tmp_path / f"run{signum}"
        run = subprocess.Popen(
            [sys.executable, "-m", "untrainable", "train", "--config", str(config), "--out", str(out)],
            stderr=subprocess.PIPE,
            text=True,
        )
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip():
            assert run.poll() is None, run.stderr.read()
            time.sleep(0.1)
        os.kill(run.pid, signum)
        assert run.wait(timeout=120) == code, run.stderr.read()


# Non-finite values: one line naming the step and the term.


def test_a_diverging_run_is_one_line_naming_the_step(tmp_path, capsys):
    config = _write(tmp_path / "c.json", _config(max_steps=20).with_section("optim", name="sgd", lr=1e30))
    err = _one_line(capsys, ["train", "--config", str(config), "--out", str(tmp_path / "run")])
    assert "step " in err and "not finite" in err


def test_guidance_on_a_nan_input_raises_instead_of_returning_nan():
    from untrainable.guidance import Guidance, NonFiniteError
    from untrainable.models import create_model

    target = create_model("fcn", input_shape=(40,), num_classes=10, depth=2, width=16)
    guide = create_model("fcn", input_shape=(40,), num_classes=10, depth=2, width=16)
    guidance = Guidance(target, guide)
    x = torch.randn(8, 40)
    assert torch.isfinite(guidance(x).guidance_loss)
    x[3, 5] = float("nan")
    with pytest.raises(NonFiniteError, match="not finite"):
        guidance(x)


def test_a_module_shared_by_target_and_guide_is_refused():
    from torch import nn

    from untrainable.guidance import Guidance

    norm = nn.BatchNorm1d(8, affine=False)  # no parameters: the parameter check alone misses it
    target = nn.Sequential(nn.Linear(4, 8), norm, nn.Linear(8, 2))
    guide = nn.Sequential(nn.Linear(4, 8), norm)
    with pytest.raises(ValueError, match=r"shares 1 module\(s\) with the target \(e.g. '1'\)"):
        Guidance(target, guide)


# Config values that must be refused, naming the field.


@pytest.mark.parametrize("name", ["/tmp/elsewhere", "../../x", "", ".."])
def test_a_run_name_must_be_a_folder_name(name):
    with pytest.raises(ConfigError, match="name: .* is not a folder name"):
        _config().replace(name=name)


@pytest.mark.parametrize(
    ("pair", "match"),
    [
        (["layers.0.linear", "blocks.0.conv", float("inf")], r"pairs\[0\] weight: must be a number >= 0"),
        (["layers.0.linear", "blocks.0.conv", "heavy"], r"pairs\[0\]: the weight must be a number >= 0, got 'heavy'"),
        (["layers.0.linear", 3], r"pairs\[0\]: the target and guide layers must be layer paths"),
    ],
)
def test_a_bad_pair_weight_names_the_pair(pair, match):
    with pytest.raises(ConfigError, match=match):
        _config().with_section("guidance", pairs=[pair])


def test_unknown_keys_name_the_config_file(tmp_path, capsys):
    path = tmp_path / "c.toml"
    path.write_text('[model]\nname = "fcn"\ncolour = "red"\n[data]\nname = "mnist1d"\n')
    err = _one_line(capsys, ["train", "--config", str(path)])
    assert f"config file {path}: model: unknown key(s)" in err


def test_a_bad_glob_of_a_guides_entry_names_the_entry(tmp_path):
    from untrainable.build import build_guidance, build_guides

    base = _config().to_dict()
    del base["guide"]
    guides = [
        {"model": {"name": "cnn1d", "args": {"channels": 4}}, "name": "a"},
        {"model": {"name": "cnn1d", "args": {"channels": 4}}, "name": "b", "guide_layers": ["nothing.*"]},
    ]
    config = from_dict(RunConfig, {**base, "guides": guides})
    data = trainer.build_data(config.data)
    with pytest.raises(ConfigError, match=r"guides\[1\].guide_layers: no layer of CNN1d matches 'nothing.\*'"):
        build_guidance(config, trainer.build_model(config.model, data, 0), build_guides(config, data))


def test_a_corrupt_arm_config_under_run_names_the_file(tmp_path, capsys):
    out = tmp_path / "study"
    bad = out / "fcn" / "seed0" / "config.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{ not json")
    err = _one_line(capsys, ["run", "mnist1d", "--quick", "--seeds", "0", "--out", str(out)])
    assert f"{bad} is not valid JSON" in err


def test_progress_lines_go_to_a_log_that_is_not_a_terminal(tmp_path, capsys):
    trainer.train(_config(progress=True), tmp_path)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("safety: ")]
    assert len(lines) == 2  # one per epoch
    last = json.loads((tmp_path / "history.json").read_text())[-1]["step"]
    assert f"step {last}/{last}," in lines[-1]
    assert all(cell in lines[-1] for cell in ("epoch 2/2", "loss ", "alpha ", "val_accuracy "))
    assert "steps/s" in lines[-1]


def test_a_checkpoint_error_is_still_one_line(tmp_path, capsys):
    """CheckpointError is a RuntimeError: the time-out handler must not turn it into a traceback."""
    config = _write(tmp_path / "c.json", _config(max_steps=4, checkpoint_every=2))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 0
    (tmp_path / "run" / "result.json").unlink()
    for path in (tmp_path / "run" / "checkpoints").glob("step-*.pt"):
        path.write_bytes(b"garbage")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        capsys.readouterr()
        err = _one_line(capsys, ["train", "--config", str(config), "--out", str(tmp_path / "run"), "--resume"])
    assert "no checkpoint" in err
    assert issubclass(CheckpointError, RuntimeError)


# The lock comes first; the log is rewritten atomically; refusals before data and models.



def test_a_second_study_process_touches_nothing_in_a_run_folder_another_process_writes(tmp_path):
    from untrainable.experiment import Arm, Experiment, run_experiment

    out = tmp_path / "study"
    folder = out / "alone" / "seed0"
    folder.mkdir(parents=True)
    live = json.dumps({"step": 1, "loss": 2.3}) + "\n"
    (folder / "metrics.jsonl").write_text(live)  # a live run's log, before its first checkpoint
    holder = _hold_lock(folder)
    lines: list[str] = []
    try:
        with pytest.raises(BlockingIOError, match=f"PID {holder.pid}"):
            run_experiment(Experiment("t", "", [Arm("alone", _tiny())], seeds=(0,)), out, log=lines.append)
    finally:
        holder.kill()
        holder.wait()
    assert (folder / "metrics.jsonl").read_text() == live, "the live run's log was moved or changed"
    assert not list(folder.glob("metrics.attempt*")) and not (folder / "config.json").exists()
    assert not [line for line in lines if "trained again" in line], lines


@pytest.mark.slow
def test_a_resume_killed_while_it_rewrites_a_large_log_loses_no_record(tmp_path):
    run = tmp_path / "run"
    trainer.train(_tiny(), run)
    log = run / "metrics.jsonl"
    pad = "".join(json.dumps({"step": 1 + i % 5, "kind": "pad", "text": "x" * 200}) + "\n" for i in range(20000))
    with open(log, "a") as f:  # a large log (4.6 MB): its records are all at or before the checkpoint's step
        f.write(pad)
    before = log.read_text()
    config = _write(tmp_path / "c.json", _tiny())
    limit = len(before) // 2  # a file grown past it kills the process (SIGXFSZ): a kill in the middle of the write
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_DFL)\n"  # Python ignores it (the write then fails): a kill instead
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
        "resource.setrlimit(resource.RLIMIT_CORE, (0, 0))\n"
        "from untrainable.cli import main\n"
        f"sys.exit(main(['train', '--config', {str(config)!r}, '--out', {str(run)!r}, '--resume',"
        " '--set', 'train.max_steps=8']))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGXFSZ, done.stderr[-2000:]
    assert log.read_text() == before, "the log was cut by a kill during its rewrite"
    # The next resume finds every record up to its checkpoint, and leaves no temporary file.
    trainer.train(_tiny(max_steps=8), run, resume=True)
    steps = [r["step"] for r in map(json.loads, log.read_text().splitlines()) if "kind" not in r]
    assert steps == list(range(1, 9))
    assert not list(run.glob(".metrics.jsonl.tmp-*"))


@pytest.mark.parametrize("case", ["changed config, config.json gone", "only checkpoint unloadable"])
def test_resume_refusals_that_need_the_checkpoint_still_come_before_the_data(tmp_path, monkeypatch, case):
    run = tmp_path / "run"
    trainer.train(_tiny(), run)
    (run / "result.json").unlink()
    config = _tiny()
    if case == "changed config, config.json gone":
        (run / "config.json").unlink()
        config = config.with_section("optim", lr=0.05)
        expected: type[Exception] = ValueError
    else:
        for path in (run / "checkpoints").glob("step-*.pt"):
            path.write_bytes(path.read_bytes()[:-50])
        expected = CheckpointError

    def no_data(*args, **kwargs):
        raise AssertionError("the data was built before the checkpoint was read")

    monkeypatch.setattr(trainer, "build_data", no_data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(expected) as err:
            trainer.train(config, run, resume=True)
    assert str(run) in str(err.value)
