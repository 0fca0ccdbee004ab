"""Several guides: the loss is the sum of the single-guide losses, each guide runs once, frozen, on its own schedule."""

import json

import pytest
import torch
import torch.nn.functional as F

from untrainable import AlphaSchedule, Guidance, Guide
from untrainable.models import create_model

PAIRS_CNN = [("layers.0.linear", "blocks.0.conv"), ("layers.2.linear", "blocks.2.conv", 0.5)]
PAIRS_FCN = [("layers.0.linear", "layers.1.linear"), ("layers.1.linear", "layers.0.linear", 2.0)]


def models(dtype=torch.float32):
    """A target and two guides of other kinds; layers wider than the batch, so CKA may use Gram matrices."""
    torch.manual_seed(0)
    target = create_model("fcn", input_shape=(40,), depth=3, width=96, dropout=0.0).to(dtype)
    cnn = create_model("cnn1d", input_shape=(40,), channels=8, batch_norm=True).to(dtype)
    fcn = create_model("fcn", input_shape=(40,), depth=2, width=48, dropout=0.0).to(dtype)
    return target, cnn, fcn


def batch(n=24, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    return torch.randn(n, 40, generator=gen).to(dtype), torch.randint(0, 10, (n,), generator=gen)


def counter(module):
    calls = []
    module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("gather", [None, lambda t: t], ids=["gram-matrices", "activations"])
def test_two_guides_give_the_sum_of_the_single_guide_losses_in_float64(gather):
    target, cnn, fcn = models(torch.float64)
    x, y = batch(dtype=torch.float64)
    both = Guidance(
        target,
        [Guide(cnn, name="cnn", pairs=PAIRS_CNN, alpha=0.7), Guide(fcn, name="fcn", pairs=PAIRS_FCN, alpha=1.3)],
        gather=gather,
    )
    alone_cnn = Guidance(target, cnn, pairs=PAIRS_CNN, alpha=0.7, gather=gather)
    alone_fcn = Guidance(target, fcn, pairs=PAIRS_FCN, alpha=1.3, gather=gather)
    params = [p for name, p in target.named_parameters() if ".linear." in name]  # the paired layers
    out = both(x)
    grads = torch.autograd.grad(out.guidance_loss, params)
    out_cnn, out_fcn = alone_cnn(x), alone_fcn(x)
    expected = out_cnn.guidance_loss + out_fcn.guidance_loss
    expected_grads = torch.autograd.grad(expected, params)
    assert out.guidance_loss.dtype == torch.float64
    assert torch.allclose(out.guidance_loss, expected, rtol=1e-12, atol=1e-12)
    assert all(torch.allclose(a, b, rtol=1e-10, atol=1e-12) for a, b in zip(grads, expected_grads))
    assert torch.allclose(out.guide_losses["cnn"], out_cnn.guidance_loss / 0.7, rtol=1e-12)
    assert torch.allclose(out.guide_losses["fcn"], out_fcn.guidance_loss / 1.3, rtol=1e-12)
    assert out.alphas == {"cnn": 0.7, "fcn": 1.3} and out.alpha == 0.7
    # Keys name the guide; the pairs' similarities are those of each guide alone, in pair order.
    assert list(out.similarities) == [f"cnn:{k}" for k in out_cnn.similarities] + [
        f"fcn:{k}" for k in out_fcn.similarities
    ]
    for name, single in (("cnn", out_cnn), ("fcn", out_fcn)):
        for key, value in single.similarities.items():
            assert torch.allclose(out.similarities[f"{name}:{key}"], value, rtol=1e-12), key


def test_a_single_unnamed_guide_keeps_the_plain_keys_and_a_named_one_prefixes_them():
    target, cnn, _ = models()
    x, _ = batch()
    plain = Guidance(target, cnn, pairs=PAIRS_CNN)(x)
    assert list(plain.similarities) == ["layers.0.linear<-blocks.0.conv", "layers.2.linear<-blocks.2.conv"]
    assert list(plain.guide_losses) == [""] and plain.alphas == {"": 1.0}
    named = Guidance(target, Guide(cnn, name="cnn1d", pairs=PAIRS_CNN))(x)
    assert list(named.similarities) == ["cnn1d:layers.0.linear<-blocks.0.conv", "cnn1d:layers.2.linear<-blocks.2.conv"]
    assert torch.equal(named.guidance_loss, plain.guidance_loss)


def test_target_and_each_guide_run_exactly_once_per_step_and_a_target_layer_is_pulled_by_both():
    target, cnn, fcn = models()
    calls = {"target": counter(target), "cnn": counter(cnn), "fcn": counter(fcn)}
    # Default layers and even spread for both guides: each pulls on the target's first layer.
    guidance = Guidance(target, [Guide(cnn, name="cnn"), Guide(fcn, name="fcn")]).train()
    x, y = batch()
    for step in range(1, 4):
        out = guidance(x)
        (F.cross_entropy(out.output, y) + out.guidance_loss).backward()
        assert {name: len(c) for name, c in calls.items()} == {"target": step, "cnn": step, "fcn": step}
    first_layer = [key for key in out.similarities if key.split(":")[1].startswith("layers.0.linear<-")]
    assert {key.split(":")[0] for key in first_layer} == {"cnn", "fcn"}, first_layer
    assert target.layers[0].linear.weight.grad is not None


def test_the_same_module_may_serve_as_two_guides():
    target, cnn, _ = models()
    calls = counter(cnn)
    guidance = Guidance(target, [Guide(cnn, name="a", pairs=PAIRS_CNN[:1]), Guide(cnn, name="b", pairs=PAIRS_CNN[1:])])
    out = guidance(batch()[0])
    assert len(calls) == 2 and set(out.similarities) == {
        "a:layers.0.linear<-blocks.0.conv",
        "b:layers.2.linear<-blocks.2.conv",
    }


def test_each_guide_follows_its_own_schedule():
    target, cnn, fcn = models()
    calls = {"cnn": counter(cnn), "fcn": counter(fcn)}
    first = Guide(cnn, name="cnn", schedule=AlphaSchedule(alpha=2.0, kind="first_steps", steps=2))
    guidance = Guidance(target, [first, Guide(fcn, name="fcn", alpha=0.5)]).train()
    x, _ = batch()
    outs = [guidance(x) for _ in range(4)]
    assert [out.alphas for out in outs] == [{"cnn": 2.0, "fcn": 0.5}] * 2 + [{"cnn": 0.0, "fcn": 0.5}] * 2
    assert [out.alpha for out in outs] == [2.0, 2.0, 0.0, 0.0]
    assert (len(calls["cnn"]), len(calls["fcn"])) == (2, 4)  # off its schedule, a guide no longer runs
    losses = {name: float(loss.detach()) for name, loss in outs[-1].guide_losses.items()}
    assert losses["cnn"] == 0.0 and losses["fcn"] > 0.0
    assert not any(key.startswith("cnn:") for key in outs[-1].similarities)
    assert torch.allclose(outs[-1].guidance_loss, 0.5 * outs[-1].guide_losses["fcn"])
    both_off = Guidance(target, [first, Guide(fcn, name="fcn", alpha=0.0)]).train()
    both_off.step = 2
    out = both_off(x)
    assert float(out.guidance_loss) == 0.0 and out.similarities == {} and len(calls["fcn"]) == 4


def test_every_guide_is_frozen_and_its_weights_never_change():
    target, cnn, fcn = models()
    before = {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in (("cnn", cnn), ("fcn", fcn))}
    guidance = Guidance(target, [Guide(cnn, name="cnn"), Guide(fcn, name="fcn", guide_input="noise")]).train()
    everything = list(target.parameters()) + list(cnn.parameters()) + list(fcn.parameters())
    optimizer = torch.optim.SGD(everything, lr=0.5)
    x, y = batch()
    for _ in range(4):
        cnn.train(), fcn.train()  # whatever the user does, guides run in eval mode
        out = guidance(x)
        optimizer.zero_grad()
        (F.cross_entropy(out.output, y) + out.guidance_loss).backward()
        optimizer.step()
        assert not any(m.training for m in [*cnn.modules(), *fcn.modules()])
    for name, model in (("cnn", cnn), ("fcn", fcn)):
        assert all(p.grad is None and not p.requires_grad for p in model.parameters())
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[name][key]), f"{name}.{key}"  # BN running stats included


