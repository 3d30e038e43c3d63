"""e2ip NequIP extension (DESIGN §3).

Loaded by ``import nequip`` through the ``nequip.extension`` entry point
(``init_always``). On import it only registers the plugin's output fields with
NequIP's :func:`nequip.data.register_fields`, and the ``e2ip_ase`` compile target
and packaging rules (:mod:`nequip_ext.compile`); the model builder, loss, metrics
and ASE calculator (:class:`E2IPNequIPCalculator`) are imported lazily on first
attribute access (so ``torch.package`` and ``import nequip`` stay light), e.g. from YAML::

    model:
      _target_: nequip_ext.EvidentialNequIPGNNModel
      uq_head: {kind: e2ip, num_channels: 16}
    # or the head on a model you already have (docs/attach.md):
    # model: {_target_: nequip_ext.AttachedE2IPModel, package_path: /abs/plain.nequip.zip, uq_head: {...}}
    # scalar backbones (issue 28): l_max: 0 works as is; Allegro: {_target_: nequip_ext.EvidentialAllegroModel, ...}
    loss:
      _target_: nequip_ext.EvidentialEnergyForceLoss
    val_metrics:
      _target_: nequip_ext.UQMetrics
"""

import importlib

from . import _keys
from ._keys import *  # noqa: F401,F403


def _register() -> None:
    from nequip.data._key_registry import register_fields

    register_fields(
        graph_fields=list(_keys.GRAPH_KEYS),
        node_fields=list(_keys.NODE_KEYS),
        cartesian_tensor_fields={k: "ij=ji" for k in _keys.CARTESIAN_KEYS},
    )


_register()


def _register_deployment() -> None:
    """``e2ip_ase`` compile target and packaging rules (:mod:`nequip_ext.compile`).

    Imported by name so ``torch.package`` does not follow it into packaged models; skipped when this
    file runs from inside a ``.nequip.zip`` (``__torch_package__``), where the loading environment's
    own ``nequip_ext`` (if installed) has already registered them."""
    if not globals().get("__torch_package__", False):
        importlib.import_module("nequip_ext.compile").register()


_register_deployment()

_LAZY = {
    "EvidentialNequIPGNNModel": "nequip_ext.model",
    "AttachedE2IPModel": "nequip_ext.attach",
    "EvidentialAllegroModel": "nequip_ext.allegro",
    "E2IPGeometricModule": "nequip_ext.geometric",
    "E2IPHeadModule": "nequip_ext.nn",
    "EIPHeadModule": "nequip_ext.nn",
    "EvidentialEnergyForceLoss": "nequip_ext.train",
    "EvidentialForceLossMetric": "nequip_ext.train",
    "EnergyNoiseLossMetric": "nequip_ext.train",
    "UQMetrics": "nequip_ext.train",
    "UQScalarMetric": "nequip_ext.train",
    "UQPlotsCallback": "nequip_ext.callbacks",
    "NoveltyFitCallback": "nequip_ext.novelty",
    "E2IPNequIPCalculator": "nequip_ext.calculator",
    "E2IP_ASE_TARGET": "nequip_ext.compile",
}

__all__ = sorted(_LAZY) + sorted(n for n in dir(_keys) if n.endswith("_KEY") or n.endswith("_KEYS"))


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'nequip_ext' has no attribute {name!r}")


def __dir__():
    return __all__
