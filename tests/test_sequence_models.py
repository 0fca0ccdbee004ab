"""Sequence models: shapes, gradients, padding handling and causality."""

import pytest
import torch
import torch.nn.functional as F

from untrainable.models import create_model

B, T, V = 2, 12, 5
SMALL = {
    "rnn": dict(vocab_size=V, num_classes=V, embed_dim=8, hidden=8, layers=2),
    "lstm": dict(vocab_size=V, num_classes=V, embed_dim=8, hidden=8, layers=2),
    "causal_transformer": dict(vocab_size=V, num_classes=V, dim=8, depth=2, heads=2, max_len=32),
    "transformer_encoder": dict(vocab_size=V, num_classes=2, dim=8, depth=2, heads=2, max_len=32),
}


def tokens(seed: int = 0, lengths: tuple[int, ...] = (T, 7)) -> torch.Tensor:
    """(B, T) right-padded tokens in 1..V-1 with the given lengths."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, V, (len(lengths), T), generator=g)
    for row, n in enumerate(lengths):
        x[row, n:] = 0
    return x


@pytest.mark.parametrize(
    "name, kwargs, shape",
    [
        ("rnn", {}, (B, T, V)),
        ("rnn", {"pooled": True}, (B, V)),
        ("rnn", {"pack": True}, (B, T, V)),
        ("lstm", {}, (B, T, V)),
        ("lstm", {"pooled": True, "pack": True}, (B, V)),
        ("causal_transformer", {}, (B, T, V)),
        ("transformer_encoder", {}, (B, 2)),
    ],
)
def test_forward_backward_shapes(name, kwargs, shape):
    torch.manual_seed(0)
    model = create_model(name, **SMALL[name], **kwargs)
    logits = model(tokens())
    assert logits.shape == shape
    logits.square().mean().backward()
    assert all(p.grad is not None for p in model.head.parameters())
    assert model.embed.weight.grad is not None


def test_rnn_layers_are_addressable():
    model = create_model("rnn", **SMALL["rnn"])
    names = dict(model.named_modules())
    assert all(isinstance(names[f"layers.{i}"], torch.nn.RNN) for i in (0, 1))
    assert names["layers.0"].num_layers == 1 and names["layers.0"].nonlinearity == "tanh"


@pytest.mark.parametrize("name", ["rnn", "lstm"])
@pytest.mark.parametrize("pack", [False, True])
def test_pooled_rnn_reads_last_real_position(name, pack):
    torch.manual_seed(0)
    model = create_model(name, **SMALL[name], pooled=True, pack=pack)
    x = tokens()
    pooled = model(x)
    per_position = create_model(name, **SMALL[name])
    per_position.load_state_dict(model.state_dict())
    logits = per_position(x)
    assert torch.allclose(pooled[0], logits[0, T - 1], atol=1e-6)
    assert torch.allclose(pooled[1], logits[1, 6], atol=1e-6)
    # More trailing padding leaves the read-out unchanged.
    longer = F.pad(x, (0, 5), value=0)
    assert torch.allclose(model(longer), pooled, atol=1e-6)


@pytest.mark.parametrize("name", ["rnn", "lstm"])
def test_packing_matches_unpacked_on_real_positions(name):
    torch.manual_seed(0)
    plain = create_model(name, **SMALL[name])
    packed = create_model(name, **SMALL[name], pack=True)
    packed.load_state_dict(plain.state_dict())
    x = tokens(lengths=(T, 4))
    real = x != 0
    assert torch.allclose(packed(x)[real], plain(x)[real], atol=1e-6)


def test_encoder_ignores_padding():
    torch.manual_seed(0)
    model = create_model("transformer_encoder", **SMALL["transformer_encoder"]).eval()
    x = tokens()
    out = model(x)
    assert torch.allclose(model(F.pad(x, (0, 9), value=0)), out, atol=1e-5)
    # A fully masked softmax would be NaN.
    assert torch.isfinite(model(torch.zeros(2, T, dtype=torch.long))).all()


def test_causal_transformer_is_causal():
    torch.manual_seed(0)
    model = create_model("causal_transformer", **SMALL["causal_transformer"]).eval()
    x = tokens(lengths=(T, T))
    changed = x.clone()
    changed[:, 8] = changed[:, 8] % (V - 1) + 1
    before, after = model(x), model(changed)
    assert torch.allclose(before[:, :8], after[:, :8], atol=1e-6)
    assert not torch.allclose(before[:, 8:], after[:, 8:], atol=1e-6)


def test_transformer_rejects_too_long_input():
    model = create_model("causal_transformer", **SMALL["causal_transformer"])
    with pytest.raises(ValueError, match="max_len"):
        model(torch.ones(1, 40, dtype=torch.long))
