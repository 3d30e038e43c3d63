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

The math is :func:`~e2ip_plugins.ensemble.ensemble_predictive` (forces) and
:func:`~e2ip_plugins.energy_noise.committee_energy` (energy); this class only gathers the members' results.
Members with and without an e²IP head cannot be mixed (``ValueError``): the mean of their U_ale would
be meaningless.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes

from .energy_noise import committee_energy
from .ensemble import STRUCTURE_KEYS, ensemble_predictive, structure_uncertainty_results
from .head_covariance import covariance_uncertainty

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
        f = torch.as_tensor(np.stack(forces))  # (K, N, 3)
        ens = ensemble_predictive(f, torch.as_tensor(np.stack(ale)) if ale else None, jitter=0.0)
        committee = ens.covariance_epistemic  # C_i, 1/(K−1)
        u_epi = committee + torch.as_tensor(np.mean(epi, axis=0)) if ale else committee.clone()
        e = torch.tensor(energies, dtype=torch.float64).reshape(-1, 1)
        var = torch.tensor(sig, dtype=torch.float64).reshape(-1, 1) ** 2 if ale else None
        mean_e, var_tot, var_epi, _ = (float(x) for x in committee_energy(e, var))
        u = covariance_uncertainty(u_epi).numpy()
        u_ale, u_epi, committee = ens.covariance_aleatoric.numpy(), u_epi.numpy(), committee.numpy()
        self.results = {"energy": mean_e, "free_energy": mean_e, "forces": ens.mean.numpy(),
                        "forces_covariance": u_ale + u_epi, "forces_covariance_epistemic": u_epi,
                        "forces_covariance_aleatoric": u_ale, "forces_covariance_committee": committee,
                        "forces_uncertainty": u, "forces_committee": f.numpy(),
                        "energy_uncertainty": var_tot ** 0.5, "energy_uncertainty_committee": var_epi ** 0.5,
                        **{k: float(v) for k, v in structure_uncertainty_results(u).items()}}


__all__ = ["CommitteeCalculator"]
