"""Differentiable representational similarity between two sets of activations.

Every measure takes `x` of shape (n, d1) and `y` of shape (n, d2), the same n
examples seen by two networks, and returns a scalar similarity (1 = same
representation up to the measure's invariances). Guidance minimises
`1 - similarity`.

This module holds linear CKA (biased and unbiased) and RSA, and the registry
of every measure by name with its metadata (`SIMILARITY_INFO`,
`similarity_table`); Procrustes, ridge CCA and SVCCA live in
`shape_metrics.py`, RBF kernel CKA in `kernel_cka.py`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from untrainable.centring import EPS as _EPS
from untrainable.centring import centre as _centre
from untrainable.centring import centre_scaled as _centre_scaled
from untrainable.centring import prepare as _prepare
from untrainable.centring import ratio as _ratio
from untrainable.kernel_cka import BANDWIDTH, cka_rbf
from untrainable.registry import Registry
from untrainable.shape_metrics import KEEP, RIDGE, cca, procrustes, svcca

Similarity = Callable[[Tensor, Tensor], Tensor]

SIMILARITIES: Registry[Tensor] = Registry("similarity")


def sample_space_is_cheaper(n: int, d1: int, d2: int) -> bool:
    """True when CKA of x (n, d1) and y (n, d2), with a gradient for x, takes fewer multiply-adds in sample space.

    Sample space: two Gram matrices and one gradient product, n^2 (2 d1 + d2).
    Feature space: Y^T X, X^T X, Y^T Y and their gradients (autograd's two
    products for X^T X), n (2 d1 d2 + 3 d1^2 + d2^2).
    """
    return n * (2 * d1 + d2) < 2 * d1 * d2 + 3 * d1 * d1 + d2 * d2


# Centring an (n, n) Gram matrix instead of the (n, d) activations costs n^2
# instead of n d, but subtracts large numbers where a layer's mean dominates
# its variance. Measured in float32 (n 64 to 256, d 1e3 to 5e4): while the
# variance is at least 1/64 of the mean square, CKA stays within 1e-6 of
# float64; below that share (and for constant layers, or sums that would
# over- or underflow) the activations are centred column by column instead.
_MIN_VARIANCE_SHARE = 1.0 / 64


def _gram_side(x: Tensor, gram_dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """One input's share of sample-space CKA, without gradient: (k, basis, factor).

    Args:
        x: (n, d) activations, float32 or float64.
        gram_dtype: dtype of the Gram products (None: x's). A narrower one
            (bfloat16) is used on column-centred activations only.
    Returns:
        k: (n, n) centred Gram matrix scaled to unit Frobenius norm; zero for a constant layer.
        basis: (n, d) what k was formed from: x, or x column-centred and scaled.
        factor: 0-d; for a function f of k with symmetric, centred gradient g,
            df/dx = factor * (g - <g, k> k) @ basis (0 for a constant layer).
    """
    n, d = x.shape
    finfo = torch.finfo(x.dtype)
    with torch.no_grad():
        if gram_dtype is None or gram_dtype == x.dtype:
            gram = x @ x.T
            row = gram.mean(dim=1, keepdim=True)
            # One read to the host decides the branch (few small ops: at n = 64 their count, not size, costs).
            total, row_sum = torch.stack((gram.diagonal().sum(), row.sum())).tolist()
            variance = total - row_sum  # trace of the centred Gram: sum_i ||x_i - mean||^2
            in_range = math.isfinite(total) and total > n * d * finfo.tiny / finfo.eps
            if in_range and variance >= _MIN_VARIANCE_SHARE * total:
                # Divided by the variance as it is centred: ||k||_F <= trace, so its squares cannot overflow.
                k = gram.sub_(row).sub_(row.T).add_(row_sum / n).mul_(1.0 / variance)
                norm = torch.linalg.vector_norm(k)
                return k.div_(norm), x, (2.0 / variance) / norm
        basis, scale = _centre_scaled(x)
        narrow = basis.to(gram_dtype) if gram_dtype is not None else basis
        k = (narrow @ narrow.T).to(x.dtype)
        k, factor = _unit_norm(k, k.diagonal().sum(), scale)
    return k, basis, factor


def _unit_norm(k: Tensor, trace: Tensor, scale: Tensor) -> tuple[Tensor, Tensor]:
    """k / ||k||_F with the gradient factor 2 scale / ||k||_F; zeros when trace is 0 (a constant layer).

    k is divided by its trace first: for a PSD matrix ||k||_F <= trace, so the
    squares cannot overflow.
    """
    k = k * torch.where(trace > 0, 1.0 / trace, 0.0)
    norm = torch.linalg.vector_norm(k)
    inverse = torch.where(norm > 0, 1.0 / norm, 0.0)
    return k.mul_(inverse), 2.0 * scale * inverse / torch.where(trace > 0, trace, 1.0)


class _SampleSpaceCKA(torch.autograd.Function):
    """Biased linear CKA from (n, n) Gram matrices, one product per input each way.

    Forward: k = centred Gram of x, l = that of y, CKA = <k, l> with both at
    unit norm. Backward: dCKA/dx = factor (l - CKA k) @ x, one
    (n, n) @ (n, d) product, where autograd through x @ x.T would take two.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor, gram_dtype: torch.dtype | None) -> Tensor:
        k, basis_x, factor_x = _gram_side(x, gram_dtype)
        l, basis_y, factor_y = _gram_side(y, gram_dtype)
        cka = (k * l).sum()
        ctx.gram_dtype = gram_dtype
        ctx.save_for_backward(k, l, basis_x, factor_x, basis_y, factor_y, cka)
        return cka

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        k, l, basis_x, factor_x, basis_y, factor_y, cka = ctx.saved_tensors
        grad_x = grad_y = None
        if ctx.needs_input_grad[0]:
            grad_x = _project(l - cka * k, basis_x, grad * factor_x, ctx.gram_dtype)
        if ctx.needs_input_grad[1]:
            grad_y = _project(k - cka * l, basis_y, grad * factor_y, ctx.gram_dtype)
        return grad_x, grad_y, None