def test_given_activations_by_guide_name_match_running_the_guides():
    target, cnn, fcn = models()
    x, _ = batch()
    guidance = Guidance(target, [Guide(cnn, name="cnn"), Guide(fcn, name="fcn")])
    fresh = guidance(x)
    cached = guidance(x, guide_activations={"cnn": guidance.run_guide(x, name="cnn")})  # fcn left out: it runs
    assert torch.allclose(cached.guidance_loss, fresh.guidance_loss, atol=1e-6)
    with pytest.raises(ValueError, match="2 guides"):
        guidance.run_guide(x)
    with pytest.raises(ValueError, match="2 guides"):
        guidance.pairs
    with pytest.raises(KeyError, match="'cnn', 'fcn'"):
        guidance.run_guide(x, name="vit")
    assert [p.guide for p in guidance.guides[1].pairs] == ["layers.0.linear", "layers.1.linear"]


def test_several_guides_are_refused_without_distinct_names_or_with_shared_parameters():
    target, cnn, fcn = models()
    with pytest.raises(ValueError, match=r"guides\[1\]: several guides need distinct names"):
        Guidance(target, [Guide(cnn, name="a"), Guide(fcn, name="a")])
    with pytest.raises(ValueError, match=r"guides\[0\]: several guides need distinct names"):
        Guidance(target, [Guide(cnn), Guide(fcn, name="b")])
    with pytest.raises(ValueError, match="pairs: with Guide objects"):
        Guidance(target, [Guide(cnn, name="a")], pairs=PAIRS_CNN)
    with pytest.raises(ValueError, match="letters, digits"):
        Guide(cnn, name="res:net")
    with pytest.raises(ValueError, match="guide_input"):
        Guide(cnn, guide_input="zeros")
    with pytest.raises(ValueError, match="shares"):
        Guidance(target, [Guide(cnn, name="a"), Guide(target, name="b")])


