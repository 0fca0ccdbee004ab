"""The rescue study: arms and choices of its recipes, parallel runs, effects in seed stds, gradient norms, the quick job."""

import json
import math

import pytest

from untrainable.cli import main
from untrainable.config import ConfigError, DataSpec, DistillSpec, GuidanceSpec, ModelSpec, RunConfig, TrainSpec
from untrainable.experiment import Arm, Experiment, effect, run_experiment, run_study
from untrainable.recipes import rescue
from untrainable.trainer import train


def sweep_table(best: str) -> dict:
    rows = [{"arm": rescue._sweep_name(o, lr), "val_accuracy": (0.1, 0.0)} for o, lr in rescue.SWEEP]
    next(row for row in rows if row["arm"] == best)["val_accuracy"] = (0.3, 0.01)
    return {"rows": rows}


def test_effect_is_the_difference_in_pooled_seed_stds():
    difference, sds = effect((0.5, 0.1), (0.1, 0.0))
    assert difference == pytest.approx(0.4)
    assert sds == pytest.approx(0.4 / math.sqrt(0.01 / 2))
    assert effect((0.1, 0.0), (0.1, 0.0)) == (0.0, None)  # no spread: no ratio, rather than a division by zero


def test_the_sweep_choice_becomes_the_baseline_of_both_experiments():
    best = rescue._sweep_name("sgd", 1e-2)
    assert rescue.chosen_optimiser(sweep_table(best)) == ("sgd", 1e-2, best)
    headline = rescue.headline_experiment(sweep_table(best))
    controls = rescue.controls_experiment(sweep_table(best))
    for experiment in (headline, controls):
        arms = {arm.name: arm for arm in experiment.arms}
        alone = arms["deep-fcn"].config
        assert (alone.optim.name, alone.optim.lr, alone.guide) == ("sgd", 1e-2, None)
        guided = arms["deep-fcn+untrained-resnet18"].config
        assert (guided.optim.name, guided.optim.lr, guided.guidance.alpha) == ("adam", 1e-3, 1.0)
        assert experiment.baseline == "deep-fcn" and experiment.seeds == rescue.SEEDS and len(rescue.SEEDS) >= 5
    assert {arm.config.model.args["width"] for arm in headline.arms} == {1024}
    assert {arm.config.model.args["depth"] for arm in headline.arms} == {48}
    assert [arm.name for arm in headline.arms] == [
        "deep-fcn",
        "deep-fcn+untrained-resnet18",
        "deep-fcn+untrained-resnet18-first150",
    ]


def test_controls_cover_trained_guide_longer_stretch_noise_and_distillation():
    arms = {arm.name: arm for arm in rescue.controls_experiment(sweep_table(rescue._sweep_name("adam", 1e-3))).arms}
    assert arms["deep-fcn+trained-resnet18"].guide_from == "resnet18"
    assert arms["deep-fcn+untrained-resnet18-first300"].config.guidance.steps == 300
    noise = arms["deep-fcn+noise-untrained-resnet18"].config.guidance
    assert (noise.guide_input, noise.cache) == ("noise", "none")
    for name, guide_from in (("deep-fcn+kd-untrained-resnet18", None), ("deep-fcn+kd-trained-resnet18", "resnet18")):
        config = arms[name].config
        assert arms[name].guide_from == guide_from
        assert config.guidance.alpha == 0.0 and config.distill.weight == 1.0 and config.guide.name == "resnet18"


def test_distillation_needs_a_teacher():
    with pytest.raises(ConfigError, match="distill.weight"):
        RunConfig(model=ModelSpec("fcn"), data=DataSpec("mnist1d"), distill=DistillSpec(weight=1.0))


def tiny(**guidance) -> RunConfig:
    return RunConfig(
        model=ModelSpec("fcn", {"depth": 3, "width": 16}),
        data=DataSpec("mnist1d", {"num_samples": 400, "val_size": 50}, batch_size=50, train_eval_size=50),
        guide=ModelSpec("cnn1d", {"channels": 4}),
        guidance=GuidanceSpec(**guidance),
        train=TrainSpec(epochs=1, progress=False, grad_norm_steps=[1, 3]),
    )


