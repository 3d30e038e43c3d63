"""Energy-noise head: the coherent energy/force noise model of docs/energy_uncertainty.md §2 trained as a head (§10).

Per atom, from invariant (l = 0) node features x_i, a small MLP predicts

    ℓ_i = exp(o_i,0)   (Å, the atom's noise length scale),      c_i = o_i,1   (eV),

and with the force head's aleatoric covariance as the local force block D_i = U_ale,i (so the metric
M_i⁻¹ = D_i / (ℓ_i² tr D_i/3) has the force head's equivariant shape):

    a_i² = ℓ_i² tr(D_i)/3,     A = Σ_i c_i,     h_j = ∂A/∂r_j                          (§2)

Training term (``coherent_head_loss``): the joint Gaussian NLL of (r_E, r_F) under C = B + v vᵀ (§3,
:func:`e2ip_plugins.energy_noise.coherent_nll`) per structure, divided by its 1 + 3N dimensions (the
adapters average it over structures). The residuals and D are detached: the mean energy/forces keep the framework's MSE terms and
U_ale keeps the force head's own loss, so the term trains ℓ_i, c_i. With ``detach_features`` (the default) the
head reads x_i.detach(): the term reaches the head's own weights only and leaves the backbone, hence the force and
energy MAE, untouched; h is then computed from the attached features and enters the term as data
(``EnergyNoiseHead.amplitude_grad``). ``detach_features=False`` trains through the backbone as well (the first version).

Deployed ``energy_uncertainty`` (:class:`e2ip_plugins.energy_uq.EnergyUncertainty` with these inputs):

    σ_E = k · sqrt( A² + Σ_i ℓ_i² tr(U_tot,i)/3 )                                       (eV)

the same per-atom lengths applied to the calibrated total force covariance (aleatoric + epistemic),
k the validation-fitted factor (ML, ``fit_variance_scale``). Without the head this reduces to the
approximation of §4 (ℓ_i = ℓ, A = 0). The deployed forces_covariance does not include the shared
part's rank-one h hᵀ (it needs a backward pass of A); the loss does.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .energy_noise import amplitude_gradient, coherent_nll, segment_sum

INIT_AMPLITUDE = 0.01  # eV per atom: A = 0 is a stationary point of the NLL in A, so start off it


class NoEnergyNoiseHead(torch.nn.Module):
    """Placeholder for models without the head (keeps one TorchScript-compilable forward); never called."""

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return x.new_zeros(0), x.new_zeros(0)

    def amplitude_grad(self, x: torch.Tensor, amplitude_atom: torch.Tensor, positions: torch.Tensor,
                       batch: torch.Tensor, num_structures: int) -> torch.Tensor:
        return torch.zeros_like(positions)


class EnergyNoiseHead(torch.nn.Module):
    """Invariant features (N, F) → (ℓ_i (N,) Å, c_i (N,) eV) by Linear–SiLU–Linear (module docstring).

    The last layer starts at zero weight with bias [log ``init_length``, ``INIT_AMPLITUDE``]: every atom
    starts at the same ℓ and A = N·0.01 eV. ``detach_features``: read x.detach() (module docstring)."""

    def __init__(self, num_features: int, hidden: int = 16, init_length: float = 1.0, detach_features: bool = True):
        super().__init__()
        self.detach_features = bool(detach_features)
        if num_features < 1:
            raise ValueError(f"the energy-noise head needs invariant features, got num_features={num_features}")
        self.lin1 = torch.nn.Linear(int(num_features), int(hidden))
        self.lin2 = torch.nn.Linear(int(hidden), 2)
        with torch.no_grad():
            self.lin2.weight.zero_()
            self.lin2.bias.copy_(torch.tensor([math.log(float(init_length)), INIT_AMPLITUDE]))

    def __setstate__(self, state):
        """Heads pickled before ``detach_features`` existed trained through the backbone."""
        torch.nn.Module.__setstate__(self, state)
        if "detach_features" not in self.__dict__:
            self.detach_features = False

    def raw(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 2) outputs [log ℓ_i (unclamped), c_i] on x as given (attached)."""
        return self.lin2(torch.nn.functional.silu(self.lin1(x)))

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        o = self.raw(x.detach() if self.detach_features else x)
        log_len = o[:, 0].clamp(-7.0, 5.0)  # ℓ_i in [1e-3, 150] Å: keeps exp finite, far outside any fitted value
        return torch.exp(log_len), o[:, 1]

    def amplitude_grad(self, x: torch.Tensor, amplitude_atom: torch.Tensor, positions: torch.Tensor,
                       batch: torch.Tensor, num_structures: int) -> torch.Tensor:
        """h = ∂A/∂R (N,3) for the training term. With ``detach_features`` it comes from c_i on the attached
        features x and is detached (data for the loss); otherwise from ``amplitude_atom``, graph kept."""
        if self.detach_features:
            c = self.raw(x)[:, 1]
            return shared_amplitude_gradient(c, positions, batch, num_structures).detach()
        return shared_amplitude_gradient(amplitude_atom, positions, batch, num_structures)


