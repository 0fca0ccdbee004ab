"""Settings under which guidance would silently do nothing, or freeze the target, are refused by name."""

import pytest
import torch
from torch import nn

from untrainable import Guidance
from untrainable.config import ConfigError, RunConfig, from_dict
from untrainable.models import create_model
from untrainable.similarity import linear_cka


def _fcn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("fcn", input_shape=(40,), depth=3, width=16)


def test_biased_cka_is_identically_one_on_two_examples():
    # Why a batch of 2 is refused: the measure carries no signal there.
    for seed in range(5):
        gen = torch.Generator().manual_seed(seed)
        x, y = torch.randn(2, 7, generator=gen), torch.randn(2, 5, generator=gen)
        assert float(linear_cka(x, y)) == pytest.approx(1.0, abs=1e-5)


def test_guide_that_is_the_target_is_refused_and_the_target_stays_trainable():
    target = _fcn()
    with pytest.raises(ValueError, match="shares .* parameters with the target"):
        Guidance(target, target)
    assert all(p.requires_grad for p in target.parameters())


def test_guide_that_shares_a_module_with_the_target_is_refused():
    target = _fcn()
    guide = nn.Sequential(nn.Flatten(), target.layers[0])
    with pytest.raises(ValueError, match="shares"):
        Guidance(target, guide, target_layers=["layers.0.linear"], guide_layers=["1.linear"])


@pytest.mark.parametrize("similarity, least", [("cka", 3), ("cka_unbiased", 4)])
def test_batch_too_small_for_the_similarity_raises_with_the_minimum(similarity, least):
    guidance = Guidance(_fcn(0), _fcn(1), similarity=similarity)
    guidance(torch.randn(least, 40))  # the minimum itself works
    with pytest.raises(ValueError, match=f"at least {least} examples"):
        guidance(torch.randn(least - 1, 40))


def test_config_with_a_batch_too_small_for_the_similarity_is_refused():
    data = {"model": {"name": "fcn"}, "data": {"name": "mnist1d", "batch_size": 2}, "guide": {"name": "cnn1d"}}
    with pytest.raises(ConfigError, match="data.batch_size.*at least 3"):
        from_dict(RunConfig, data)
    data["guidance"] = {"similarity": "cka_unbiased"}
    data["data"]["batch_size"] = 3
    with pytest.raises(ConfigError, match="at least 4"):
        from_dict(RunConfig, data)
