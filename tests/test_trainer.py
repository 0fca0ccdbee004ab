"""The training loop: run folder contents, seeds, interrupted-and-resumed runs."""

import json

import pytest
import torch

from crashing import DiesAfter, Killed
from untrainable.checkpoint import CheckpointError, load_weights
from untrainable.config import DataSpec, GuidanceSpec, ModelSpec, OptimSpec, RunConfig, TrainSpec
from untrainable.data import load_data
from untrainable.trainer import train


def small_config(**train_args) -> RunConfig:
    return RunConfig(
        model=ModelSpec("fcn", {"depth": 3, "width": 32, "dropout": 0.1}),
        data=DataSpec("mnist1d", {"num_samples": 600, "val_size": 100}, batch_size=50, train_eval_size=100),
        guide=ModelSpec("cnn1d", {"channels": 8}),
        guidance=GuidanceSpec(alpha=1.0, schedule="linear", steps=15, log_every=1),
        optim=OptimSpec(name="adamw", lr=3e-3, lr_schedule="cosine", weight_decay=0.01),
        train=TrainSpec(epochs=4, seed=3, progress=False, **train_args),
    )


def test_run_folder_holds_everything(tmp_path):
    result = train(small_config(), tmp_path)
    for name in (
        "config.json",
        "meta.json",
        "metrics.jsonl",
        "history.json",
        "result.json",
        "model.pt",
        "test_predictions.npy",
    ):
        assert (tmp_path / name).exists(), name
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(list((tmp_path / "checkpoints").glob("step-*.pt"))) == 2
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["seed"] == 3 and len(meta["starts"]) == 1 and "torch" in meta["starts"][0]["versions"]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r.get("kind") != "epoch"]
    assert [r["step"] for r in steps] == list(range(1, result.final["steps"] + 1))
    assert {"loss", "task_loss", "guidance_loss", "alpha", "lr"} <= set(steps[0])
    assert any(k.startswith("similarity/") for k in steps[0])
    assert steps[-1]["alpha"] == 0.0 and steps[0]["alpha"] == 1.0
    assert len(result.history) == 4 and "val_accuracy" in result.history[-1]
    assert "gap" in result.final and 0.0 <= result.final["test"]["accuracy"] <= 1.0


@pytest.mark.slow
def test_same_seed_same_weights(tmp_path):
    a = train(small_config(max_steps=12), tmp_path / "a")
    b = train(small_config(max_steps=12), tmp_path / "b")
    wa, wb = load_weights(a.folder / "model.pt"), load_weights(b.folder / "model.pt")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_refuses_to_overwrite_a_run(tmp_path):
    train(small_config(max_steps=3), tmp_path)
    with pytest.raises(FileExistsError, match="--resume"):
        train(small_config(max_steps=3), tmp_path)


def test_refuses_a_folder_with_a_runs_logs_but_no_checkpoint(tmp_path):
    train(small_config(max_steps=3), tmp_path)
    checkpoints = sorted((tmp_path / "checkpoints").glob("step-*.pt"))
    for path in checkpoints:  # as a resume that found them corrupted leaves them
        path.rename(path.with_name(path.name + ".corrupt"))
    logged = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(FileExistsError, match="--resume.*remove the folder"):
        train(small_config(max_steps=3), tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == logged


def test_a_run_stopped_before_its_first_checkpoint_is_trained_again_keeping_its_log(tmp_path):
    train(small_config(max_steps=3), tmp_path)
    for name in ("result.json", "model.pt", "history.json"):  # as a run stopped mid-epoch leaves it
        (tmp_path / name).unlink()
    for path in (tmp_path / "checkpoints").iterdir():  # no checkpoint at all: stopped before its first
        path.unlink()
    logged, config = (tmp_path / "metrics.jsonl").read_text(), (tmp_path / "config.json").read_text()
    with pytest.raises(CheckpointError, match="stopped before its first checkpoint.*drop --resume"):
        train(small_config(max_steps=3), tmp_path, resume=True)
    with pytest.warns(UserWarning, match="stopped before its first checkpoint.*kept as metrics.attempt1.jsonl"):
        result = train(small_config(max_steps=4), tmp_path)
    assert result.final["steps"] == 4
    assert (tmp_path / "metrics.attempt1.jsonl").read_text() == logged
    assert (tmp_path / "config.attempt1.json").read_text() == config
    assert (tmp_path / "tensorboard.attempt1").is_dir() and (tmp_path / "tensorboard").is_dir()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps[0] == 1 and "resume" not in (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(FileExistsError, match="already holds checkpoints"):  # a finished run is never restarted
        train(small_config(max_steps=4), tmp_path)


@pytest.mark.parametrize("where", [pytest.param("epoch-boundary", marks=pytest.mark.slow), "mid-epoch"])
def test_interrupted_run_resumes_to_identical_weights(tmp_path, where):
    config = small_config(checkpoint_every=1)
    data = load_data("mnist1d", num_samples=600, val_size=100)
    full = train(config, tmp_path / "full", data=data)
    total = full.final["steps"]
    steps_per_epoch = len(data.train) // 50
    assert total == 4 * steps_per_epoch
    kill_after_steps = total // 2 if where == "epoch-boundary" else total // 2 - 3

    crashing = load_data("mnist1d", num_samples=600, val_size=100)
    # Each step reads 50 examples; the crash comes while reading the batch after `kill_after_steps`.
    crashing.train = DiesAfter(crashing.train, limit=50 * kill_after_steps + 10)
    with pytest.raises(Killed):
        train(config, tmp_path / "resumed", data=crashing)
    assert len(list((tmp_path / "resumed" / "checkpoints").glob("*.pt"))) == 2
    resumed = train(config, tmp_path / "resumed", resume=True, data=data)

    assert resumed.final["steps"] == total
    w_full, w_resumed = load_weights(tmp_path / "full" / "model.pt"), load_weights(tmp_path / "resumed" / "model.pt")
    for key in w_full:
        assert torch.allclose(w_full[key].float(), w_resumed[key].float(), atol=1e-6), key
    records = [json.loads(line) for line in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "kind" not in r]
    assert steps == list(range(1, total + 1))  # no step lost, none logged twice
    resumed_at = [r["step"] for r in records if r.get("kind") == "resume"]
    assert len(resumed_at) == 1 and 0 < resumed_at[0] <= kill_after_steps  # it continued, not restarted