def _project(m: Tensor, basis: Tensor, factor: Tensor, gram_dtype: torch.dtype | None) -> Tensor:
    """factor * m @ basis: m (n, n), basis (n, d), in gram_dtype where one is asked for."""
    if gram_dtype is not None and gram_dtype != basis.dtype:
        return (m.to(gram_dtype) @ basis.to(gram_dtype)).to(basis.dtype) * factor
    return (m * factor) @ basis


def linear_cka(x: Tensor, y: Tensor, gram_dtype: torch.dtype | None = None, space: str = "auto") -> Tensor:
    """Linear CKA with the biased HSIC estimator (Kornblith et al. 2019).

    The measure used by Subramaniam et al.:
    CKA = ||Yc^T Xc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F), with column-centred
    Xc, Yc. Computed in feature space (d x d products) or sample space
    (n x n Gram matrices, centred as n x n matrices), whichever is cheaper;
    never with an explicit n x n centring matrix.

    Args:
        x: (n, d1) activations. Extra dimensions are flattened.
        y: (n, d2) activations of the same n examples.
        gram_dtype: `torch.bfloat16` forms the sample-space Gram matrices and
            the gradient's product from column-centred activations in
            bfloat16 (faster on hardware with bf16 matrix units). Measured
            against float64 on correlated activations (n 64 to 256, d1 256
            to 1024, d2 4096 to 16384, 36 draws): within 5e-5 (float32:
            2e-6); `tests/test_similarity.py` asserts 1e-3.
            Default None: the inputs' float32 or float64.
        space: `auto` (the cheaper by `sample_space_is_cheaper`), `sample`
            or `feature` (to measure where the two cross over).
    Returns:
        scalar in [0, 1]; 0 when either input is constant over the examples.
    """
    if space not in ("auto", "sample", "feature"):
        raise ValueError(f"space {space!r} is not one of auto, sample, feature")
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, y = _prepare(x, y, min_n=2)
        n, d1, d2 = x.shape[0], x.shape[1], y.shape[1]
        if space == "sample" or (space == "auto" and sample_space_is_cheaper(n, d1, d2)):
            cka: Tensor = _SampleSpaceCKA.apply(x, y, gram_dtype)  # type: ignore[no-untyped-call]  # torch's apply
            return cka
        x, y = _centre(x), _centre(y)
        xy = (y.T @ x).square().sum()
        xx = (x.T @ x).square().sum()
        yy = (y.T @ y).square().sum()
        return _ratio(xy, xx, yy)


