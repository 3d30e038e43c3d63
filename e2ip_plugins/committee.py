"""A committee of K ASE calculators as one calculator (DESIGN §3 keys; docs/energy_uncertainty.md §5).

Framework-agnostic: the members are any ASE calculators, so a NequIP committee is
``CommitteeCalculator([E2IPNequIPCalculator.from_saved_model(p) for p in paths])``. MACE's own
``E2IPMACECalculator(model_paths=[...])`` applies the same rule inside one calculator. With member forces
F_k and energies E_k (k = 1..K ≥ 2):

    F̄ = mean_k F_k,   C_i = 1/(K−1) Σ_k (F_ik − F̄_i)(F_ik − F̄_i)ᵀ          (``forces_covariance_committee``)
    e²IP members (each reports U_ale,k and U_epi,k):
        U_ale = mean_k U_ale,k,   U_epi = mean_k U_epi,k + C,   U_tot = U_ale + U_epi
    plain members:  U_epi = U_tot = C,   U_ale = 0
    u_i = sqrt(tr U_epi,i / 3),  and its max / mean over the structure
    σ_E,committee = sqrt(Var_k E_k)   (1/(K−1), ``energy_uncertainty_committee``)
    σ_E = sqrt(Var_k E_k + mean_k σ²_E,k)   (``energy_uncertainty``; σ_E,k = 0 for plain members)

Members with and without an e²IP head cannot be mixed (``ValueError``): the mean of their U_ale would
be meaningless.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from ase.calculators.calculator import Calculator, all_changes

from .ensemble import STRUCTURE_KEYS, structure_uncertainty_results

HEAD_KEYS = ("forces_covariance_aleatoric", "forces_covariance_epistemic")


class CommitteeCalculator(Calculator):
    """ASE calculator over K member calculators (module docstring). Results: ``energy``, ``forces`` (means),
    ``forces_covariance`` (U_tot), ``forces_covariance_epistemic``, ``forces_covariance_aleatoric``,
    ``forces_covariance_committee``, ``forces_uncertainty`` (+ ``_max``/``_mean``), ``energy_uncertainty``,
    ``energy_uncertainty_committee``, ``forces_committee`` (K, N, 3)."""

    implemented_properties = ["energy", "free_energy", "forces", "forces_covariance", "forces_covariance_epistemic",
                              "forces_covariance_aleatoric", "forces_covariance_committee", "forces_uncertainty",
                              "energy_uncertainty", "energy_uncertainty_committee", "forces_committee",
                              *STRUCTURE_KEYS]

    def __init__(self, members: Sequence[Calculator], **kwargs):
        super().__init__(**kwargs)
        if len(members) < 2:
            raise ValueError("a committee needs at least two members")
        self.members = list(members)

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        energies, forces, ale, epi, sig = [], [], [], [], []
        for calc in self.members:
            a = self.atoms.copy()
            a.calc = calc
            energies.append(float(a.get_potential_energy()))
            forces.append(np.array(a.get_forces(), dtype=np.float64))
            res = calc.results
            if all(k in res for k in HEAD_KEYS):
                ale.append(np.asarray(res[HEAD_KEYS[0]], dtype=np.float64).reshape(-1, 3, 3))
                epi.append(np.asarray(res[HEAD_KEYS[1]], dtype=np.float64).reshape(-1, 3, 3))
                sig.append(float(res.get("energy_uncertainty", 0.0)))
        if ale and len(ale) != len(self.members):
            raise ValueError(f"{len(ale)} of {len(self.members)} committee members report e2ip covariances: "
                             "use members that all have an e2ip head, or all plain models")
        f = np.stack(forces)  # (K, N, 3)
        e = np.asarray(energies)
        dev = f - f.mean(0)
        committee = np.einsum("kia,kib->iab", dev, dev) / (len(self.members) - 1)
        if ale:
            u_ale = np.mean(ale, axis=0)
            u_epi = np.mean(epi, axis=0) + committee
            mean_var = float(np.mean(np.square(sig)))
        else:
            u_ale, u_epi, mean_var = np.zeros_like(committee), committee.copy(), 0.0
        var_e = float(np.var(e, ddof=1))
        u = np.sqrt(np.clip(np.trace(u_epi, axis1=1, axis2=2) / 3.0, 0.0, None))
        self.results = {"energy": float(e.mean()), "free_energy": float(e.mean()), "forces": f.mean(0),
                        "forces_covariance": u_ale + u_epi, "forces_covariance_epistemic": u_epi,
                        "forces_covariance_aleatoric": u_ale, "forces_covariance_committee": committee,
                        "forces_uncertainty": u, "forces_committee": f,
                        "energy_uncertainty": float(np.sqrt(var_e + mean_var)),
                        "energy_uncertainty_committee": float(np.sqrt(var_e)),
                        **{k: float(v) for k, v in structure_uncertainty_results(u).items()}}


__all__ = ["CommitteeCalculator"]
