"""Experiments: arms over seeds, reused runs, tables."""

import dataclasses
import json

import pytest

from untrainable.config import DataSpec, ModelSpec, RunConfig, TrainSpec
from untrainable.experiment import Arm, Experiment, format_table, run_experiment
from untrainable.trainer import train


def tiny(epochs: int = 1) -> RunConfig:
    return RunConfig(
        model=ModelSpec("fcn", {"depth": 2, "width": 16}),
        data=DataSpec("mnist1d", {"num_samples": 400, "val_size": 50}, batch_size=50, train_eval_size=50),
        guide=ModelSpec("cnn1d", {"channels": 4}),
        train=TrainSpec(epochs=epochs, progress=False),
    )


def experiment(epochs: int = 1) -> Experiment:
    guide = tiny(epochs).replace(model=ModelSpec("cnn1d", {"channels": 4}), guide=None)
    return Experiment(
        name="tiny",
        description="two arms",
        arms=[Arm("cnn", guide), Arm("fcn+trained-cnn", tiny(epochs), guide_from="cnn")],
        seeds=(0, 1),
    )


def test_arms_seeds_table_and_reuse(tmp_path):
    table = run_experiment(experiment(), tmp_path, log=lambda _: None)
    assert [row["arm"] for row in table["rows"]] == ["cnn", "fcn+trained-cnn"]
    assert all(row["seeds"] == 2 and len(row["per_seed_test"]) == 2 for row in table["rows"])
    saved = json.loads((tmp_path / "fcn+trained-cnn" / "seed1" / "config.json").read_text())
    assert saved["guide"]["checkpoint"].endswith("cnn/seed1/model.pt")  # the same seed's trained guide
    assert "| fcn+trained-cnn | 2 |" in format_table(table)

    messages = []
    run_experiment(experiment(), tmp_path, log=messages.append)
    assert all("reusing" in m for m in messages)

    with pytest.raises(ValueError, match="train.epochs"):
        run_experiment(experiment(epochs=2), tmp_path, log=lambda _: None)


def test_interrupted_runs_are_resumed_and_one_without_a_checkpoint_trained_again_keeping_its_log(tmp_path):
    run_experiment(experiment(), tmp_path, log=lambda _: None)
    interrupted, early = (tmp_path / "fcn+trained-cnn" / f"seed{seed}" for seed in (0, 1))
    for folder in (interrupted, early):  # as if killed before the end: no result yet
        (folder / "result.json").unlink()
        (folder / "model.pt").unlink()
    for path in (early / "checkpoints").iterdir():  # killed while writing its first checkpoint
        path.unlink()
    (early / "checkpoints" / ".step-4.pt.tmp-12345").write_bytes(b"half a checkpoint")
    earlier_log = (early / "metrics.jsonl").read_text()
    messages = []
    run_experiment(experiment(), tmp_path, log=messages.append)
    resumes = [json.loads(line) for line in (interrupted / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("kind") == "resume" for r in resumes)
    assert any("fcn+trained-cnn seed 1" in m and "first checkpoint" in m for m in messages), messages
    assert (early / "metrics.attempt1.jsonl").read_text() == earlier_log
    assert (early / "result.json").exists() and (interrupted / "result.json").exists()
    assert not (early / "checkpoints" / ".step-4.pt.tmp-12345").exists()


def test_resume_refuses_a_changed_config(tmp_path):
    config = tiny(epochs=2)
    train(dataclasses.replace(config, train=dataclasses.replace(config.train, max_steps=3)), tmp_path)
    changed = config.replace(optim=dataclasses.replace(config.optim, lr=0.5))
    with pytest.raises(ValueError, match="optim.lr"):
        train(changed, tmp_path, resume=True)
    assert train(config, tmp_path, resume=True).final["steps"] == 10  # 270 examples, batch 50, 2 epochs


def test_a_study_moved_or_spelled_otherwise_is_reused_and_resumed(tmp_path, monkeypatch):
    run_experiment(experiment(), tmp_path / "study", log=lambda _: None)
    interrupted = tmp_path / "study" / "fcn+trained-cnn" / "seed0"
    (interrupted / "result.json").unlink()  # as if killed after its last checkpoint
    (tmp_path / "study").rename(tmp_path / "moved")
    monkeypatch.chdir(tmp_path / "moved")  # and named by a relative path from elsewhere
    messages = []
    run_experiment(experiment(), "../moved", log=messages.append)
    assert any("seed 0] training" in m for m in messages) and any("reusing" in m for m in messages)
    saved = json.loads((tmp_path / "moved" / "fcn+trained-cnn" / "seed0" / "config.json").read_text())
    # Stored absolute: the path does not depend on the folder `run` was started from.
    assert saved["guide"]["checkpoint"] == str(tmp_path / "moved" / "cnn" / "seed0" / "model.pt")
    resumes = [
        json.loads(line)
        for line in (tmp_path / "moved" / "fcn+trained-cnn" / "seed0" / "metrics.jsonl").read_text().splitlines()
    ]
    assert any(r.get("kind") == "resume" for r in resumes)


def test_a_moved_study_whose_interrupted_guided_run_lost_its_config_json_is_resumed(tmp_path):
    run_experiment(experiment(), tmp_path / "study", log=lambda _: None)
    interrupted = tmp_path / "study" / "fcn+trained-cnn" / "seed0"
    (interrupted / "result.json").unlink()
    (interrupted / "config.json").unlink()  # the checkpoint's copy of the config is the record
    (tmp_path / "study").rename(tmp_path / "moved")
    messages = []
    run_experiment(experiment(), tmp_path / "moved", log=messages.append)
    assert any("seed 0] training" in m for m in messages)
    moved = tmp_path / "moved" / "fcn+trained-cnn" / "seed0"
    saved = json.loads((moved / "config.json").read_text())
    assert saved["guide"]["checkpoint"] == str(tmp_path / "moved" / "cnn" / "seed0" / "model.pt")
    records = [json.loads(line) for line in (moved / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("kind") == "resume" for r in records) and (moved / "result.json").exists()


def test_a_guide_of_another_arm_or_seed_is_still_a_different_config(tmp_path):
    run_experiment(experiment(), tmp_path, log=lambda _: None)
    path = tmp_path / "fcn+trained-cnn" / "seed0" / "config.json"
    saved = json.loads(path.read_text())
    saved["guide"]["checkpoint"] = saved["guide"]["checkpoint"].replace("seed0", "seed1")
    path.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="guide.checkpoint"):
        run_experiment(experiment(), tmp_path, log=lambda _: None)
