"""Scriptable head-output → covariance maps, for deployed models (DESIGN §3).

The predictive classes in :mod:`e2ip_plugins.predictive` are dataclasses (with
scipy-based PIT) and cannot live inside a TorchScript / ``torch.export`` graph.
The covariances, however, depend only on the head outputs, so a model can emit
them from one forward pass with these pure-torch functions. They are the same
formulas as the predictive classes (tested equal in ``tests/core`` and
``tests/nequip``):

e²IP (NIW, d = 3):   U_ale = ν Σ₀ / (ν − d − 1),   U_epi = U_ale / κ,   U_tot = U_ale + U_epi.

eIP (per component, quantile q):  z = β/(α−1),  Ω = 4β(1 + ωνz),  df = 2α,
    scale² = Ω/(2να),  U_tot = diag(scale²·df/(df−2)),  U_epi = diag(β/(ν(α−1))),
    U_ale = U_tot − U_epi.

u_i = sqrt(tr U_epi / 3) (DESIGN §2.5).
"""

from __future__ import annotations

from typing import Tuple

import torch


def niw_covariances(
    nu: torch.Tensor, kappa: torch.Tensor, sigma0: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_tot, U_epi, U_ale), each (N, 3, 3), from ν (N,), κ (N,), Σ₀ (N, 3, 3)."""
    ale = (nu / (nu - 4.0)).unsqueeze(-1).unsqueeze(-1) * sigma0
    epi = ale / kappa.unsqueeze(-1).unsqueeze(-1)
    return ale + epi, epi, ale


def eip_student_t(
    nu: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, q: float = 0.5
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-component Student-t implied by seed 002 eq. 8: (τz, df, scale², Var[μ]), each (N, 3).

    τ = (1−2q)/(q(1−q)), ω = 2/(q(1−q)), z = β/(α−1), Ω = 4β(1 + ωνz):
    location γ + τz, df 2α, scale² Ω/(2να), Var[μ] = β/(ν(α−1)) (eq. 5)."""
    tau = (1.0 - 2.0 * q) / (q * (1.0 - q))
    omega = 2.0 / (q * (1.0 - q))
    z = beta / (alpha - 1.0)
    big_omega = 4.0 * beta * (1.0 + omega * nu * z)
    return tau * z, 2.0 * alpha, big_omega / (2.0 * nu * alpha), beta / (nu * (alpha - 1.0))


def eip_covariances(
    nu: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor, q: float = 0.5
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U_tot, U_epi, U_ale), each (N, 3, 3) and diagonal in the lab frame, from (N, 3) ν, α, β."""
    _, df, scale2, var_epi = eip_student_t(nu, alpha, beta, q)
    tot = torch.diag_embed(scale2 * df / (df - 2.0))
    epi = torch.diag_embed(var_epi)
    return tot, epi, tot - epi


def covariance_uncertainty(cov_epistemic: torch.Tensor) -> torch.Tensor:
    """u_i = sqrt(tr U_epi,i / 3), (N,)."""
    return torch.sqrt(torch.diagonal(cov_epistemic, dim1=-2, dim2=-1).sum(-1) / 3.0)