def test_distillation_arm_trains_without_guidance_and_logs_per_layer_gradient_norms(tmp_path):
    config = tiny(alpha=0.0).replace(distill=DistillSpec(weight=1.0, temperature=2.0))
    train(config, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "distill_loss" in r]
    assert steps and all(r["guidance_loss"] == 0.0 and r["distill_loss"] > 0 for r in steps)
    with_norms = [r["step"] for r in records if "grad_norm/layers.0.linear.weight" in r]
    assert with_norms == [1, 3]
    norms = rescue.grad_norms_by_layer([tmp_path])
    assert sorted(norms) == [1, 3] and len(norms[1]) == 3 and all(v > 0 for v in norms[1])


def two_arms() -> Experiment:
    guide = tiny().replace(model=ModelSpec("cnn1d", {"channels": 4}), guide=None)
    return Experiment(
        name="tiny",
        description="a guide and a guided target",
        arms=[Arm("cnn", guide), Arm("fcn+trained-cnn", tiny(), guide_from="cnn")],
        seeds=(0, 1),
        baseline="cnn",
    )


@pytest.mark.slow
def test_parallel_runs_match_one_process_and_wait_for_their_guide(tmp_path):
    one = run_experiment(two_arms(), tmp_path / "one", log=lambda _: None)
    two = run_experiment(two_arms(), tmp_path / "two", log=lambda _: None, jobs=2)
    for a, b in zip(one["rows"], two["rows"]):
        assert a["arm"] == b["arm"]
        assert a["per_seed_test"] == pytest.approx(b["per_seed_test"], abs=0.02)
    saved = json.loads((tmp_path / "two" / "fcn+trained-cnn" / "seed1" / "config.json").read_text())
    assert saved["guide"]["checkpoint"].endswith("cnn/seed1/model.pt")
    assert two["baseline"] == "cnn" and two["rows"][0]["vs_baseline"]["difference"] == 0.0


def test_a_study_step_is_built_from_the_tables_before_it(tmp_path):
    first = Experiment(name="first", description="", arms=[Arm("a", tiny().replace(guide=None))], seeds=(0,))
    seen = {}

    def second(tables):
        seen.update(tables)
        return Experiment(name="second", description="", arms=[Arm("b", tiny().replace(guide=None))], seeds=(0,))

    done = run_study([first, second], tmp_path, log=lambda _: None)
    assert [e.name for e, _, _ in done] == ["first", "second"]
    assert list(seen) == ["first"] and seen["first"]["rows"][0]["arm"] == "a"
    assert (tmp_path / "second" / "table.md").exists()


@pytest.mark.slow
def test_quick_rescue_shows_the_rescue(tmp_path, capsys):
    assert main(["run", "rescue", "--quick", "--seeds", "0", "--jobs", "2", "--out", str(tmp_path)]) == 0
    assert "Δ vs deep-fcn" in capsys.readouterr().out
    table = json.loads((tmp_path / "table.json").read_text())
    test = {row["arm"]: row["per_seed_test"][0] for row in table["rows"]}
    # Seed 0 of the main job: with the guided arms' own optimiser the FCN alone stays at chance, and the
    # untrained guide lifts it well clear; the FCN alone at its tuned rate is reported beside them.
    assert test["deep-fcn-adam-lr0.001"] < 0.15
    assert test["deep-fcn+untrained-resnet18"] > test["deep-fcn-adam-lr0.001"] + 0.1
    assert table["baseline"] == "deep-fcn" and "deep-fcn" in test
    assert (tmp_path / "rescue_curves.png").stat().st_size > 10_000


@pytest.mark.slow
def test_quick_alpha_study_runs_every_arm_and_plots_alpha(tmp_path):
    experiment = rescue.alpha_experiment(quick=True)
    assert [arm.name for arm in experiment.arms] == [
        "deep-fcn",
        "deep-fcn+untrained-resnet18",
        "deep-fcn+untrained-resnet18-first150",
        rescue.ADAPTIVE_ARM,
    ]
    table = run_experiment(experiment, tmp_path, log=lambda _: None)
    assert {row["arm"] for row in table["rows"]} == {arm.name for arm in experiment.arms}
    constant = rescue.alpha_by_step(tmp_path / "deep-fcn+untrained-resnet18" / "seed0")
    adaptive = rescue.alpha_by_step(tmp_path / rescue.ADAPTIVE_ARM / "seed0")
    assert constant == [1.0] * 4  # 256 images, batch 64
    assert adaptive[0] == 1.0 and adaptive[1] == adaptive[2] != 1.0 and adaptive[3] > 0  # measured at steps 2 and 4
    assert (tmp_path / "alpha.png").stat().st_size > 10_000 and (tmp_path / "rescue_curves.png").exists()
    assert any(note.startswith("Adaptive alpha") for note in table["notes"])


