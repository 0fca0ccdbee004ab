"""The Guidance object: one target forward, a frozen guide, schedules, losses that go down."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from untrainable import AlphaSchedule, Guidance
from untrainable.models import create_model


def models(seed: int = 0):
    torch.manual_seed(seed)
    target = create_model("fcn", input_shape=(40,), depth=4, width=64, dropout=0.1)
    guide = create_model("cnn1d", input_shape=(40,), channels=8, batch_norm=True)
    return target, guide


def batch(n: int = 32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 40, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def test_target_forward_runs_exactly_once_per_step():
    target, guide = models()
    calls = {"target": 0, "guide": 0}
    target.register_forward_pre_hook(lambda *_: calls.__setitem__("target", calls["target"] + 1))
    guide.register_forward_pre_hook(lambda *_: calls.__setitem__("guide", calls["guide"] + 1))
    guidance = Guidance(target, guide)
    x, y = batch()
    out = guidance(x)
    (F.cross_entropy(out.output, y) + out.guidance_loss).backward()
    assert calls == {"target": 1, "guide": 1}
    assert set(out.similarities) == {p.key for p in guidance.pairs}


def test_guide_is_frozen_and_stays_in_eval():
    target, guide = models()
    before = {k: v.clone() for k, v in guide.state_dict().items()}
    guidance = Guidance(target, guide)
    optimizer = torch.optim.SGD(list(target.parameters()) + list(guide.parameters()), lr=0.5)
    x, y = batch()
    guidance.train()
    guide.train()  # whatever the user does, the guide runs in eval mode
    for _ in range(5):
        out = guidance(x)
        optimizer.zero_grad()
        (F.cross_entropy(out.output, y) + out.guidance_loss).backward()
        optimizer.step()
        assert not any(m.training for m in guide.modules())
        assert target.training
    assert all(p.grad is None and not p.requires_grad for p in guide.parameters())
    for key, value in guide.state_dict().items():
        assert torch.equal(value, before[key]), key  # BN running stats included


def test_guided_steps_lower_the_guidance_loss():
    target, guide = models()
    guidance = Guidance(target, guide, alpha=1.0)
    optimizer = torch.optim.Adam(target.parameters(), lr=1e-3)
    x, _ = batch(64)
    losses = []
    for _ in range(30):
        out = guidance(x)
        optimizer.zero_grad()
        out.guidance_loss.backward()
        optimizer.step()
        losses.append(float(out.guidance_loss.detach()))
    assert losses[-1] < 0.5 * losses[0]


def test_first_steps_schedule_disconnects_the_guide():
    target, guide = models()
    calls = []
    guide.register_forward_pre_hook(lambda *_: calls.append(1))
    guidance = Guidance(target, guide, schedule=AlphaSchedule(alpha=2.0, kind="first_steps", steps=3)).train()
    x, _ = batch()
    alphas = [guidance(x).alpha for _ in range(5)]
    assert alphas == [2.0, 2.0, 2.0, 0.0, 0.0]
    assert len(calls) == 3
    assert guidance.get_extra_state() == {"step": 5}


def test_decay_schedules():
    linear = AlphaSchedule(1.0, "linear", 4)
    cosine = AlphaSchedule(1.0, "cosine", 4)
    assert [linear(s) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert cosine(0) == 1.0 and abs(cosine(2) - 0.5) < 1e-12 and cosine(4) == 0.0
    with pytest.raises(ValueError, match="one of constant, first_steps, linear, cosine"):
        AlphaSchedule(1.0, "exponential", 4)


def test_explicit_pairs_many_to_one_and_weights():
    target, guide = models()
    pairs = [("layers.0.linear", "blocks.0.conv", 1.0), ("layers.0.linear", "blocks.1.conv", 0.5), ("layers.3.linear", "blocks.2.conv", 0.0)]
    guidance = Guidance(target, guide, pairs=pairs)
    out = guidance(batch()[0])
    assert len(out.similarities) == 3
    expected = sum(w * (1 - float(out.similarities[f"{t}<-{g}"])) for t, g, w in pairs)
    assert abs(float(out.guidance_loss.detach()) - expected) < 1e-5
    with pytest.raises(KeyError, match="valid layers"):
        Guidance(target, guide, pairs=[("layers.9.linear", "blocks.0.conv")])


def test_noise_guide_input():
    target, guide = models()
    seen = []
    guide.register_forward_pre_hook(lambda _m, inputs: seen.append(inputs[0]))
    guidance = Guidance(target, guide, guide_input="noise")
    x, _ = batch()
    guidance(x)
    assert seen[0].shape == x.shape and not torch.equal(seen[0], x)
    with pytest.raises(ValueError, match="guide_input"):
        Guidance(target, guide, guide_input="zeros")


def test_constant_target_layer_gives_finite_loss():
    class Dead(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(40, 16)
            self.head = nn.Linear(16, 10)
            nn.init.zeros_(self.body.weight)
            nn.init.constant_(self.body.bias, 0.3)

        def forward(self, x):
            return self.head(self.body(x))

    _, guide = models()
    guidance = Guidance(Dead(), guide, target_layers=["body"])
    out = guidance(batch()[0])
    out.guidance_loss.backward()
    assert torch.isfinite(out.guidance_loss)
    assert all(torch.isfinite(p.grad).all() for p in guidance.target.parameters() if p.grad is not None)
