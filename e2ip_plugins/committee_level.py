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

**Scaled-head form** (``CommitteeLevel(scale_head=True)``, candidate C of docs/committee.md; MACE's default): the
committee does not replace the head's epistemic covariance U_epi,head (its novelty-calibrated level) but scales it
by its own local spread relative to validation:

    s_i = tr Ĉ_i / 3,   s̃_i = (s_i + Σ_{j ∈ N(i)} s_j) / (1 + |N(i)|)      N(i): the model's edges of atom i
    U_epi,i = c · (s̃_i / s_ref) · U_epi,head,i,   U_tot,i = U_ale,i + U_epi,i

with s_ref the mean of s̃ over the validation atoms and c by the validation NLL (:func:`fit_scaled_level`). The
head keeps the per-atom shape; the members' (averaged, so less noisy) spread carries the growth under a shift.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from scipy.optimize import minimize_scalar

from .level import _gather_columns
from .predictive import GaussianPredictive


def committee_variance(member_forces: torch.Tensor) -> torch.Tensor:
    """(N, M, 3) → tr Ĉ_i / 3 = Σ_k ‖F_k,i − F̄_i‖² / (3(M−1)), (N,): the members' mean per-component sample
    variance (TorchScript-able; equals the trace of :func:`~e2ip_plugins.force_committee.committee_covariance`)."""
    centred = member_forces - member_forces.mean(dim=1, keepdim=True)
    return (centred * centred).sum(dim=(1, 2)) / (3.0 * (member_forces.shape[1] - 1))


def local_spread(spread: torch.Tensor, center: torch.Tensor, neighbor: torch.Tensor) -> torch.Tensor:
    """s̃_i = (s_i + Σ_{edges (i, j)} s_j) / (1 + deg_i): the mean of ``spread`` (N,) over each atom and the atoms its
    edges (``center`` → ``neighbor``) reach."""
    total = spread.index_add(0, center, spread[neighbor])
    count = torch.ones_like(spread).index_add(0, center, torch.ones_like(spread[neighbor]))
    return total / count


class CommitteeLevel(torch.nn.Module):
    """(member forces (N, M, 3), U_ale (N, 3, 3)[, U_epi,head, edges]) → (U_tot, U_epi) of the module docstring with
    the stored c (and s_ref in the scaled-head form)."""

    def __init__(self, scale_head: bool = False):
        super().__init__()
        self.register_buffer("committee_scale", torch.ones(()))
        self.register_buffer("committee_scale_fitted", torch.zeros((), dtype=torch.bool))
        self.register_buffer("spread_ref", torch.ones(()))
        self.scale_head = bool(scale_head)

    def __setstate__(self, state):
        """A level pickled before the scaled-head form: the isotropic spread form, s_ref = 1."""
        torch.nn.Module.__setstate__(self, state)
        if "spread_ref" not in self._buffers:
            self.register_buffer("spread_ref", torch.ones_like(self.committee_scale))
        if "scale_head" not in self.__dict__:
            self.scale_head = False

    def forward(self, member_forces: torch.Tensor, cov_ale: torch.Tensor, cov_epi_head: Optional[torch.Tensor] = None,
                center: Optional[torch.Tensor] = None,
                neighbor: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        var = committee_variance(member_forces)
        if self.scale_head:
            if cov_epi_head is None or center is None or neighbor is None:
                raise ValueError("the scaled-head committee level needs the head's U_epi and the edges")
            ratio = local_spread(var, center, neighbor) / self.spread_ref.to(var.dtype)
            epi = (self.committee_scale.to(var.dtype) * ratio).to(cov_ale.dtype).reshape(-1, 1, 1) * cov_epi_head
        else:
            var = self.committee_scale.to(member_forces.dtype) * var
            eye = torch.eye(3, dtype=cov_ale.dtype, device=cov_ale.device)
            epi = var.to(cov_ale.dtype).reshape(-1, 1, 1) * eye
        return cov_ale + epi, epi

    def set_scale(self, c: float, spread_ref: Optional[float] = None) -> None:
        for name, v in (("scale", c), ("spread reference", spread_ref)):
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(f"the committee's {name} must be finite and > 0, got {v}")
        self.committee_scale.fill_(float(c))
        if spread_ref is not None:
            self.spread_ref.fill_(float(spread_ref))
        self.committee_scale_fitted.fill_(True)


def committee_predictive(forces: torch.Tensor, cov_epistemic: torch.Tensor,
                         cov_aleatoric: torch.Tensor) -> GaussianPredictive:
    """The deployed predictive of a model with a committee level: N(γ, U_ale + U_epi), the form c is fitted in."""
    dtype = forces.dtype
    return GaussianPredictive(mean=forces, cov_epistemic=cov_epistemic.to(dtype), cov_aleatoric=cov_aleatoric.to(dtype))


def _validation_columns(what: str, **cols: torch.Tensor):
    """The columns in float64, gathered over DDP ranks (every rank fits on all ranks' atoms), checked finite."""
    cols = _gather_columns({k: v.double() for k, v in cols.items()})
    for name, v in cols.items():
        if not torch.isfinite(v).all():
            raise ValueError(f"fitting {what}: the validation {name} hold NaN/Inf")
    return cols


def fit_epistemic_scale(gamma: torch.Tensor, y: torch.Tensor, ale: torch.Tensor, epi_unit: torch.Tensor,
                        log_bounds: tuple = (-20.0, 20.0)) -> float:
    """argmin_c mean_i −log N(y_i; γ_i, U_ale,i + c · E_i) with E = ``epi_unit`` (1-D Brent search in log c)."""

    def objective(logc: float) -> float:
        return float(GaussianPredictive(mean=gamma, cov_epistemic=math.exp(logc) * epi_unit, cov_aleatoric=ale).nll(y).mean())

    res = minimize_scalar(objective, bounds=log_bounds, method="bounded", options={"xatol": 1e-8})
    return float(math.exp(res.x))


def fit_committee_scale(gamma: torch.Tensor, y: torch.Tensor, cov_ale: torch.Tensor, member_forces: torch.Tensor,
                        log_bounds: tuple = (-20.0, 20.0)) -> float:
    """ĉ of the module docstring on validation atoms (γ, y (N, 3), U_ale (N, 3, 3), members (N, M, 3)); under
    ``torch.distributed`` the atoms of all ranks are gathered first, so every rank stores the same c."""
    with torch.no_grad():
        cols = _validation_columns("the committee's scale", forces=gamma, **{"reference forces": y}, U_ale=cov_ale,
                                   **{"committee forces": member_forces})
        iso = committee_variance(cols["committee forces"]).reshape(-1, 1, 1) * torch.eye(3, dtype=torch.float64)
        return fit_epistemic_scale(cols["forces"], cols["reference forces"], cols["U_ale"], iso, log_bounds)


def fit_scaled_level(gamma: torch.Tensor, y: torch.Tensor, cov_ale: torch.Tensor, cov_epi_head: torch.Tensor,
                     spread: torch.Tensor, log_bounds: tuple = (-20.0, 20.0)) -> Tuple[float, float]:
    """(s_ref, ĉ) of the scaled-head form on validation atoms (γ, y (N, 3), U_ale, U_epi,head (N, 3, 3), s̃ (N,)):
    s_ref = mean s̃, ĉ = argmin_c mean −log N(y; γ, U_ale + c·(s̃/s_ref)·U_epi,head); DDP ranks' atoms gathered."""
    with torch.no_grad():
        cols = _validation_columns("the committee's scaled level", forces=gamma, **{"reference forces": y},
                                   U_ale=cov_ale, **{"head's U_epi": cov_epi_head, "committee spread": spread})
        s_ref = float(cols["committee spread"].mean())
        if not s_ref > 0:
            raise ValueError("fitting the committee's scaled level: the members do not differ on validation")
        epi = (cols["committee spread"] / s_ref).reshape(-1, 1, 1) * cols["head's U_epi"]
        return s_ref, fit_epistemic_scale(cols["forces"], cols["reference forces"], cols["U_ale"], epi, log_bounds)
