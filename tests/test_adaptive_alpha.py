"""Adaptive alpha: the gradient-norm rule against a hand computation, holding, clipping, config, logs, resume, DDP."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from crashing import DiesAfter, Killed
from ranks import run_ranks
from untrainable import AdaptiveAlpha, Guidance, Guide, distributed
from untrainable.config import (
    ConfigError,
    DataSpec,
    GuidanceSpec,
    GuideSpec,
    ModelSpec,
    OptimSpec,
    RunConfig,
    TrainSpec,
)
from untrainable.data import load_data
from untrainable.models import create_model
from untrainable.step import StepParts, adapt_alpha, train_step
from untrainable.tasks import get_task
from untrainable.trainer import train

LAYERS = {"target_layers": ["layers.*.linear"], "guide_layers": ["layers.*.linear"]}
BATCH = 16


def models(batch_norm: bool = True) -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    target = create_model("fcn", input_shape=(12,), num_classes=5, depth=3, width=24, batch_norm=batch_norm)
    torch.manual_seed(1)
    guide = create_model("fcn", input_shape=(12,), num_classes=5, depth=2, width=32, batch_norm=batch_norm)
    return target, guide


def batches(n: int, size: int = BATCH) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(2)
    return [
        (torch.randn(size, 12, generator=generator), torch.randint(0, 5, (size,), generator=generator))
        for _ in range(n)
    ]


def norm_of_grads(model: torch.nn.Module) -> float:
    grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.cat(grads)))


def test_alpha_is_the_ratio_of_gradient_norms_taken_by_separate_backward_passes():
    target, guide = models()
    x, y = batches(1)[0]
    # The oracle: each gradient from its own backward on its own copy of the models, alpha 1 for the guidance loss.
    norms = []
    for term in ("task", "guidance"):
        t, g = copy.deepcopy(target), copy.deepcopy(guide)
        out = Guidance(t, g, alpha=1.0, **LAYERS).train()(x)
        (F.cross_entropy(out.output, y) if term == "task" else out.guidance_loss).backward()
        norms.append(norm_of_grads(t))
    schedule = AdaptiveAlpha(alpha=0.5, every=1, ratio=0.7, momentum=0.0)
    guidance = Guidance(target, guide, schedule=schedule, **LAYERS).train()
    out = guidance(x)
    loss, measured = adapt_alpha(guidance, out, F.cross_entropy(out.output, y), target.parameters())
    assert out.alpha == 0.5  # the forward ran at the starting value
    assert measured["adapt/task_grad_norm"] == pytest.approx(norms[0], rel=1e-5)
    assert measured["adapt/guide_grad_norm"] == pytest.approx(norms[1], rel=1e-5)
    assert measured["alpha"] == pytest.approx(0.7 * norms[0] / norms[1], rel=1e-5)
    assert float(loss.detach()) == pytest.approx(measured["alpha"] * float(out.unit_loss.detach()), rel=1e-6)
    assert schedule.value == measured["alpha"]
    assert all(p.grad is None for p in target.parameters())  # measuring leaves .grad alone


def test_alpha_starts_at_its_value_and_holds_between_measurements():
    target, guide = models()
    schedule = AdaptiveAlpha(alpha=2.0, every=3, momentum=0.0)
    guidance = Guidance(target, guide, schedule=schedule, **LAYERS).train()
    optimizer = torch.optim.SGD(target.parameters(), lr=0.05)
    alphas, measured_at = [], []
    for step, (x, y) in enumerate(batches(7), start=1):
        out = guidance(x)
        task_loss = F.cross_entropy(out.output, y)
        guidance_loss, measured = adapt_alpha(guidance, out, task_loss, target.parameters())
        alphas.append(measured.get("alpha", out.alpha))
        if measured:
            measured_at.append(step)
        optimizer.zero_grad()
        (task_loss + guidance_loss).backward()
        optimizer.step()
    assert measured_at == [3, 6]
    assert alphas[:2] == [2.0, 2.0]
    assert alphas[2] == alphas[3] == alphas[4] != 2.0
    assert alphas[5] == alphas[6] != alphas[2]


def test_moving_average_with_bias_correction_by_hand():
    schedule = AdaptiveAlpha(alpha=1.0, every=1, ratio=0.5, momentum=0.5)
    assert schedule.update(4.0, 1.0) == pytest.approx(2.0)  # r_1 = 2, alpha_1 = r_1
    # r_2 = 4: m_2 = 0.5 * (0.5 * 2) + 0.5 * 4 = 2.5, alpha_2 = 2.5 / (1 - 0.25)
    assert schedule.update(8.0, 1.0) == pytest.approx(2.5 / 0.75)
    state = schedule.state_dict()
    restored = AdaptiveAlpha(alpha=1.0, every=1, ratio=0.5, momentum=0.5)
    restored.load_state_dict(state)
    assert restored.value == schedule.value


def test_alpha_is_clipped_and_an_overflow_is_not_a_measurement():
    schedule = AdaptiveAlpha(alpha=1.0, every=1, alpha_max=5.0, momentum=0.0)
    assert schedule.update(1.0, 0.0) == 5.0  # a vanishing guidance gradient
    assert schedule.update(1e6, 1.0) == 5.0
    assert schedule.update(0.3, 1.0) == pytest.approx(0.3)
    assert schedule.update(float("inf"), 1.0) == pytest.approx(0.3)
    assert schedule.update(1.0, float("nan")) == pytest.approx(0.3) and schedule.measurements == 3


def test_an_adaptive_alpha_at_zero_still_runs_the_guide_on_its_measurement_steps():
    target, guide = models()
    calls = []
    guide.register_forward_pre_hook(lambda *_: calls.append(1))
    guidance = Guidance(target, guide, schedule=AdaptiveAlpha(alpha=0.0, every=2), **LAYERS).train()
    alphas = []
    for x, y in batches(3):
        out = guidance(x)
        _, measured = adapt_alpha(guidance, out, F.cross_entropy(out.output, y), target.parameters())
        alphas.append(measured.get("alpha", out.alpha))
    assert len(calls) == 2  # skipped at step 1 (alpha 0); run at step 2 to measure, and at step 3 (alpha > 0)
    assert alphas[0] == 0.0 and alphas[1] > 0 and alphas[2] == alphas[1]


def second_guide() -> torch.nn.Module:
    torch.manual_seed(3)
    return create_model("fcn", input_shape=(12,), num_classes=5, depth=3, width=16)


def test_two_adaptive_guides_each_get_their_own_alpha_from_their_own_gradient_norm():
    target, first = models()
    second = second_guide()
    x, y = batches(1)[0]
    # The oracle: each gradient from its own backward on its own copy, each guide alone at alpha 1.
    t = copy.deepcopy(target)
    F.cross_entropy(t(x), y).backward()
    task_norm = norm_of_grads(t)
    guide_norms = {}
    for name, guide in (("a", first), ("b", second)):
        t = copy.deepcopy(target)
        Guidance(t, copy.deepcopy(guide), alpha=1.0, **LAYERS).train()(x).guidance_loss.backward()
        guide_norms[name] = norm_of_grads(t)
    assert guide_norms["a"] != pytest.approx(guide_norms["b"], rel=0.05)  # two different measurements
    schedules = {
        "a": AdaptiveAlpha(alpha=0.5, every=1, ratio=0.7, momentum=0.0),
        "b": AdaptiveAlpha(alpha=2.0, every=1, ratio=1.5, momentum=0.0),
    }
    guidance = Guidance(
        target, [Guide(g, name=n, schedule=schedules[n], **LAYERS) for n, g in (("a", first), ("b", second))]
    )
    out = guidance.train()(x)
    loss, measured = adapt_alpha(guidance, out, F.cross_entropy(out.output, y), target.parameters())
    assert out.alphas == {"a": 0.5, "b": 2.0}  # the forward ran at the starting values
    assert measured["adapt/task_grad_norm"] == pytest.approx(task_norm, rel=1e-5)
    for name, ratio in (("a", 0.7), ("b", 1.5)):
        assert measured[f"adapt/{name}/guide_grad_norm"] == pytest.approx(guide_norms[name], rel=1e-5)
        assert measured[f"alpha/{name}"] == pytest.approx(ratio * task_norm / guide_norms[name], rel=1e-5)
        assert schedules[name].value == measured[f"alpha/{name}"]
    assert measured["alpha"] == measured["alpha/a"]  # the first guide's
    expected = sum(measured[f"alpha/{n}"] * float(out.guide_losses[n].detach()) for n in ("a", "b"))
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-6)
    assert out.unit_loss is None  # several guides: each guide's is in out.guide_losses
    assert all(p.grad is None for p in target.parameters())
    # Both adaptive states travel with the state dict.
    state = guidance.get_extra_state()
    assert set(state["adaptive"]) == {"a", "b"}
    fresh = {n: AdaptiveAlpha(alpha=0.5, every=1, ratio=0.7, momentum=0.0) for n in ("a", "b")}
    restored = Guidance(
        target, [Guide(g, name=n, schedule=fresh[n], **LAYERS) for n, g in (("a", first), ("b", second))]
    )
    restored.set_extra_state(state)
    assert restored.alphas == {n: schedules[n].value for n in ("a", "b")} and restored.step == 1


def test_an_adaptive_guide_at_zero_among_several_runs_on_its_measurement_steps_only():
    target, first = models()
    second = second_guide()
    calls = []
    first.register_forward_pre_hook(lambda *_: calls.append(1))
    guides = [
        Guide(first, name="a", schedule=AdaptiveAlpha(alpha=0.0, every=2), **LAYERS),
        Guide(second, name="b", alpha=0.5, **LAYERS),
    ]
    guidance = Guidance(target, guides).train()
    alphas = []
    for x, y in batches(3):
        out = guidance(x)
        _, measured = adapt_alpha(guidance, out, F.cross_entropy(out.output, y), target.parameters())
        alphas.append(measured.get("alpha/a", out.alphas["a"]))
        assert out.alphas["b"] == 0.5 and "alpha/b" not in measured
    assert len(calls) == 2  # skipped at step 1 (alpha 0), run at step 2 to measure, and at step 3 (alpha > 0)
    assert alphas[0] == 0.0 and alphas[1] > 0 and alphas[2] == alphas[1]


def test_each_adaptive_guides_entry_is_measured_on_its_own_steps_and_logged_by_name(tmp_path):
    entries = [
        GuideSpec(
            ModelSpec("cnn1d", {"channels": 4}),
            name="cnn",
            schedule="adaptive",
            adapt_every=2,
            adapt_ratio=0.5,
            adapt_momentum=0.0,
        ),
        GuideSpec(
            ModelSpec("fcn", {"depth": 2, "width": 8}),
            name="fcn",
            alpha=0.3,
            schedule="adaptive",
            adapt_every=3,
            adapt_momentum=0.0,
        ),
    ]
    config = tiny_config().with_guides(entries)
    train(config, tmp_path)
    records = step_records(tmp_path)
    assert len(records) == 7
    for name, every, ratio, start in (("cnn", 2, 0.5, 1.0), ("fcn", 3, 1.0, 0.3)):
        measured = [r for r in records if f"adapt/{name}/guide_grad_norm" in r]
        assert [r["step"] for r in measured] == list(range(every, 8, every))
        assert [r[f"alpha/{name}"] for r in records[: every - 1]] == [start] * (every - 1)
        for r in measured:
            expected = ratio * r["adapt/task_grad_norm"] / r[f"adapt/{name}/guide_grad_norm"]
            assert r[f"alpha/{name}"] == pytest.approx(expected, rel=1e-6)
    assert [r["alpha"] for r in records] == [r["alpha/cnn"] for r in records]
    for r in records:
        expected = r["alpha/cnn"] * r["guide_loss/cnn"] + r["alpha/fcn"] * r["guide_loss/fcn"]
        assert r["guidance_loss"] == pytest.approx(expected, rel=1e-5)
    assert "adapt/guide_grad_norm" not in records[5] and "adapt/task_grad_norm" in records[5]


def test_adaptive_fields_of_a_guides_entry_are_named():
    bad = GuideSpec(ModelSpec("cnn1d", {"channels": 4}), name="cnn", schedule="adaptive", adapt_momentum=1.0)
    with pytest.raises(ConfigError, match=r"guides\[0\]\.adapt_momentum"):
        tiny_config().with_guides([bad])
    with pytest.raises(ConfigError, match="guidance.adapt_every: with \\[\\[guides\\]\\]"):
        tiny_config(adapt_every=3).replace(guide=None, guides=[GuideSpec(ModelSpec("cnn1d", {"channels": 4}))])


@pytest.mark.parametrize(
    "changes, field",
    [
        ({"adapt_ratio": 0.0}, "guidance.adapt_ratio"),
        ({"adapt_ratio": float("inf")}, "guidance.adapt_ratio"),
        ({"adapt_every": 0}, "guidance.adapt_every"),
        ({"adapt_momentum": 1.0}, "guidance.adapt_momentum"),
        ({"adapt_momentum": -0.1}, "guidance.adapt_momentum"),
        ({"alpha_max": 0.5}, "guidance.alpha_max"),
        ({"schedule": "adaptiv"}, "guidance.schedule"),
    ],
)
def test_config_errors_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field) as err:
        tiny_config(**{"schedule": "adaptive", **changes})
    if field == "guidance.schedule":
        assert "adaptive" in str(err.value)  # the allowed values are listed


def test_adaptive_needs_no_steps():
    assert tiny_config(schedule="adaptive").guidance.steps is None


def tiny_config(epochs: int = 1, checkpoint_every: int = 0, **guidance) -> RunConfig:
    return RunConfig(
        model=ModelSpec("fcn", {"depth": 3, "width": 16, "dropout": 0.1}),
        data=DataSpec("mnist1d", {"num_samples": 500, "val_size": 50}, batch_size=50, train_eval_size=50),
        guide=ModelSpec("cnn1d", {"channels": 4}),
        guidance=GuidanceSpec(**guidance),
        optim=OptimSpec(name="adam", lr=3e-3),
        train=TrainSpec(epochs=epochs, seed=1, progress=False, checkpoint_every=checkpoint_every),
    )


def step_records(folder) -> list[dict]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "kind" not in r]


def test_metrics_log_the_adaptive_alpha_of_every_step(tmp_path):
    config = tiny_config(alpha=0.5, schedule="adaptive", adapt_every=3, adapt_ratio=0.5, adapt_momentum=0.0)
    train(config, tmp_path)
    records = step_records(tmp_path)
    assert [r["step"] for r in records] == list(range(1, 8))  # 350 training examples, batch 50
    assert [r["alpha"] for r in records[:2]] == [0.5, 0.5]
    measured = [r for r in records if "adapt/task_grad_norm" in r]
    assert [r["step"] for r in measured] == [3, 6]
    for r in measured:
        assert r["alpha"] == pytest.approx(0.5 * r["adapt/task_grad_norm"] / r["adapt/guide_grad_norm"], rel=1e-6)
    assert records[3]["alpha"] == records[4]["alpha"] == records[2]["alpha"]
    assert records[6]["alpha"] == records[5]["alpha"]


def test_a_resumed_run_continues_the_same_alpha_sequence(tmp_path):
    config = tiny_config(epochs=2, checkpoint_every=4, schedule="adaptive", adapt_every=3, adapt_momentum=0.5)
    data = load_data("mnist1d", num_samples=500, val_size=50)
    train(config, tmp_path / "full", data=data)
    crashing = load_data("mnist1d", num_samples=500, val_size=50)
    # 7 steps an epoch and 50 training examples evaluated after it: dies in step 10, after the checkpoint of step 8.
    crashing.train = DiesAfter(crashing.train, limit=50 * 10 + 10)
    with pytest.raises(Killed):
        train(config, tmp_path / "resumed", data=crashing)
    train(config, tmp_path / "resumed", resume=True, data=data)
    full, resumed = step_records(tmp_path / "full"), step_records(tmp_path / "resumed")
    assert len(full) == 14 and [r["step"] for r in resumed] == [r["step"] for r in full]
    # The checkpoint of step 8 holds the average of the measurements at steps 3 and 6; step 9's includes them.
    assert [r["alpha"] for r in resumed] == pytest.approx([r["alpha"] for r in full], rel=1e-6)
    assert len({r["alpha"] for r in full}) > 3


def _ddp_steps(rank: int, world: int, steps: int) -> dict:
    """`steps` adaptive train_steps (measured every step) on this rank's share of each batch."""
    target, guide = models(batch_norm=False)  # no batch statistic but the CKA's: ranks match one process
    info = distributed.DistInfo(rank, world, rank, torch.device("cpu"))
    model = distributed.wrap(target, info)
    schedule = AdaptiveAlpha(alpha=1.0, every=1, momentum=0.5)
    guidance = Guidance(model, guide, schedule=schedule, gather=distributed.gather_for_similarity, **LAYERS).train()
    optimizer = torch.optim.SGD(target.parameters(), lr=0.1)
    parts = StepParts(
        model, target, optimizer, get_task("classification"), torch.device("cpu"), info, guidance=guidance
    )
    rows = slice(rank * BATCH // world, (rank + 1) * BATCH // world)
    alphas = [train_step(parts, (x[rows], y[rows]), step)[0]["alpha"] for step, (x, y) in enumerate(batches(steps), 1)]
    return {"alphas": alphas, "weights": {k: v.clone() for k, v in target.state_dict().items()}}


@pytest.mark.slow
def test_every_rank_gets_the_alpha_of_one_process_on_the_whole_batch():
    ranks = run_ranks(_ddp_steps, 2, 3)
    one = _ddp_steps(0, 1, 3)
    assert ranks[0]["alphas"] == ranks[1]["alphas"]  # the same number on every rank, not merely close
    assert ranks[0]["alphas"] == pytest.approx(one["alphas"], rel=1e-5)
    assert len(set(one["alphas"])) == 3
    for name, value in one["weights"].items():
        assert torch.allclose(ranks[0]["weights"][name], value, atol=1e-5), name
