"""NIW predictive, eIP and Gaussian densities against scipy; Monte-Carlo moments."""

import numpy as np
import pytest
import torch
from scipy import stats

from e2ip_plugins import (
    EIPHead,
    eip_loss,
    eip_nll,
    eip_predictive,
    eip_regularizer,
    ensemble_predictive,
    evidential_force_loss,
    structure_uncertainty,
)
from e2ip_plugins._e3nn import o3
from e2ip_plugins.eip import eip_atom_sigma2, pinball

from .helpers import random_gaussian, random_student_t


def test_student_t_nll_matches_scipy():
    pred = random_student_t(40)
    y = pred.mean + 0.5 * torch.randn(40, 3, dtype=torch.float64)
    nll = pred.nll(y)
    lam = pred.scale_factor[:, None, None] * pred.sigma0
    for i in range(40):
        ref = stats.multivariate_t.logpdf(
            y[i].numpy(), loc=pred.mean[i].numpy(), shape=lam[i].numpy(), df=float(pred.df[i])
        )
        assert nll[i].item() == pytest.approx(-ref, rel=1e-10, abs=1e-10)


def test_niw_moments_by_monte_carlo():
    """Sample Σ ~ IW(νΣ₀, ν), μ ~ N(γ, Σ/κ): E[Σ] = U_ale, Cov[μ] = U_epi, Cov[y] = U_tot."""
    pred = random_student_t(3, seed=1)
    rng = np.random.default_rng(0)
    n = 200_000
    for i in range(3):
        nu, kappa = float(pred.nu[i]), float(pred.kappa[i])
        if nu < 7.5:  # keep the estimator's variance finite (ν > d + 3) for a tight check
            pred.nu[i] = nu = nu + 4.0
        s0 = pred.sigma0[i].numpy()
        sig = stats.invwishart(df=nu, scale=nu * s0).rvs(size=n, random_state=rng)
        chol = np.linalg.cholesky(sig / kappa)
        mu = np.einsum("nij,nj->ni", chol, rng.standard_normal((n, 3)))
        y = mu + np.einsum("nij,nj->ni", np.linalg.cholesky(sig), rng.standard_normal((n, 3)))
        for est, ref in [
            (sig.mean(0), pred.covariance_aleatoric[i]),
            (np.cov(mu.T), pred.covariance_epistemic[i]),
            (np.cov(y.T), pred.covariance[i]),
        ]:
            ref = ref.numpy()
            assert np.linalg.norm(est - ref) / np.linalg.norm(ref) < 0.04


def test_total_covariance_is_student_t_covariance():
    pred = random_student_t(10)
    lam = pred.scale_factor[:, None, None] * pred.sigma0
    expected = (pred.df / (pred.df - 2))[:, None, None] * lam
    assert torch.allclose(pred.covariance, expected, rtol=1e-12)


def test_gaussian_nll_matches_scipy():
    pred = random_gaussian(20)
    y = pred.mean + torch.randn(20, 3, dtype=torch.float64)
    nll = pred.nll(y)
    for i in range(20):
        ref = stats.multivariate_normal.logpdf(y[i].numpy(), pred.mean[i].numpy(), pred.covariance[i].numpy())
        assert nll[i].item() == pytest.approx(-ref, rel=1e-10)


def test_evidential_loss_terms():
    pred = random_student_t(15)
    y = pred.mean + 0.3 * torch.randn(15, 3, dtype=torch.float64)
    head_out = {k: getattr(pred, k) for k in ("nu", "kappa", "sigma0", "sigma0_inv", "sigma0_logdet")}
    sigma_f = 0.9
    loss = evidential_force_loss(pred.mean, head_out, y, sigma_f, reg_weight=0.25)
    r2 = ((y - pred.mean) ** 2).sum(-1) / sigma_f**2
    assert torch.allclose(loss, pred.nll(y) + 0.25 * (pred.nu + pred.kappa) * r2, rtol=1e-12)
    loss_m = evidential_force_loss(pred.mean, head_out, y, sigma_f, reg_weight=0.25, residual_metric="sigma0")
    d = y - pred.mean
    r2m = torch.einsum("ni,nij,nj->n", d, torch.linalg.inv(pred.sigma0), d)
    assert torch.allclose(loss_m, pred.nll(y) + 0.25 * (pred.nu + pred.kappa) * r2m, rtol=1e-8)


def test_detach_mean_stops_gradient_into_forces():
    pred = random_student_t(6)
    head_out = {k: getattr(pred, k) for k in ("nu", "kappa", "sigma0", "sigma0_inv", "sigma0_logdet")}
    y = torch.randn(6, 3, dtype=torch.float64)
    for detach, expect_grad in [(False, True), (True, False)]:
        forces = pred.mean.clone().requires_grad_(True)
        loss = evidential_force_loss(forces, head_out, y, 1.0, detach_mean=detach).sum()
        if expect_grad:
            (g,) = torch.autograd.grad(loss, forces)
            assert g.abs().sum() > 0
        else:
            assert not loss.requires_grad


