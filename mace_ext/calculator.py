"""ASE calculator for MACE models with an e2ip/eip head (DESIGN §3).

``E2IPMACECalculator`` is ``mace.calculators.MACECalculator`` (same arguments: one
or several ``model_paths``, ``device``, ``default_dtype``, ...) that also fills

=================================  =========  =====================================================
``forces_covariance``              (N,3,3)    total predictive covariance U_tot, (eV/Å)²
``forces_covariance_epistemic``    (N,3,3)    U_epi
``forces_covariance_aleatoric``    (N,3,3)    U_ale
``forces_uncertainty``             (N,)       u_i = sqrt(tr U_epi / 3), eV/Å
``forces_uncertainty_max/_mean``   ()         max and mean of u_i over the structure (DESIGN §2.5)
``forces_covariance_committee``    (N,3,3)    committees only: 3×3 sample covariance of the members'
                                              forces, 1/(K−1) Σ_k (F_k − F̄)(F_k − F̄)ᵀ
``energy_uncertainty``             ()         σ_E, eV: the model's ℓ·sqrt(Σ_i tr U_tot,i/3) (APPROXIMATION,
                                              docs/energy_uncertainty.md §4, ℓ stored in the model);
                                              committees: sqrt(Var_k E_k + mean_k σ²_E,k) (§5)
``energy_uncertainty_committee``   ()         committees only: sqrt(Var_k E_k), the epistemic part, 1/(K−1)
=================================  =========  =====================================================

``calc.predictive()`` gives, for one model, the exact ``e2ip_plugins`` predictive of
the last calculation (``StudentTPredictive`` for an ``e2ip`` head,
``IndependentStudentTPredictive`` for ``eip``; eV/Å), from the raw evidence the model
returns (``calc.e2ip_evidence``: ``e2ip_nu``, ``e2ip_kappa``, ``e2ip_sigma0``, ... as
(K, N, ...) arrays).

With K > 1 models, the head covariances are averaged over the members and the
committee's spread is added to the epistemic (and total) part:
U_epi = mean_k U_epi,k + committee covariance; ``forces_uncertainty`` is then
computed from that U_epi. Models without a head (plain MACE committees) give only
the committee keys, and need K ≥ 2. All keys are in ``implemented_properties``.
Models saved before ``energy_uncertainty`` existed (old ``_compiled.model`` files) get it from their
``forces_covariance`` with the unfitted default ℓ = 0.1 Å, with a warning.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import numpy as np
import torch
from ase.calculators.calculator import all_changes

import e2ip_plugins  # noqa: F401  (allow-lists e3nn's constants before mace imports e3nn)
from e2ip_plugins import ensemble_predictive
from e2ip_plugins.energy_noise import DEFAULT_LENGTH_SCALE
from e2ip_plugins.energy_uq import ENERGY_UNCERTAINTY_KEY, LEGACY_WARNING, committee_energy_uncertainty
from e2ip_plugins.ensemble import STRUCTURE_KEYS, structure_uncertainty_results
from e2ip_plugins.predictive import atom_uncertainty
from mace.calculators.mace import MACECalculator

from .outputs import ATOM_LEVEL_KEYS, COVARIANCE_KEYS, predictive_from_output

EVIDENCE_KEYS = tuple(k for k in ATOM_LEVEL_KEYS if k not in COVARIANCE_KEYS)
MEMBERS_KEY = "e2ip_committee_forces"  # the in-model committee's members (N, M, 3): its level is the predictive
RAW_KEYS = EVIDENCE_KEYS + (MEMBERS_KEY,)

COMMITTEE_KEY = "forces_covariance_committee"
ENERGY_COMMITTEE_KEY = "energy_uncertainty_committee"
_SHAPES = {
    "forces_covariance": (3, 3),
    "forces_covariance_epistemic": (3, 3),
    "forces_covariance_aleatoric": (3, 3),
    "forces_uncertainty": (),
}


class E2IPMACECalculator(MACECalculator):
    """MACECalculator that reports the e2ip force covariances (see module docstring)."""

    def __init__(self, model_paths=None, models=None, device: str = "cpu", default_dtype: str = "", **kwargs):
        super().__init__(model_paths=model_paths, models=models, device=device, default_dtype=default_dtype, **kwargs)
        self.has_head = all(hasattr(m, "e2ip_head") for m in self.models)
        if not self.has_head and self.num_models < 2:
            raise ValueError(
                "E2IPMACECalculator needs a model trained with mace_run_train_e2ip (it has no e2ip head) "
                "or a committee of >= 2 models"
            )
        extra = list(COVARIANCE_KEYS) + list(STRUCTURE_KEYS) + [ENERGY_UNCERTAINTY_KEY]
        if self.num_models > 1:
            extra += [COMMITTEE_KEY, ENERGY_COMMITTEE_KEY]
        # instance copy: MACECalculator extends ASE's class-level list in place
        self.implemented_properties = list(dict.fromkeys(list(self.implemented_properties) + extra))
        self._e2ip_ret: Optional[Dict[str, torch.Tensor]] = None
        self.e2ip_evidence: Dict[str, np.ndarray] = {}

    @staticmethod
    def _slice_real_outputs(out, num_real_atoms: int):
        sliced = MACECalculator._slice_real_outputs(out, num_real_atoms)
        for key in ATOM_LEVEL_KEYS + (MEMBERS_KEY,):
            value = sliced.get(key)
            if torch.is_tensor(value):
                sliced[key] = value[:num_real_atoms]
        return sliced

    def _create_result_tensors(self, num_models: int, num_atoms: int, batch, out: dict):
        dict_of_tensors, node_e0 = super()._create_result_tensors(num_models, num_atoms, batch, out)
        for key, shape in _SHAPES.items():
            if out.get(key) is not None:
                dict_of_tensors[key] = torch.zeros(num_models, num_atoms, *shape, device=self.device, dtype=out[key].dtype)
        for key in RAW_KEYS:  # raw head (and committee) outputs, for the exact predictive
            if torch.is_tensor(out.get(key)):
                dict_of_tensors[key] = torch.zeros(
                    num_models, num_atoms, *out[key].shape[1:], device=self.device, dtype=out[key].dtype
                )
        if out.get(ENERGY_UNCERTAINTY_KEY) is not None:
            dict_of_tensors[ENERGY_UNCERTAINTY_KEY] = torch.zeros(num_models, device=self.device,
                                                                  dtype=out[ENERGY_UNCERTAINTY_KEY].dtype)
        if "forces" not in dict_of_tensors and out.get("forces") is not None:  # pragma: no cover
            dict_of_tensors["forces"] = torch.zeros(num_models, num_atoms, 3, device=self.device, dtype=out["forces"].dtype)
        self._e2ip_ret = dict_of_tensors  # filled in place by MACECalculator.calculate
        return dict_of_tensors, node_e0

    def calculate(self, atoms=None, properties=None, system_changes=all_changes):
        self._e2ip_ret = None
        self.e2ip_evidence = {}
        super().calculate(atoms, properties, system_changes)
        ret = self._e2ip_ret
        if ret is None:  # pragma: no cover
            return
        raw = RAW_KEYS + (("forces_covariance_epistemic", "forces_covariance_aleatoric") if MEMBERS_KEY in ret else ())
        self.e2ip_evidence = {k: ret[k].cpu().numpy() for k in raw if k in ret}
        conv_f = self.energy_units_to_eV / self.length_units_to_A
        conv2 = conv_f**2
        cov = {k: ret[k].mean(0) for k in ("forces_covariance", "forces_covariance_epistemic",
                                             "forces_covariance_aleatoric") if k in ret}
        if self.num_models > 1 and "forces" in ret:
            committee = ensemble_predictive(ret["forces"], jitter=0.0).covariance_epistemic
            self.results[COMMITTEE_KEY] = (committee * conv2).cpu().numpy()
            if cov:
                cov["forces_covariance_epistemic"] = cov["forces_covariance_epistemic"] + committee
                cov["forces_covariance"] = cov["forces_covariance"] + committee
            else:
                zeros = torch.zeros_like(committee)
                cov = {"forces_covariance": committee, "forces_covariance_epistemic": committee,
                       "forces_covariance_aleatoric": zeros}
        for key, value in cov.items():
            self.results[key] = (value * conv2).cpu().numpy()
        if "forces_covariance_epistemic" in cov:
            u = (atom_uncertainty(cov["forces_covariance_epistemic"]) * conv_f).cpu().numpy()
            self.results["forces_uncertainty"] = u
            self.results.update(structure_uncertainty_results(u))
        self._energy_uncertainty(ret)

    def _energy_uncertainty(self, ret: Dict[str, torch.Tensor]) -> None:
        """``energy_uncertainty`` (and ``energy_uncertainty_committee``) of the last calculation (module docstring)."""
        sigma = ret.get(ENERGY_UNCERTAINTY_KEY)  # (K,) per member, model units
        if sigma is None and self.has_head and "forces_covariance" in ret:  # model saved before issue 15
            if not getattr(self, "_warned_energy", False):
                import warnings

                warnings.warn("E2IPMACECalculator: " + LEGACY_WARNING)
                self._warned_energy = True
            tr = torch.diagonal(ret["forces_covariance"], dim1=-2, dim2=-1).sum((-1, -2)) / 3.0
            sigma = DEFAULT_LENGTH_SCALE * torch.sqrt(tr)
        energy = ret.get("energy")
        if self.num_models > 1 and energy is not None:
            e = energy.reshape(self.num_models, 1).double()
            s = sigma.reshape(self.num_models, 1).double() if sigma is not None and self.has_head else None
            total = committee_energy_uncertainty(e, s)
            self.results[ENERGY_COMMITTEE_KEY] = float(committee_energy_uncertainty(e)[0]) * self.energy_units_to_eV
            self.results[ENERGY_UNCERTAINTY_KEY] = float(total[0]) * self.energy_units_to_eV
        elif sigma is not None:
            self.results[ENERGY_UNCERTAINTY_KEY] = float(sigma[0]) * self.energy_units_to_eV

    def predictive(self):
        """Exact per-atom predictive of the last calculation (one model only), in eV/Å.

        ``StudentTPredictive`` (``e2ip`` head) or ``IndependentStudentTPredictive`` (``eip``),
        built by ``e2ip_plugins`` from the model's raw evidence and forces; with the in-model committee
        (``--e2ip_committee``), the deployed ``GaussianPredictive`` N(γ, U_ale + U_epi) of its level. A
        committee of several models' predictive is a mixture, which this does not provide (raises ``ValueError``).
        """
        if self.num_models != 1 or not self.has_head:
            raise ValueError("the exact predictive needs exactly one model with an e2ip/eip head")
        if not self.e2ip_evidence or "forces" not in self.results:
            raise ValueError("no calculation with evidence outputs yet")
        conv_f = self.energy_units_to_eV / self.length_units_to_A
        out = {k: torch.as_tensor(v[0]) for k, v in self.e2ip_evidence.items()}
        forces = torch.as_tensor(np.asarray(self.results["forces"]), dtype=next(iter(out.values())).dtype)
        quantile = float(getattr(self.models[0], "e2ip_quantile", 0.5))
        pred = predictive_from_output(out, quantile, forces=forces / conv_f)  # model units
        if conv_f == 1.0:
            return pred
        return dataclasses.replace(pred.scaled(conv_f**2), mean=pred.mean * conv_f)


__all__ = ["COMMITTEE_KEY", "ENERGY_COMMITTEE_KEY", "STRUCTURE_KEYS", "E2IPMACECalculator"]
