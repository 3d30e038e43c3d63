"""e2ip core: equivariant evidential force uncertainty, framework-agnostic.

Imports torch, e3nn, numpy and scipy only — never mace, nequip or wandb.
"""

from .calibration import fit_covariance_scale
from .covariance import SymmetricMatrixExp, soft_clamp, symmetric_basis
from .eip import EIPHead, eip_loss, eip_nll, eip_predictive, eip_regularizer
from .ensemble import ensemble_predictive, structure_uncertainty
from .energy_noise import coherent_nll, committee_energy, energy_uncertainty_from_forces  # noqa: F401 (issue 15)
from .head import EvidentialHead, check_head_irreps
from .losses import check_finite, evidential_force_loss, evidential_predictive, evidential_regularizer
from .metrics import UQMetricState, compute_metrics, uq_metrics
from .predictive import (
    GaussianPredictive,
    IndependentStudentTPredictive,
    StudentTPredictive,
    atom_uncertainty,
)

__version__ = "0.1.0"

__all__ = [
    "EvidentialHead", "EIPHead", "SymmetricMatrixExp", "StudentTPredictive", "GaussianPredictive",
    "IndependentStudentTPredictive", "UQMetricState", "atom_uncertainty", "check_finite", "check_head_irreps",
    "compute_metrics", "eip_loss", "eip_nll", "eip_predictive", "eip_regularizer", "ensemble_predictive",
    "evidential_force_loss", "evidential_predictive", "evidential_regularizer", "fit_covariance_scale",
    "soft_clamp", "structure_uncertainty", "symmetric_basis", "uq_metrics",
]