def linear_cka_to_grams(x: Tensor, grams: Tensor, gram_dtype: torch.dtype | None = None) -> Tensor:
    """`linear_cka(x, y_j)` for m layers y_j given by their `centred_gram`s, differentiable in x only.

    The target's side of its pairs: x's Gram matrix is formed once and the
    backward is one (n, n) @ (n, d1) product, however many guide layers x is
    paired with.

    Args:
        x: (n, d1) activations (extra dimensions flattened).
        grams: (m, n, n) `centred_gram(y_j)` stacked.
    Returns:
        (m,) similarities.
    """
    if grams.dim() != 3 or x.shape[0] != grams.shape[1]:
        raise ValueError(
            f"similarity needs the same examples in both: got {x.shape[0]} rows in x and Gram matrices of shape "
            f"{tuple(grams.shape)}"
        )
    with torch.autocast(device_type=x.device.type, enabled=False):
        (x,) = _prepare(x, x, min_n=2)[:1]
        ckas: Tensor = _CKAToGrams.apply(x, grams.to(x.dtype), gram_dtype)  # type: ignore[no-untyped-call]  # torch's apply
        return ckas


def linear_cka_to_gram(x: Tensor, l: Tensor, gram_dtype: torch.dtype | None = None) -> Tensor:
    """`linear_cka(x, y)` from y's `centred_gram` l (n, n); a scalar, differentiable in x only."""
    return linear_cka_to_grams(x, l[None], gram_dtype)[0]


class _CKAToGrams(torch.autograd.Function):
    """CKA of x against m precomputed unit-norm centred Gram matrices l_j.

    Forward: k = centred Gram of x at unit norm, CKA_j = <k, l_j>. Backward:
    dx = factor (sum_j g_j (l_j - CKA_j k)) @ x, one product.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, grams: Tensor, gram_dtype: torch.dtype | None) -> Tensor:
        k, basis, factor = _gram_side(x, gram_dtype)
        ckas = grams.flatten(1) @ k.flatten()
        ctx.gram_dtype = gram_dtype
        ctx.save_for_backward(k, grams, basis, factor, ckas)
        return ckas

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, None]:
        k, grams, basis, factor, ckas = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        m = (grad @ grams.flatten(1)).view_as(k) - (grad * ckas).sum() * k
        return _project(m, basis, factor, ctx.gram_dtype), None, None


def centred_gram(x: Tensor, gram_dtype: torch.dtype | None = None) -> Tensor:
    """The (n, n) Gram matrix of x (n, ...) flattened, centred and scaled to unit Frobenius norm, without gradient.

    Zero for a constant layer. For many pairs of layers: form each layer's
    Gram matrix once, then `gram_cka(k, l)` (or `linear_cka_to_gram(x, l)`)
    equals `linear_cka` of the two layers.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        (x,) = _prepare(x, x, min_n=2)[:1]
        return _gram_side(x.detach(), gram_dtype)[0]


def gram_cka(k: Tensor, l: Tensor) -> Tensor:
    """Biased linear CKA from two centred (n, n) Gram matrices; 0 for a constant layer."""
    return _ratio((k * l).sum(), (k * k).sum(), (l * l).sum())


