"""The output dict of E2IP MACE models: the keys the head adds, and readers of a dict (imports no MACE).

================================  =========  ==========================================
key                               shape      meaning
================================  =========  ==========================================
``forces_covariance``             (N,3,3)    total predictive covariance U_tot
``forces_covariance_epistemic``   (N,3,3)    U_epi
``forces_covariance_aleatoric``   (N,3,3)    U_ale
``forces_uncertainty``            (N,)       u_i = sqrt(tr U_epi / 3)
``e2ip_nu``, ``e2ip_kappa``       (N,)       NIW evidence (head ``e2ip``)
``e2ip_sigma0``/``_inv``          (N,3,3)    Σ₀ and Σ₀⁻¹ (head ``e2ip``)
``e2ip_sigma0_logdet``            (N,)       log|Σ₀| (head ``e2ip``)
``eip_nu/alpha/beta``             (N,3)      per-component evidence (head ``eip``)
``e2ip_novelty``                  (N,)       s/s_ref of the novelty score (head ``e2ip``; 0 if unfitted)
``energy_uncertainty``            (S,)       σ_E = ℓ·sqrt(Σ_i tr U_tot,i/3), eV (APPROXIMATION, see
                                             :mod:`mace_ext.model`); with the energy-noise head
                                             k·sqrt(A² + Σ_i ℓ_i² tr U_tot,i/3)
``energy_noise_length/amplitude`` (N,)       ℓ_i (Å), c_i (eV) of the energy-noise head (if enabled)
``energy_noise_amplitude_grad``   (N,3)      h = ∂A/∂r (training forwards only)
================================  =========  ==========================================
"""

from typing import Any, Dict, Optional

import torch

from e2ip_plugins import eip_predictive, evidential_predictive
from e2ip_plugins.committee_level import committee_predictive

HEAD_TYPES = ("e2ip", "eip")

#: raw evidence keys in the model output, per head type: output key -> head dict key
EVIDENCE_KEYS: Dict[str, Dict[str, str]] = {
    "e2ip": {
        "e2ip_nu": "nu",
        "e2ip_kappa": "kappa",
        "e2ip_sigma0": "sigma0",
        "e2ip_sigma0_inv": "sigma0_inv",
        "e2ip_sigma0_logdet": "sigma0_logdet",
    },
    "eip": {"eip_nu": "eip_nu", "eip_alpha": "eip_alpha", "eip_beta": "eip_beta"},
}

#: DESIGN §3 output keys every E2IP model adds
COVARIANCE_KEYS = (
    "forces_covariance",
    "forces_covariance_epistemic",
    "forces_covariance_aleatoric",
    "forces_uncertainty",
)

#: all per-atom keys the E2IP models add (for padding removal etc.)
ATOM_LEVEL_KEYS = COVARIANCE_KEYS + tuple(k for d in EVIDENCE_KEYS.values() for k in d)


def zeros_forces(out: Dict[str, Any], n: int, like: torch.Tensor) -> torch.Tensor:
    f = out.get("forces")
    return f if f is not None else like.new_zeros((n, 3))


def head_out_from_output(out: Dict[str, Any], head_type: str) -> Dict[str, torch.Tensor]:
    """The head's raw dict, rebuilt from a model output dict."""
    return {hk: out[ok] for ok, hk in EVIDENCE_KEYS[head_type].items()}


def output_head_type(out: Dict[str, Any]) -> Optional[str]:
    """Which head produced this output dict (None if it holds no evidence)."""
    for head_type, keys in EVIDENCE_KEYS.items():
        if all(out.get(k) is not None for k in keys):
            return head_type
    return None


def predictive_from_output(out: Dict[str, Any], quantile: float = 0.5, forces: Optional[torch.Tensor] = None):
    """e2ip_plugins predictive (Student-t or per-component) of an E2IP model output dict; with the in-model
    committee (issue 26) the deployed N(γ, U_tot) of its covariance keys."""
    if out.get("e2ip_committee_forces") is not None and out.get("forces_covariance_epistemic") is not None:
        cov = out["forces_covariance_epistemic"]
        gamma = forces if forces is not None else zeros_forces(out, cov.shape[0], cov)
        return committee_predictive(gamma, cov, out["forces_covariance_aleatoric"])
    head_type = output_head_type(out)
    if head_type is None:
        raise KeyError("model output holds no e2ip/eip evidence keys")
    head_out = head_out_from_output(out, head_type)
    any_key = next(iter(head_out.values()))
    gamma = forces if forces is not None else zeros_forces(out, any_key.shape[0], any_key)
    if head_type == "e2ip":
        return evidential_predictive(gamma, head_out)
    return eip_predictive(gamma, head_out, q=quantile)
