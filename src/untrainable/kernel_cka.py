"""Kernel CKA with an RBF kernel (Kornblith et al. 2019), its bandwidth a fraction of the median distance."""

from __future__ import annotations

import torch
from torch import Tensor

from untrainable.centring import centre, prepare, ratio
from untrainable.shape_metrics import _coordinates

# sigma = BANDWIDTH * the median distance between examples; Kornblith et al. report 0.2, 0.4 and 0.8.
BANDWIDTH = 0.8


def _rbf_gram(x: Tensor, bandwidth: float) -> Tensor:
    """exp(-||x_i - x_j||^2 / (2 sigma^2)) for x (n, r), sigma = bandwidth * median_{i<j} ||x_i - x_j||, (n, n).

    The median is taken on squared distances (the same pair, being monotone)
    and stays in the graph: it is part of the measure, and keeps it
    invariant to isotropic scaling in its gradient too. For an even number
    of pairs torch takes the lower of the two middle values.
    """
    n = x.shape[0]
    gram = x @ x.T
    norms = torch.diagonal(gram)
    squared = (norms[:, None] + norms[None, :] - 2 * gram).clamp_min(0)
    rows, cols = torch.triu_indices(n, n, offset=1, device=x.device)
    pairs = squared[rows, cols]
    median = pairs.median()
    # Over half the examples coinciding gives a zero median: the mean distance then, and 1 for a constant layer
    # (its centred kernel is zero whatever the bandwidth), so that the gradient stays finite.
    median = torch.where(median > 0, median, pairs.mean())
    scale = torch.where(median > 0, 2 * bandwidth**2 * median, 1.0)
    return torch.exp(-squared / scale)


def _centre_gram(k: Tensor) -> Tensor:
    """H k H for a symmetric k (n, n), H = I - 11^T / n, without forming H."""
    k = k - k.mean(dim=0, keepdim=True)
    return k - k.mean(dim=1, keepdim=True)


def cka_rbf(x: Tensor, y: Tensor, bandwidth: float = BANDWIDTH) -> Tensor:
    """CKA with RBF kernels and the biased HSIC: <HKH, HLH> / (||HKH||_F ||HLH||_F).

    K_ij = exp(-||x_i - x_j||^2 / (2 sigma_x^2)) with sigma_x = `bandwidth`
    times the median distance between x's examples, and likewise L for y.

    Args:
        x: (n, d1) activations, n >= 3. Extra dimensions are flattened.
        y: (n, d2) activations of the same n examples.
        bandwidth: sigma as a fraction of the median pairwise distance, > 0.
    Returns:
        scalar in [0, 1]; 0 when either input is constant over the examples.
    """
    if bandwidth <= 0:
        raise ValueError(f"cka_rbf: bandwidth must be > 0, got {bandwidth}")
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, y = prepare(x, y, min_n=3)
        x, y = _coordinates(centre(x)), _coordinates(centre(y))
        k, l = _centre_gram(_rbf_gram(x, bandwidth)), _centre_gram(_rbf_gram(y, bandwidth))
        return ratio((k * l).sum(), (k * k).sum(), (l * l).sum())
