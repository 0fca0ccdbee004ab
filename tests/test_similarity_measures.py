"""Procrustes, ridge CCA, SVCCA and RBF kernel CKA against scipy, scikit-learn and the papers' formulas in float64.

The references are other people's code (scipy's `orthogonal_procrustes`,
`subspace_angles`, `fractional_matrix_power`; scikit-learn's iterative CCA)
or a paper's formula written out with explicit matrices, never our helpers.
"""

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch
from sklearn.cross_decomposition import CCA

from untrainable.config import GuidanceSpec
from untrainable.guidance import Guidance
from untrainable.kernel_cka import cka_rbf
from untrainable.shape_metrics import cca, procrustes, svcca
from untrainable.similarity import SIMILARITY_INFO, get_similarity, list_similarities, similarity_table

NEW = ("procrustes", "cca", "svcca", "cka_rbf")
TOL = 1e-6


def _data(n, d1, d2, shared=3, seed=0):
    """Two related float64 layers (n, d1), (n, d2) with unequal column variances and nonzero means."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(n, shared))
    x = w @ rng.normal(size=(shared, d1)) + 0.5 * rng.normal(size=(n, d1)) * rng.uniform(0.2, 2, size=d1) + 3.0
    y = w @ rng.normal(size=(shared, d2)) + 0.5 * rng.normal(size=(n, d2)) * rng.uniform(0.2, 2, size=d2) - 1.0
    return x, y


def _t(a):
    return torch.tensor(a, dtype=torch.float64)


def _pad(a, d):
    return np.hstack([a, np.zeros((a.shape[0], d - a.shape[1]))])


@pytest.mark.parametrize("n, d1, d2", [(40, 5, 8), (20, 50, 30), (12, 3, 40)])
def test_procrustes_is_scipys_orthogonal_procrustes_score(n, d1, d2):
    x, y = _data(n, d1, d2)
    xc, yc = x - x.mean(0), y - y.mean(0)
    d = max(d1, d2)
    xc, yc = _pad(xc, d), _pad(yc, d)  # netrep's zero padding of the narrower side
    _, nuclear = scipy.linalg.orthogonal_procrustes(yc, xc)  # its scale is the sum of singular values of yc^T xc
    ref = nuclear / (np.linalg.norm(xc) * np.linalg.norm(yc))
    assert float(procrustes(_t(x), _t(y))) == pytest.approx(ref, abs=TOL)


def _sklearn_correlations(x, y):
    k = min(x.shape[1], y.shape[1])
    model = CCA(n_components=k, scale=False, max_iter=100_000, tol=1e-15).fit(x, y)
    a, b = model.transform(x, y)
    return np.array([np.corrcoef(a[:, i], b[:, i])[0, 1] for i in range(k)])


@pytest.mark.parametrize("d1, d2", [(4, 4), (3, 5)])
def test_cca_at_ridge_zero_is_the_mean_canonical_correlation_of_sklearn(d1, d2):
    x, y = _data(300, d1, d2)
    rho = _sklearn_correlations(x, y)
    # scikit-learn's NIPALS at tol 1e-15 agrees with the Björck-Golub QR route to rounding; both are checked.
    xq, _ = np.linalg.qr(x - x.mean(0))
    yq, _ = np.linalg.qr(y - y.mean(0))
    assert np.sort(np.abs(rho))[::-1] == pytest.approx(np.linalg.svd(xq.T @ yq, compute_uv=False), abs=TOL)
    ref = np.abs(rho).sum() / np.sqrt(d1 * d2)  # the mean canonical correlation when d1 = d2
    assert float(cca(_t(x), _t(y), ridge=0.0)) == pytest.approx(ref, abs=TOL)
    if d1 == d2:
        assert float(cca(_t(x), _t(y), ridge=0.0)) == pytest.approx(np.abs(rho).mean(), abs=TOL)


@pytest.mark.parametrize("n, d1, d2, ridge", [(50, 6, 9, 1.0), (16, 40, 25, 1.0), (16, 40, 25, 0.1), (30, 5, 5, 10.0)])
def test_ridge_cca_matches_partial_whitening_by_scipys_inverse_square_root(n, d1, d2, ridge):
    x, y = _data(n, d1, d2)

    def whiten(a):
        a = a - a.mean(0)
        cov = a.T @ a
        lam = ridge * np.trace(cov) / min(a.shape)
        return a @ np.real(scipy.linalg.fractional_matrix_power(cov + lam * np.eye(a.shape[1]), -0.5))

    xw, yw = whiten(x), whiten(y)
    ref = np.linalg.svd(xw.T @ yw, compute_uv=False).sum() / (np.linalg.norm(xw) * np.linalg.norm(yw))
    assert float(cca(_t(x), _t(y), ridge=ridge)) == pytest.approx(ref, abs=TOL)


@pytest.mark.parametrize("n, d1, d2", [(200, 10, 14), (25, 40, 60)])
def test_svcca_matches_svd_truncation_and_scipys_subspace_angles(n, d1, d2):
    x, y = _data(n, d1, d2, shared=4)

    def reduce(a):
        a = a - a.mean(0)
        u, s, _ = np.linalg.svd(a, full_matrices=False)
        k = int(np.searchsorted(np.cumsum(s**2) / np.sum(s**2), 0.99) + 1)
        return u[:, :k] * s[:k]

    xr, yr = reduce(x), reduce(y)
    cosines = np.cos(scipy.linalg.subspace_angles(xr, yr))
    ref = cosines.mean()  # min(kx, ky) angles: the mean canonical correlation of the kept components
    assert len(cosines) == min(xr.shape[1], yr.shape[1])
    assert float(svcca(_t(x), _t(y))) == pytest.approx(ref, abs=TOL)


def ref_cka_rbf(x, y, fraction):
    """Kornblith et al. 2019: CKA = HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)), HSIC = tr(K H L H) / (n - 1)^2,
    K_ij = exp(-||x_i - x_j||^2 / (2 sigma^2)), sigma a fraction of the median distance between examples."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n

    def kernel(a):
        dist = np.sqrt(((a[:, None, :] - a[None, :, :]) ** 2).sum(-1))
        sigma = fraction * np.median(dist[np.triu_indices(n, 1)])
        return np.exp(-(dist**2) / (2 * sigma**2))

    def hsic(k, l):
        return np.trace(k @ h @ l @ h) / (n - 1) ** 2

    k, l = kernel(x), kernel(y)
    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


