"""Deployment hooks of the NequIP extension: the ``e2ip_ase`` compile target and packaging rules.

Registered when ``import nequip`` loads :mod:`nequip_ext` (see ``nequip_ext/__init__.py``), so that::

    nequip-compile model.ckpt model.nequip.pt2 --mode aotinductor --device cpu --target e2ip_ase
    nequip-package build model.ckpt model.nequip.zip

work on :class:`~nequip_ext.EvidentialNequIPGNNModel` checkpoints and packages.

``e2ip_ase``
    NequIP's ``ase`` target (same inputs, same single-frame static batch dimension) whose outputs
    additionally hold the DESIGN §3 keys ``forces_covariance``, ``forces_covariance_epistemic``,
    ``forces_covariance_aleatoric``, ``forces_uncertainty`` and ``energy_uncertainty``. Its example-data settings are the
    ``ase`` ones followed by :func:`_box_non_periodic_example`, so that checkpoints trained on
    molecules pass ``nequip-compile``'s eager-vs-compiled check (NaN stress otherwise).
    Load the result with :meth:`nequip_ext.E2IPNequIPCalculator.from_compiled_model`.
    ``--mode torchscript`` takes no target, and NequIP 0.19 refuses it on torch >= 2.10.

Packaging
    ``nequip-package build`` interns ``nequip``, ``e3nn`` and every module named by a
    ``nequip.extension`` entry point (``nequip/scripts/_package_utils.py:_INTERNAL_MODULES``);
    ``e2ip_plugins`` (the framework-agnostic core the head modules are built from) is interned
    through its own entry point in ``pyproject.toml`` (``e2ip_core = "e2ip_plugins"``; ``import
    nequip`` imports only ``init_always`` entries), and :func:`register` adds it too in case the
    install metadata is stale. Two libraries are reached only through
    module-level imports that no packaged model calls — ``scipy`` (``e2ip_plugins`` metrics,
    calibration, predictive classes) and ``sympy`` (``e3nn.o3``'s angular spherical harmonics,
    reached because the core does ``from e3nn import o3``) — so they are registered as *mock*
    modules with NequIP's ``register_libraries_as_external_for_packaging``: the package holds
    the plugin code and needs neither e2ip nor an extern'd copy of it where it is loaded.

This module is imported by module name (``importlib``) from ``nequip_ext/__init__.py`` so that
``torch.package`` does not pull ``nequip.scripts`` into every packaged model.
"""

from typing import Dict, List

import torch

from . import _keys as K

E2IP_ASE_TARGET = "e2ip_ase"
"""name of the compile target (``nequip-compile --target e2ip_ase``)"""

E2IP_EXTRA_OUTPUTS: List[str] = list(K.COVARIANCE_KEYS) + [K.FORCES_UNCERTAINTY_KEY, K.ENERGY_UNCERTAINTY_KEY]
"""outputs the ``e2ip_ase`` target adds to NequIP's ``ase`` target (DESIGN §3)"""

LEGACY_EXTRA_OUTPUTS: List[str] = list(K.COVARIANCE_KEYS) + [K.FORCES_UNCERTAINTY_KEY]
"""outputs of ``e2ip_ase`` artefacts compiled before ``energy_uncertainty`` existed (issue 15)"""

PACKAGING_MOCK_MODULES: List[str] = ["scipy", "sympy"]
"""libraries imported at module level by packaged code (``e2ip_plugins``, ``e3nn.o3``) but never called by a model"""

PACKAGING_INTERNAL_MODULES: List[str] = ["nequip_ext", "e2ip_plugins"]
"""top-level modules a packaged plugin model needs interned (named by ``nequip.extension`` entry points)"""


MOLECULE_BOX_PADDING: float = 10.0
"""Å added to the extent of a non-periodic example frame to make its (tracing-only) box"""


def _box_non_periodic_example(data: Dict) -> Dict:
    """Give a non-periodic example frame (all-zero cell) a finite box.

    ``nequip-compile`` checks the exported model against the eager one on the example frame
    (``nequip/utils/aot.py:aot_export_model`` → ``nequip/utils/dtype.py:test_model_output_similarity_by_dtype``,
    ``torch.allclose`` without ``equal_nan``). For a molecule the cell is all zeros, so the ``stress``
    output of the ``ase`` target is NaN in both and the check fails although nothing is wrong — the
    case for every checkpoint trained on molecular data. With all ``edge_cell_shift`` zero (no
    periodic edges) the cell enters only the stress normalisation: energies, forces and the
    covariances are unchanged, the stress becomes finite and the check meaningful again. Only the
    tracing example is touched; the compiled graph is shape-generic and a molecule given to the
    compiled model later still gets NaN stress, exactly like the eager model.
    """
    from nequip.data import AtomicDataDict

    cell = data.get(AtomicDataDict.CELL_KEY, None)
    shifts = data.get(AtomicDataDict.EDGE_CELL_SHIFT_KEY, None)
    if cell is None or bool(cell.abs().sum() > 0) or (shifts is not None and bool(shifts.abs().sum() > 0)):
        return data
    pos = data[AtomicDataDict.POSITIONS_KEY]
    extent = float((pos.max(0).values - pos.min(0).values).max()) if pos.shape[0] else 0.0
    side = extent + MOLECULE_BOX_PADDING
    data = dict(data)
    data[AtomicDataDict.CELL_KEY] = side * torch.eye(3, dtype=cell.dtype, device=cell.device).expand_as(cell).clone()
    return data


def e2ip_ase_target(legacy: bool = False) -> Dict:
    """The ``e2ip_ase`` target dict: NequIP's registered ``ase`` target with the covariance outputs appended
    and its example-data settings followed by :func:`_box_non_periodic_example`. ``legacy``: the outputs of
    artefacts compiled before ``energy_uncertainty`` was added (for loading them only)."""
    from nequip.scripts._compile_utils import AOTI_ASE_TARGET, COMPILE_TARGET_DICT

    ase = COMPILE_TARGET_DICT[AOTI_ASE_TARGET]
    outputs = list(ase["output"])
    ase_data_settings = ase["data_settings"]

    def data_settings(data):
        return _box_non_periodic_example(ase_data_settings(data))

    target = dict(ase)
    extra = LEGACY_EXTRA_OUTPUTS if legacy else E2IP_EXTRA_OUTPUTS
    target["output"] = outputs + [k for k in extra if k not in outputs]
    target["data_settings"] = data_settings
    return target


def register() -> None:
    """Register the ``e2ip_ase`` compile target and the packaging rules with NequIP (idempotent)."""
    from nequip.scripts._compile_utils import register_compile_targets
    from nequip.scripts._package_utils import _INTERNAL_MODULES, register_libraries_as_external_for_packaging

    register_compile_targets({E2IP_ASE_TARGET: e2ip_ase_target()})
    register_libraries_as_external_for_packaging(mock_modules=PACKAGING_MOCK_MODULES)
    # normally already there through the `nequip.extension` entry points; stale install metadata can hide
    # `e2ip_core` (e.g. an old `e2ip.egg-info` in the source tree shadows the venv's dist-info whenever the
    # tree is on sys.path), so add what the entry points would have added
    _INTERNAL_MODULES.update(PACKAGING_INTERNAL_MODULES)
