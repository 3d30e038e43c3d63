"""Uncertainty-driven dynamics (UDD): a bias that lowers the energy where the model is unsure.

Kulichenko et al., Nat. Comput. Sci. 3, 230 (2023); seed 002 §3.5, eqs. 12–14. With

    σ²(r) = Σ_i tr U_epi,i(r) / 3                 (the structure's epistemic variance, (eV/Å)²;
                                                   = Σ_i u_i², u_i of DESIGN §2.5)

the bias energy and force are

    E_bias = A · [exp(−σ² / (N B²)) − 1]                                       (eq. 12; A ≥ 0 eV, B > 0 eV/Å)
    F_bias = −∂E_bias/∂r = (A / (N B²)) · exp(−σ² / (N B²)) · ∂σ²/∂r             (eq. 13)

so E_bias ∈ (−A, 0]: structures with mean u² = σ²/N well above B² get up to A lower energy, and the
bias force pushes the atoms up the gradient of σ². ∂σ²/∂r comes from autograd through the model (the
adapter's hook, :data:`~e2ip_plugins.md.registry.VarianceFn`); compiled models that cannot give it are
refused at construction (:class:`~e2ip_plugins.md.registry.UDDUnsupportedError`).

Optional damping (seed 002 eq. 14), per atom, with C > 0 (eV/Å) and D > 0 (eV/Å):

    F_bias,i^limited = F_bias,i · D / (√(2π) C) · exp(−‖F_bias,i‖² / (2 C²))

which suppresses bias forces much larger than C. The damped force is **no longer the gradient of
E_bias** (nor of any energy in general): the reported energy is then not conserved by the dynamics
and ``energy`` is E + E_bias only as a diagnostic.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np
from ase.calculators.calculator import Calculator, all_changes

from .registry import MDConfigError, VarianceFn, variance_function_for

#: keys this wrapper adds to the base calculator's results
UDD_KEYS = ("model_energy", "model_forces", "udd_bias_energy", "udd_bias_forces", "udd_sigma2")


def check_udd_parameters(A: float, B: float, damping: Optional[Sequence[float]] = None) -> None:
    """:class:`MDConfigError` unless A ≥ 0, B > 0 (finite) and, with damping, C > 0 and D > 0."""
    if not (math.isfinite(A) and A >= 0):
        raise MDConfigError(f"UDD parameter A (bias depth, eV) must be a finite number >= 0, got {A}")
    if not (math.isfinite(B) and B > 0):
        raise MDConfigError(f"UDD parameter B (uncertainty scale, eV/A) must be a finite number > 0, got {B}")
    if damping is not None:
        if len(damping) != 2:
            raise MDConfigError(f"UDD damping takes two parameters (C, D), got {damping}")
        C, D = map(float, damping)
        if not (math.isfinite(C) and C > 0 and math.isfinite(D) and D > 0):
            raise MDConfigError(f"UDD damping parameters C and D must be finite numbers > 0, got C={C}, D={D}")


def bias_energy(sigma2: float, n_atoms: int, A: float, B: float) -> float:
    """E_bias = A·[exp(−σ²/(N B²)) − 1] (eV)."""
    return A * math.expm1(-sigma2 / (n_atoms * B * B))


def bias_forces(sigma2: float, grad_sigma2: np.ndarray, n_atoms: int, A: float, B: float,
                damping: Optional[Sequence[float]] = None) -> np.ndarray:
    """F_bias = (A/(N B²))·exp(−σ²/(N B²))·∂σ²/∂r, (N, 3) eV/Å; with ``damping=(C, D)`` eq. 14 per atom."""
    scale = A / (n_atoms * B * B) * math.exp(-sigma2 / (n_atoms * B * B))
    f = scale * np.asarray(grad_sigma2, dtype=np.float64).reshape(n_atoms, 3)
    if damping is not None:
        C, D = map(float, damping)
        norm2 = np.sum(f * f, axis=1, keepdims=True)
        f = f * (D / (math.sqrt(2.0 * math.pi) * C)) * np.exp(-norm2 / (2.0 * C * C))
    return f


def epistemic_variance_and_gradient(cov_epistemic, positions, n_atoms: int, energy_units_to_eV: float = 1.0,
                                    length_units_to_A: float = 1.0) -> Tuple[float, np.ndarray]:
    """σ² = Σ_i tr U_epi,i/3 of the first ``n_atoms`` atoms and ∂σ²/∂r (N, 3), in (eV/Å)² and (eV/Å)²/Å.

    ``cov_epistemic`` (≥ N, 3, 3) must come from a forward pass on ``positions`` (requires grad), in the
    model's units; the adapters' UDD hooks call this once they have run their model."""
    import torch

    with torch.enable_grad():
        epi = cov_epistemic.reshape(-1, 3, 3)[:n_atoms]
        sigma2 = torch.diagonal(epi, dim1=-2, dim2=-1).sum() / 3.0
        (grad,) = torch.autograd.grad(sigma2, positions)
    conv_f = energy_units_to_eV / length_units_to_A
    value = float(sigma2.detach()) * conv_f**2
    gradient = grad[:n_atoms].detach().to(torch.float64).cpu().numpy() * conv_f**2 / length_units_to_A
    return value, gradient


def epistemic_variance_from_results(results) -> float:
    """σ² = Σ_i tr U_epi,i / 3 from a calculator's results (``forces_covariance_epistemic``, else Σ u_i²)."""
    if "forces_covariance_epistemic" in results:
        cov = np.asarray(results["forces_covariance_epistemic"], dtype=np.float64)
        return float(np.trace(cov, axis1=-2, axis2=-1).sum() / 3.0)
    u = np.asarray(results["forces_uncertainty"], dtype=np.float64)
    return float(np.sum(u * u))