TWO_GUIDES = """
name = "two-guides"

[model]
name = "fcn"
args = { depth = 3, width = 16 }

[data]
name = "mnist1d"
args = { num_samples = 400, val_size = 50 }
batch_size = 50
train_eval_size = 50

[guidance]
log_every = 1

[[guides]]
name = "cnn"
schedule = "first_steps"
steps = 2
guide_layers = ["blocks.*.conv"]
[guides.model]
name = "cnn1d"
args = { channels = 4 }

[[guides]]
alpha = 0.5
pairs = [["layers.0.linear", "layers.0.linear"], ["layers.2.linear", "layers.1.linear", 2.0]]
[guides.model]
name = "fcn"
args = { depth = 2, width = 8 }
seed = 7

[train]
epochs = 1
max_steps = 4
progress = false
"""


def two_guides_file(tmp_path, text=TWO_GUIDES):
    path = tmp_path / "two_guides.toml"
    path.write_text(text)
    return path


def test_a_config_with_two_guides_loads_builds_and_trains(tmp_path):
    from untrainable.build import build_data, build_guidance, build_guides, build_model
    from untrainable.config import load_config
    from untrainable.trainer import train

    config = load_config(two_guides_file(tmp_path))
    assert [spec.label for spec in config.guides] == ["cnn", "fcn"] and config.guide is None
    data = build_data(config.data)
    target = build_model(config.model, data, 0)
    guidance = build_guidance(config, target, build_guides(config, data))
    assert [g.name for g in guidance.guides] == ["cnn", "fcn"]
    assert [(p.target, p.guide, p.weight) for p in guidance.guides[1].pairs][1] == (
        "layers.2.linear",
        "layers.1.linear",
        2.0,
    )
    result = train(config, tmp_path / "run", data=data)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "kind" not in r]
    assert result.final["steps"] == 4 and [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [r["alpha/cnn"] for r in steps] == [1.0, 1.0, 0.0, 0.0] and {r["alpha/fcn"] for r in steps} == {0.5}
    assert [r["alpha"] for r in steps] == [1.0, 1.0, 0.0, 0.0]  # the first guide's
    assert steps[0]["guide_loss/cnn"] > 0 and steps[-1]["guide_loss/cnn"] == 0.0
    for r in steps:
        expected = r["alpha/cnn"] * r["guide_loss/cnn"] + r["alpha/fcn"] * r["guide_loss/fcn"]
        assert r["guidance_loss"] == pytest.approx(expected, rel=1e-5)
    assert "similarity/cnn:layers.0.linear<-blocks.0.conv" in steps[0]
    assert "similarity/fcn:layers.2.linear<-layers.1.linear" in steps[0]
    assert not any(k.startswith("similarity/cnn:") for k in steps[-1])  # off its schedule
    saved = load_config(tmp_path / "run" / "config.json")
    assert saved.guides == config.guides


def test_a_config_saved_before_several_guides_still_compares_equal():
    from untrainable.config import DataSpec, ModelSpec, RunConfig, config_differences

    config = RunConfig(model=ModelSpec("fcn"), data=DataSpec("mnist1d"), guide=ModelSpec("cnn1d"))
    saved = {key: value for key, value in json.loads(json.dumps(config.to_dict())).items() if key != "guides"}
    assert config_differences(saved, config) == []
    assert config.guide_entries()[0][1].label == ""  # the single [guide]: plain similarity keys


@pytest.mark.parametrize(
    "change, field",
    [
        (("alpha = 0.5", "alpha = -1.0"), "guides[1].alpha: must be a number >= 0"),
        (("alpha = 0.5", 'alpha = "high"'), "guides[1].alpha: expected a number"),
        (("alpha = 0.5", 'name = "cnn"'), "guides[1].name: 'cnn' already names guides[0]"),
        (("alpha = 0.5", 'name = "a:b"'), "guides[1].name: 'a:b': use letters"),
        (("alpha = 0.5", 'guide_input = "zeros"'), "guides[1].guide_input: 'zeros' is not one of same, noise"),
        (("alpha = 0.5", "strength = 2"), "guides[1]: unknown key(s) ['strength']"),
        (('name = "fcn"\nargs = { depth = 2', 'name = "mlp"\nargs = { depth = 2'), "guides[1].model.name: 'mlp'"),
        (("steps = 2\n", "\n"), "guides[0].steps: must be a number > 0"),
        (("[guidance]\n", "[guidance]\nalpha = 2.0\n"), "guidance.alpha: with [[guides]], each guide sets its own"),
        (("[guidance]\n", '[guidance]\ncache = "memory"\n'), "guidance.cache: 'memory' keeps one guide's"),
        (("[guidance]\n", '[guide]\nname = "cnn1d"\n[guidance]\n'), "guides: give one [guide]"),
        (("[train]\n", "[distill]\nweight = 1.0\n[train]\n"), "distill.weight: distillation needs a teacher"),
    ],
)
def test_bad_guides_fields_are_named(tmp_path, change, field):
    from untrainable.config import ConfigError, load_config

    old, new = change
    assert old in TWO_GUIDES
    with pytest.raises(ConfigError) as err:
        load_config(two_guides_file(tmp_path, TWO_GUIDES.replace(old, new, 1)))
    assert field in str(err.value)


def test_a_bad_guide_model_argument_names_its_entry(tmp_path):
    from untrainable.build import build_data, build_guides
    from untrainable.config import ConfigError, load_config

    config = load_config(two_guides_file(tmp_path, TWO_GUIDES.replace("depth = 2, width = 8", "deep = 2")))
    with pytest.raises(ConfigError, match=r"guides\[1\]\.model\.args\.deep: not an argument of fcn"):
        build_guides(config, build_data(config.data))
