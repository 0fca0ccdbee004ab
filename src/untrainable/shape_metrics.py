"""Procrustes, ridge CCA and SVCCA: similarities from the singular values of a cross-covariance.

All three compare the column-centred activations x (n, d1) and y (n, d2)
through the singular values of x~^T y~ after a transform of each side:

- `procrustes`: none. The cosine of the angular Procrustes shape metric
  (Williams et al. 2021): ||x^T y||_* / (||x||_F ||y||_F).
- `cca`: partial whitening, x~ = x (x^T x + lambda I)^(-1/2), the same
  ratio (netrep's `LinearMetric` with a ridge); at ridge 0 and d1 = d2 it is
  the mean canonical correlation.
- `svcca`: the top principal directions of each side, then the mean cosine
  of the principal angles between them (Raghu et al. 2017).

Zero-padding the narrower side, as netrep does, changes none of the norms,
so it is implicit.

Finite gradients where singular values are zero or repeated: the nuclear
norm is differentiated through `torch.linalg.svdvals`, whose backward is
U V^T (the polar factor), bounded by 1 in spectral norm and free of the
1 / (s_i^2 - s_j^2) terms that the singular vectors' gradient carries.
Where a zero singular value makes the norm non-smooth, that is one of its
subgradients. Whitening uses a Cholesky factor of the ridged covariance
instead of an inverse square root (the ratio is invariant to the rotation
by which they differ), so it has no eigenvalue gaps either. SVCCA's
projector onto the kept directions has its own backward, which only
divides by gaps between kept and dropped eigenvalues, floored at
`_GAP` times the largest.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from untrainable.centring import EPS, centre, prepare

# Default ridge of `cca`, as a fraction of the mean eigenvalue of x^T x over min(n, d) dimensions.
RIDGE = 1.0
# Default share of the variance that `svcca` keeps on each side (Raghu et al. 2017 keep 99%).
KEEP = 0.99
# Floor of the eigenvalue gap in SVCCA's projector backward, relative to the largest eigenvalue.
_GAP = 1e-6


def _coordinates(x: Tensor) -> Tensor:
    """x (n, d) in an orthonormal basis of its row space, (n, min(n, d)); x itself when d <= n.

    With x^T = Q R (Q (d, n) with orthonormal columns, taken without
    gradient), x = x Q Q^T, so x Q keeps every inner product between
    examples. For a measure invariant to rotations of the features this is
    exact in value and in gradient: the gradient of such a measure lies in
    the row space of x, which Q spans. It turns a (n, d) problem into a
    (n, n) one when d > n (a guide layer of 6,272 features at n = 64).
    """
    n, d = x.shape
    if d <= n:
        return x
    with torch.no_grad():
        q = torch.linalg.qr(x.T).Q
    return x @ q


def _nuclearratio(x: Tensor, y: Tensor) -> Tensor:
    """||x^T y||_* / (||x||_F ||y||_F) for x (n, r1), y (n, r2); 0 when either side is zero."""
    nuclear = torch.linalg.svdvals(x.T @ y).sum()
    xx, yy = (x * x).sum(), (y * y).sum()
    return nuclear / (torch.sqrt(xx + EPS) * torch.sqrt(yy + EPS))


def procrustes(x: Tensor, y: Tensor) -> Tensor:
    """Cosine of the angular Procrustes shape metric (Williams et al. 2021): ||Xc^T Yc||_* / (||Xc||_F ||Yc||_F).

    Xc, Yc are the column-centred activations. It equals
    max over orthogonal Q of <Xc, Yc Q> / (||Xc|| ||Yc||) (the narrower side
    zero-padded), so it is 1 exactly when Yc is a rotated, scaled copy of Xc,
    and arccos of it is a metric.

    Args:
        x: (n, d1) activations, n >= 3. Extra dimensions are flattened.
        y: (n, d2) activations of the same n examples.
    Returns:
        scalar in [0, 1]; 0 when either input is constant over the examples.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, y = prepare(x, y, min_n=3)
        x, y = _coordinates(centre(x)), _coordinates(centre(y))
        return _nuclearratio(x, y)


def _whiten(z: Tensor, ridge: float) -> Tensor:
    """z (n, r) times L^-T, L L^T = z^T z + lambda I, lambda = ridge * trace(z^T z) / r.

    z L^-T = z (z^T z + lambda I)^(-1/2) Q for an orthogonal Q, which no
    rotation-invariant ratio sees. A small absolute floor keeps a zero layer
    (lambda 0) factorable; it gives zeros there.
    """
    r = z.shape[1]
    cov = z.T @ z
    floor = torch.finfo(z.dtype).eps * z.shape[0]
    lam = ridge * torch.diagonal(cov).sum() / r + floor
    eye = torch.eye(r, dtype=z.dtype, device=z.device)
    chol = torch.linalg.cholesky(cov + lam * eye)
    return torch.linalg.solve_triangular(chol, z.T, upper=False).T


