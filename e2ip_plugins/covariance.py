"""Equivariant SPD covariance from an invariant scalar and an ``2e`` tensor.

For each atom, a ``0e`` scalar s and a ``2e`` 5-vector t define the symmetric matrix

    S = s I + T(t),            T(t) traceless symmetric (e3nn ``CartesianTensor("ij=ji")``)

which is damped equivariantly (s and the Frobenius norm of T are soft-clamped) and
exponentiated:

    Σ₀ = σ_F² expm(S̃),   log|Σ₀| = tr S̃ + 2d log σ_F,   Σ₀⁻¹ = expm(−S̃) / σ_F².

expm of a symmetric matrix is SPD and expm(R S Rᵀ) = R expm(S) Rᵀ, so Σ₀ rotates
with the structure. The (0e, 2e) → 3×3 basis is read off the installed e3nn at
construction time (conventions differ between e3nn versions), never hard-coded.
"""

from __future__ import annotations

from typing import Tuple

import torch

from ._e3nn import CartesianTensor, o3


def symmetric_basis() -> Tuple[torch.Tensor, torch.Tensor]:
    """Return ``(iso, traceless)``: the isotropic 3×3 matrix I and the (5, 3, 3)
    traceless basis such that ``S = s·I + einsum('k,kij->ij', t, traceless)``.

    Built from the installed e3nn's ``CartesianTensor("ij=ji")``; the ``0e``
    component is rescaled so that it multiplies the identity with weight one.
    """
    ct = CartesianTensor("ij=ji")
    irreps = [(mul, (ir.l, ir.p)) for mul, ir in o3.Irreps(ct)]
    if irreps != [(1, (0, 1)), (1, (2, 1))]:
        raise RuntimeError(f"unexpected CartesianTensor('ij=ji') irreps {o3.Irreps(ct)}")
    eye6 = torch.eye(6, dtype=torch.float64)
    mats = ct.to_cartesian(eye6)  # (6, 3, 3)
    iso = mats[0]
    c = iso.trace() / 3.0
    if not torch.allclose(iso, c * torch.eye(3, dtype=torch.float64), atol=1e-12):
        raise RuntimeError("e3nn CartesianTensor 0e component is not isotropic")
    return torch.eye(3, dtype=torch.float64), mats[1:].contiguous()


def soft_clamp(x: torch.Tensor, tau: float, cap: float) -> torch.Tensor:
    """Identity for |x| ≤ τ, saturating smoothly (C¹) to ±cap:
    f(x) = sign(x)·(τ + (cap−τ)·tanh((|x|−τ)/(cap−τ))) for |x| > τ."""
    ax = x.abs()
    width = cap - tau
    over = tau + width * torch.tanh((ax - tau).clamp(min=0.0) / width)
    return torch.where(ax <= tau, x, torch.sign(x) * over)


class SymmetricMatrixExp(torch.nn.Module):
    """(s, t) → (Σ₀, Σ₀⁻¹, log|Σ₀|) with Σ₀ = σ_F² expm(s̃ I + T̃).

    s̃ = soft_clamp(s; τ_s, c_s); T̃ = T · soft_clamp(‖T‖_F; τ_t, c_t)/‖T‖_F.
    The anisotropy cap c_t bounds the condition number of Σ₀ by exp(√2·c_t),
    so Σ₀ stays numerically SPD in float32 for any input.
    """

    def __init__(
        self,
        force_rms: float = 1.0,
        iso_tau: float = 6.0,
        iso_cap: float = 12.0,
        aniso_tau: float = 2.0,
        aniso_cap: float = 4.0,
    ):
        super().__init__()
        if not (0 < iso_tau < iso_cap and 0 < aniso_tau < aniso_cap):
            raise ValueError("damping needs 0 < tau < cap for both iso and aniso parts")
        if not force_rms > 0:
            raise ValueError(f"force_rms must be > 0, got {force_rms}")
        _, traceless = symmetric_basis()
        self.register_buffer("traceless_basis", traceless.to(torch.get_default_dtype()), persistent=False)
        self.register_buffer("sigma_f", torch.tensor(float(force_rms)))
        self.iso_tau, self.iso_cap = float(iso_tau), float(iso_cap)
        self.aniso_tau, self.aniso_cap = float(aniso_tau), float(aniso_cap)

    def forward(self, s: torch.Tensor, t: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """s: (N,) scalar; t: (N, 5) ``2e`` vector. Returns Σ₀ (N,3,3), Σ₀⁻¹ (N,3,3), log|Σ₀| (N,)."""
        basis = self.traceless_basis.to(t.dtype)
        tmat = torch.einsum("nk,kij->nij", t, basis)
        norm = torch.sqrt((tmat * tmat).sum(dim=(-1, -2)) + 1e-30)
        factor = soft_clamp(norm, self.aniso_tau, self.aniso_cap) / norm
        tmat = tmat * factor[:, None, None]
        s_d = soft_clamp(s, self.iso_tau, self.iso_cap)
        both = torch.matrix_exp(torch.stack([tmat, -tmat], dim=0))
        fs2 = self.sigma_f.to(s.dtype) ** 2
        sigma0 = both[0] * (fs2 * torch.exp(s_d))[:, None, None]
        sigma0_inv = both[1] * (torch.exp(-s_d) / fs2)[:, None, None]
        sigma0 = 0.5 * (sigma0 + sigma0.transpose(-1, -2))
        sigma0_inv = 0.5 * (sigma0_inv + sigma0_inv.transpose(-1, -2))
        logdet = 3.0 * s_d + 3.0 * torch.log(fs2)
        return sigma0, sigma0_inv, logdet
