"""Energy uncertainty of E2IP MACE models: fit of the stored length scale on validation energies (issue 15).

``energy_uncertainty`` = ℓ·sqrt(Σ_i tr U_tot,i/3) (eV, per structure) is computed inside the model
(:class:`e2ip_plugins.energy_uq.EnergyUncertainty`, submodule ``e2ip_energy_uq``); ℓ̂² = mean_s r_E,s²/v_s
over the validation structures (v_s = Σ_i tr U_tot,i/3 of the calibrated model), fitted by
:func:`mace_ext.fit_novelty.fit_novelty` right after the force level — i.e. by ``mace_run_train_e2ip`` before
it saves the ``.model`` / ``_compiled.model`` files and by ``mace_fit_novelty_e2ip``.
"""

import logging
from typing import Dict

import torch

from e2ip_plugins.energy_uq import fit_energy_length

from .validation_columns import energy_columns


def fit_energy_noise(model: torch.nn.Module, valid_loaders, device=None) -> Dict[str, float]:
    """Fit the stored energy length ℓ of ``energy_uncertainty`` on the validation energies (after the force
    level, so the calibrated U_tot is used; :func:`e2ip_plugins.energy_uq.fit_energy_length`)."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    res = fit_energy_length(model.e2ip_energy_uq, energy_columns(model, valid_loaders, device))
    model.train(was_training)
    what = "factor k of the energy-noise head" if getattr(model, "e2ip_energy_noise_enabled", False) else \
        "length scale l (A)"
    logging.info("e2ip: energy %s fitted on %d validation structures: %.4g (val energy NLL %.4f)", what,
                 int(res["structures"]), res["length"], res["nll"])
    return res


__all__ = ["energy_columns", "fit_energy_noise"]
