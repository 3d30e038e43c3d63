"""``E2IPNequIPCalculator``: NequIP's ASE calculator plus the e2ip force covariances (DESIGN §3).

A subclass of :class:`nequip.integrations.ase.NequIPCalculator` (energy, free_energy, energies,
forces and stress exactly as NequIP fills them) whose ``results`` also hold, per atom,

========================================  ==========  ==========================================
key                                       shape       meaning
========================================  ==========  ==========================================
``forces_covariance``                     (N, 3, 3)   total predictive covariance U_tot (eV/Å)²
``forces_covariance_epistemic``           (N, 3, 3)   U_epi (eV/Å)²
``forces_covariance_aleatoric``           (N, 3, 3)   U_ale (eV/Å)²
``forces_uncertainty``                    (N,)        u = sqrt(tr U_epi / 3) (eV/Å)
``forces_uncertainty_max``, ``_mean``      ()          max and mean of u over the structure (DESIGN §2.5)
``energy_uncertainty``                    ()          σ_E = ℓ·sqrt(Σ_i tr U_tot,i/3) (eV), APPROXIMATION from
                                                      the force covariance (docs/energy_uncertainty.md §4),
                                                      ℓ fitted on validation energies and stored in the model
========================================  ==========  ==========================================

all listed in ``implemented_properties`` (so ``atoms.calc.get_property("forces_covariance")`` works).

Loading::

    # compiled: nequip-compile model.ckpt model.nequip.pt2 --mode aotinductor --device cpu --target e2ip_ase
    calc = E2IPNequIPCalculator.from_compiled_model("model.nequip.pt2", device="cpu")
    # eager, from a checkpoint or a `nequip-package build` file
    calc = E2IPNequIPCalculator.from_saved_model("model.nequip.zip", device="cpu")

AOTInductor models must be compiled with ``--target e2ip_ase`` (NequIP's plain ``ase`` target drops the
covariance outputs); loading one compiled for another target raises a ``ValueError`` that says so.
Artefacts compiled before ``energy_uncertainty`` existed (and old packages) still load, with a warning:
their ``energy_uncertainty`` comes from ``forces_covariance`` with the unfitted default ℓ = 0.1 Å.
"""

import dataclasses
import warnings
from pathlib import Path
from typing import Dict, Union

import torch

from nequip.data import AtomicDataDict
from nequip.integrations.ase import NequIPCalculator

from e2ip_plugins.energy_noise import DEFAULT_LENGTH_SCALE
from e2ip_plugins.energy_uq import LEGACY_WARNING
from e2ip_plugins.ensemble import STRUCTURE_KEYS, structure_uncertainty_results

from . import _keys as K
from .compile import E2IP_ASE_TARGET, E2IP_EXTRA_OUTPUTS, LEGACY_EXTRA_OUTPUTS, e2ip_ase_target

_NEEDS_TARGET = (
    "compile it with `nequip-compile <model> <out>.nequip.pt2 --mode aotinductor --device <device> "
    f"--target {E2IP_ASE_TARGET}` (NequIP's `--target ase` drops the force covariances)"
)