def test_guides_experiment_pairs_each_guide_alone_and_both_at_alpha_one():
    experiment = rescue.guides_experiment()
    arms = {arm.name: arm.config for arm in experiment.arms}
    assert list(arms) == [
        "deep-fcn",
        "deep-fcn+untrained-resnet18",
        "deep-fcn+untrained-vit",
        "deep-fcn+untrained-resnet18+untrained-vit",
    ]
    assert experiment.baseline == "deep-fcn" and experiment.seeds == rescue.QUICK_SEEDS
    assert {(c.model.args["depth"], c.model.args["width"], c.train.epochs) for c in arms.values()} == {(48, 256, 10)}
    assert (arms["deep-fcn"].optim.name, arms["deep-fcn"].optim.lr) == rescue.QUICK_BASELINE
    assert {(c.optim.name, c.optim.lr) for name, c in arms.items() if name != "deep-fcn"} == {("adam", 1e-3)}
    assert arms["deep-fcn"].guide is None and arms["deep-fcn"].guides is None
    resnet, vit = arms["deep-fcn+untrained-resnet18"], arms["deep-fcn+untrained-vit"]
    assert (vit.guide.name, vit.guidance.guide_layers) == ("vit_tiny", ["blocks.*"])
    both = arms["deep-fcn+untrained-resnet18+untrained-vit"]
    assert both.guide is None and both.guidance.cache == "none"
    assert [(g.label, g.alpha, g.model, g.guide_layers) for g in both.guides] == [
        ("resnet18", 1.0, resnet.guide, resnet.guidance.guide_layers),
        ("vit", 1.0, vit.guide, ["blocks.*"]),
    ]


@pytest.mark.slow
def test_quick_guides_experiment_runs_end_to_end(tmp_path):
    table = run_experiment(rescue.guides_experiment(quick=True), tmp_path, log=lambda _: None)
    assert [row["arm"] for row in table["rows"]][-1] == "deep-fcn+untrained-resnet18+untrained-vit"
    records = (tmp_path / "deep-fcn+untrained-resnet18+untrained-vit" / "seed0" / "metrics.jsonl").read_text()
    first = json.loads(records.splitlines()[0])
    assert {"alpha/resnet18", "alpha/vit", "guide_loss/resnet18", "guide_loss/vit"} <= set(first)
    assert any(key.startswith("similarity/vit:layers.0.linear<-") for key in first)
    assert any(key.startswith("similarity/resnet18:layers.0.linear<-") for key in first)
    assert all(0.0 <= row["test_accuracy"][0] <= 1.0 for row in table["rows"])


def test_each_width_has_its_own_sweep_and_the_controls_take_theirs():
    steps = rescue.rescue()
    assert [steps[0].name, steps[1].name] == ["rescue-lr", f"rescue-lr-{rescue.CONTROL_WIDTH}"]
    assert {arm.config.model.args["width"] for arm in steps[1].arms} == {rescue.CONTROL_WIDTH}
    assert {arm.config.train.epochs for arm in steps[1].arms} == {rescue.CONTROL_EPOCHS}
    narrow, wide = rescue._sweep_name("adam", 3e-4), rescue._sweep_name("sgd", 1e-2)
    tables = {"rescue-lr": sweep_table(wide), f"rescue-lr-{rescue.CONTROL_WIDTH}": sweep_table(narrow)}
    headline, controls = steps[2](tables), steps[3](tables)
    assert {arm.name: arm for arm in headline.arms}["deep-fcn"].config.optim.name == "sgd"
    alone = {arm.name: arm for arm in controls.arms}["deep-fcn"].config
    assert (alone.optim.name, alone.optim.lr, alone.model.args["width"]) == ("adam", 3e-4, rescue.CONTROL_WIDTH)
