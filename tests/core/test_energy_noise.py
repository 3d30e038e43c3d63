"""Coherent energy/force noise (issue 15): the closed forms of e2ip_plugins.energy_noise against
(i) finite differences of energies sampled from the noise process itself, (ii) rotations,
(iii) scipy's multivariate normal, (iv) autograd gradcheck, (v) TorchScript."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from e2ip_plugins import energy_noise as en
from e2ip_plugins._e3nn import o3

N_ATOMS = 3
LOCAL_VAR = torch.tensor([0.02, 0.05, 0.03], dtype=torch.float64)  # a_i² (eV²)
LENGTH = torch.tensor([0.3, 0.5, 0.4], dtype=torch.float64)  # ℓ_i (Å)


def _positions():
    return torch.tensor([[0.0, 0.0, 0.0], [1.1, 0.2, -0.1], [-0.3, 0.9, 0.4]], dtype=torch.float64)


def _amplitude(pos, w=None):
    """A smooth, rotation- and translation-invariant shared amplitude A(R) (eV)."""
    w = torch.tensor([0.4, 0.7], dtype=pos.dtype) if w is None else w
    d2 = ((pos.unsqueeze(0) - pos.unsqueeze(1)) ** 2).sum(-1)
    iu = torch.triu_indices(pos.shape[0], pos.shape[0], 1)
    return w[0] + w[1] * torch.exp(-d2[iu[0], iu[1]] / 1.5).sum()


def _metric_shape(pos):
    """An equivariant per-atom SPD shape (like the head's Σ₀): Σ_j w_ij r_ij r_ijᵀ + 0.2 I."""
    rij = pos.unsqueeze(0) - pos.unsqueeze(1)
    w = torch.exp(-(rij**2).sum(-1))
    return torch.einsum("ij,ija,ijb->iab", w, rij, rij) + 0.2 * torch.eye(3, dtype=pos.dtype)


def _model(pos):
    """(a², M⁻¹, D, A, h) of the test structure at positions ``pos``."""
    pos = pos.clone().requires_grad_(True)
    amp = _amplitude(pos)
    h = en.amplitude_gradient(amp.reshape(1), pos, create_graph=False)
    minv = en.metric_inverse_from_shape(_metric_shape(pos.detach()), LENGTH)
    d = en.local_force_covariance(LOCAL_VAR, minv)
    return LOCAL_VAR, minv, d, amp.detach().reshape(1), h


def _kernel(pos0, deltas, minv, shared=True):
    """Energy-noise kernel between displaced configurations R⁰+δ_p (P, N, 3): the GP itself."""
    diff = deltas.unsqueeze(1) - deltas.unsqueeze(0)  # (P, P, N, 3)
    quad = torch.einsum("pqia,iab,pqib->pqi", diff, minv, diff)
    k = (LOCAL_VAR * torch.exp(-0.5 * quad)).sum(-1)
    if shared:
        amps = torch.stack([_amplitude(pos0 + d) for d in deltas])
        k = k + amps.unsqueeze(0) * amps.unsqueeze(1)
    return k


def _stencil(n, tau):
    """Points 0, ±τ e_ja and the map W from their energies to (ε, F = −∇ε by central differences)."""
    pts = [torch.zeros(n, 3, dtype=torch.float64)]
    w = torch.zeros(1 + 3 * n, 1 + 6 * n, dtype=torch.float64)
    w[0, 0] = 1.0
    for j in range(n):
        for a in range(3):
            for sgn in (1.0, -1.0):
                d = torch.zeros(n, 3, dtype=torch.float64)
                d[j, a] = sgn * tau
                pts.append(d)
                w[1 + 3 * j + a, len(pts) - 1] = -sgn / (2 * tau)
    return torch.stack(pts), w


@pytest.mark.parametrize("shared", [True, False])
def test_finite_difference_kernel_matches_closed_form(shared):
    """Deterministic: W K Wᵀ of the GP kernel (FD of the covariance) equals the closed forms."""
    pos = _positions()
    a2, minv, d, amp, h = _model(pos)
    pts, w = _stencil(N_ATOMS, 1e-4)
    fd = w @ _kernel(pos, pts, minv, shared) @ w.T
    pred = en.joint_covariance_dense(a2, d, amp if shared else None, h if shared else None)
    assert torch.allclose(fd, pred, rtol=1e-5, atol=1e-6 * pred.abs().max())


def test_sampled_energies_reproduce_force_and_cross_covariance():
    """Draw ε at R⁰ and R⁰ ± τ e_ja from the GP, differentiate numerically, compare the sample
    covariance of (ε, −∇ε) with the predicted one element by element (within 4.5 standard errors)."""
    pos = _positions()
    a2, minv, d, amp, h = _model(pos)
    pts, w = _stencil(N_ATOMS, 3e-3)
    k = _kernel(pos, pts, minv).numpy()
    lam, vec = np.linalg.eigh(k)
    root = vec * np.sqrt(np.clip(lam, 0.0, None))
    rng = np.random.default_rng(1234)
    n_samples = 200_000
    eps = root @ rng.standard_normal((k.shape[0], n_samples))
    y = w.numpy() @ eps  # (1+3N, S): energy noise and FD forces
    emp = np.cov(y)
    pred = en.joint_covariance_dense(a2, d, amp, h).numpy()
    se = np.sqrt((np.outer(np.diag(pred), np.diag(pred)) + pred**2) / n_samples)
    z = np.abs(emp - pred) / se
    assert z.max() < 4.5, f"max deviation {z.max():.1f} standard errors"
    # the test has power: the energy–force cross-covariance is clearly non-zero and resolved
    cross = pred[0, 1:]
    assert np.abs(cross / se[0, 1:]).max() > 20
    # per-atom blocks and cross-atom blocks from the public functions agree with the dense matrix
    fcov = en.force_covariance(d, h)
    j, kk = torch.tensor([0, 0, 1, 2]), torch.tensor([0, 1, 2, 2])
    blocks = en.force_cross_covariance(d, h, j, kk)
    for b, (jj, k2) in enumerate(zip(j.tolist(), kk.tolist())):
        ref = torch.as_tensor(pred[1 + 3 * jj : 4 + 3 * jj, 1 + 3 * k2 : 4 + 3 * k2])
        assert torch.allclose(blocks[b], ref, atol=1e-12)
    for jj in range(N_ATOMS):
        assert torch.allclose(fcov[jj], torch.as_tensor(pred[1 + 3 * jj : 4 + 3 * jj, 1 + 3 * jj : 4 + 3 * jj]))
    batch = torch.zeros(N_ATOMS, dtype=torch.long)
    assert math.isclose(float(en.energy_variance(a2, batch, 1, amp)), pred[0, 0], rel_tol=1e-12)
    assert np.allclose(en.energy_force_covariance(amp, h, batch).numpy().reshape(-1), cross)


def test_cross_covariance_is_minus_half_gradient_of_energy_variance():
    pos = _positions().requires_grad_(True)
    var = _amplitude(pos) ** 2 + LOCAL_VAR.sum()
    (gvar,) = torch.autograd.grad(var, pos)
    _, _, _, amp, h = _model(pos.detach())
    assert torch.allclose(en.energy_force_covariance(amp, h, torch.zeros(N_ATOMS, dtype=torch.long)), -0.5 * gvar)


def _rotation(seed):
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64, generator=g))
    q = q * torch.sign(torch.diagonal(r))
    return q if torch.det(q) > 0 else -q


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rotation_rotates_force_covariance_and_keeps_energy_variance(seed):
    rot = _rotation(seed)
    pos = _positions()
    a2, minv, d, amp, h = _model(pos)
    a2r, minvr, dr, ampr, hr = _model(pos @ rot.T + torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64))
    batch = torch.zeros(N_ATOMS, dtype=torch.long)
    assert torch.allclose(minvr, rot @ minv @ rot.T, atol=1e-12)
    assert torch.allclose(en.force_covariance(dr, hr), rot @ en.force_covariance(d, h) @ rot.T, atol=1e-12)
    assert torch.allclose(en.energy_variance(a2r, batch, 1, ampr), en.energy_variance(a2, batch, 1, amp), rtol=1e-12)
    assert torch.allclose(en.energy_force_covariance(ampr, hr, batch), en.energy_force_covariance(amp, h, batch) @ rot.T)
    u, ur = en.force_covariance(d, h), en.force_covariance(dr, hr)
    assert torch.allclose(en.energy_uncertainty_from_forces(ur, batch, 1), en.energy_uncertainty_from_forces(u, batch, 1))
    # the shared part carries zero net force (A is translation invariant)
    assert torch.allclose(h.sum(0), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    # the joint likelihood is invariant when the residuals rotate with the structure
    g = torch.Generator().manual_seed(seed)
    re, rf = torch.randn(1, dtype=torch.float64, generator=g), torch.randn(N_ATOMS, 3, dtype=torch.float64, generator=g)
    nll = en.coherent_nll(re, rf, a2, d, batch, amp, h)
    nllr = en.coherent_nll(re, rf @ rot.T, a2r, dr, batch, ampr, hr)
    assert torch.allclose(nll, nllr, rtol=1e-10)


def test_metric_from_e2ip_head_sigma0_rotates(f64):
    from e2ip_plugins import EvidentialHead

    torch.manual_seed(0)
    irreps = o3.Irreps("8x0e+8x1o")
    head = EvidentialHead(irreps, force_rms=1.3, num_channels=8)
    torch.nn.init.normal_(head.mlp.net[-1].weight, std=0.7)
    x = torch.randn(5, irreps.dim)
    rot = o3.rand_matrix()
    ell = torch.tensor(0.2)
    minv = en.metric_inverse_from_shape(head(x)["sigma0"], ell)
    minvr = en.metric_inverse_from_shape(head(x @ irreps.D_from_matrix(rot).T)["sigma0"], ell)
    assert torch.allclose(minvr, rot @ minv @ rot.T, atol=1e-10)
    assert torch.allclose(torch.diagonal(minv, dim1=-2, dim2=-1).sum(-1) / 3, 1 / ell**2 * torch.ones(5))


def _random_batch(dtype=torch.float64, seed=0, shared=True):
    g = torch.Generator().manual_seed(seed)
    counts = [1, 2, 4]
    batch = torch.cat([torch.full((c,), s, dtype=torch.long) for s, c in enumerate(counts)])
    n = len(batch)
    b = torch.randn(n, 3, 3, dtype=torch.float64, generator=g)
    d = 0.05 * (b @ b.transpose(-1, -2) + 0.5 * torch.eye(3, dtype=torch.float64))
    a2 = 0.01 + 0.05 * torch.rand(n, dtype=torch.float64, generator=g)
    amp = 0.3 * torch.randn(3, dtype=torch.float64, generator=g)
    h = 0.2 * torch.randn(n, 3, dtype=torch.float64, generator=g)
    re = 0.3 * torch.randn(3, dtype=torch.float64, generator=g)
    rf = 0.3 * torch.randn(n, 3, dtype=torch.float64, generator=g)
    out = [re, rf, a2, d, batch] + ([amp, h] if shared else [None, None])
    return [t.to(dtype) if t is not None and t.is_floating_point() else t for t in out], counts


@pytest.mark.parametrize("shared", [True, False])
def test_nll_equals_scipy_multivariate_normal(shared):
    (re, rf, a2, d, batch, amp, h), counts = _random_batch(shared=shared)
    nll = en.coherent_nll(re, rf, a2, d, batch, amp, h, var_floor=0.0)
    for s in range(len(counts)):
        m = batch == s
        cov = en.joint_covariance_dense(a2[m], d[m], amp[s] if shared else None, h[m] if shared else None)
        r = torch.cat([re[s : s + 1], rf[m].reshape(-1)])
        ref = -multivariate_normal(mean=np.zeros(len(r)), cov=cov.numpy()).logpdf(r.numpy())
        assert math.isclose(float(nll[s]), ref, rel_tol=1e-10, abs_tol=1e-10)


def test_nll_float32_close_to_float64():
    args64, _ = _random_batch(torch.float64)
    args32, _ = _random_batch(torch.float32)
    n64, n32 = en.coherent_nll(*args64), en.coherent_nll(*args32)
    assert n32.dtype == torch.float32
    assert torch.allclose(n32.double(), n64, rtol=1e-4, atol=1e-4)


def test_nll_gradcheck():
    (re, rf, a2, d, batch, amp, h), _ = _random_batch(seed=3)
    chol_d = torch.linalg.cholesky(d)

    def fn(re, rf, log_a2, ld, amp, h):
        dd = ld @ ld.transpose(-1, -2) + 1e-3 * torch.eye(3, dtype=ld.dtype)  # SPD for any perturbation
        return en.coherent_nll(re, rf, log_a2.exp(), dd, batch, amp, h)

    inputs = [t.clone().requires_grad_(True) for t in (re, rf, a2.log(), chol_d, amp, h)]
    assert torch.autograd.gradcheck(fn, inputs)


def test_gradients_flow_through_amplitude_gradient():
    """Training: A(R; w) → h = ∂A/∂R (create_graph) → NLL → ∂/∂w, checked by gradcheck (2nd order)."""
    pos = _positions()
    batch = torch.zeros(N_ATOMS, dtype=torch.long)
    a2, _, d, _, _ = _model(pos)
    g = torch.Generator().manual_seed(5)
    re, rf = torch.randn(1, dtype=torch.float64, generator=g), torch.randn(N_ATOMS, 3, dtype=torch.float64, generator=g)

    def fn(w):
        p = pos.clone().requires_grad_(True)
        amp = _amplitude(p, w).reshape(1)
        h = en.amplitude_gradient(amp, p, create_graph=True)
        return en.coherent_nll(re, rf, a2, d, batch, amp, h)

    w = torch.tensor([0.4, 0.7], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fn, (w,))


def test_approximation_is_the_local_model():
    """energy_uncertainty_from_forces = the local GP with D_i = U_i and trace-normalised metric ℓ."""
    (_, _, _, u, batch, _, _), _ = _random_batch()
    ell = 0.25
    a2 = en.local_energy_variance(u, torch.tensor(ell, dtype=torch.float64))
    d = en.local_force_covariance(a2, en.metric_inverse_from_shape(u, torch.tensor(ell, dtype=torch.float64)))
    assert torch.allclose(d, u, atol=1e-12)
    sig = en.energy_uncertainty_from_forces(u, batch, 3, ell)
    assert torch.allclose(sig**2, en.energy_variance(a2, batch, 3))
    assert torch.allclose(sig**2, ell**2 * en.segment_sum(torch.diagonal(u, dim1=-2, dim2=-1).sum(-1) / 3, batch, 3))


def test_committee():
    g = torch.Generator().manual_seed(7)
    k, batch = 4, torch.tensor([0, 0, 1, 1, 1])
    e = torch.randn(k, 2, dtype=torch.float64, generator=g)
    f = torch.randn(k, 5, 3, dtype=torch.float64, generator=g)
    var = torch.rand(k, 2, dtype=torch.float64, generator=g)
    cross = torch.randn(k, 5, 3, dtype=torch.float64, generator=g)
    mean, tot, epi, ale = en.committee_energy(e, var)
    assert torch.allclose(epi, torch.from_numpy(np.var(e.numpy(), axis=0, ddof=1)))
    assert torch.allclose(tot, epi + var.mean(0)) and torch.allclose(mean, e.mean(0)) and torch.allclose(ale, var.mean(0))
    c = en.committee_energy_force_covariance(e, f, batch, cross)
    for j, s in enumerate(batch.tolist()):
        for a in range(3):
            ref = np.cov(e[:, s].numpy(), f[:, j, a].numpy())[0, 1] + cross[:, j, a].mean().item()
            assert math.isclose(float(c[j, a]), ref, rel_tol=1e-10, abs_tol=1e-12)
    with pytest.raises(ValueError):
        en.committee_energy(e[:1])


def test_fit_scale_and_energy_metrics():
    rng = np.random.default_rng(0)
    sigma = rng.uniform(0.01, 0.1, 20_000)
    r = rng.standard_normal(20_000) * sigma * math.sqrt(2.5)
    c = en.fit_variance_scale(torch.from_numpy(r), torch.from_numpy(sigma**2))
    assert abs(c - 2.5) < 0.1
    m = en.energy_uq_metrics(r, sigma * math.sqrt(c))
    assert abs(m["energy_coverage_90"] - 0.9) < 0.01 and abs(m["energy_coverage_50"] - 0.5) < 0.015
    assert m["energy_spearman"] > 0.3 and m["energy_auroc"] > 0.7


def test_torchscript():
    fns = [
        en.coherent_nll, en.energy_variance, en.force_covariance, en.force_cross_covariance,
        en.energy_force_covariance, en.energy_uncertainty_from_forces, en.metric_inverse_from_shape,
        en.local_energy_variance, en.local_force_covariance, en.amplitude_gradient, en.committee_energy,
        en.committee_energy_force_covariance, en.segment_sum,
    ]
    scripted = {f.__name__: torch.jit.script(f) for f in fns}
    args, _ = _random_batch()
    assert torch.allclose(scripted["coherent_nll"](*args, 1e-12), en.coherent_nll(*args))
    assert torch.allclose(
        scripted["energy_uncertainty_from_forces"](args[3], args[4], 3, 0.2),
        en.energy_uncertainty_from_forces(args[3], args[4], 3, 0.2),
    )