class E2IPNequIPCalculator(NequIPCalculator):
    """ASE calculator for :class:`~nequip_ext.EvidentialNequIPGNNModel` models (compiled, packaged or checkpoints).

    Same constructor arguments as :class:`nequip.integrations.ase.NequIPCalculator`; build it with
    :meth:`from_compiled_model` (``--target e2ip_ase`` artefacts) or :meth:`from_saved_model`.
    Covariances scale with ``energy_units_to_eV / length_units_to_A`` squared, like forces squared.
    """

    implemented_properties = (list(NequIPCalculator.implemented_properties) + list(E2IP_EXTRA_OUTPUTS)
                              + [K.E2IP_NOVELTY_KEY] + list(STRUCTURE_KEYS))

    _legacy_target = False  # set while retrying an artefact compiled before energy_uncertainty existed

    @classmethod
    def _get_aoti_compile_target(cls) -> Dict:
        return e2ip_ase_target(legacy=cls._legacy_target)

    @classmethod
    def from_compiled_model(cls, compile_path: Union[str, Path], device: Union[str, torch.device] = "cpu", **kwargs):
        """Load a ``nequip-compile --mode aotinductor --target e2ip_ase`` model (``.nequip.pt2``).

        Keyword arguments as :meth:`nequip.integrations.ase.NequIPCalculator.from_compiled_model`
        (``chemical_species_to_atom_type_map``, ``neighborlist_backend``, ...). TorchScript models
        (``.nequip.pth``, torch < 2.10 only) return every field and load as well.

        Raises:
            ValueError: an AOTInductor model compiled for another target (e.g. NequIP's ``--target ase``,
                which drops the covariances); the message names ``--target e2ip_ase``.
        """
        try:
            return super().from_compiled_model(compile_path, device=device, **kwargs)
        except ValueError as err:
            # nequip/model/inference_models/aotinductor.py:_resolve_aot_keys compares the fields this class asks
            # for (the e2ip_ase target) with those stored in the artefact and raises ValueError if they differ
            if "do not match metadata" not in str(err):
                raise
            try:  # an e2ip_ase artefact compiled before issue 15 (no energy_uncertainty output)
                cls._legacy_target = True
                calc = super().from_compiled_model(compile_path, device=device, **kwargs)
                warnings.warn(f"{compile_path}: compiled before energy_uncertainty existed; " + LEGACY_WARNING
                              + " (or recompile with --target e2ip_ase)")
                return calc
            except ValueError:
                pass
            finally:
                cls._legacy_target = False
            raise ValueError(
                f"`{compile_path}` was not compiled with `--target {E2IP_ASE_TARGET}`: its stored input/output fields "
                f"differ from that target's (outputs {e2ip_ase_target()['output']}); " + _NEEDS_TARGET + f". NequIP: {err}"
            ) from err

    @classmethod
    def from_saved_model(cls, model_path: Union[str, Path], device: Union[str, torch.device] = "cpu", **kwargs):
        """Load an eager model from a checkpoint (``.ckpt``) or a ``nequip-package build`` file (``.nequip.zip``).

        Keyword arguments as NequIP's ``_from_saved_model`` (``chemical_species_to_atom_type_map``,
        ``allow_tf32``, ``model_name``, ``compile_mode``, ``neighborlist_backend``, ...).
        """
        return cls._from_saved_model(model_path, device=device, **kwargs)

    def save_extra_outputs(self, out: AtomicDataDict.Type) -> None:
        """Copy the DESIGN §3 covariance keys from the model output into ``self.results``."""
        missing = [k for k in LEGACY_EXTRA_OUTPUTS if k not in out]
        if missing:
            raise KeyError(
                f"the model output lacks {missing}: use an nequip_ext.EvidentialNequIPGNNModel model; for compiled "
                "models, " + _NEEDS_TARGET
            )
        force_unit = self.energy_units_to_eV / self.length_units_to_A
        for k in K.COVARIANCE_KEYS:
            self.results[k] = force_unit**2 * out[k].detach().cpu().numpy().reshape(-1, 3, 3)
        u = out[K.FORCES_UNCERTAINTY_KEY].detach().cpu().numpy().reshape(-1)
        self.results[K.FORCES_UNCERTAINTY_KEY] = force_unit * u
        self.results.update(structure_uncertainty_results(force_unit * u))
        if K.ENERGY_UNCERTAINTY_KEY in out:  # (frames, 1), eV in model units
            sigma = float(out[K.ENERGY_UNCERTAINTY_KEY].detach().reshape(-1)[0])
        else:  # model built before issue 15: unfitted default length (module docstring)
            if not getattr(self, "_warned_energy", False):
                warnings.warn("E2IPNequIPCalculator: " + LEGACY_WARNING)
                self._warned_energy = True
            cov = out[K.FORCES_COVARIANCE_KEY].detach().double().reshape(-1, 3, 3)
            sigma = DEFAULT_LENGTH_SCALE * float(torch.diagonal(cov, dim1=-2, dim2=-1).sum() / 3.0) ** 0.5
        self.results[K.ENERGY_UNCERTAINTY_KEY] = self.energy_units_to_eV * sigma
        if K.E2IP_NOVELTY_KEY in out:  # eager models: novelty ratio s/s_ref per atom (e2ip_plugins.novelty)
            self.results[K.E2IP_NOVELTY_KEY] = out[K.E2IP_NOVELTY_KEY].detach().cpu().numpy().reshape(-1)
        # raw evidence (eager models only: the e2ip_ase target returns the covariances, not the evidence)
        raw = [k for k in list(K.E2IP_HEAD_FIELDS.values()) + list(K.EIP_HEAD_FIELDS.values()) if k in out]
        if raw and K.E2IP_COMMITTEE_FORCES_KEY in out:  # the committee's level is the deployed predictive
            raw += [K.E2IP_COMMITTEE_FORCES_KEY, K.FORCES_COVARIANCE_EPISTEMIC_KEY, K.FORCES_COVARIANCE_ALEATORIC_KEY]
        self.e2ip_evidence = {k: out[k].detach().cpu() for k in raw + [AtomicDataDict.FORCE_KEY] if raw}

    def predictive(self):
        """Exact per-atom force predictive of the last calculation, in eV/Å (eager models only).

        ``StudentTPredictive`` (e²IP head) or ``IndependentStudentTPredictive`` (eIP head), built by
        ``e2ip_plugins`` from the model's raw evidence and forces (the same function the training metrics use);
        with the in-model committee, the deployed ``GaussianPredictive`` N(γ, U_ale + U_epi) of its level.

        Raises:
            ValueError: no calculation yet, or a compiled model (its ``e2ip_ase`` outputs hold the
                covariances but not the evidence; load the checkpoint or package with :meth:`from_saved_model`).
        """
        from .train import predictive as predictive_from_output

        evidence = getattr(self, "e2ip_evidence", None)
        if not evidence:
            raise ValueError(
                "no raw evidence from the last calculation: run a calculation first; compiled (e2ip_ase) models "
                "return the covariances only, load a checkpoint or package with from_saved_model for the predictive"
            )
        q = next((float(m.q) for m in self.model.modules() if type(m).__name__ == "EIPHeadModule"), 0.5)
        pred = predictive_from_output(evidence, q=q, dtype=torch.float64)
        force_unit = self.energy_units_to_eV / self.length_units_to_A
        if force_unit == 1.0:
            return pred
        return dataclasses.replace(pred.scaled(force_unit**2), mean=pred.mean * force_unit)
