"""Field names the e2ip NequIP plugin adds to ``AtomicDataDict`` (DESIGN §3).

Plain strings only: this module is imported when ``import nequip`` loads the
extension, so it must stay import-free.
"""

from typing import Final, List

# === DESIGN §3 contract (model outputs and ASE ``calc.results``) ===
FORCES_COVARIANCE_KEY: Final[str] = "forces_covariance"  # (N, 3, 3) U_tot
FORCES_COVARIANCE_EPISTEMIC_KEY: Final[str] = "forces_covariance_epistemic"  # (N, 3, 3) U_epi
FORCES_COVARIANCE_ALEATORIC_KEY: Final[str] = "forces_covariance_aleatoric"  # (N, 3, 3) U_ale
FORCES_UNCERTAINTY_KEY: Final[str] = "forces_uncertainty"  # (N,) sqrt(tr U_epi / 3)
# (frames, 1) per-structure σ_E = ℓ·sqrt(Σ_i tr U_tot,i/3), eV (approximation, e2ip_plugins.energy_uq)
ENERGY_UNCERTAINTY_KEY: Final[str] = "energy_uncertainty"

# === energy-noise head (uq_head.energy_noise, e2ip_plugins.energy_noise_head) ===
ENERGY_NOISE_LENGTH_KEY: Final[str] = "energy_noise_length"  # (N,) ℓ_i, Å
ENERGY_NOISE_AMPLITUDE_KEY: Final[str] = "energy_noise_amplitude"  # (N,) c_i, eV (A = Σ_i c_i)
ENERGY_NOISE_AMPLITUDE_GRAD_KEY: Final[str] = "energy_noise_amplitude_grad"  # (N, 3) h = ∂A/∂r_i (training only)

# === in-model force committee (uq_head.committee, e2ip_plugins.force_committee; issue 26, opt-in) ===
E2IP_COMMITTEE_FORCES_KEY: Final[str] = "e2ip_committee_forces"  # (N, 3M): M members' direct forces, M×1o
E2IP_COMMITTEE_DEPTH_KEY: Final[str] = "e2ip_committee_depth"  # node features of an earlier convnet (committee depths)

# === geometric construction for scalar backbones (uq_head.geometric, nequip_ext.geometric; issue 28) ===
E2IP_GEOMETRIC_FEATURES_KEY: Final[str] = "e2ip_geometric_features"  # (N, F+8K): F×0e + K×1o + K×2e, the head's input
E2IP_NODE_SCALARS_KEY: Final[str] = "e2ip_node_scalars"  # (N, F): Σ_j x_ij/√n̄ of per-edge scalars (Allegro)

# === raw evidence of the e²IP (NIW) head ===
E2IP_NU_KEY: Final[str] = "e2ip_nu"  # (N,)
E2IP_KAPPA_KEY: Final[str] = "e2ip_kappa"  # (N,)
E2IP_SIGMA0_KEY: Final[str] = "e2ip_sigma0"  # (N, 3, 3)
E2IP_SIGMA0_INV_KEY: Final[str] = "e2ip_sigma0_inv"  # (N, 3, 3)
E2IP_SIGMA0_LOGDET_KEY: Final[str] = "e2ip_sigma0_logdet"  # (N,)
E2IP_NOVELTY_KEY: Final[str] = "e2ip_novelty"  # (N,) s/s_ref of e2ip_plugins.novelty (0 if unfitted)
# internal: invariants of the head's input, read by the novelty module after the last convnet
E2IP_HEAD_INVARIANTS_KEY: Final[str] = "e2ip_head_invariants"

# === raw evidence of the eIP (per-component) head ===
EIP_NU_KEY: Final[str] = "eip_nu"  # (N, 3)
EIP_ALPHA_KEY: Final[str] = "eip_alpha"  # (N, 3)
EIP_BETA_KEY: Final[str] = "eip_beta"  # (N, 3)

COVARIANCE_KEYS: Final[List[str]] = [
    FORCES_COVARIANCE_KEY,
    FORCES_COVARIANCE_EPISTEMIC_KEY,
    FORCES_COVARIANCE_ALEATORIC_KEY,
]
# symmetric 3x3 per-atom tensors: registered as Cartesian tensors "ij=ji"
CARTESIAN_KEYS: Final[List[str]] = COVARIANCE_KEYS + [E2IP_SIGMA0_KEY, E2IP_SIGMA0_INV_KEY]
# every per-atom field the plugin can emit
NODE_KEYS: Final[List[str]] = CARTESIAN_KEYS + [
    FORCES_UNCERTAINTY_KEY,
    E2IP_NU_KEY,
    E2IP_KAPPA_KEY,
    E2IP_SIGMA0_LOGDET_KEY,
    E2IP_NOVELTY_KEY,
    E2IP_HEAD_INVARIANTS_KEY,
    EIP_NU_KEY,
    EIP_ALPHA_KEY,
    EIP_BETA_KEY,
    ENERGY_NOISE_LENGTH_KEY,
    ENERGY_NOISE_AMPLITUDE_KEY,
    ENERGY_NOISE_AMPLITUDE_GRAD_KEY,
    E2IP_COMMITTEE_FORCES_KEY,
    E2IP_COMMITTEE_DEPTH_KEY,
    E2IP_GEOMETRIC_FEATURES_KEY,
    E2IP_NODE_SCALARS_KEY,
]
# per-frame fields the plugin can emit
GRAPH_KEYS: Final[List[str]] = [ENERGY_UNCERTAINTY_KEY]
# head-output dict key (as returned by e2ip_plugins heads) -> data field
E2IP_HEAD_FIELDS: Final[dict] = {
    "nu": E2IP_NU_KEY,
    "kappa": E2IP_KAPPA_KEY,
    "sigma0": E2IP_SIGMA0_KEY,
    "sigma0_inv": E2IP_SIGMA0_INV_KEY,
    "sigma0_logdet": E2IP_SIGMA0_LOGDET_KEY,
}
EIP_HEAD_FIELDS: Final[dict] = {k: k for k in (EIP_NU_KEY, EIP_ALPHA_KEY, EIP_BETA_KEY)}