@pytest.mark.parametrize("n, d1, d2, fraction", [(30, 6, 9, 0.8), (30, 50, 70, 0.4), (19, 4, 4, 0.2)])
def test_cka_rbf_matches_the_papers_hsic_formulas(n, d1, d2, fraction):
    # n(n - 1)/2 odd: the median of the pairs is one distance, as numpy and torch agree on.
    x, y = _data(n, d1, d2)
    assert float(cka_rbf(_t(x), _t(y), bandwidth=fraction)) == pytest.approx(ref_cka_rbf(x, y, fraction), abs=TOL)


MEASURES = {"procrustes": procrustes, "cca": cca, "svcca": svcca, "cka_rbf": cka_rbf}


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("n, d1, d2", [(10, 4, 3), (8, 12, 5)])
def test_gradcheck_float64(name, n, d1, d2):
    x, y = _data(n, d1, d2, seed=1)
    x, y = _t(x).requires_grad_(), _t(y).requires_grad_()
    assert torch.autograd.gradcheck(MEASURES[name], (x, y), eps=1e-6, atol=1e-5)


def _random_rotation(d, seed):
    return _t(scipy.stats.special_ortho_group.rvs(d, random_state=seed))


def _invertible(d, seed):
    rng = np.random.default_rng(seed)
    return _t(rng.normal(size=(d, d)) + 3 * np.eye(d))


