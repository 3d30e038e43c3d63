"""``EvidentialAllegroModel``: Allegro (``nequip-allegro``) + the e²IP head through the geometric construction
(issue 28, docs/scalar_backbones.md).

Allegro's final features are per-edge scalars x_ij (``edge_features``, written by the ``allegro`` module and read by
``edge_readout``), so the head gets its l = 1 / l = 2 input from :class:`~nequip_ext.geometric.E2IPGeometricModule`
(``uq_geometric``), inserted before ``edge_readout``:

    h_i = Σ_{j∈N(i)} x_ij / √n̄   (centre i = edge_index[0], the atom Allegro's ``edge_eng_sum`` gives E_ij to)
    [h_i, v_i, t_i] → head → ν, κ, Σ₀ → U_tot, U_epi, U_ale

The novelty module scores [invariants of the head's input, per-atom energy after ``edge_eng_sum``]; energy,
forces and stress are Allegro's, untouched. YAML (``configs/nequip/allegro_e2ip.yaml``)::

    model:
      _target_: nequip_ext.EvidentialAllegroModel
      # ... every allegro.model.AllegroModel argument ...
      uq_head: {kind: e2ip, num_channels: 16, force_rms: ${training_data_stats:forces_rms},
                geometric: {num_channels: 8, num_basis: 8, mlp_hidden: 32},
                novelty: {enabled: true, mode: linear, quantile: 0.99}}
"""

from typing import Any, Dict, Optional

from nequip.model.utils import model_builder
from nequip.nn import GraphModel

from .model import HEAD_KINDS, attach_uq_head


@model_builder
def EvidentialAllegroModel(uq_head: Optional[Dict[str, Any]] = None, **kwargs) -> GraphModel:
    """Allegro model with an evidential force-uncertainty head on geometric l = 1 / l = 2 features.

    Args:
        uq_head (dict): as for :func:`nequip_ext.EvidentialNequIPGNNModel` (``kind``, head options, ``novelty``,
            ``energy_noise``, ``committee``); ``geometric`` (``true`` or a dict of ``num_channels``, ``num_basis``,
            ``mlp_hidden``) is always on here.
        **kwargs: every :func:`allegro.model.AllegroModel` argument.

    Raises:
        ValueError: an unknown ``uq_head.kind`` or ``uq_head.geometric: false``.
    """
    from allegro.model import AllegroModel  # nequip-allegro is optional: imported when this builder runs

    uq_head = dict(uq_head or {})
    kind = uq_head.get("kind", "e2ip")
    if kind not in HEAD_KINDS:
        raise ValueError(f"uq_head.kind must be one of {sorted(HEAD_KINDS)}, got {kind!r}")
    # nested inside our @model_builder, AllegroModel returns the raw ForceStressOutput
    model = AllegroModel(**kwargs)
    return attach_uq_head(model, uq_head, kwargs.get("per_type_energy_scales", None), len(kwargs["type_names"]),
                          r_max=kwargs["r_max"])