def test_nonfinite_loss_is_named():
    pred = random_student_t(4)
    head_out = {k: getattr(pred, k) for k in ("nu", "kappa", "sigma0", "sigma0_inv", "sigma0_logdet")}
    y = pred.mean.clone()
    y[2, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="evidential force loss"):
        evidential_force_loss(pred.mean, head_out, y, 1.0)


# --- eIP -------------------------------------------------------------------------------


def _eip_params(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    nu = 0.1 + 3 * torch.rand(n, 3, dtype=torch.float64, generator=g)
    alpha = 1.05 + 4 * torch.rand(n, 3, dtype=torch.float64, generator=g)
    beta = 0.05 + torch.rand(n, 3, dtype=torch.float64, generator=g)
    gamma = torch.randn(n, 3, dtype=torch.float64, generator=g)
    y = gamma + 0.5 * torch.randn(n, 3, dtype=torch.float64, generator=g)
    return y, gamma, {"eip_nu": nu, "eip_alpha": alpha, "eip_beta": beta}


@pytest.mark.parametrize("q", [0.5, 0.3, 0.8])
def test_eip_nll_is_the_student_t_it_implies(q):
    y, gamma, h = _eip_params(30)
    nll = eip_nll(y, gamma, h["eip_nu"], h["eip_alpha"], h["eip_beta"], q)
    pred = eip_predictive(gamma, h, q)
    ref = -stats.t.logpdf(y.numpy(), df=pred.df.numpy(), loc=pred.mean.numpy(), scale=np.sqrt(pred.scale2.numpy()))
    np.testing.assert_allclose(nll.numpy(), ref, rtol=1e-10)
    np.testing.assert_allclose(pred.nll(y).numpy(), ref.sum(-1), rtol=1e-10)
    if q == 0.5:  # median quantile: μ = γ
        assert torch.equal(pred.mean, gamma)


def test_eip_regulariser_and_sigma():
    y, gamma, h = _eip_params(10)
    q = 0.3
    reg = eip_regularizer(y, gamma, h["eip_nu"], h["eip_alpha"], h["eip_beta"], q)
    eps = (y - gamma).numpy()
    rho = np.maximum(q * eps, (q - 1) * eps)
    expected = rho * (2 * h["eip_nu"] + h["eip_alpha"] + 1 / h["eip_beta"]).numpy()
    np.testing.assert_allclose(reg.numpy(), expected, rtol=1e-12)
    assert (pinball(torch.tensor([-1.0, 2.0]), 0.3) >= 0).all()
    var = (h["eip_beta"] / (h["eip_nu"] * (h["eip_alpha"] - 1))).numpy()
    np.testing.assert_allclose(eip_atom_sigma2(h).numpy(), np.sqrt((var**2).sum(-1)), rtol=1e-12)
    loss = eip_loss(y, gamma, h, q=q, reg_weight=0.2)
    nll = eip_nll(y, gamma, h["eip_nu"], h["eip_alpha"], h["eip_beta"], q)
    assert torch.allclose(loss, (nll + 0.2 * reg).mean(-1))


def test_eip_head_is_not_equivariant_by_construction(f64):
    """Documented limitation: eIP's covariance is diagonal in the lab frame, so it cannot rotate."""
    torch.manual_seed(0)
    head = EIPHead("8x0e+8x1o", num_channels=8)
    torch.nn.init.normal_(head.mlp.net[-1].weight, std=0.7)
    ir = o3.Irreps("8x0e+8x1o")
    x = torch.randn(9, ir.dim)
    R = o3.rand_matrix()
    gamma = torch.zeros(9, 3)
    cov = eip_predictive(gamma, head(x)).covariance
    cov_rot = eip_predictive(gamma, head(x @ ir.D_from_matrix(R).T)).covariance
    offdiag = cov_rot - torch.diag_embed(torch.diagonal(cov_rot, dim1=-2, dim2=-1))
    assert offdiag.abs().max() == 0.0  # always diagonal in the lab frame
    rel = (cov_rot - R @ cov @ R.T).norm() / cov.norm()
    assert rel > 1e-3  # ... hence not R Σ Rᵀ


def test_eip_head_needs_vectors():
    with pytest.raises(ValueError, match="l_max"):
        EIPHead("16x0e+4x2e")


# --- ensembles and per-structure scalars --------------------------------------------------


def test_ensemble_covariance_is_sample_covariance():
    members = torch.randn(4, 7, 3, dtype=torch.float64)
    pred = ensemble_predictive(members, jitter=0.0)
    for i in range(7):
        np.testing.assert_allclose(pred.covariance_epistemic[i].numpy(), np.cov(members[:, i].numpy().T), rtol=1e-12)
    np.testing.assert_allclose(pred.mean.numpy(), members.mean(0).numpy())
    expected_u = np.sqrt(np.trace(np.cov(members[:, 0].numpy().T)) / 3)
    assert pred.uncertainty[0].item() == pytest.approx(expected_u, rel=1e-12)


def test_structure_uncertainty():
    u = torch.rand(10, dtype=torch.float64)
    batch = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    mean, umax = structure_uncertainty(u, batch, 3)
    for s in range(3):
        assert mean[s].item() == pytest.approx(u[batch == s].mean().item())
        assert umax[s].item() == u[batch == s].max().item()