@pytest.mark.parametrize("name", list_similarities())
def test_every_stated_invariance_holds(name):
    x, y = (_t(a) for a in _data(60, 7, 9))
    measure = get_similarity(name)
    base = float(measure(x, y))
    transforms = {
        "translation": lambda a: a + 5.0,
        "rotation": lambda a: a @ _random_rotation(a.shape[1], 3),
        "isotropic scale": lambda a: 37.0 * a,
        "invertible linear (ridge 0 only)": lambda a: a @ _invertible(a.shape[1], 4),
    }
    for invariance in SIMILARITY_INFO[name].invariances:
        if invariance.startswith("invertible linear"):
            f0 = float(cca(x, y, ridge=0.0))
            assert float(cca(transforms[invariance](x), y, ridge=0.0)) == pytest.approx(f0, abs=TOL)
            continue
        assert float(measure(transforms[invariance](x), y)) == pytest.approx(base, abs=TOL), invariance
        assert float(measure(x, transforms[invariance](y))) == pytest.approx(base, abs=TOL), invariance


@pytest.mark.parametrize("name", NEW)
def test_one_on_identical_inputs_and_on_a_rotated_scaled_copy(name):
    x = _t(_data(40, 6, 6)[0])
    assert float(MEASURES[name](x, x)) == pytest.approx(1.0, abs=TOL)
    assert float(MEASURES[name](x, 4.0 * x @ _random_rotation(6, 0) + 2.0)) == pytest.approx(1.0, abs=TOL)


def test_procrustes_is_one_only_for_a_rotated_scaled_copy_unlike_cca():
    x = _t(_data(40, 6, 6)[0])
    stretched = x @ torch.diag(_t(np.array([1.0, 2.0, 3.0, 1.0, 1.0, 5.0])))
    assert float(procrustes(x, stretched)) < 0.99
    assert float(cca(x, stretched, ridge=0.0)) == pytest.approx(1.0, abs=TOL)


@pytest.mark.parametrize("name", NEW)
def test_finite_gradients_at_zero_and_repeated_singular_values(name):
    n = 12
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    q = q - q.mean(0)  # centred orthogonal-ish columns: equal singular values
    cases = {
        "repeated": (q[:, :4].clone(), q[:, :4].clone()),  # identical, four equal singular values
        "rank-deficient": (torch.cat([q[:, :2], q[:, :2]], 1), q[:, :5] @ torch.ones(5, 5, dtype=torch.float64)),
        "zero columns": (torch.cat([q[:, :3], torch.zeros(n, 20, dtype=torch.float64)], 1), q[:, 2:6]),
        "duplicate examples": (q[[0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5], :3], q[:, :3]),
        "constant": (torch.ones(n, 4, dtype=torch.float64), q[:, :3]),
    }
    for case, (x, y) in cases.items():
        x, y = x.clone().requires_grad_(), y.clone().requires_grad_()
        value = MEASURES[name](x, y)
        value.backward()
        assert torch.isfinite(value), case
        assert torch.isfinite(x.grad).all() and torch.isfinite(y.grad).all(), case
    assert float(MEASURES[name](torch.ones(n, 4), torch.randn(n, 3))) == 0.0


@pytest.mark.parametrize("name", NEW)
def test_float32_agrees_with_float64(name):
    x, y = _data(64, 128, 300)
    assert float(MEASURES[name](torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32))) == (
        pytest.approx(float(MEASURES[name](_t(x), _t(y))), abs=1e-4)
    )


def test_the_registry_holds_at_least_six_measures_with_metadata():
    names = list_similarities()
    assert len(names) >= 6 and set(NEW) <= set(names)
    rows = similarity_table()
    assert rows[0][0] == "similarity" and [row[0] for row in rows[1:]] == names
    for name in names:
        info = SIMILARITY_INFO[name]
        assert info.low < info.high and info.min_n >= 3 and info.invariances and info.reference


@pytest.mark.parametrize("name", NEW)
def test_guidance_pulls_with_every_new_measure(name):
    GuidanceSpec(similarity=name).validate("guidance")
    torch.manual_seed(0)
    target = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    guide = torch.nn.Sequential(torch.nn.Linear(6, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    guidance = Guidance(target, guide, similarity=name, pairs=[("0", "0"), ("2", "2")])
    out = guidance(torch.randn(20, 6))
    out.guidance_loss.backward()
    assert torch.isfinite(out.guidance_loss) and out.guidance_loss > 0
    assert all(torch.isfinite(p.grad).all() for p in target.parameters())
