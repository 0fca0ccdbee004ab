"""The Guidance object: one target forward, a frozen guide, schedules, losses that go down."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from untrainable import AlphaSchedule, Guidance
from untrainable.guidance import GuideGram
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
    pairs = [
        ("layers.0.linear", "blocks.0.conv", 1.0),
        ("layers.0.linear", "blocks.1.conv", 0.5),
        ("layers.3.linear", "blocks.2.conv", 0.0),
    ]
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


def wide_models(seed: int = 0):
    """Layers wider than the batch, so CKA compares in sample space and the guide's layers become Gram matrices."""
    torch.manual_seed(seed)
    target = create_model("fcn", input_shape=(40,), depth=3, width=96, dropout=0.0)
    guide = create_model("cnn1d", input_shape=(40,), channels=8, batch_norm=True)
    return target, guide


def loss_and_grads(guidance, x, y, **kwargs):
    out = guidance(x, **kwargs)
    loss = F.cross_entropy(out.output, y) + out.guidance_loss
    grads = torch.autograd.grad(loss, list(guidance.target.parameters()))
    return out, grads


def test_guide_grams_match_the_activation_path():
    # gather=identity makes Guidance keep the guide's activations (the path
    # used for a batch gathered over processes); without it the guide's layers
    # are reduced to centred Gram matrices in their hooks.
    target, guide = wide_models()
    x, y = batch(24)
    with_grams = Guidance(target, guide)
    with_acts = Guidance(target, guide, gather=lambda t: t)
    reduce = with_grams.guide_grams(with_grams.target_capture.run(x)[1], None)
    assert reduce is not None and with_acts.guide_grams({}, None) is None
    reduced = with_grams.run_guide(x, reduce)
    assert all(isinstance(value, GuideGram) and value.matrix.shape == (24, 24) for value in reduced.values())
    out_g, grads_g = loss_and_grads(with_grams, x, y)
    out_a, grads_a = loss_and_grads(with_acts, x, y)
    assert torch.allclose(out_g.guidance_loss, out_a.guidance_loss, atol=1e-5)
    for key in out_a.similarities:
        assert torch.allclose(out_g.similarities[key], out_a.similarities[key], atol=1e-6), key
    for grad_g, grad_a in zip(grads_g, grads_a):
        assert torch.allclose(grad_g, grad_a, rtol=1e-4, atol=1e-6)


def test_guide_grams_from_cached_activations_and_noise_input():
    target, guide = wide_models()
    x, y = batch(24)
    guidance = Guidance(target, guide)
    acts = guidance.run_guide(x)
    from_cache, grads_cache = loss_and_grads(guidance, x, y, guide_activations=acts)
    fresh, grads_fresh = loss_and_grads(guidance, x, y)
    assert torch.allclose(from_cache.guidance_loss, fresh.guidance_loss, atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(grads_cache, grads_fresh))
    noisy, noisy_acts = (
        Guidance(target, guide, guide_input="noise"),
        Guidance(target, guide, guide_input="noise", gather=lambda t: t),
    )
    torch.manual_seed(3)
    out_noisy, _ = loss_and_grads(noisy, x, y)
    torch.manual_seed(3)
    out_noisy_acts, _ = loss_and_grads(noisy_acts, x, y)
    assert torch.allclose(out_noisy.guidance_loss, out_noisy_acts.guidance_loss, atol=1e-5)


def test_constant_guide_layer_scores_zero_with_grams():
    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(40, 64)
            self.head = nn.Linear(64, 10)
            nn.init.zeros_(self.body.weight)

        def forward(self, x):
            return self.head(self.body(x))

    target, _ = wide_models()
    guidance = Guidance(target, Flat(), guide_layers=["body"])
    out = guidance(batch(24)[0])
    out.guidance_loss.backward()
    assert all(float(s) == 0.0 for s in out.similarities.values())
    assert all(torch.isfinite(p.grad).all() for p in target.parameters() if p.grad is not None)


def test_sequences_with_masks_keep_the_guide_activations():
    torch.manual_seed(0)
    target = create_model("rnn", vocab_size=9, num_classes=9, hidden=32, embed_dim=8, layers=1)
    guide = create_model("causal_transformer", vocab_size=9, num_classes=9, dim=32, depth=1, heads=2, max_len=12)
    tokens = torch.randint(1, 9, (6, 12))
    mask = torch.ones(6, 12, dtype=torch.bool)
    mask[3:, 8:] = False
    guidance = Guidance(target, guide, sequence_mode="tokens")
    target_acts = guidance.target_capture.run(tokens)[1]
    assert guidance.guide_grams(target_acts, mask) is None
    assert Guidance(target, guide).guide_grams(target_acts, None) is not None  # flatten, no mask
    assert torch.isfinite(guidance(tokens, mask=mask).guidance_loss)
