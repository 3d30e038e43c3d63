"""The stored constants of an e²IP model from ONE validation forward (issue 16: no recomputation).

After the per-species training moments are fitted (:class:`~e2ip_plugins.novelty.NoveltyFitter`), three
constants are fitted on the validation data: the novelty reference s_ref (:mod:`e2ip_plugins.novelty`),
the level [c, β] (:mod:`e2ip_plugins.level`) and the energy length ℓ (:mod:`e2ip_plugins.energy_uq`).
Each used to take its own validation pass. All three only read per-atom quantities that do not depend on
the constants being fitted, when the one pass runs with the reference at 1 and the calibration at
identity (``linear`` mode, :func:`prepare_one_pass`): the raw score s_i (the model's novelty-ratio output),
the head's own ν_i, κ_i, Σ₀,i (with Σ₀⁻¹, log|Σ₀|), the force residual, and the per-frame energy residual.
From these columns (:func:`fit_from_columns`):

    s_ref,z = quantile_q {s_i : z_i = z}                  (NoveltyFitter.finish_reference)
    r_i = s_i / s_ref,z_i                                  (0 for species without a reference)
    (c, β) = fit_level(ν, κ, Σ₀⁻¹, log|Σ₀|, y − γ, r)      (fit_stored_level)
    κ_eff,i = κ_i / (1 + β κ_i min(r_i, r_cap)),  U_tot,i = U_tot(ν_i, κ_eff,i, c Σ₀,i)   (niw_covariances)
    v_s = Σ_{i∈s} tr U_tot,i / 3,   ℓ = fit_energy_length(r_E, v)

which is the three-pass fit up to rounding (the scores come from the model's dtype instead of float64).
``power`` mode maps κ through the reference inside the forward, so it keeps the three-pass fit.
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch

from .energy_uq import fit_energy_length, force_variance_sum
from .head_covariance import niw_covariances
from .level import fit_stored_level
from .novelty import NoveltyEvidence, NoveltyFitter

ATOM_COLUMNS = ("nu", "kappa", "sigma0", "sigma0_inv", "sigma0_logdet", "residual", "score", "species", "frame")


def supports_one_pass(novelty: NoveltyEvidence) -> bool:
    return bool(novelty.linear)


@torch.no_grad()
def prepare_one_pass(novelty: NoveltyEvidence, fitter: NoveltyFitter) -> None:
    """After ``fitter.finish_moments()``: reference 1 for every species with moments (so the forward's
    novelty ratio is the raw score s_i), 0 for the others, and the calibration at identity [1, 0]."""
    fitted = (fitter.n >= 2).to(novelty.novelty_ref)
    novelty.novelty_ref.copy_(fitted)
    novelty.novelty_calib.copy_(torch.tensor([1.0, 0.0]).to(novelty.novelty_calib))


def total_covariance(novelty: NoveltyEvidence, nu: torch.Tensor, kappa: torch.Tensor, sigma0: torch.Tensor,
                     ratio: torch.Tensor) -> torch.Tensor:
    """U_tot,i (float64, CPU) under the stored [c, β] from the head's own ν, κ, Σ₀ and the ratio r (linear mode):
    κ_eff = κ / (1 + β κ min(r, r_cap)), U_tot = niw_covariances(ν, κ_eff, c Σ₀)[0]."""
    c, beta = (float(x) for x in novelty.novelty_calib)
    nu, kappa, sigma0, ratio = (t.detach().to("cpu", torch.float64) for t in (nu, kappa, sigma0, ratio))
    kappa_eff = kappa / (1.0 + beta * kappa * ratio.clamp(max=novelty.ratio_cap))
    return niw_covariances(nu, kappa_eff, c * sigma0)[0]


def fit_from_columns(novelty: NoveltyEvidence, fitter: NoveltyFitter, batches: List[Dict[str, torch.Tensor]],
                     energy_module: Optional[torch.nn.Module] = None) -> Dict[str, float]:
    """Fit s_ref, [c, β] and (with ``energy_module``) ℓ from the columns of one validation pass made after
    :func:`prepare_one_pass` (module docstring). Each batch holds :data:`ATOM_COLUMNS` (per atom; ``frame``
    indexes the batch's frames), ``num_frames`` (int) and, for the energy fit, ``energy_residual`` (per
    frame) and ``has_energy`` (per-frame bool). Returns the level fit's info, plus ``length`` if fitted."""
    for b in batches:
        fitter.add_val_scores(b["score"], b["species"])
    fitter.finish_reference()
    ref = novelty.novelty_ref.detach().to("cpu", torch.float64)
    ratios = []
    for b in batches:
        sp = b["species"].detach().to("cpu").long()
        r_ref = ref[sp]
        s = b["score"].detach().to("cpu", torch.float64)
        ratios.append(torch.where(r_ref > 0, s / torch.where(r_ref > 0, r_ref, torch.ones_like(r_ref)),
                                  torch.zeros_like(s)))
    info = fit_stored_level(novelty, [{"nu": b["nu"], "kappa": b["kappa"], "sigma0_inv": b["sigma0_inv"],
                                       "sigma0_logdet": b["sigma0_logdet"], "residual": b["residual"], "ratio": r}
                                      for b, r in zip(batches, ratios)])
    if energy_module is None:
        return info
    energy_batches = []
    for b, r in zip(batches, ratios):
        tot = total_covariance(novelty, b["nu"], b["kappa"], b["sigma0"], r)
        v = force_variance_sum(tot, b["frame"].detach().to("cpu").long(), int(b["num_frames"]))
        keep = b["has_energy"].detach().to("cpu").reshape(-1)
        energy_batches.append({"energy_residual": b["energy_residual"].detach().to("cpu", torch.float64)[keep],
                               "force_var": v[keep]})
    return {**info, **fit_energy_length(energy_module, energy_batches)}
