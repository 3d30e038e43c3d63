"""MACE adapter of e2ip: evidential force covariances for mace-torch models.

- :mod:`mace_ext.hooks` — every MACE name the adapter wraps/subclasses, with a check;
- :mod:`mace_ext.errors` — ``E2IPConfigError``, ``MACEHookError``;
- :mod:`mace_ext.outputs` — the output keys the head adds, readers of an output dict;
- :mod:`mace_ext.model` — ``attach_e2ip_head``, ``E2IPMACE``, ``E2IPScaleShiftMACE``;
- :mod:`mace_ext.validation_columns` — validation forwards and the columns the stored fits read;
- :mod:`mace_ext.fit_novelty` — ``fit_novelty`` (novelty buffers, stored calibration) and ``mace_fit_novelty_e2ip``;
- :mod:`mace_ext.energy_uq` — ``fit_energy_noise`` (stored energy length);
- :mod:`mace_ext.loss` — ``E2IPLoss`` (MACE loss + evidential term), ``E2IPMACELoss`` (metrics);
- :mod:`mace_ext.cli` — ``mace_run_train_e2ip``, built from :mod:`~mace_ext.train_options` (``--e2ip_*``),
  :mod:`~mace_ext.train_run` (wrappers installed into MACE), :mod:`~mace_ext.uq_reports` (UQ logs and
  final tables) and :mod:`~mace_ext.force_scale` (σ_F);
- :mod:`mace_ext.calculator` — ``E2IPMACECalculator`` (ASE);
- :mod:`mace_ext.eval_configs` — ``mace_eval_configs_e2ip`` (covariances and exact UQ metrics on a file);
- :mod:`mace_ext.md`, :mod:`mace_ext.active_learning` — adapters of ``e2ip-md`` and ``e2ip-active-learning``.
"""

import e2ip_plugins  # noqa: F401  (allow-lists e3nn's constants before mace imports e3nn)

from .calculator import COMMITTEE_KEY, E2IPMACECalculator
from .hooks import HOOKS, MACEHookError, verify_hooks
from .model import (
    COVARIANCE_KEYS,
    E2IPConfigError,
    E2IPMACE,
    E2IPScaleShiftMACE,
    attach_e2ip_head,
    predictive_from_output,
)

__all__ = [
    "COMMITTEE_KEY", "COVARIANCE_KEYS", "E2IPConfigError", "E2IPMACE", "E2IPMACECalculator", "E2IPScaleShiftMACE",
    "HOOKS", "MACEHookError", "attach_e2ip_head", "predictive_from_output", "verify_hooks",
]