def _unbiased_hsic(inner: Tensor, dk: Tensor, dl: Tensor, rk: Tensor, rl: Tensor, n: int) -> Tensor:
    """Unbiased HSIC (Song et al. 2012, eq. 5) from Gram-matrix statistics.

    With K, L the (n, n) Gram matrices and K~, L~ the same with zero diagonals:
    HSIC_1 = [tr(K~ L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3)).

    Args:
        inner: <K, L>_F.  dk, dl: (n,) diagonals.  rk, rl: (n,) row sums K 1, L 1.
    """
    trace = inner - (dk * dl).sum()
    rk, rl = rk - dk, rl - dl  # row sums of K~ and L~
    return (trace + rk.sum() * rl.sum() / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * (rk * rl).sum()) / (n * (n - 3))


def linear_cka_unbiased(x: Tensor, y: Tensor) -> Tensor:
    """Linear CKA with the unbiased HSIC estimator (Song et al. 2012; Nguyen et al. 2021).

    Removes the upward bias of the biased estimator at small batches
    (independent Gaussians at n = 32 score about 0.2 with the biased one).
    It can be slightly negative.

    Args:
        x: (n, d1) activations, n >= 4.
        y: (n, d2) activations of the same n examples.
    Returns:
        scalar in [-1, 1]; 0 when either input is constant over the examples.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, y = _prepare(x, y, min_n=4)
        x, y = _centre(x), _centre(y)
        n, d1, d2 = x.shape[0], x.shape[1], y.shape[1]
        dk, dl = (x * x).sum(1), (y * y).sum(1)
        if sample_space_is_cheaper(n, d1, d2):
            k, l = x @ x.T, y @ y.T
            inner_xy, inner_xx, inner_yy = (k * l).sum(), (k * k).sum(), (l * l).sum()
            rk, rl = k.sum(1), l.sum(1)
        else:
            inner_xy = (y.T @ x).square().sum()
            inner_xx = (x.T @ x).square().sum()
            inner_yy = (y.T @ y).square().sum()
            rk, rl = x @ x.sum(0), y @ y.sum(0)
        xy = _unbiased_hsic(inner_xy, dk, dl, rk, rl, n)
        xx = _unbiased_hsic(inner_xx, dk, dk, rk, rk, n)
        yy = _unbiased_hsic(inner_yy, dl, dl, rl, rl, n)
        # Both self-terms are >= 0 in exact arithmetic (an inner product of
        # U-centred matrices); `_ratio` clamps the rounding at tiny ranks.
        return _ratio(xy, xx, yy)


def rsa(x: Tensor, y: Tensor) -> Tensor:
    """RSA: Pearson correlation of the two cosine-similarity matrices.

    As in the authors' code, over the off-diagonal upper triangle of the
    (n, n) matrices of cosine similarities between examples.

    Args:
        x: (n, d1) activations, n >= 3.
        y: (n, d2) activations of the same n examples.
    Returns:
        scalar in [-1, 1]; 0 when either matrix is constant.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        x, y = _prepare(x, y, min_n=3)
        n = x.shape[0]
        # Scale before the row norms so tiny or huge layers do not under/overflow.
        x = x / x.detach().abs().amax().clamp_min(torch.finfo(x.dtype).tiny)
        y = y / y.detach().abs().amax().clamp_min(torch.finfo(y.dtype).tiny)
        x = x / torch.sqrt((x * x).sum(1, keepdim=True) + _EPS)
        y = y / torch.sqrt((y * y).sum(1, keepdim=True) + _EPS)
        rows, cols = torch.triu_indices(n, n, offset=1, device=x.device)
        a = (x @ x.T)[rows, cols]
        b = (y @ y.T)[rows, cols]
        a, b = a - a.mean(), b - b.mean()
        return _ratio((a * b).sum(), (a * a).sum(), (b * b).sum())


@dataclass(frozen=True)
class MeasureInfo:
    """What a registered similarity promises: its range, what it ignores, what it needs, whether it gives a metric.

    `invariances` name transforms of either input's features that leave it
    unchanged: `translation`, `rotation` (any orthogonal map), `isotropic
    scale`, `invertible linear` (any invertible map). Every measure here is
    higher for more similar inputs and 1 on identical ones.
    """

    name: str
    summary: str
    low: float
    high: float
    invariances: tuple[str, ...]
    min_n: int
    needs: str
    metric: str
    reference: str

    def row(self) -> tuple[str, ...]:
        """The cells of this measure's row in `similarity_table`."""
        return (
            self.name,
            f"[{self.low:g}, {self.high:g}]",
            ", ".join(self.invariances),
            f"n >= {self.min_n}" + (f"; {self.needs}" if self.needs else ""),
            self.metric,
            self.summary,
        )


