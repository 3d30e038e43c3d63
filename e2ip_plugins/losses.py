"""Evidential force loss for the e²IP head (DESIGN §2.1).

Per atom:  L_i = NLL_StudentT(y_i | γ_i, ν_i, κ_i, Σ₀,i) + λ·(ν_i + κ_i)·r_i²,
with the dimensionless residual r_i² = ‖y_i − γ_i‖² / σ_F²  (``residual_metric="euclidean"``)
or r_i² = (y_i − γ_i)ᵀ Σ₀,i⁻¹ (y_i − γ_i)  (``residual_metric="sigma0"``).
``detach_mean=True`` stops both terms' gradient into γ, so the head learns the
uncertainty of a mean trained only by the usual force MSE.
"""

from __future__ import annotations

from typing import Dict

import torch

from .predictive import StudentTPredictive, quad_form


def evidential_predictive(forces: torch.Tensor, head_out: Dict[str, torch.Tensor]) -> StudentTPredictive:
    """Build the Student-t predictive from the head's output dict and the mean forces γ."""
    return StudentTPredictive(
        mean=forces,
        nu=head_out["nu"],
        kappa=head_out["kappa"],
        sigma0=head_out["sigma0"],
        sigma0_inv=head_out["sigma0_inv"],
        sigma0_logdet=head_out["sigma0_logdet"],
    )


def evidential_regularizer(
    pred: StudentTPredictive, y: torch.Tensor, sigma_f: float | torch.Tensor, residual_metric: str = "euclidean"
) -> torch.Tensor:
    """(ν + κ)·r² per atom, r dimensionless (see module docstring)."""
    r = y - pred.mean
    if residual_metric == "euclidean":
        r2 = (r * r).sum(-1) / sigma_f**2
    elif residual_metric == "sigma0":
        r2 = quad_form(pred.sigma0_inv, r)
    else:
        raise ValueError(f"residual_metric must be 'euclidean' or 'sigma0', got {residual_metric!r}")
    return (pred.nu + pred.kappa) * r2


def evidential_force_loss(
    forces: torch.Tensor,
    head_out: Dict[str, torch.Tensor],
    ref_forces: torch.Tensor,
    sigma_f: float | torch.Tensor,
    reg_weight: float = 0.1,
    residual_metric: str = "euclidean",
    detach_mean: bool = False,
) -> torch.Tensor:
    """Per-atom evidential loss NLL + λ(ν+κ)r²; shape (N,). Raises on NaN/Inf."""
    mean = forces.detach() if detach_mean else forces
    pred = evidential_predictive(mean, head_out)
    loss = pred.nll(ref_forces) + reg_weight * evidential_regularizer(pred, ref_forces, sigma_f, residual_metric)
    check_finite(loss, "evidential force loss")
    return loss


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise FloatingPointError naming the term if x holds NaN/Inf (never train on it)."""
    if not torch.isfinite(x).all():
        bad = int((~torch.isfinite(x)).sum())
        raise FloatingPointError(
            f"{name}: {bad} non-finite value(s) (NaN/Inf). Lower the learning rate or the evidential "
            "weight, or check the reference forces for NaN."
        )
