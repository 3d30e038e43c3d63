"""Equivariance, SPD-ness, damping and configuration errors of the e²IP head."""

import subprocess
import sys

import pytest
import torch

from e2ip_plugins import EvidentialHead, SymmetricMatrixExp, soft_clamp, symmetric_basis
from e2ip_plugins._e3nn import o3

LAYOUTS = [
    "8x0e+8x1o",  # l_max = 1 backbone: no 2e input, 2e comes from 1o ⊗ 1o
    "16x0e+8x1o+4x2e",
    "8x0e+4x1o+4x1e+4x2e+2x3o",
    "4x1o",
    "4x2e",
]


def _randomised_head(irreps, seed=0):
    torch.manual_seed(seed)
    head = EvidentialHead(irreps, force_rms=1.7, num_channels=8)
    torch.nn.init.normal_(head.mlp.net[-1].weight, std=0.7)  # zero-initialised otherwise
    return head


def test_e3nn_conventions_pinned(f64):
    """The core relies on: 1o components are Cartesian (x, y, z), and CartesianTensor('ij=ji')
    maps 0e+2e to symmetric 3x3 equivariantly. Fails loudly if an e3nn release moves this."""
    R = o3.rand_matrix()
    assert torch.allclose(o3.Irreps("1o").D_from_matrix(R), R, atol=1e-12)
    iso, basis = symmetric_basis()
    assert torch.allclose(iso, torch.eye(3, dtype=torch.float64))
    assert torch.allclose(basis, basis.transpose(-1, -2))
    assert torch.allclose(torch.diagonal(basis, dim1=-2, dim2=-1).sum(-1), torch.zeros(5), atol=1e-12)
    t = torch.randn(5)
    d2 = o3.Irreps("2e").D_from_matrix(R)
    lhs = torch.einsum("k,kij->ij", d2 @ t, basis)
    rhs = R @ torch.einsum("k,kij->ij", t, basis) @ R.T
    assert torch.allclose(lhs, rhs, atol=1e-12)


@pytest.mark.parametrize("irreps", LAYOUTS)
def test_covariance_rotates(irreps, f64):
    head = _randomised_head(irreps)
    ir = o3.Irreps(irreps)
    x = torch.randn(11, ir.dim)
    out = head(x)
    for _ in range(3):
        R = o3.rand_matrix()
        rot = head(x @ ir.D_from_matrix(R).T)
        expected = R @ out["sigma0"] @ R.T
        rel = (rot["sigma0"] - expected).norm() / expected.norm()
        assert rel < 1e-10, f"{irreps}: Σ(Rx) != R Σ(x) Rᵀ (rel {rel:.2e})"
        assert torch.allclose(rot["nu"], out["nu"], rtol=1e-10)
        assert torch.allclose(rot["kappa"], out["kappa"], rtol=1e-10)
    # the anisotropic part is really used (not a trivially isotropic Σ)
    evals = torch.linalg.eigvalsh(out["sigma0"])
    assert (evals[:, -1] / evals[:, 0]).max() > 1.01


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("amplitude", [1.0, 1e2, 1e4])
def test_spd_and_finite_for_large_inputs(dtype, amplitude):
    head = _randomised_head("8x0e+8x1o+4x2e").to(dtype)
    x = amplitude * torch.randn(64, o3.Irreps("8x0e+8x1o+4x2e").dim, dtype=dtype)
    out = head(x)
    for k in ("nu", "kappa", "sigma0", "sigma0_inv", "sigma0_logdet"):
        assert torch.isfinite(out[k]).all(), k
    assert (torch.linalg.eigvalsh(out["sigma0"]) > 0).all()
    assert (out["nu"] > 4).all() and (out["kappa"] > 0).all()


def test_inverse_and_logdet_consistent(f64):
    m = SymmetricMatrixExp(force_rms=0.8)
    s, t = 3 * torch.randn(20), 2 * torch.randn(20, 5)
    sig, inv, logdet = m(s, t)
    assert torch.allclose(sig @ inv, torch.eye(3).expand(20, 3, 3), atol=1e-9)
    assert torch.allclose(logdet, torch.logdet(sig), atol=1e-9)


def test_soft_clamp():
    x = torch.linspace(-50, 50, 2001, dtype=torch.float64)
    y = soft_clamp(x, 2.0, 5.0)
    inside = x.abs() <= 2.0
    assert torch.equal(y[inside], x[inside])
    assert (y.abs() < 5.0).all() and (torch.diff(y) >= 0).all()  # bounded, monotone


@pytest.mark.parametrize("irreps", ["16x0e", "8x0e+4x0o", "4x3o+8x0e"])
def test_head_without_l_gt_0_features_fails_clearly(irreps):
    with pytest.raises(ValueError, match=r"l > 0.*l_max"):
        EvidentialHead(irreps)


def test_head_scripts_and_matches_eager(f64):
    head = _randomised_head("8x0e+8x1o")
    x = torch.randn(5, o3.Irreps("8x0e+8x1o").dim)
    scripted = torch.jit.script(head)
    eager, sc = head(x), scripted(x)
    for k in eager:
        assert torch.allclose(eager[k], sc[k], atol=1e-12), k


def test_parameter_names_safe_for_mace():
    """MACE slices state dicts by these substrings; the head must not collide."""
    head = EvidentialHead("8x0e+8x1o")
    for name in list(dict(head.named_parameters())) + list(dict(head.named_buffers())):
        for bad in ("scale", "shift", "readouts", "atomic_energies"):
            assert bad not in name, name


def test_core_import_is_light():
    code = "import sys, e2ip_plugins; bad=[m for m in ('mace','nequip','wandb') if m in sys.modules]; print(bad); assert not bad"
    subprocess.run([sys.executable, "-c", code], check=True)
