"""NequIP adapter of the MD tools (``e2ip.calculators`` entry points ``.ckpt``, ``.nequip.zip``,
``.nequip.pt2``; DESIGN §6).

- :meth:`NequIPAdapter.open`: :meth:`E2IPNequIPCalculator.from_saved_model` for checkpoints and packages
  (eager), :meth:`E2IPNequIPCalculator.from_compiled_model` for AOTInductor ``.nequip.pt2`` files
  (``--target e2ip_ase``); chemical species are mapped to the model's type names.
- :meth:`NequIPAdapter.variance_function`: the UDD hook σ²(r) = Σ_i tr U_epi,i / 3 and ∂σ²/∂r by autograd.

How the gradient is taken: NequIP's ``ForceStressOutput`` differentiates the energy with
``create_graph=self.training``; in eval mode the graph of the covariance fields is freed with it, and
train mode would change the model (the novelty factor is gated by the module mode). The hook therefore
runs the wrapped energy network (``ForceStressOutput.func``, the ``SequentialGraphNetwork`` holding the
head and ``uq_novelty``) on the calculator's own input dict (same neighbour list and transforms) with
positions that require grad, and differentiates Σ tr ``forces_covariance_epistemic`` / 3. Compiled
(AOTInductor) models export the forward only, so UDD refuses them at construction and names the eager
checkpoint / package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import torch

from e2ip_plugins.md.registry import MDConfigError, UDDUnsupportedError, VarianceFn
from e2ip_plugins.md.udd import epistemic_variance_and_gradient

from . import _keys as K

_COMPILED_SUFFIXES = (".nequip.pt2", ".pt2", ".nequip.pth")
_GRAD_OUTPUT_CLASSES = ("ForceStressOutput", "ForceOutput")


def _energy_network(model: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The energy network inside NequIP's force wrapper (by class name: packaged models carry their own
    copies of NequIP's classes, so ``isinstance`` does not hold for them)."""
    for module in model.modules():
        if type(module).__name__ in _GRAD_OUTPUT_CLASSES and isinstance(getattr(module, "func", None), torch.nn.Module):
            return module.func
    return None


def _epistemic_variance(calc, network: torch.nn.Module, atoms) -> Tuple[float, np.ndarray]:
    from nequip.data import AtomicDataDict

    n = len(atoms)
    data = calc.atoms_to_data(atoms)  # NequIP's own conversion: neighbour list, type mapping, device
    fields = getattr(calc.model, "model_input_fields", None)
    if fields is not None:  # what GraphModel.forward passes on
        data = {k: v for k, v in data.items() if k in fields}
    pos = data[AtomicDataDict.POSITIONS_KEY].detach().clone().requires_grad_(True)
    data[AtomicDataDict.POSITIONS_KEY] = pos
    with torch.enable_grad():
        out = network(data)
    return epistemic_variance_and_gradient(out[K.FORCES_COVARIANCE_EPISTEMIC_KEY], pos, n,
                                           calc.energy_units_to_eV, calc.length_units_to_A)


class NequIPAdapter:
    """Opens NequIP checkpoints, packages and ``e2ip_ase`` AOTInductor models; gives the UDD σ² hook."""

    name = "nequip"
    suffixes = (".ckpt", ".nequip.zip", ".nequip.pt2")

    def open(self, path: Union[str, Path], device: str = "cpu"):
        from .calculator import E2IPNequIPCalculator

        path = str(path)
        try:
            if path.endswith(_COMPILED_SUFFIXES):
                calc = E2IPNequIPCalculator.from_compiled_model(path, device=device, chemical_species_to_atom_type_map=True)
            else:
                calc = E2IPNequIPCalculator.from_saved_model(path, device=device, chemical_species_to_atom_type_map=True)
        except ValueError as err:  # e.g. compiled with NequIP's `--target ase` (no covariance outputs)
            raise MDConfigError(f"{path}: {err}") from err
        calc.e2ip_source = path
        return calc

    def variance_function(self, calc) -> Optional[VarianceFn]:
        from .calculator import E2IPNequIPCalculator

        if not isinstance(calc, E2IPNequIPCalculator):
            return None
        source = getattr(calc, "e2ip_source", "the model")
        network = _energy_network(calc.model)
        if network is None:
            raise UDDUnsupportedError(
                f"UDD needs the gradient of the epistemic variance with respect to the positions, but {source} is a "
                "compiled (AOTInductor) model that exports the forward pass only. Run UDD on the eager model: the "
                "checkpoint (.ckpt) or the `nequip-package build` file (.nequip.zip) it was compiled from "
                "(E2IPNequIPCalculator.from_saved_model)."
            )
        return lambda atoms: _epistemic_variance(calc, network, atoms)


ADAPTER = NequIPAdapter()

__all__ = ["ADAPTER", "NequIPAdapter"]
