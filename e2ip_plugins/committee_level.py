"""The deployed epistemic level of an in-model force committee (issue 26): one global scale, fitted on validation.

With the members' direct forces F_k,i (k = 1..M) and the head's aleatoric covariance U_ale,i:

    Ĉ_i     = 1/(M−1) Σ_k (F_k,i − F̄_i)(F_k,i − F̄_i)ᵀ            the members' sample covariance
    U_epi,i = c · (tr Ĉ_i / 3) · I                               isotropic: a 3×3 sample covariance of M = 4–8
                                                                 members is near singular, and with it the
                                                                 one-scale fit is degenerate (docs/committee.md)
    U_tot,i = U_ale,i + U_epi,i,   u_i = sqrt(tr U_epi,i / 3) = sqrt(c · tr Ĉ_i / 3)

The forces stay the backbone's conservative γ = −∂E/∂r. ``c`` is fitted once on validation data
(:func:`fit_committee_scale`):

    ĉ = argmin_c  mean_i −log N(y_i; γ_i, U_ale,i + c · (tr Ĉ_i / 3) · I)          (1-D Brent search in log c)

and stored in :class:`CommitteeLevel`'s buffer, so every output path of the model applies it. The deployed
predictive (metrics, plots, the demo's table) is then N(γ, U_tot) (:func:`committee_predictive`).
"""

from __future__ import annotations

import math
from typing import Tuple

import torch
from scipy.optimize import minimize_scalar

from .level import _gather_columns
from .predictive import GaussianPredictive


def committee_variance(member_forces: torch.Tensor) -> torch.Tensor:
    """(N, M, 3) → tr Ĉ_i / 3 = Σ_k ‖F_k,i − F̄_i‖² / (3(M−1)), (N,): the members' mean per-component sample
    variance (TorchScript-able; equals the trace of :func:`~e2ip_plugins.force_committee.committee_covariance`)."""
    centred = member_forces - member_forces.mean(dim=1, keepdim=True)
    return (centred * centred).sum(dim=(1, 2)) / (3.0 * (member_forces.shape[1] - 1))


class CommitteeLevel(torch.nn.Module):
    """(member forces (N, M, 3), U_ale (N, 3, 3)) → (U_tot, U_epi) of the module docstring with the stored c."""

    def __init__(self):
        super().__init__()
        self.register_buffer("committee_scale", torch.ones(()))
        self.register_buffer("committee_scale_fitted", torch.zeros((), dtype=torch.bool))

    def forward(self, member_forces: torch.Tensor, cov_ale: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        var = self.committee_scale.to(member_forces.dtype) * committee_variance(member_forces)
        eye = torch.eye(3, dtype=cov_ale.dtype, device=cov_ale.device)
        epi = var.to(cov_ale.dtype).reshape(-1, 1, 1) * eye
        return cov_ale + epi, epi

    def set_scale(self, c: float) -> None:
        if not (math.isfinite(c) and c > 0):
            raise ValueError(f"the committee's scale must be finite and > 0, got {c}")
        self.committee_scale.fill_(float(c))
        self.committee_scale_fitted.fill_(True)


def committee_predictive(forces: torch.Tensor, cov_epistemic: torch.Tensor,
                         cov_aleatoric: torch.Tensor) -> GaussianPredictive:
    """The deployed predictive of a model with a committee level: N(γ, U_ale + U_epi), the form c is fitted in."""
    dtype = forces.dtype
    return GaussianPredictive(mean=forces, cov_epistemic=cov_epistemic.to(dtype), cov_aleatoric=cov_aleatoric.to(dtype))


def fit_committee_scale(gamma: torch.Tensor, y: torch.Tensor, cov_ale: torch.Tensor, member_forces: torch.Tensor,
                        log_bounds: tuple = (-20.0, 20.0)) -> float:
    """ĉ of the module docstring on validation atoms (γ, y (N, 3), U_ale (N, 3, 3), members (N, M, 3)); under
    ``torch.distributed`` the atoms of all ranks are gathered first, so every rank stores the same c."""
    with torch.no_grad():
        cols = _gather_columns({"gamma": gamma.double(), "y": y.double(), "ale": cov_ale.double(),
                                "members": member_forces.double()})  # every DDP rank fits on all ranks' atoms
        gamma, y, ale, member_forces = (cols[k] for k in ("gamma", "y", "ale", "members"))
        iso = committee_variance(member_forces).reshape(-1, 1, 1) * torch.eye(3, dtype=torch.float64)
        for name, t in (("forces", gamma), ("reference forces", y), ("U_ale", ale), ("committee spread", iso)):
            if not torch.isfinite(t).all():
                raise ValueError(f"fitting the committee's scale: the validation {name} hold NaN/Inf")

        def objective(logc: float) -> float:
            return float(GaussianPredictive(mean=gamma, cov_epistemic=math.exp(logc) * iso, cov_aleatoric=ale).nll(y).mean())

        res = minimize_scalar(objective, bounds=log_bounds, method="bounded", options={"xatol": 1e-8})
    return float(math.exp(res.x))
