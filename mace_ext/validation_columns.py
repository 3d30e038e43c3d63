"""Validation passes of an E2IP MACE model: its evaluation outputs, and the columns the stored fits read.

:func:`level_columns` feeds the stored calibration [c, β] (:func:`e2ip_plugins.level.fit_stored_level`),
:func:`energy_columns` the stored energy length (:func:`e2ip_plugins.energy_uq.fit_energy_length`).
"""

import torch


def validation_outputs(model: torch.nn.Module, loaders, device):
    """Yield ``(data, output)`` of the model's evaluation forward (with forces) over every validation batch."""
    for loader in loaders:
        for batch in loader:
            data = batch.to(device).to_dict()
            yield data, model(data, training=False, compute_force=True)


def level_columns(model: torch.nn.Module, loaders, device):
    """Yield the per-atom validation columns of :func:`e2ip_plugins.level.fit_stored_level` (full forward)."""
    for data, out in validation_outputs(model, loaders, device):
        yield {
            "nu": out["e2ip_nu"], "kappa": out["e2ip_kappa"], "sigma0_inv": out["e2ip_sigma0_inv"],
            "sigma0_logdet": out["e2ip_sigma0_logdet"], "residual": data["forces"] - out["forces"],
            "ratio": out["e2ip_novelty"], "sigma0": out["e2ip_sigma0"], "frame": data["batch"],
            "species": torch.argmax(data["node_attrs"], dim=-1),
        }


def committee_columns(model: torch.nn.Module, loaders, device):
    """(γ, y, U_ale, members (N, M, 3)) over the validation atoms: the columns of
    :func:`e2ip_plugins.committee_level.fit_committee_scale` (issue 26)."""
    cols = [(out["forces"].detach(), data["forces"], out["forces_covariance_aleatoric"].detach(),
             out["e2ip_committee_forces"].detach()) for data, out in validation_outputs(model, loaders, device)]
    return tuple(torch.cat(c) for c in zip(*cols))


def energy_columns(model: torch.nn.Module, loaders, device):
    """Yield per-structure validation energy residuals (structures with an energy) and the variance the stored
    factor k scales, (σ_E/k)²: Σ_i tr U_tot,i/3, or A² + Σ_i ℓ_i² tr U_tot,i/3 with the energy-noise head."""
    k = model.e2ip_energy_uq.length
    for data, out in validation_outputs(model, loaders, device):
        num = data["ptr"].numel() - 1
        keep = data["energy_weight"].reshape(-1) > 0 if "energy_weight" in data else torch.ones(num, dtype=torch.bool, device=out["energy"].device)
        sigma = out["energy_uncertainty"].detach().to(torch.float64)
        yield {"energy_residual": (data["energy"] - out["energy"]).detach()[keep], "force_var": ((sigma / k) ** 2)[keep]}