def head_energy_variance(force_cov: torch.Tensor, length: torch.Tensor, amplitude_atom: torch.Tensor,
                         batch: torch.Tensor, num_structures: int) -> torch.Tensor:
    """A² + Σ_i ℓ_i² tr(U_i)/3 per structure (S,), eV², with A = Σ_i c_i (module docstring)."""
    tr = torch.diagonal(force_cov, dim1=-2, dim2=-1).sum(-1) / 3.0
    amp = segment_sum(amplitude_atom, batch, num_structures)
    return segment_sum(length * length * tr, batch, num_structures) + amp * amp


def coherent_head_loss(energy_residual: torch.Tensor, force_residual: torch.Tensor, force_cov_ale: torch.Tensor,
                       length: torch.Tensor, amplitude_atom: torch.Tensor, batch: torch.Tensor, num_structures: int,
                       amplitude_grad: Optional[torch.Tensor] = None, jitter: float = 1e-10) -> torch.Tensor:
    """Per structure (S,): coherent_nll / (1 + 3N) (module docstring); residuals and D detached.

    energy_residual (S,) = E_ref − E_θ; force_residual (N,3) = F_ref − γ; force_cov_ale U_ale (N,3,3);
    ``amplitude_grad`` h = ∂A/∂R (N,3) or None (then the shared part enters through A only, as at
    validation where the graph to the positions is gone). ``jitter`` (eV/Å)² is added to D's diagonal."""
    d = force_cov_ale.detach() + jitter * torch.eye(3, dtype=force_cov_ale.dtype, device=force_cov_ale.device)
    local_var = length * length * torch.diagonal(d, dim1=-2, dim2=-1).sum(-1) / 3.0
    amp = segment_sum(amplitude_atom, batch, num_structures)
    h = amplitude_grad if amplitude_grad is not None else torch.zeros_like(force_residual)
    nll = coherent_nll(energy_residual.detach(), force_residual.detach(), local_var, d, batch, amp, h)
    n_atoms = segment_sum(torch.ones_like(length), batch, num_structures)
    return nll / (1.0 + 3.0 * n_atoms)


def shared_amplitude_gradient(amplitude_atom: torch.Tensor, positions: torch.Tensor, batch: torch.Tensor,
                              num_structures: int) -> torch.Tensor:
    """h = ∂A/∂R (N,3), A = Σ_i c_i per structure, with the graph kept for the loss (training forwards only:
    the positions must still be part of the graph)."""
    return amplitude_gradient(segment_sum(amplitude_atom, batch, num_structures), positions, True)


__all__ = ["EnergyNoiseHead", "NoEnergyNoiseHead", "coherent_head_loss", "head_energy_variance", "shared_amplitude_gradient"]
