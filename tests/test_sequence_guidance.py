"""Guidance over (batch, time, features) activations: masking, sequence modes, RNN targets."""

import math

import pytest
import torch

from untrainable.guidance import Guidance
from untrainable.models import create_model
from untrainable.sequence import sequence_similarity
from untrainable.similarity import linear_cka
from untrainable.tasks import padding_mask

B, T, D1, D2 = 12, 7, 5, 3
V = 9  # token ids 1..V-1, PAD = 0


def activations(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Related float64 activations x (B, T, D1), y (B, T, D2): y is a noisy projection of x."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, D1, generator=g, dtype=torch.float64)
    y = x @ torch.randn(D1, D2, generator=g, dtype=torch.float64) + 0.5 * torch.randn(
        B, T, D2, generator=g, dtype=torch.float64
    )
    return x, y


def right_padded_mask(lengths: list[int]) -> torch.Tensor:
    """(len(lengths), T) bool, True on the first `length` positions of each row."""
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]


LENGTHS = [7, 7, 6, 6, 5, 5, 4, 7, 3, 2, 6, 1]  # 3 full rows: the last position has too few


def test_tokens_mode_with_mask_equals_similarity_of_valid_tokens():
    x, y = activations()
    mask = right_padded_mask(LENGTHS)
    # Garbage at padded positions must not matter.
    x_pad, y_pad = x.clone(), y.clone()
    x_pad[~mask] = 1e3
    y_pad[~mask] = -7.0
    got = sequence_similarity(linear_cka, x_pad, y_pad, "tokens", mask)
    assert torch.allclose(got, linear_cka(x[mask], y[mask]), atol=1e-12)


def test_tokenwise_mode_with_mask_equals_reference_loop():
    x, y = activations(1)
    mask = right_padded_mask(LENGTHS)
    x_pad = x.masked_fill(~mask[..., None], 5.0)
    values = []
    for t in range(T):
        rows = [b for b in range(B) if mask[b, t]]
        if len(rows) >= 4:  # sequence_similarity's min_rows
            values.append(float(linear_cka(x[rows, t], y[rows, t])))
    want = sum(values) / len(values)
    got = sequence_similarity(linear_cka, x_pad, y, "tokenwise", mask)
    assert math.isclose(float(got), want, rel_tol=1e-10)
    assert len(values) < T  # the last positions have too few valid rows and are skipped


def test_flatten_mode_with_shared_mask_equals_flatten_of_kept_positions():
    x, y = activations(2)
    keep = torch.tensor([True, True, False, True, False, True, True])
    mask = keep.expand(B, T)
    x_pad, y_pad = x.clone(), y.clone()
    x_pad[:, ~keep] = 3.0 * torch.randn(B, int((~keep).sum()), D1, dtype=torch.float64)
    got = sequence_similarity(linear_cka, x_pad, y_pad, "flatten", mask)
    want = linear_cka(x[:, keep].reshape(B, -1), y[:, keep].reshape(B, -1))
    assert torch.allclose(got, want, atol=1e-12)


def test_unmasked_modes_against_hand_written_reference():
    x, y = activations(3)
    flat = linear_cka(x.reshape(B, T * D1), y.reshape(B, T * D2))
    tokens = linear_cka(x.reshape(B * T, D1), y.reshape(B * T, D2))
    tokenwise = sum(float(linear_cka(x[:, t, :], y[:, t, :])) for t in range(T)) / T
    assert torch.allclose(sequence_similarity(linear_cka, x, y, "flatten"), flat, atol=1e-12)
    assert torch.allclose(sequence_similarity(linear_cka, x, y, "tokens"), tokens, atol=1e-12)
    assert math.isclose(float(sequence_similarity(linear_cka, x, y, "tokenwise")), tokenwise, rel_tol=1e-10)
    # An all-true mask changes nothing.
    full = torch.ones(B, T, dtype=torch.bool)
    for mode in ("flatten", "tokens", "tokenwise"):
        assert torch.allclose(
            sequence_similarity(linear_cka, x, y, mode, full), sequence_similarity(linear_cka, x, y, mode), atol=1e-12
        )