SIMILARITY_INFO: dict[str, MeasureInfo] = {}
_ORTHO = ("translation", "rotation", "isotropic scale")


def register_similarity(info: MeasureInfo, measure: Similarity) -> None:
    """Register `measure` (x (n, d1), y (n, d2)) -> scalar under `info.name`, with its metadata."""
    SIMILARITIES.register(info.name)(measure)
    SIMILARITY_INFO[info.name] = info


# Every registered measure with its metadata (`untrainable list` prints them sorted by name).
_MEASURES: tuple[tuple[MeasureInfo, Similarity], ...] = (
    (
        MeasureInfo(
            "cka",
            "biased linear CKA (the paper's)",
            0,
            1,
            _ORTHO,
            3,
            "",
            "no",
            "Kornblith et al. 2019, eq. (1) with the biased HSIC",
        ),
        linear_cka,
    ),
    (
        MeasureInfo(
            "cka_unbiased",
            "linear CKA, unbiased HSIC",
            -1,
            1,
            _ORTHO,
            4,
            "",
            "no",
            "Song et al. 2012 (unbiased HSIC); Nguyen et al. 2021",
        ),
        linear_cka_unbiased,
    ),
    (
        MeasureInfo(
            "rsa",
            "Pearson correlation of cosine-similarity matrices",
            -1,
            1,
            ("rotation", "isotropic scale"),
            3,
            "",
            "no",
            "Kriegeskorte et al. 2008; the authors' code",
        ),
        rsa,
    ),
    (
        MeasureInfo(
            "procrustes",
            "cosine of the angular Procrustes shape metric",
            0,
            1,
            _ORTHO,
            3,
            "",
            "yes: arccos(s) is a metric",
            "Williams et al. 2021; netrep LinearMetric(alpha=1)",
        ),
        procrustes,
    ),
    (
        MeasureInfo(
            "cca",
            f"ridge CCA (ridge {RIDGE:g} x the mean eigenvalue); the mean canonical correlation at ridge 0",
            0,
            1,
            _ORTHO + (("invertible linear (ridge 0 only)",)),
            3,
            "ridge 0 needs n > d; near 1 for unrelated layers when n <= d",
            "yes: arccos(s) is a metric",
            "Hotelling 1936; Williams et al. 2021 (partial whitening)",
        ),
        cca,
    ),
    (
        MeasureInfo(
            "svcca",
            f"SVCCA, {KEEP:.0%} of the variance kept on each side",
            0,
            1,
            _ORTHO,
            3,
            "n well above d: near 1 for unrelated layers when n <= d",
            "no",
            "Raghu et al. 2017",
        ),
        svcca,
    ),
    (
        MeasureInfo(
            "cka_rbf",
            f"kernel CKA, RBF with sigma = {BANDWIDTH:g} x the median distance",
            0,
            1,
            _ORTHO,
            3,
            "",
            "no",
            "Kornblith et al. 2019, RBF kernel",
        ),
        cka_rbf,
    ),
)
for _info, _measure in _MEASURES:
    register_similarity(_info, _measure)


def get_similarity(similarity: str | Similarity) -> Similarity:
    """A registered similarity by name (see `list_similarities`), or the callable itself."""
    if callable(similarity):
        return similarity
    return SIMILARITIES.get(similarity)


def list_similarities() -> list[str]:
    return SIMILARITIES.names()


def similarity_table() -> list[tuple[str, ...]]:
    """Rows (name, range, invariances, needs, metric, what it is) of every registered measure; the first is a header."""
    header = ("similarity", "range", "invariant to", "needs", "metric", "what it is")
    return [header] + [SIMILARITY_INFO[name].row() for name in list_similarities()]
