"""Coherent energy and force noise (DESIGN §2.4, issue 15; derivation in docs/energy_uncertainty.md).

Observed energy and forces around a configuration R⁰ (displacements δ = R − R⁰):

    E_obs(R) = E_θ(R) + ε(R),          F_obs = −∇E_obs = γ − ∇ε,

with ε a Gaussian process over the displacements, made of independent parts

    ε(R⁰+δ) = A(R⁰+δ)·ζ + Σ_i a_i z_i(δ_i),     ζ ~ N(0, 1),
    z_i ~ GP(0, exp(−½ (δ_i−δ_i')ᵀ M_i⁻¹ (δ_i−δ_i'))),

- local part: per-atom amplitude a_i and SPD metric M_i (Å²), evaluated at R⁰ (locally
  stationary: they do not vary with δ);
- shared part: one noise ζ common to all atoms, with amplitude A(R) (eV) a smooth invariant
  function of the positions predicted by the network (e.g. A = Σ_i c_i), h_j = ∂A/∂r_j.

Zero-lag moments of r_E = E_obs − E_θ and r_F = F_obs − γ = −∇ε at δ = 0:

    Var r_E          = A² + Σ_i a_i²
    Cov(r_F,j, r_F,k) = h_j h_kᵀ + δ_jk D_j,      D_j = a_j² M_j⁻¹      ((eV/Å)²)
    Cov(r_E, r_F,j)   = −A h_j = −½ ∂(Var r_E)/∂r_j   (local part: 0, stationarity)

Joint covariance of (r_E, r_F) = B + v vᵀ, B = blockdiag(s, D_1..D_N), s = Σ a_i², v = (A, −h):
log|C| = log s + Σ log|D_i| + log(1 + vᵀB⁻¹v),  rᵀC⁻¹r = rᵀB⁻¹r − (vᵀB⁻¹r)²/(1 + vᵀB⁻¹v).

Parameterisation by a force covariance: with a trace-normalised metric, tr(M_i⁻¹)/3 = 1/ℓ_i²
(ℓ_i the atom's length scale, Å), a_i² = ℓ_i² tr(D_i)/3. The metric M_i⁻¹ = Σ₀,i/(ℓ_i² trΣ₀,i/3)
(Σ₀ the e²IP head's scale; ``metric_inverse_from_shape``) keeps D_i ∝ Σ₀,i and equivariant.

Approximation for e²IP models without this head (``energy_uncertainty_from_forces``):
assume A = 0 and that the whole force covariance U_i is D_i with one length scale ℓ:
Var E ≈ ℓ² Σ_i tr(U_i)/3. ℓ is not identified by forces; fit it on validation energies
(``fit_variance_scale``).

Committee of K models (deep ensemble read as posterior samples), moment-matched:
Var E = Var_k(E_k) [epistemic, 1/(K−1)] + mean_k σ²_k [aleatoric].

Closed forms are pure torch and TorchScript-scriptable (not fit_variance_scale, energy_uq_metrics).
Units: eV, Å.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

LOG_2PI = math.log(2.0 * math.pi)
# Placeholder length scale (Å) for ``energy_uncertainty_from_forces`` when nothing was fitted.
# Not measured: an order-of-magnitude guess. Replace by ℓ·sqrt(ĉ) from ``fit_variance_scale``.
DEFAULT_LENGTH_SCALE = 0.1


def segment_sum(x: torch.Tensor, batch: torch.Tensor, num_structures: int) -> torch.Tensor:
    """Σ over the atoms of each structure: x (N, ...) → (S, ...)."""
    shape: List[int] = [num_structures] + list(x.shape[1:])
    return torch.zeros(shape, dtype=x.dtype, device=x.device).index_add(0, batch, x)


def _trace(m: torch.Tensor) -> torch.Tensor:
    return torch.diagonal(m, dim1=-2, dim2=-1).sum(-1)


def metric_inverse_from_shape(shape: torch.Tensor, length_scale: torch.Tensor) -> torch.Tensor:
    """M_i⁻¹ (N,3,3, 1/Å²) ∝ ``shape`` (e.g. the head's Σ₀), normalised to tr(M_i⁻¹)/3 = 1/ℓ_i².

    ``length_scale``: ℓ (Å), scalar or (N,). Equivariant: shape → R shape Rᵀ gives R M⁻¹ Rᵀ."""
    norm = _trace(shape) / 3.0
    ell2 = (length_scale * length_scale).expand(norm.shape)
    return shape / (norm * ell2).unsqueeze(-1).unsqueeze(-1)


def local_energy_variance(force_cov_local: torch.Tensor, length_scale: torch.Tensor) -> torch.Tensor:
    """a_i² = ℓ_i² tr(D_i)/3 (eV²) from the local force covariance D_i = a_i² M_i⁻¹ with
    tr(M_i⁻¹)/3 = 1/ℓ_i² (trace-normalised metric). ``length_scale`` scalar or (N,)."""
    return length_scale * length_scale * _trace(force_cov_local) / 3.0


def local_force_covariance(local_var: torch.Tensor, metric_inv: torch.Tensor) -> torch.Tensor:
    """D_i = a_i² M_i⁻¹ (N,3,3) from a_i² (N,) and M_i⁻¹ (N,3,3)."""
    return local_var.unsqueeze(-1).unsqueeze(-1) * metric_inv


def energy_variance(
    local_var: torch.Tensor, batch: torch.Tensor, num_structures: int, amplitude: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Var r_E = Σ_i a_i² + A² per structure (S,). ``amplitude`` A (S,) or None (A = 0)."""
    var = segment_sum(local_var, batch, num_structures)
    if amplitude is not None:
        var = var + amplitude * amplitude
    return var


def force_covariance(force_cov_local: torch.Tensor, amplitude_grad: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-atom 3×3 block Cov(r_F,j) = D_j + h_j h_jᵀ (N,3,3)."""
    if amplitude_grad is None:
        return force_cov_local
    return force_cov_local + amplitude_grad.unsqueeze(-1) * amplitude_grad.unsqueeze(-2)


def force_cross_covariance(
    force_cov_local: torch.Tensor, amplitude_grad: Optional[torch.Tensor], j: torch.Tensor, k: torch.Tensor
) -> torch.Tensor:
    """Blocks Cov(r_F,j, r_F,k) = h_j h_kᵀ + δ_jk D_j (P,3,3) for atom pairs (j, k) of one structure
    (index tensors (P,)). Cross-atom blocks come only from the shared part (rank one)."""
    same = (j == k).to(force_cov_local.dtype).unsqueeze(-1).unsqueeze(-1)
    out = same * force_cov_local[j]
    if amplitude_grad is not None:
        out = out + amplitude_grad[j].unsqueeze(-1) * amplitude_grad[k].unsqueeze(-2)
    return out


def energy_force_covariance(amplitude: torch.Tensor, amplitude_grad: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
    """Cov(r_E(s), r_F,j) = −A_s h_j = −½ ∂(Var r_E,s)/∂r_j (N,3) for atom j in structure s.
    Identically zero without a shared part (the local part is stationary)."""
    return -amplitude[batch].unsqueeze(-1) * amplitude_grad


def amplitude_gradient(amplitude: torch.Tensor, positions: torch.Tensor, create_graph: bool = True) -> torch.Tensor:
    """h_j = ∂A_s/∂r_j (N,3) by autograd (A (S,) depends on ``positions`` (N,3); structures are
    independent, so one backward of Σ_s A_s suffices). ``create_graph`` for training."""
    grads = torch.autograd.grad(
        [amplitude.sum()], [positions], create_graph=create_graph, allow_unused=True
    )
    g = grads[0]
    if g is None:
        return torch.zeros_like(positions)
    return g


def coherent_nll(
    energy_residual: torch.Tensor,
    force_residual: torch.Tensor,
    local_var: torch.Tensor,
    force_cov_local: torch.Tensor,
    batch: torch.Tensor,
    amplitude: Optional[torch.Tensor] = None,
    amplitude_grad: Optional[torch.Tensor] = None,
    var_floor: float = 1e-12,
) -> torch.Tensor:
    """Joint Gaussian −log p(r_E, r_F) per structure (S,), closed form (O(N), differentiable).

    energy_residual (S,) = E_ref − E_θ; force_residual (N,3) = F_ref − γ; local_var a_i² (N,);
    force_cov_local D_i (N,3,3) SPD; amplitude A (S,), amplitude_grad h (N,3) or both None.
    ``var_floor`` (eV²) is added to s = Σ a_i² (s must be > 0 for the closed form)."""
    num_s = energy_residual.shape[0]
    s = segment_sum(local_var, batch, num_s) + var_floor
    chol = torch.linalg.cholesky(force_cov_local)
    logdet_d = 2.0 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    d_inv_r = torch.cholesky_solve(force_residual.unsqueeze(-1), chol).squeeze(-1)
    r_b_r = energy_residual * energy_residual / s + segment_sum((force_residual * d_inv_r).sum(-1), batch, num_s)
    logdet = torch.log(s) + segment_sum(logdet_d, batch, num_s)
    quad = r_b_r
    if amplitude is not None and amplitude_grad is not None:
        d_inv_h = torch.cholesky_solve(amplitude_grad.unsqueeze(-1), chol).squeeze(-1)
        v_b_v = amplitude * amplitude / s + segment_sum((amplitude_grad * d_inv_h).sum(-1), batch, num_s)
        v_b_r = amplitude * energy_residual / s - segment_sum((amplitude_grad * d_inv_r).sum(-1), batch, num_s)
        logdet = logdet + torch.log1p(v_b_v)
        quad = quad - v_b_r * v_b_r / (1.0 + v_b_v)
    n_atoms = segment_sum(torch.ones_like(local_var), batch, num_s)
    return 0.5 * ((1.0 + 3.0 * n_atoms) * math.log(2.0 * math.pi) + logdet + quad)


def joint_covariance_dense(
    local_var: torch.Tensor,
    force_cov_local: torch.Tensor,
    amplitude: Optional[torch.Tensor] = None,
    amplitude_grad: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Full (1+3N)×(1+3N) covariance of (r_E, r_F,1x, r_F,1y, …) for ONE structure (small N;
    tests and inspection). amplitude: () or (1,) tensor."""
    n = local_var.shape[0]
    c = torch.zeros(1 + 3 * n, 1 + 3 * n, dtype=local_var.dtype, device=local_var.device)
    c[0, 0] = local_var.sum()
    c[1:, 1:] = torch.block_diag(*force_cov_local.unbind(0))
    if amplitude is not None and amplitude_grad is not None:
        v = torch.cat([amplitude.reshape(1), -amplitude_grad.reshape(-1)])
        c = c + v.unsqueeze(-1) * v.unsqueeze(-2)
    return c


def energy_uncertainty_from_forces(
    force_cov: torch.Tensor, batch: torch.Tensor, num_structures: int, length_scale: float = DEFAULT_LENGTH_SCALE
) -> torch.Tensor:
    """APPROXIMATION for models with only a per-atom force covariance U_i (e.g. e²IP's U_tot):
    σ_E = sqrt(ℓ² Σ_i tr(U_i)/3) (eV) per structure (S,).

    Assumes the force noise is entirely the derivative of the local per-atom GP (no shared part,
    so Cov(E, F) = 0), with trace-normalised metrics tr(M_i⁻¹)/3 = 1/ℓ² and one length scale ℓ (Å)
    for all atoms. ℓ is a free constant the forces do not determine: fit it on validation energy
    residuals (ℓ_fit = ℓ·sqrt(ĉ), ĉ from ``fit_variance_scale``). The default is unfitted."""
    var = length_scale * length_scale * segment_sum(_trace(force_cov) / 3.0, batch, num_structures)
    return torch.sqrt(var)


def committee_energy(
    member_energy: torch.Tensor, member_var: Optional[torch.Tensor] = None
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """K models as posterior samples, moment-matched. member_energy (K,S), member_var σ²_k (K,S)
    or None → (mean, var_total, var_epistemic = 1/(K−1) Σ_k (E_k − Ē)², var_aleatoric = mean σ²_k)."""
    k = member_energy.shape[0]
    if k < 2:
        raise ValueError("a committee needs at least 2 members")
    mean = member_energy.mean(0)
    epi = ((member_energy - mean) ** 2).sum(0) / (k - 1)
    ale = member_var.mean(0) if member_var is not None else torch.zeros_like(epi)
    return mean, epi + ale, epi, ale


def committee_energy_force_covariance(
    member_energy: torch.Tensor,
    member_forces: torch.Tensor,
    batch: torch.Tensor,
    member_cross: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Cov(E_s, F_j) (N,3) of the committee: 1/(K−1) Σ_k (E_k,s − Ē_s)(F_k,j − F̄_j) + mean_k of
    the members' aleatoric cross-covariances ``member_cross`` (K,N,3) if given.
    member_energy (K,S), member_forces (K,N,3)."""
    k = member_energy.shape[0]
    de = (member_energy - member_energy.mean(0))[:, batch]
    df = member_forces - member_forces.mean(0)
    cov = (de.unsqueeze(-1) * df).sum(0) / (k - 1)
    if member_cross is not None:
        cov = cov + member_cross.mean(0)
    return cov


def fit_variance_scale(residual: torch.Tensor, variance: torch.Tensor) -> float:
    """Closed-form maximum-likelihood ĉ = mean(r²/σ²) of N(0, c·σ²) on validation residuals.
    Multiply energy variances by ĉ (for the approximation: ℓ → ℓ·sqrt(ĉ))."""
    with torch.no_grad():
        return float((residual.double() ** 2 / variance.double()).mean())


def energy_uq_metrics(residual, sigma, coverages=(50, 90)) -> Dict[str, float]:
    """Per-structure energy metrics (numpy): energy_mae/rmse, Gaussian energy_nll, Spearman of σ
    vs |r|, AUROC of σ for |r| above its 90th percentile, coverage of the central p % interval."""
    from scipy import stats

    from .metrics import AUROC_PERCENTILE, auroc

    r = np.abs(np.asarray(residual, dtype=np.float64).reshape(-1))
    sg = np.asarray(sigma, dtype=np.float64).reshape(-1)
    out = {
        "energy_mae": float(r.mean()),
        "energy_rmse": float(np.sqrt(np.mean(r * r))),
        "energy_nll": float(np.mean(0.5 * (LOG_2PI + 2 * np.log(sg) + (r / sg) ** 2))),
        "energy_spearman": float(stats.spearmanr(sg, r).statistic) if len(r) > 2 else float("nan"),
        "energy_auroc": auroc(sg, r > np.percentile(r, AUROC_PERCENTILE)),
        "energy_sharpness": float(np.mean(sg)),
    }
    for p in coverages:
        z = stats.norm.ppf(0.5 + p / 200.0)
        out[f"energy_coverage_{p}"] = float(np.mean(r <= z * sg))
    return out