def tokens(lengths: list[int], seed: int = 0) -> torch.Tensor:
    """(len(lengths), T) right-padded token ids."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, V, (len(lengths), T), generator=g)
    return x.masked_fill(~right_padded_mask(lengths), 0)


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("mode", ["flatten", "tokenwise", "tokens"])
def test_guided_step_rnn_target_transformer_guide(pack, mode):
    torch.manual_seed(0)
    target = create_model("rnn", vocab_size=V, num_classes=V, embed_dim=8, hidden=8, layers=2, pack=pack)
    # A deeper, wider guide: 3 blocks spread over 2 recurrent layers.
    guide = create_model("causal_transformer", vocab_size=V, num_classes=V, dim=16, depth=3, heads=2, max_len=T)
    guidance = Guidance(target, guide, target_layers=["layers.*"], guide_layers=["blocks.*"], sequence_mode=mode)
    assert [(p.target, p.guide) for p in guidance.pairs] == [
        ("layers.0", "blocks.0"),
        ("layers.1", "blocks.1"),
        ("layers.1", "blocks.2"),
    ]
    x = tokens(LENGTHS)
    y = torch.randint(1, V, (B, T)).masked_fill(x == 0, -100)
    guide_before = {k: v.clone() for k, v in guide.state_dict().items()}
    optimizer = torch.optim.SGD(target.parameters(), lr=0.1)
    out = guidance(x, mask=padding_mask(x, 0))
    loss = (
        torch.nn.functional.cross_entropy(out.output.flatten(0, 1), y.flatten(), ignore_index=-100) + out.guidance_loss
    )
    optimizer.zero_grad()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in target.layers.parameters())
    optimizer.step()
    assert set(out.similarities) == {p.key for p in guidance.pairs}
    assert all(torch.isfinite(s) and 0.0 <= float(s) <= 1.0 + 1e-6 for s in out.similarities.values())
    assert torch.isfinite(out.guidance_loss) and float(out.guidance_loss.detach()) > 0
    assert all(torch.equal(v, guide.state_dict()[k]) for k, v in guide_before.items())
    guidance.remove_hooks()


def test_packed_rnn_target_when_every_row_is_padded():
    # A packed RNN's captured output is only as long as the batch's longest row,
    # shorter than the mask: the missing positions count as padding.
    target = create_model("rnn", vocab_size=V, num_classes=V, embed_dim=8, hidden=8, layers=1, pack=True)
    guide = create_model("causal_transformer", vocab_size=V, num_classes=V, dim=8, depth=1, heads=2, max_len=T)
    guidance = Guidance(target, guide, target_layers=["layers.*"], guide_layers=["blocks.*"], sequence_mode="tokenwise")
    x = tokens([min(n, T - 1) for n in LENGTHS])
    out = guidance(x, mask=padding_mask(x, 0))
    assert torch.isfinite(out.guidance_loss)


def test_guide_cache_stores_packed_outputs_of_any_length():
    from untrainable.guide_cache import GuideCache

    target = create_model("rnn", vocab_size=V, num_classes=V, embed_dim=8, hidden=8, layers=1)
    guide = create_model("rnn", vocab_size=V, num_classes=V, embed_dim=8, hidden=8, layers=1, pack=True)
    guidance = Guidance(target, guide, target_layers=["layers.*"], guide_layers=["layers.*"])
    cache = GuideCache(16, "memory")
    short, long = tokens([3] * 8), tokens([T - 1] * 8)  # the first batch's packed output is the shorter
    first = cache.activations(torch.arange(8), short, guidance.run_guide)
    second = cache.activations(torch.arange(8, 16), long, guidance.run_guide)
    assert first["layers.0"].shape == second["layers.0"].shape == (8, T, 8)
    again = cache.activations(torch.arange(8, 16), long, guidance.run_guide)
    assert torch.equal(again["layers.0"], second["layers.0"]) and cache.hits == 8
