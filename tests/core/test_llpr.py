"""Post hoc force LLPR (e2ip_plugins.llpr): the benchmark baseline of issue 27."""

import numpy as np
import pytest
import torch
from scipy import optimize, stats

from e2ip_plugins._e3nn import o3
from e2ip_plugins.llpr import LLPR, feature_gram, ml_scale, rigidity_covariance


def _jacobians(n=60, p=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, p, 3, generator=g, dtype=torch.float64)


def test_covariance_is_spd_and_rotates():
    g = _jacobians()
    gram = feature_gram(g)
    u = rigidity_covariance(g, gram, 1e-4)
    assert torch.linalg.eigvalsh(u).min() > 0
    torch.manual_seed(3)
    rot = o3.rand_matrix(dtype=torch.float64)
    # ∂Φ/∂(R r) = G Rᵀ, so the Jacobians of the rotated structure are G Rᵀ
    u_rot = rigidity_covariance(g @ rot.T, gram, 1e-4)
    assert torch.allclose(u_rot, rot @ u @ rot.T, atol=1e-10)


def test_ml_scale_is_the_gaussian_maximum_likelihood():
    g = _jacobians(seed=1)
    u = rigidity_covariance(g, feature_gram(g), 1e-2)
    r = torch.randn(len(g), 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def nll(log_a2):
        return -sum(stats.multivariate_normal(np.zeros(3), np.exp(log_a2) * ui).logpdf(ri)
                    for ui, ri in zip(u.numpy(), r.numpy()))

    best = optimize.minimize_scalar(nll, bounds=(-10, 10), method="bounded", options={"xatol": 1e-8})
    assert ml_scale(u, r) == pytest.approx(float(np.exp(best.x)), rel=1e-4)


def test_fit_recovers_the_scale_and_the_predictive_nll_matches_scipy():
    g_train, g_val = _jacobians(200, seed=3), _jacobians(400, seed=4)
    llpr = LLPR(g_train)
    true_a2 = 0.37
    u_val = rigidity_covariance(g_val, llpr.gram, 1e-2)
    chol = torch.linalg.cholesky(true_a2 * u_val)
    z = torch.randn(len(g_val), 3, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    mean = torch.zeros(len(g_val), 3, dtype=torch.float64)
    y = (chol @ z)[..., 0]
    llpr.fit(g_val, mean, y, grid=(1e-2,))
    assert llpr.alpha2 == pytest.approx(true_a2, rel=0.15)
    pred = llpr.predictive(g_val[:5], mean[:5])
    ref = [-stats.multivariate_normal(np.zeros(3), c).logpdf(v) for c, v in zip(pred.covariance.numpy(), y[:5].numpy())]
    assert np.allclose(pred.nll(y[:5]).numpy(), ref, rtol=1e-8)
