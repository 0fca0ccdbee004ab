"""Property-based tests of every similarity measure on random and degenerate inputs."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from untrainable.similarity import linear_cka, linear_cka_unbiased, rsa

# (measure, smallest n, lowest allowed value)
MEASURES = [(linear_cka, 2, 0.0), (linear_cka_unbiased, 4, -1.0), (rsa, 3, -1.0)]
TOLERANCE = 1e-5


@st.composite
def activations(draw, min_n: int):
    """Two (n, d) float64 matrices, possibly degenerate: one feature, constant columns, duplicated rows, extreme scales."""
    n = draw(st.integers(min_n, 24))
    d1, d2 = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d1, generator=generator, dtype=torch.float64)
    y = torch.randn(n, d2, generator=generator, dtype=torch.float64)
    for m in (x, y):
        if draw(st.booleans()):
            m[:, draw(st.integers(0, m.shape[1] - 1))] = draw(st.sampled_from([0.0, 1.0, -3.5]))  # constant column
        if draw(st.booleans()):
            m[draw(st.integers(1, n - 1))] = m[0]  # duplicated row
        if draw(st.booleans()):
            m.fill_(draw(st.sampled_from([0.0, 2.0])))  # a wholly constant layer
        m.mul_(draw(st.sampled_from([1.0, 1e6, 1e-6])))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return x.to(dtype), y.to(dtype)


def _check(measure, low, x, y):
    x = x.clone().requires_grad_(True)
    y = y.clone().requires_grad_(True)
    value = measure(x, y)
    assert value.dim() == 0 and torch.isfinite(value), value
    assert low - TOLERANCE <= float(value.detach()) <= 1.0 + TOLERANCE, float(value.detach())
    value.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all()


@pytest.mark.parametrize("measure,min_n,low", MEASURES, ids=lambda m: getattr(m, "__name__", str(m)))
def test_finite_bounded_with_finite_gradients(measure, min_n, low):
    @settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(activations(min_n))
    def check(pair):
        _check(measure, low, *pair)

    check()


@pytest.mark.parametrize("measure,min_n,low", MEASURES, ids=lambda m: getattr(m, "__name__", str(m)))
def test_too_few_examples_is_a_clear_error(measure, min_n, low):
    with pytest.raises(ValueError, match="at least"):
        measure(torch.randn(min_n - 1, 3), torch.randn(min_n - 1, 3))
    with pytest.raises(ValueError, match="same examples"):
        measure(torch.randn(min_n, 3), torch.randn(min_n + 1, 3))


@pytest.mark.parametrize("measure,min_n,low", MEASURES, ids=lambda m: getattr(m, "__name__", str(m)))
def test_a_layer_with_itself_scores_one(measure, min_n, low):
    @settings(max_examples=25, deadline=None)
    @given(st.integers(max(min_n, 5), 20), st.integers(2, 10), st.sampled_from([1.0, 1e6, 1e-6]), st.integers(0, 1000))
    def check(n, d, scale, seed):
        x = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
        assert abs(float(measure(x, x)) - 1.0) < 1e-6

    check()
