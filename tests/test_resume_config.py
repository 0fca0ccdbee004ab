"""A resume trains the config its run folder records, or says in meta.json what it changed; meta.json lists every start."""

from __future__ import annotations

import json
from pathlib import Path

from tiny import tiny_config as _tiny
from untrainable.checkpoint import CheckpointManager, load_checkpoint, save_checkpoint
from untrainable.cli import main


def _started(tmp_path: Path) -> tuple[Path, Path]:
    """A run stopped at step 5 of 10 (its checkpoint at 5) and its config file."""
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(_tiny().to_dict()))
    assert main(["train", "--config", str(config), "--out", str(tmp_path / "run")]) == 0
    (tmp_path / "run" / "result.json").unlink()
    return tmp_path / "run", config


def _resume(config: Path, run: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(config), "--out", str(run), "--resume", "--set", "train.max_steps=8", *extra]


def _one_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _meta(run: Path) -> dict:
    return json.loads((run / "meta.json").read_text())


def test_an_older_runs_resume_with_config_json_gone_and_a_changed_config_is_refused_unless_accepted(tmp_path, capsys):
    run, config = _started(tmp_path)
    (checkpoint,) = CheckpointManager(run / "checkpoints").paths()
    state = load_checkpoint(checkpoint)
    del state["config"]  # as checkpoints of older runs are
    save_checkpoint(state, checkpoint)
    (run / "config.json").unlink()
    changed = [*_resume(config, run), "--set", "optim.lr=0.05"]
    err = _one_line(capsys, changed)
    assert str(run) in err and "cannot be checked" in err and "--accept-config" in err
    assert not (run / "config.json").exists() and len(_meta(run)["starts"]) == 1, "the refused resume wrote records"
    assert main([*changed, "--accept-config"]) == 0
    capsys.readouterr()
    last = _meta(run)["starts"][-1]
    assert last["resumed_from"] == checkpoint.name and "config_unchecked" in last
    assert json.loads((run / "config.json").read_text())["optim"]["lr"] == 0.05


def test_a_changed_config_accepted_on_resume_is_recorded_old_to_new(tmp_path, capsys):
    run, config = _started(tmp_path)
    changed = [*_resume(config, run), "--set", "optim.lr=0.05"]
    err = _one_line(capsys, changed)
    assert "config.json differs in optim.lr" in err and "--accept-config" in err
    assert main([*changed, "--accept-config"]) == 0
    capsys.readouterr()
    assert _meta(run)["starts"][-1]["config_changes"] == {"optim.lr": [_tiny().optim.lr, 0.05]}


def test_with_config_json_gone_the_advice_does_not_name_the_missing_file(tmp_path, capsys):
    run, config = _started(tmp_path)
    (run / "config.json").unlink()
    err = _one_line(capsys, [*_resume(config, run), "--set", "optim.lr=0.05"])
    assert "checkpoints/step-" in err and "differs in optim.lr" in err
    assert "its own config.json" not in err and "config.json is missing" in err


def test_accept_config_needs_resume(tmp_path, capsys):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(_tiny().to_dict()))
    err = _one_line(capsys, ["train", "--config", str(config), "--out", str(tmp_path / "run"), "--accept-config"])
    assert "--accept-config" in err and "--resume" in err and not (tmp_path / "run").exists()


def test_meta_json_keeps_every_start_with_its_command_time_and_versions(tmp_path, capsys, monkeypatch):
    run, config = _started(tmp_path)
    first = _meta(run)["starts"][0]
    for argv in (_resume(config, run), [*_resume(config, run)[:-1], "train.max_steps=9"]):
        monkeypatch.setattr("sys.argv", ["untrainable", *argv])
        assert main(argv) == 0
    capsys.readouterr()
    meta = _meta(run)
    assert meta["seed"] == 0 and [s.get("resumed_from") for s in meta["starts"]] == [
        None,
        "step-000000005.pt",
        "step-000000008.pt",
    ]
    assert meta["starts"][0] == first
    for start in meta["starts"]:
        assert {"command", "cwd", "started", "versions", "platform"} <= set(start)
        assert "torch" in start["versions"]
    assert "train.max_steps=9" in meta["starts"][-1]["command"]


def test_a_meta_json_of_an_older_run_becomes_the_first_start(tmp_path, capsys):
    run, config = _started(tmp_path)
    older = {"seed": 0, "command": ["untrainable", "train"], "started": "2025-01-01T00:00:00+0000", "versions": {}}
    (run / "meta.json").write_text(json.dumps(older))
    assert main(_resume(config, run)) == 0
    capsys.readouterr()
    starts = _meta(run)["starts"]
    assert starts[0]["started"] == "2025-01-01T00:00:00+0000" and starts[1]["resumed_from"] == "step-000000005.pt"
