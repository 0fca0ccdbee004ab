"""Early stopping: the best validation epoch's weights are kept, resumed, saved and tested; tables report both."""

import json

import pytest
import torch

from crashing import DiesAfter, Killed
from untrainable.build import build_model
from untrainable.checkpoint import load_weights
from untrainable.config import DataSpec, ModelSpec, OptimSpec, RunConfig, TrainSpec
from untrainable.data import load_data
from untrainable.experiment import Arm, Experiment, format_table, run_experiment
from untrainable.trainer import evaluate, train


def config(**train_args) -> RunConfig:
    # A rate so high that validation accuracy peaks at epoch 1 and falls after (seed 1).
    return RunConfig(
        model=ModelSpec("fcn", {"depth": 3, "width": 32}),
        data=DataSpec("mnist1d", {"num_samples": 600, "val_size": 100}, batch_size=50, train_eval_size=50),
        optim=OptimSpec(name="sgd", lr=3.0),
        train=TrainSpec(epochs=6, seed=1, progress=False, early_stopping=True, **train_args),
    )


def test_the_best_validation_epoch_is_kept_saved_and_tested(tmp_path):
    data = load_data("mnist1d", num_samples=600, val_size=100)
    result = train(config(), tmp_path, data=data)
    vals = [entry["val_accuracy"] for entry in result.history]
    best = result.final["best"]
    assert best["epoch"] == vals.index(max(vals)) + 1  # the first epoch of the highest validation accuracy
    assert best["val"]["accuracy"] == max(vals)
    model = build_model(config().model, data, seed=1)
    model.load_state_dict(load_weights(tmp_path / "model_best.pt"))
    again = evaluate(model, data.test, config(), torch.device("cpu"))
    assert again["accuracy"] == pytest.approx(best["test"]["accuracy"])
    assert best["epoch"] < len(vals) and best["test"]["accuracy"] != result.final["test"]["accuracy"]
    final = load_weights(tmp_path / "model.pt")  # model.pt stays the last epoch's weights
    assert any(not torch.equal(final[k], v) for k, v in load_weights(tmp_path / "model_best.pt").items())
    assert json.loads((tmp_path / "result.json").read_text())["best"]["epoch"] == best["epoch"]


def test_without_early_stopping_nothing_changes(tmp_path):
    result = train(config().with_section("train", early_stopping=False, epochs=2), tmp_path)
    assert "best" not in result.final and not (tmp_path / "model_best.pt").exists()


def test_a_resumed_run_keeps_the_best_epoch_of_before_the_crash(tmp_path):
    data = load_data("mnist1d", num_samples=600, val_size=100)
    full = train(config(), tmp_path / "full", data=data)
    crashing = load_data("mnist1d", num_samples=600, val_size=100)
    crashing.train = DiesAfter(crashing.train, limit=50 * 40 + 10)  # 10 steps an epoch: dies in epoch 5
    with pytest.raises(Killed):
        train(config(), tmp_path / "resumed", data=crashing)
    resumed = train(config(), tmp_path / "resumed", resume=True, data=data)
    assert resumed.final["best"] == full.final["best"]
    w_full, w_resumed = (
        load_weights(tmp_path / "full" / "model_best.pt"),
        load_weights(tmp_path / "resumed" / "model_best.pt"),
    )
    assert all(torch.equal(w_full[k], w_resumed[k]) for k in w_full)


def test_tables_give_the_test_at_the_best_epoch_and_its_difference(tmp_path):
    alone = config().with_section("train", epochs=3)
    experiment = Experiment(
        name="tiny",
        description="",
        arms=[Arm("slow", alone.with_section("optim", lr=0.3)), Arm("fast", alone)],
        seeds=(0, 1),
        baseline="slow",
    )
    table = run_experiment(experiment, tmp_path, log=lambda _: None)
    rows = {row["arm"]: row for row in table["rows"]}
    for arm in ("slow", "fast"):
        per_seed = [json.loads((tmp_path / arm / f"seed{s}" / "result.json").read_text())["best"] for s in (0, 1)]
        assert rows[arm]["per_seed_best"] == [b["test"]["accuracy"] for b in per_seed]
        assert rows[arm]["best_epoch"] == [b["epoch"] for b in per_seed]
        assert rows[arm]["best_val_accuracy"][0] == pytest.approx(sum(b["val"]["accuracy"] for b in per_seed) / 2)
    difference = rows["fast"]["best_accuracy"][0] - rows["slow"]["best_accuracy"][0]
    assert rows["fast"]["best_vs_baseline"]["difference"] == pytest.approx(difference)
    text = format_table(table)
    assert "test accuracy (best val epoch)" in text and "Δ / std (best)" in text
    assert "best val accuracy" not in text  # the selection key is in table.json, not a column


def test_an_arm_reuses_the_runs_of_an_earlier_experiments_arm(tmp_path):
    alone = config().with_section("train", epochs=1)
    tune = Experiment(name="tune", description="", arms=[Arm("sgd-0.3", alone)], seeds=(0,))
    run_experiment(tune, tmp_path / "tune", log=lambda _: None)
    before = (tmp_path / "tune" / "sgd-0.3" / "seed0" / "result.json").stat().st_mtime_ns
    seen = []
    final = Experiment(name="final", description="", arms=[Arm("alone", alone, runs_in="tune/sgd-0.3")], seeds=(0, 1))
    table = run_experiment(final, tmp_path / "final", log=seen.append)
    assert any("seed 0] done earlier" in line for line in seen)
    assert (tmp_path / "tune" / "sgd-0.3" / "seed0" / "result.json").stat().st_mtime_ns == before
    assert (tmp_path / "tune" / "sgd-0.3" / "seed1" / "result.json").exists()  # trained where the arm's runs live
    assert not (tmp_path / "final" / "alone").exists()
    assert table["rows"][0]["arm"] == "alone" and table["rows"][0]["seeds"] == 2
    changed = Experiment(
        name="final",
        description="",
        arms=[Arm("alone", alone.with_section("optim", lr=0.1), runs_in="tune/sgd-0.3")],
        seeds=(0,),
    )
    with pytest.raises(ValueError, match="different config"):  # never reused under another config
        run_experiment(changed, tmp_path / "final", log=lambda _: None)


def test_when_the_last_epoch_is_the_best_its_test_is_the_final_one_without_a_second_pass(tmp_path, monkeypatch):
    import untrainable.trainer as trainer

    data = load_data("mnist1d", num_samples=600, val_size=100)
    passes = []
    counted = trainer.evaluate

    def evaluate(model, dataset, *args, **kwargs):
        passes.append(dataset is data.test)
        return counted(model, dataset, *args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate", evaluate)
    steady = config().with_section("optim", lr=0.01).with_section("train", epochs=2)  # val 0.13, then 0.18
    result = train(steady, tmp_path, data=data)
    best = result.final["best"]
    assert best["epoch"] == 2 and best["test"] == result.final["test"] and passes.count(True) == 1
    model = build_model(steady.model, data, seed=1)  # the oracle: model_best.pt tested on its own
    model.load_state_dict(load_weights(tmp_path / "model_best.pt"))
    assert evaluate(model, data.test, steady, torch.device("cpu"))["accuracy"] == best["test"]["accuracy"]
