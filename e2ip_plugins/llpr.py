"""Post hoc last-layer prediction rigidity (LLPR) for forces: the baseline a user of a trained model has.

Bigi et al. (2024) give a trained model an uncertainty from its last-layer features alone, with one
pass over the training data and one validation scale (metatrain's LLPR wrapper). With the energy
E = wᵀΦ, Φ = Σ_i φ_i the summed last-layer features (P of them), the force on atom j is
F_j = −G_jᵀw with G_j = ∂Φ/∂r_j (P×3). Treating w as the only uncertain parameters of a model trained
on forces gives the force-Jacobian form used here:

    A = Σ_{training atoms j} G_j G_jᵀ                                   (P×P, one pass)
    U_j = α² G_jᵀ (A + ς²·(tr A / P)·I)⁻¹ G_j                          (3×3, SPD up to rank, R U Rᵀ)

ς² is chosen on a fixed grid by validation NLL, and α² is the closed-form Gaussian maximum-likelihood
scale on the validation atoms, α² = mean_j (r_jᵀ Ũ_j⁻¹ r_j) / 3 (Ũ_j the α = 1 covariance, r_j the
force residual): one validation scale, nothing fitted elsewhere. The predictive is the Gaussian
N(γ_j, U_j) (no separate aleatoric part: α² absorbs it, as in the LLPR recipe).
"""

from __future__ import annotations

from typing import Dict, Sequence

import torch

from .predictive import GaussianPredictive

#: ς² grid (relative to tr A / P) searched on the validation set
REG_GRID = (1e-8, 1e-6, 1e-4, 1e-2, 1.0)
_JITTER = 1e-10  # relative ridge added to each 3×3 block before inversion (rank-deficient G_j)


def feature_gram(jacobians: torch.Tensor) -> torch.Tensor:
    """A = Σ_j G_j G_jᵀ from per-atom Jacobians ``jacobians`` (N, P, 3)."""
    return torch.einsum("npa,nqa->pq", jacobians, jacobians)


def rigidity_covariance(jacobians: torch.Tensor, gram: torch.Tensor, reg: float) -> torch.Tensor:
    """Ũ_j = G_jᵀ (A + reg·(tr A / P)·I)⁻¹ G_j (α = 1), (N, 3, 3)."""
    p = gram.shape[0]
    eye = torch.eye(p, dtype=gram.dtype, device=gram.device)
    inv = torch.linalg.inv(gram + reg * torch.trace(gram) / p * eye)
    u = torch.einsum("npa,pq,nqb->nab", jacobians, inv, jacobians)
    return 0.5 * (u + u.transpose(-1, -2))


def _regularised(u: torch.Tensor) -> torch.Tensor:
    tr = torch.diagonal(u, dim1=-2, dim2=-1).mean(-1).clamp_min(1e-300)
    return u + _JITTER * tr[:, None, None] * torch.eye(3, dtype=u.dtype, device=u.device)


def ml_scale(u: torch.Tensor, residual: torch.Tensor) -> float:
    """α² = mean_j rᵀ Ũ_j⁻¹ r / 3: the Gaussian maximum-likelihood scale of N(0, α²Ũ_j)."""
    m = torch.linalg.solve(_regularised(u), residual[..., None])[..., 0]
    return float((m * residual).sum(-1).mean() / 3.0)


class LLPR:
    """Fitted force LLPR: ``A`` from the training Jacobians, ``(reg, alpha2)`` from validation."""

    def __init__(self, train_jacobians: torch.Tensor):
        self.gram = feature_gram(train_jacobians.to(torch.float64))
        self.reg = REG_GRID[0]
        self.alpha2 = 1.0
        self.val_nll: Dict[float, float] = {}

    def fit(self, val_jacobians: torch.Tensor, val_mean: torch.Tensor, val_forces: torch.Tensor,
            grid: Sequence[float] = REG_GRID) -> "LLPR":
        """Choose ς² on ``grid`` and α² (closed form) by validation NLL of the force residuals."""
        r = (val_forces - val_mean).to(torch.float64)
        best = None
        for reg in grid:
            u = rigidity_covariance(val_jacobians.to(torch.float64), self.gram, reg)
            a2 = ml_scale(u, r)
            nll = float(self._pred(val_mean, u, a2).nll(val_forces.to(torch.float64)).mean())
            self.val_nll[float(reg)] = nll
            if best is None or nll < best[0]:
                best = (nll, reg, a2)
        _, self.reg, self.alpha2 = best
        return self

    @staticmethod
    def _pred(mean: torch.Tensor, u: torch.Tensor, alpha2: float) -> GaussianPredictive:
        cov = alpha2 * _regularised(u)
        return GaussianPredictive(mean=mean.to(torch.float64), cov_epistemic=cov, cov_aleatoric=torch.zeros_like(cov))

    def predictive(self, jacobians: torch.Tensor, mean: torch.Tensor) -> GaussianPredictive:
        """N(γ_j, α² G_jᵀ (A + ς²·tr A/P·I)⁻¹ G_j) for atoms with Jacobians (N, P, 3) and mean forces γ (N, 3)."""
        u = rigidity_covariance(jacobians.to(torch.float64), self.gram, self.reg)
        return self._pred(mean, u, self.alpha2)
