"""Shared steps of the similarity measures: shape checks, column centring at a safe scale, a guarded ratio."""

from __future__ import annotations

import torch
from torch import Tensor

# Added under square roots so that a constant layer (all Gram terms zero) gives a
# similarity of 0 with finite gradients instead of 0 / 0.
EPS = 1e-12


def prepare(x: Tensor, y: Tensor, min_n: int) -> tuple[Tensor, Tensor]:
    """Check shapes, flatten, promote half precision to float32."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"similarity needs the same examples in both: got {x.shape[0]} rows in x and {y.shape[0]} rows in y"
        )
    n = x.shape[0]
    if n < min_n:
        raise ValueError(f"this similarity needs at least {min_n} examples, got n = {n}")
    x = x.reshape(n, -1)
    y = y.reshape(n, -1)
    # Half precision loses the Gram sums; float64 stays float64.
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    if y.dtype not in (torch.float32, torch.float64):
        y = y.float()
    dtype = torch.promote_types(x.dtype, y.dtype)
    return x.to(dtype), y.to(dtype)


def centre(x: Tensor) -> Tensor:
    """Centre the columns of x (n, d) and scale its largest entry to 1, in one pass over x."""
    return centre_scaled(x)[0]


def centre_scaled(x: Tensor) -> tuple[Tensor, Tensor]:
    """x (n, d) column-centred and scaled by s so its largest entry is 1; returns (that, s), s a 0-d tensor.

    Columns that are exactly constant are set to zero rather than to the
    rounding error of their mean, so a constant layer scores exactly 0. Every
    measure here is invariant to isotropic scaling, so scaling changes nothing
    but the range of the Gram sums (no overflow at large scales, no underflow
    at small ones).

    The statistics are computed without gradient. That is exact: the scale
    cancels in a scale-invariant measure, and the measures are invariant to a
    shift of the columns, so the gradient at the centred point already has
    zero column sums and needs no projection through the mean.
    """
    with torch.no_grad():
        mean = x.mean(dim=0, keepdim=True)
        # amin and amax apart: torch.aminmax over dim 0 is several times slower on CPU.
        lo, hi = x.amin(dim=0, keepdim=True), x.amax(dim=0, keepdim=True)
        varies = lo != hi
        # Largest |x - mean| over the whole matrix, from per-column statistics.
        spread = torch.maximum(hi - mean, mean - lo) * varies
        scale = 1.0 / spread.amax().clamp_min(torch.finfo(x.dtype).tiny)
        factor = varies.to(x.dtype) * scale
        shift = -mean * factor
    return torch.addcmul(shift, x, factor), scale


def ratio(xy: Tensor, xx: Tensor, yy: Tensor) -> Tensor:
    """xy / sqrt(xx yy), finite with finite gradients when xx or yy is 0.

    After `centre`, xx >= 1 / rank for any non-constant input, so the epsilon
    only matters for constant ones.
    """
    return xy / (torch.sqrt(xx.clamp_min(0) + EPS) * torch.sqrt(yy.clamp_min(0) + EPS))
