"""Deep-ensemble reference (DESIGN §2.3) and per-structure uncertainty scalars (§2.5).

Ensemble of K members with forces F_k (N,3):
    γ = (1/K) Σ_k F_k,   U_epi = 1/(K−1) Σ_k (F_k − γ)(F_k − γ)ᵀ,
optionally plus a mean-variance (MVE) aleatoric covariance averaged over members.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import numpy as np

import torch

from .predictive import GaussianPredictive


def ensemble_predictive(
    member_forces: torch.Tensor, member_aleatoric: Optional[torch.Tensor] = None, jitter: float = 1e-8
) -> GaussianPredictive:
    """member_forces: (K, N, 3); member_aleatoric: (K, N, 3, 3) or None.

    ``jitter`` (eV/Å)² is added to the diagonal of U_epi so a K ≤ 3 committee still
    has an invertible covariance."""
    k = member_forces.shape[0]
    if k < 2:
        raise ValueError(f"an ensemble needs at least 2 members, got {k}")
    mean = member_forces.mean(0)
    dev = member_forces - mean
    cov = torch.einsum("kni,knj->nij", dev, dev) / (k - 1)
    cov = cov + jitter * torch.eye(3, dtype=cov.dtype, device=cov.device)
    ale = member_aleatoric.mean(0) if member_aleatoric is not None else torch.zeros_like(cov)
    return GaussianPredictive(mean=mean, cov_epistemic=cov, cov_aleatoric=ale)


def structure_uncertainty(u: torch.Tensor, batch: torch.Tensor, num_structures: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-structure mean (seed 002 eq. 7) and max (DP-GEN ``max_devi_f`` analogue) of u_i."""
    zeros = torch.zeros(num_structures, dtype=u.dtype, device=u.device)
    total = zeros.index_add(0, batch, u)
    count = zeros.index_add(0, batch, torch.ones_like(u))
    umax = zeros.scatter_reduce(0, batch, u, reduce="amax", include_self=False)
    return total / count.clamp(min=1), umax


#: per-structure keys of the calculators' results (DESIGN §3)
STRUCTURE_KEYS = ("forces_uncertainty_max", "forces_uncertainty_mean")


def structure_uncertainty_results(u) -> Dict[str, float]:
    """``{forces_uncertainty_max, forces_uncertainty_mean}`` of one structure's u_i (eV/Å)."""
    u = np.asarray(u, dtype=float).reshape(-1)
    if len(u) == 0:
        return {STRUCTURE_KEYS[0]: 0.0, STRUCTURE_KEYS[1]: 0.0}
    return {STRUCTURE_KEYS[0]: float(u.max()), STRUCTURE_KEYS[1]: float(u.mean())}
