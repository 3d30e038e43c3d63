"""eIP baseline (seed 002): per-Cartesian-component quantile evidential head.

For each atom i and component a ∈ {x, y, z}, (ν, α, β) come from the a-th
component of the ``1o`` features (plus the invariants) through a shared MLP:
ν = softplus + ε, α = 1 + softplus + ε, β = softplus + ε. With quantile q:

    τ = (1−2q)/(q(1−q)),  ω = 2/(q(1−q)),  z = β/(α−1),  μ = γ + τz,  Ω = 4β(1 + ωνz)
    NLL  = ½ln(π/ν) − α lnΩ + (α+½) ln(ν(y−μ)² + Ω) + lnΓ(α) − lnΓ(α+½)       (eq. 8)
    Reg  = ρ_q(y−γ)·(2ν + α + 1/β),   ρ_q(ε) = max(qε, (q−1)ε)                 (eqs. 2, 9)
    Var[μ] = β/(ν(α−1))                                                        (eq. 5)
    σ_i² = ‖(Var[μ_x], Var[μ_y], Var[μ_z])‖₂                                    (eq. 6)

eq. 8 is exactly −log of a Student-t with df 2α, location μ and scale² Ω/(2να).
The head is NOT rotation-equivariant: its covariance is diagonal in the lab frame.
"""

from __future__ import annotations

from typing import Dict, List

import torch
import torch.nn.functional as F

from ._e3nn import o3
from .head import _MLP, _count
from .head_covariance import eip_student_t
from .predictive import IndependentStudentTPredictive


def quantile_constants(q: float):
    """(τ, ω) of the asymmetric-Laplace mixture for quantile q."""
    if not 0.0 < q < 1.0:
        raise ValueError(f"quantile q must be in (0, 1), got {q}")
    return (1 - 2 * q) / (q * (1 - q)), 2 / (q * (1 - q))


class EIPHead(torch.nn.Module):
    """Node features → per-component (ν, α, β), each (N, 3)."""

    __constants__ = ['has_scalar']


    def __init__(self, irreps_in, num_channels: int = 16, mlp_hidden: int = 32, eps: float = 1e-3):
        super().__init__()
        irreps_in = o3.Irreps(irreps_in)
        vec = [n for n in ("1o", "1e") if _count(irreps_in, n) > 0]
        if not vec:
            raise ValueError(
                f"The eip head needs l = 1 node features (1o or 1e irreps), but its input irreps are "
                f"'{irreps_in}'. Use a backbone with l_max >= 1 and at least 2 interaction layers."
            )
        k = int(num_channels)
        self.has_scalar = _count(irreps_in, "0e") > 0
        mid = ([f"{k}x0e"] if self.has_scalar else []) + [f"{k}x{vec[0]}"]
        self.linear_in = o3.Linear(irreps_in, o3.Irreps("+".join(mid)))
        self.k = k
        self.n_scalar = k if self.has_scalar else 0
        self.mlp = _MLP([k + self.n_scalar, mlp_hidden, mlp_hidden, 3])
        with torch.no_grad():
            self.mlp.net[-1].bias.copy_(torch.tensor([0.5413, 0.5413, 0.5413]))
        self.eps = float(eps)

    def forward(self, features: torch.Tensor) -> Dict[str, torch.Tensor]:
        h = self.linear_in(features)
        n = h.shape[0]
        k = self.k
        vec = h[:, self.n_scalar :].reshape(n, k, 3).transpose(1, 2)  # (N, 3 components, K)
        parts: List[torch.Tensor] = [vec]
        if self.has_scalar:
            parts.append(h[:, :k].unsqueeze(1).expand(n, 3, k))
        out = self.mlp(torch.cat(parts, dim=-1))  # (N, 3, 3)
        nu = F.softplus(out[..., 0]) + self.eps
        alpha = 1.0 + F.softplus(out[..., 1]) + self.eps
        beta = F.softplus(out[..., 2]) + self.eps
        return {"eip_nu": nu, "eip_alpha": alpha, "eip_beta": beta}


def eip_nll(y, gamma, nu, alpha, beta, q: float = 0.5) -> torch.Tensor:
    """Seed 002 eq. 8, per atom and component (N, 3)."""
    tau, omega = quantile_constants(q)
    z = beta / (alpha - 1)
    mu = gamma + tau * z
    big_omega = 4 * beta * (1 + omega * nu * z)
    return (
        0.5 * torch.log(torch.pi / nu)
        - alpha * torch.log(big_omega)
        + (alpha + 0.5) * torch.log(nu * (y - mu) ** 2 + big_omega)
        + torch.lgamma(alpha)
        - torch.lgamma(alpha + 0.5)
    )


def pinball(eps: torch.Tensor, q: float) -> torch.Tensor:
    """ρ_q(ε) = max(qε, (q−1)ε) (eq. 2)."""
    return torch.maximum(q * eps, (q - 1) * eps)


def eip_regularizer(y, gamma, nu, alpha, beta, q: float = 0.5) -> torch.Tensor:
    """Seed 002 eq. 9, per atom and component (N, 3)."""
    return pinball(y - gamma, q) * (2 * nu + alpha + 1 / beta)


def eip_loss(y, gamma, head_out: Dict[str, torch.Tensor], q: float = 0.5, reg_weight: float = 0.1) -> torch.Tensor:
    """Per-atom eIP loss: mean over components of NLL + λ·Reg (seed 002 eq. 10, force part); (N,)."""
    nu, alpha, beta = head_out["eip_nu"], head_out["eip_alpha"], head_out["eip_beta"]
    per = eip_nll(y, gamma, nu, alpha, beta, q) + reg_weight * eip_regularizer(y, gamma, nu, alpha, beta, q)
    return per.mean(-1)


def eip_predictive(gamma: torch.Tensor, head_out: Dict[str, torch.Tensor], q: float = 0.5) -> IndependentStudentTPredictive:
    """The per-component Student-t implied by eq. 8: df 2α, loc μ = γ + τz, scale² Ω/(2να); Var[μ] = β/(ν(α−1))."""
    quantile_constants(q)  # validates q
    offset, df, scale2, var_epi = eip_student_t(head_out["eip_nu"], head_out["eip_alpha"], head_out["eip_beta"], q)
    return IndependentStudentTPredictive(mean=gamma + offset, df=df, scale2=scale2, var_epi=var_epi)


def eip_atom_sigma2(head_out: Dict[str, torch.Tensor]) -> torch.Tensor:
    """σ_i² of seed 002 eq. 6: the 2-norm of the per-component epistemic variances; (N,)."""
    v = head_out["eip_beta"] / (head_out["eip_nu"] * (head_out["eip_alpha"] - 1))
    return torch.linalg.vector_norm(v, dim=-1)
