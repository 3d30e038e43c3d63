"""Energy-noise head (issue 15, e2ip_plugins.energy_noise_head): the training term against scipy's
multivariate normal, what it trains (ℓ_i, c_i only), h = ∂A/∂R against finite differences, the deployed
σ_E formula (and that it reduces to the §4 approximation), TorchScript."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from e2ip_plugins.energy_noise_head import (
    INIT_AMPLITUDE,
    EnergyNoiseHead,
    NoEnergyNoiseHead,
    coherent_head_loss,
    head_energy_variance,
    shared_amplitude_gradient,
)
from e2ip_plugins.energy_uq import EnergyUncertainty


def _spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 3, 3, generator=g, dtype=torch.float64)
    return a @ a.transpose(-1, -2) * 0.05 + 0.01 * torch.eye(3, dtype=torch.float64)


def _case(seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = torch.tensor([0, 0, 0, 1, 1])
    n, s = 5, 2
    return dict(
        energy_residual=torch.randn(s, generator=g, dtype=torch.float64),
        force_residual=0.3 * torch.randn(n, 3, generator=g, dtype=torch.float64),
        force_cov_ale=_spd(n, seed + 1),
        length=(0.5 + torch.rand(n, generator=g, dtype=torch.float64)).requires_grad_(True),
        amplitude_atom=(0.2 * torch.randn(n, generator=g, dtype=torch.float64)).requires_grad_(True),
        batch=batch, num_structures=s,
        amplitude_grad=0.2 * torch.randn(n, 3, generator=g, dtype=torch.float64),
    )


def test_loss_equals_scipy_joint_normal_per_dimension():
    """Per structure: −log N((r_E, r_F); 0, B + v vᵀ) / (1 + 3N), B = blockdiag(Σ ℓ_i² tr D_i/3, D_1..D_N),
    v = (A, −h), A = Σ c_i — assembled densely and scored by scipy."""
    c = _case()
    got = coherent_head_loss(**c, jitter=0.0).detach().numpy()
    for s in range(2):
        idx = (c["batch"] == s).nonzero().reshape(-1)
        d = c["force_cov_ale"][idx]
        ell = c["length"].detach()[idx]
        local = float((ell ** 2 * torch.diagonal(d, dim1=-2, dim2=-1).sum(-1) / 3).sum())
        amp = float(c["amplitude_atom"].detach()[idx].sum())
        cov = torch.block_diag(torch.tensor([[local]], dtype=torch.float64), *d.unbind(0)).numpy()
        v = np.concatenate([[amp], -c["amplitude_grad"][idx].reshape(-1).numpy()])
        cov = cov + np.outer(v, v)
        r = np.concatenate([[float(c["energy_residual"][s])], c["force_residual"][idx].reshape(-1).numpy()])
        want = -multivariate_normal(mean=np.zeros(len(r)), cov=cov).logpdf(r) / len(r)
        assert got[s] == pytest.approx(want, rel=1e-10)


def test_loss_trains_lengths_and_amplitudes_only():
    """Residuals and U_ale are detached (the mean and the force head keep their own losses)."""
    c = _case(3)
    for k in ("energy_residual", "force_residual", "force_cov_ale"):
        c[k] = c[k].clone().requires_grad_(True)
    c["amplitude_grad"] = c["amplitude_grad"].clone().requires_grad_(True)
    coherent_head_loss(**c).sum().backward()
    for k in ("energy_residual", "force_residual", "force_cov_ale"):
        assert c[k].grad is None, k
    for k in ("length", "amplitude_atom", "amplitude_grad"):
        assert c[k].grad is not None and c[k].grad.abs().sum() > 0, k


def test_lengths_fit_energy_residual_scale():
    """Gradient descent on the term alone drives Var r_E = Σ a_i² + A² towards the residual's square:
    a structure whose energy residual is 10× larger ends with a larger predicted energy variance."""
    c = _case(5)
    c["energy_residual"] = torch.tensor([0.05, 0.5], dtype=torch.float64)
    c["amplitude_grad"] = None
    log_len = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    amp = torch.full((5,), 0.01, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([log_len, amp], lr=0.05)
    for _ in range(400):
        opt.zero_grad()
        args = dict(c, length=log_len.exp(), amplitude_atom=amp)
        coherent_head_loss(**args).sum().backward()
        opt.step()
    var = head_energy_variance(c["force_cov_ale"], log_len.exp().detach(), amp.detach(), c["batch"], 2)
    assert var[1] > 10 * var[0]
    assert math.sqrt(float(var[1])) == pytest.approx(0.5, rel=0.2)


def _invariants(pos, widths):  # rotation-invariant per-atom features: sums of Gaussians of the distances
    d = torch.cdist(pos, pos)
    return torch.stack([torch.exp(-d ** 2 / w).sum(-1) for w in widths], -1)


@pytest.mark.parametrize("detach", [True, False])
def test_shared_amplitude_gradient_matches_finite_differences(detach):
    head = EnergyNoiseHead(3, hidden=6, detach_features=detach).double()
    with torch.no_grad():
        head.lin2.weight.normal_()
    widths = (0.5, 1.0, 2.0)
    pos = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.1, 0.0], [0.2, 1.1, 0.3]], dtype=torch.float64, requires_grad=True)
    batch = torch.zeros(3, dtype=torch.long)
    x = _invariants(pos, widths)
    h = head.amplitude_grad(x, head(x)[1], pos, batch, 1)
    eps = 1e-6
    fd = torch.zeros(3, 3, dtype=torch.float64)
    for i in range(3):
        for a in range(3):
            dp = torch.zeros(3, 3, dtype=torch.float64)
            dp[i, a] = eps
            with torch.no_grad():
                fd[i, a] = (head(_invariants(pos + dp, widths))[1].sum()
                            - head(_invariants(pos - dp, widths))[1].sum()) / (2 * eps)
    torch.testing.assert_close(h.detach(), fd, rtol=1e-6, atol=1e-9)
    assert h.requires_grad is (not detach)  # detached: data for the loss; else kept in the graph


@pytest.mark.parametrize("detach", [True, False])
def test_detached_head_term_leaves_the_backbone(detach):
    """With detach_features the coherent term's gradient reaches the head's weights but no backbone weight."""
    torch.manual_seed(0)
    head = EnergyNoiseHead(3, hidden=6, detach_features=detach).double()
    with torch.no_grad():
        head.lin2.weight.normal_()
    widths = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64, requires_grad=True)  # a "backbone" weight
    pos = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    batch = torch.zeros(5, dtype=torch.long)
    d2 = ((pos[:, None] - pos[None]) ** 2).sum(-1)  # cdist has no double backward
    x = torch.stack([torch.exp(-d2 / w).sum(-1) for w in widths], -1)
    length, amp = head(x)
    h = head.amplitude_grad(x, amp, pos, batch, 1)
    d = torch.eye(3, dtype=torch.float64).expand(5, 3, 3) * 0.01
    loss = coherent_head_loss(torch.tensor([0.3], dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64) * 0.1,
                              d, length, amp, batch, 1, h).sum()
    g_w, g_head = torch.autograd.grad(loss, [widths, head.lin2.weight], allow_unused=True)
    assert g_head is not None and float(g_head.abs().max()) > 0
    if detach:
        assert g_w is None or float(g_w.abs().max()) == 0.0
    else:
        assert g_w is not None and float(g_w.abs().max()) > 0


def test_head_init_and_deployed_sigma():
    head = EnergyNoiseHead(4, hidden=5, init_length=0.7).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    ell, c = head(x)
    torch.testing.assert_close(ell, torch.full((6,), 0.7, dtype=torch.float64))
    torch.testing.assert_close(c, torch.full((6,), INIT_AMPLITUDE, dtype=torch.float64))
    cov, batch = _spd(6, 2), torch.tensor([0, 0, 0, 1, 1, 1])
    ell, amp = torch.rand(6, dtype=torch.float64) + 0.2, torch.randn(6, dtype=torch.float64)
    mod = EnergyUncertainty(length=1.0).double()
    mod.energy_noise_length[0] = 1.3
    tr = torch.diagonal(cov, dim1=-2, dim2=-1).sum(-1) / 3
    for s in range(2):
        i = batch == s
        want = 1.3 * math.sqrt(float((ell[i] ** 2 * tr[i]).sum() + amp[i].sum() ** 2))
        assert float(mod(cov, batch, 2, ell, amp)[s]) == pytest.approx(want, rel=1e-12)
    # with ℓ_i = ℓ and A = 0 it is the §4 approximation with length ℓ (factor k = 1)
    mod.energy_noise_length[0] = 1.0
    approx = EnergyUncertainty(length=0.4).double()
    torch.testing.assert_close(mod(cov, batch, 2, torch.full((6,), 0.4, dtype=torch.float64),
                                   torch.zeros(6, dtype=torch.float64)), approx(cov, batch, 2))


def test_torchscript():
    torch.jit.script(EnergyNoiseHead(4))
    torch.jit.script(NoEnergyNoiseHead())
    torch.jit.script(EnergyUncertainty())
    torch.jit.script(shared_amplitude_gradient)
    torch.jit.script(head_energy_variance)


def test_head_needs_features():
    with pytest.raises(ValueError, match="invariant features"):
        EnergyNoiseHead(0)


def test_old_pickled_head_trained_through_the_backbone(tmp_path):
    """Heads pickled before detach_features existed load with it False (how they were trained)."""
    head = EnergyNoiseHead(3, hidden=4)
    del head.detach_features
    torch.save(head, tmp_path / "old.pt")
    assert torch.load(tmp_path / "old.pt", weights_only=False).detach_features is False
    assert EnergyNoiseHead(3).detach_features is True

