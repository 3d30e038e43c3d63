"""Validation passes of an E2IP MACE model: its evaluation outputs, and the columns the stored fits read.

:func:`level_columns` feeds the stored calibration [c, β] (:func:`e2ip_plugins.level.fit_stored_level`),
:func:`energy_columns` the stored energy length (:func:`e2ip_plugins.energy_uq.fit_energy_length`).
"""

import torch

from e2ip_plugins.committee_level import committee_variance, local_spread
from e2ip_plugins.head_covariance import eip_covariances, niw_covariances

from .geometric import edge_geometry


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
    """Over the validation atoms, the columns of the committee level's fit (issue 26): (γ, y, U_ale, members
    (N, M, 3)) for :func:`e2ip_plugins.committee_level.fit_committee_scale`, or, in the scaled-head form,
    (γ, y, U_ale, U_epi,head, s̃) for :func:`e2ip_plugins.committee_level.fit_scaled_level`."""
    scaled = model.e2ip_committee_level.scale_head
    cols = []
    for data, out in validation_outputs(model, loaders, device):
        members = out["e2ip_committee_forces"].detach()
        row = (out["forces"].detach(), data["forces"], out["forces_covariance_aleatoric"].detach())
        if scaled:
            center, neighbor, _ = edge_geometry(data)
            row += (head_epistemic(model, out).detach(), local_spread(committee_variance(members), center, neighbor))
        else:
            row += (members,)
        cols.append(row)
    return tuple(torch.cat(c) for c in zip(*cols))


def head_epistemic(model: torch.nn.Module, out) -> torch.Tensor:
    """The head's own U_epi (N, 3, 3) from the evidence in ``out`` (before any committee level)."""
    if model.e2ip_head_type == "e2ip":
        return niw_covariances(out["e2ip_nu"], out["e2ip_kappa"], out["e2ip_sigma0"])[1]
    return eip_covariances(out["eip_nu"], out["eip_alpha"], out["eip_beta"], model.e2ip_quantile)[1]


def energy_columns(model: torch.nn.Module, loaders, device):
    """Yield per-structure validation energy residuals (structures with an energy) and the variance the stored
    factor k scales, (σ_E/k)²: Σ_i tr U_tot,i/3, or A² + Σ_i ℓ_i² tr U_tot,i/3 with the energy-noise head."""
    k = model.e2ip_energy_uq.length
    for data, out in validation_outputs(model, loaders, device):
        num = data["ptr"].numel() - 1
        keep = data["energy_weight"].reshape(-1) > 0 if "energy_weight" in data else torch.ones(num, dtype=torch.bool, device=out["energy"].device)
        sigma = out["energy_uncertainty"].detach().to(torch.float64)
        yield {"energy_residual": (data["energy"] - out["energy"]).detach()[keep], "force_var": ((sigma / k) ** 2)[keep]}