class UDDCalculator(Calculator):
    """ASE calculator: ``base_calc`` plus the UDD bias (module docstring).

    ``results`` hold every key of the base calculator (except ``stress``: the bias stress is not
    computed), with ``energy``/``free_energy``/``forces`` biased, plus :data:`UDD_KEYS`:
    ``model_energy``/``model_forces`` (unbiased), ``udd_bias_energy``, ``udd_bias_forces``, ``udd_sigma2``.

    Args:
        base_calc: calculator of an e2ip model (fills ``forces_covariance_epistemic`` or ``forces_uncertainty``).
        A: bias depth (eV), ≥ 0.  B: uncertainty scale (eV/Å), > 0.
        damping: ``(C, D)`` of seed 002 eq. 14 (eV/Å), or None (exact gradient of E_bias).
        variance_fn: atoms → (σ², ∂σ²/∂r); default: the installed adapter that recognises ``base_calc``
            (raises :class:`UDDUnsupportedError` for compiled models, naming the eager alternative).
    """

    def __init__(self, base_calc, A: float, B: float, damping: Optional[Tuple[float, float]] = None,
                 variance_fn: Optional[VarianceFn] = None, **kwargs):
        A, B = float(A), float(B)
        check_udd_parameters(A, B, damping)
        super().__init__(**kwargs)
        self.base = base_calc
        self.A, self.B = A, B
        self.damping = None if damping is None else (float(damping[0]), float(damping[1]))
        self.variance_fn = variance_fn if variance_fn is not None else variance_function_for(base_calc)
        base_props = [p for p in getattr(base_calc, "implemented_properties", ["energy", "forces"]) if p != "stress"]
        self.implemented_properties = list(dict.fromkeys(["energy", "free_energy", "forces"] + base_props + list(UDD_KEYS)))

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        n = len(atoms)
        energy = float(self.base.get_potential_energy(atoms))
        forces = np.array(self.base.get_forces(atoms), dtype=np.float64)
        results = {k: v for k, v in self.base.results.items() if k != "stress"}
        sigma2, grad = self.variance_fn(atoms)
        sigma2 = float(sigma2)
        e_bias = bias_energy(sigma2, n, self.A, self.B)
        f_bias = bias_forces(sigma2, grad, n, self.A, self.B, self.damping)
        results.update(
            model_energy=energy, model_forces=forces, udd_sigma2=sigma2, udd_bias_energy=e_bias,
            udd_bias_forces=f_bias, energy=energy + e_bias, free_energy=energy + e_bias, forces=forces + f_bias,
        )
        self.results = results


__all__ = [
    "UDDCalculator", "UDD_KEYS", "bias_energy", "bias_forces", "check_udd_parameters",
    "epistemic_variance_from_results",
]
