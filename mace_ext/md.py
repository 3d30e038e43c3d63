"""MACE adapter of the MD tools (``e2ip.calculators`` entry point ``.model``; DESIGN §6).

- :meth:`MACEAdapter.open`: ``E2IPMACECalculator(model_paths=path, device=..., default_dtype="float64")``.
- :meth:`MACEAdapter.variance_function`: the UDD hook σ²(r) = Σ_i tr U_epi,i / 3 and ∂σ²/∂r by autograd.

How the gradient is taken: MACE's ``forward`` computes the forces itself with
``torch.autograd.grad(..., retain_graph=training, create_graph=training)``, so with ``training=False``
the graph of the node features would be freed before σ² could be differentiated, and ``training=True``
would switch off the novelty factor (``e2ip_plugins.novelty`` is gated by ``training``) and change σ².
The hook therefore runs a second forward with ``training=False, compute_force=False`` (the e2ip
outputs are built from ``node_feats``, which stay attached to ``positions``) and differentiates σ²
with respect to the positions tensor of the batch. The calculator's own forward gives energy,
forces and the covariances; the hook's σ² equals Σ tr of its ``forces_covariance_epistemic`` / 3.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import torch

from e2ip_plugins.md.registry import MDConfigError, UDDUnsupportedError, VarianceFn
from e2ip_plugins.md.udd import epistemic_variance_and_gradient

from .calculator import E2IPMACECalculator


def _epistemic_variance(calc: E2IPMACECalculator, atoms) -> Tuple[float, np.ndarray]:
    model = calc.models[0]
    n = len(atoms)
    batch = calc._atoms_to_batch(atoms)  # MACE's own graph construction (cutoff, species, padding)
    dtype = next(model.parameters()).dtype
    data = batch.to_dict()
    for key, value in data.items():
        if torch.is_tensor(value) and torch.is_floating_point(value):
            data[key] = value.to(dtype=dtype)
    positions = data["positions"].detach().clone().requires_grad_(True)
    data["positions"] = positions
    with torch.enable_grad():
        out = model(data, training=False, compute_force=False, compute_stress=False)
    return epistemic_variance_and_gradient(out["forces_covariance_epistemic"], positions, n,
                                           calc.energy_units_to_eV, calc.length_units_to_A)


class MACEAdapter:
    """Opens MACE ``.model`` files with :class:`E2IPMACECalculator`; gives the UDD σ² hook."""

    name = "mace"
    suffixes = (".model",)

    def open(self, path: Union[str, Path], device: str = "cpu") -> E2IPMACECalculator:
        try:
            return E2IPMACECalculator(model_paths=str(path), device=device, default_dtype="float64")
        except ValueError as err:  # no e2ip head: the calculator says so
            raise MDConfigError(f"{path}: {err}") from err
        except RuntimeError as err:
            if "PytorchStreamReader" in str(err) or "constants.pkl" in str(err) or "TorchScript" in str(err):
                raise MDConfigError(
                    f"{path} is not an eager MACE model (TorchScript `_compiled.model`?); use the `<name>.model` "
                    f"file that mace_run_train_e2ip writes next to it. ({err})"
                ) from err
            raise

    def variance_function(self, calc) -> Optional[VarianceFn]:
        if not isinstance(calc, E2IPMACECalculator):
            return None
        if calc.num_models != 1 or not calc.has_head:
            raise UDDUnsupportedError(
                "UDD needs exactly one MACE model with an e2ip/eip head (committees: no autograd σ² here)"
            )
        model = calc.models[0]
        if isinstance(model, torch.jit.ScriptModule) or getattr(calc, "use_compile", False):
            raise UDDUnsupportedError(
                "UDD needs the gradient of σ² through the eager model; this calculator holds a compiled MACE model. "
                "Use the eager `<name>.model` file (E2IPMACECalculator without compile_mode)."
            )
        return lambda atoms: _epistemic_variance(calc, atoms)


ADAPTER = MACEAdapter()

__all__ = ["ADAPTER", "MACEAdapter"]
