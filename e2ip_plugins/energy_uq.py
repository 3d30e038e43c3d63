"""Per-structure energy uncertainty stored in deployed e²IP models (issue 15, docs/energy_uncertainty.md §4).

APPROXIMATION for e²IP/eIP models without a coherent energy head: the structure's energy standard
deviation is derived from the per-atom total force covariance U_tot,i the model already predicts,

    σ_E = ℓ · sqrt( Σ_i tr(U_tot,i) / 3 )                                   (eV)

(``energy_noise.energy_uncertainty_from_forces``). Assumption: the force noise is entirely the
derivative of independent per-atom Gaussian processes of the energy noise (no shared part, so
Cov(E, F) = 0) with trace-normalised metrics and ONE length scale ℓ (Å) for all atoms. The forces do
not determine ℓ; it is the maximum-likelihood fit on the validation energy residuals r_E:

    ℓ̂² = (1/S) Σ_s r_E,s² / v_s,        v_s = Σ_{i∈s} tr(U_tot,i)/3     (``fit_variance_scale``)

done by the adapters right after the force level [c, β] (so U_tot is the calibrated one) and stored in
the buffer ``energy_noise_length`` = [ℓ, S_fit] of :class:`EnergyUncertainty` (S_fit = number of
validation structures, 0 = unfitted). Unfitted models and models saved before the buffer existed
use ``DEFAULT_LENGTH_SCALE`` = 0.1 Å (an unmeasured placeholder; a warning says so).
With an energy-noise head (:mod:`e2ip_plugins.energy_noise_head`) the same buffer holds the factor k of
σ_E = k·sqrt(A² + Σ_i ℓ_i² tr U_tot,i/3) (dimensionless, 1 until fitted), fitted the same way with v_s the
bracket; :func:`fit_energy_length` takes any v_s.
Committees (deep ensembles, posterior samples): Var E = Var_k(E_k) + mean_k σ²_E,k (§5).
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, Iterable, Optional

import torch

from .energy_noise import DEFAULT_LENGTH_SCALE, fit_variance_scale, segment_sum
from .energy_noise_head import head_energy_variance

ENERGY_UNCERTAINTY_KEY = "energy_uncertainty"
BUFFER = "energy_noise_length"
LEGACY_WARNING = (
    "the model has no stored energy length scale (saved before issue 15): energy_uncertainty uses the "
    f"unfitted default length {DEFAULT_LENGTH_SCALE} Å; refit it on validation data with "
    "nequip_fit_novelty_e2ip / mace_fit_novelty_e2ip"
)


def force_variance_sum(force_cov: torch.Tensor, batch: torch.Tensor, num_structures: int) -> torch.Tensor:
    """v_s = Σ_{i∈s} tr(U_i)/3 per structure (S,), (eV/Å)²."""
    tr = torch.diagonal(force_cov, dim1=-2, dim2=-1).sum(-1) / 3.0
    return segment_sum(tr, batch, num_structures)


class EnergyUncertainty(torch.nn.Module):
    """σ_E = ℓ·sqrt(Σ_i tr U_i/3) per structure from the stored ``energy_noise_length`` = [ℓ, S_fit].

    Buffers only (no parameters), TorchScript-scriptable and export-traceable."""

    def __init__(self, length: float = DEFAULT_LENGTH_SCALE):
        super().__init__()
        self.register_buffer(BUFFER, torch.tensor([float(length), 0.0]))

    def forward(self, force_cov: torch.Tensor, batch: torch.Tensor, num_structures: int,
                length: Optional[torch.Tensor] = None, amplitude_atom: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Without a head: ℓ·sqrt(Σ_i tr U_i/3). With an energy-noise head's per-atom ℓ_i and c_i
        (:mod:`e2ip_plugins.energy_noise_head`): k·sqrt(A² + Σ_i ℓ_i² tr U_i/3), k the stored factor."""
        k = self.energy_noise_length[0].to(force_cov.dtype)
        if length is None or amplitude_atom is None:
            return k * torch.sqrt(force_variance_sum(force_cov, batch, num_structures))
        return k * torch.sqrt(head_energy_variance(force_cov, length, amplitude_atom, batch, num_structures))

    @property
    def length(self) -> float:
        return float(self.energy_noise_length[0])

    @property
    def is_fitted(self) -> bool:
        return bool(self.energy_noise_length[1] > 0)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if prefix + BUFFER not in state_dict:  # a checkpoint written before issue 15
            warnings.warn(f"{prefix}{BUFFER}: " + LEGACY_WARNING)
            state_dict[prefix + BUFFER] = torch.tensor([DEFAULT_LENGTH_SCALE, 0.0]).to(self.energy_noise_length)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def fit_energy_length(module: EnergyUncertainty, batches: Iterable[Dict[str, torch.Tensor]]) -> Dict[str, float]:
    """Fit ℓ̂ (module docstring) on validation batches and store [ℓ̂, S] in ``module``.

    ``batches`` yields ``{"energy_residual": r_E (S,), "force_var": v (S,)}`` per batch (reference minus
    predicted energy; v from the calibrated U_tot, :func:`force_variance_sum`); structures without a
    reference energy must be left out by the caller. Under ``torch.distributed`` all ranks' columns are
    gathered. Returns ``{"length", "structures", "nll"}`` (mean Gaussian NLL of r_E at the fit)."""
    from .level import _gather_columns

    cols = {"energy_residual": [], "force_var": []}
    for b in batches:
        for k in cols:
            cols[k].append(b[k].detach().to("cpu", torch.float64).reshape(-1))
    cat = _gather_columns({k: (torch.cat(v) if v else torch.zeros(0, dtype=torch.float64)) for k, v in cols.items()})
    r, v = cat["energy_residual"], cat["force_var"]
    keep = v > 0
    if int(keep.sum()) == 0:
        raise ValueError("no validation structures with a reference energy to fit the energy length scale on")
    r, v = r[keep], v[keep]
    c = fit_variance_scale(r, v)
    ell = math.sqrt(c)
    var = c * v
    nll = float((0.5 * (math.log(2 * math.pi) + torch.log(var) + r * r / var)).mean())
    with torch.no_grad():
        module.energy_noise_length.copy_(torch.tensor([ell, float(len(r))]).to(module.energy_noise_length))
    return {"length": ell, "structures": float(len(r)), "nll": nll}


def committee_energy_uncertainty(member_energy: torch.Tensor, member_sigma=None) -> torch.Tensor:
    """sqrt(Var_k E_k + mean_k σ²_E,k) (S,) of K ≥ 2 members (docs §5); ``member_sigma`` (K,S) or None."""
    from .energy_noise import committee_energy

    var = None if member_sigma is None else member_sigma * member_sigma
    return torch.sqrt(committee_energy(member_energy, var)[1])


__all__ = ["BUFFER", "ENERGY_UNCERTAINTY_KEY", "EnergyUncertainty", "committee_energy_uncertainty",
           "fit_energy_length", "force_variance_sum"]