def cca(x: Tensor, y: Tensor, ridge: float = RIDGE) -> Tensor:
    """Ridge CCA: the angular shape score after partial whitening; the mean canonical correlation at ridge 0.

    With X~ = Xc (Xc^T Xc + lambda_x I)^(-1/2), lambda_x = ridge times the
    mean eigenvalue of Xc^T Xc over min(n, d1) dimensions (and likewise for
    y), the score is ||X~^T Y~||_* / (||X~||_F ||Y~||_F). At ridge 0 with
    n > d1 + d2 this is sum_i rho_i / sqrt(d1 d2) over the canonical
    correlations rho_i, their mean when d1 = d2. The ridge makes it defined
    when n < d (without it every canonical correlation is 1 there).

    Args:
        x: (n, d1) activations, n >= 3.
        y: (n, d2) activations of the same n examples.
        ridge: >= 0; 0 needs n > d1 and n > d2 (full-rank covariances).
    Returns:
        scalar in [0, 1]; 0 when either input is constant over the examples.
    """
    if ridge < 0:
        raise ValueError(f"cca: ridge must be >= 0, got {ridge}")
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, y = prepare(x, y, min_n=3)
        x, y = _coordinates(centre(x)), _coordinates(centre(y))
        return _nuclearratio(_whiten(x, ridge), _whiten(y, ridge))


class _TopProjector(torch.autograd.Function):
    """P = U_k U_k^T, the projector onto the top-k eigenvectors of a symmetric k_mat (n, n).

    Backward: only pairs (i kept, j dropped) move P, each divided by
    lambda_i - lambda_j (floored at _GAP * lambda_max); rotations within the
    kept or the dropped eigenvectors leave P alone, so repeated eigenvalues on
    either side cost nothing.
    """

    @staticmethod
    def forward(ctx: Any, k_mat: Tensor, k: int) -> Tensor:
        values, vectors = torch.linalg.eigh(k_mat)
        values, vectors = values.flip(0), vectors.flip(1)  # descending
        top = vectors[:, :k]
        ctx.k = k
        ctx.save_for_backward(values, vectors)
        return top @ top.T

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        values, vectors = ctx.saved_tensors
        k = ctx.k
        kept, dropped = vectors[:, :k], vectors[:, k:]
        sym = grad + grad.T
        gap = values[:k][None, :] - values[k:][:, None]  # (n - k, k), > 0
        gap = gap.clamp_min(_GAP * values[0].abs().clamp_min(torch.finfo(values.dtype).tiny))
        coef = (dropped.T @ sym @ kept) / gap
        half = dropped @ coef @ kept.T
        return (half + half.T) / 2, None


def _kept(values: Tensor, keep: float) -> int:
    """The fewest leading eigenvalues (descending) whose sum reaches `keep` of the total, at least 1."""
    total = values.sum()
    if total <= 0:
        return 1
    reached = torch.cumsum(values, 0) >= keep * total * (1 - 1e-12)
    return int(torch.nonzero(reached)[0]) + 1


def svcca(x: Tensor, y: Tensor, keep: float = KEEP) -> Tensor:
    """SVCCA (Raghu et al. 2017): CCA between the principal directions holding `keep` of each side's variance.

    The k_x leading principal components of Xc span the same column space
    as its top-k_x left singular vectors U_x, and CCA between two sets of
    components is the cosines of the principal angles between those spaces:
    SVCCA = ||U_x^T U_y||_* / min(k_x, k_y), the mean canonical correlation
    over min(k_x, k_y). k_x and k_y are chosen from the eigenvalues without
    gradient (a step function); the spaces move with the inputs.

    Args:
        x: (n, d1) activations, n >= 3.
        y: (n, d2) activations of the same n examples.
        keep: share of the variance kept on each side, in (0, 1].
    Returns:
        scalar in [0, 1]; 0 when either input is constant over the examples.
    """
    if not 0 < keep <= 1:
        raise ValueError(f"svcca: keep must be in (0, 1], got {keep}")
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, y = prepare(x, y, min_n=3)
        x, y = _coordinates(centre(x)), _coordinates(centre(y))
        projectors, ranks = [], []
        for z in (x, y):
            gram = z @ z.T
            with torch.no_grad():
                values = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)
            if not bool(values[0] > 0):
                return (x.sum() + y.sum()) * 0.0  # a constant layer: 0, with zero gradients
            rank = _kept(values, keep)
            projectors.append(_TopProjector.apply(gram, rank))  # type: ignore[no-untyped-call]  # torch's apply
            ranks.append(rank)
        nuclear = torch.linalg.svdvals(projectors[0] @ projectors[1]).sum()
        return nuclear / min(ranks)
