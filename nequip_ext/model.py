"""``EvidentialNequIPGNNModel``: NequIP GNN + equivariant evidential force head (DESIGN §3).

Builds the usual :func:`nequip.model.NequIPGNNModel` and inserts the head
(:class:`~nequip_ext.nn.E2IPHeadModule` or :class:`~nequip_ext.nn.EIPHeadModule`)
before the last convnet, whose input is the last node feature that still carries
l > 0 (NequIP makes the last convnet scalar-only). The head reads those features
and writes the covariance fields; energy, forces and stress are untouched. With
novelty-aware evidence (e2ip, on by default) the parameter-free
:class:`~nequip_ext.nn.E2IPNoveltyModule` (``uq_novelty``) after the last convnet scores the
invariants of the head's input and of the last convnet's output, and writes κ and the
covariance fields. :class:`~nequip_ext.nn.E2IPEnergyUncertaintyModule` (``uq_energy``), appended
last, writes the per-frame ``energy_uncertainty`` (approximation from the force covariance, issue 15).
With ``l_max: 0`` (scalar node features, issue 28) :class:`~nequip_ext.geometric.E2IPGeometricModule`
(``uq_geometric``) before the head builds l = 1 / l = 2 features from the edges, weighted by learned invariants of
those scalars and of the distance, and the head reads them (``uq_head.geometric: true`` forces it on l ≥ 1).

YAML::

    model:
      _target_: nequip_ext.EvidentialNequIPGNNModel
      # ... every nequip.model.NequIPGNNModel argument ...
      uq_head:
        kind: e2ip            # or eip
        num_channels: 16
        force_rms: ${training_data_stats:forces_rms}   # σ_F of Σ₀ (e2ip only)
        novelty: {enabled: true, mode: linear, quantile: 0.99}   # e2ip only; fitted by nequip_ext.NoveltyFitCallback
        energy_noise: {enabled: true, mlp_hidden: 16, detach_features: true}   # optional energy-noise head (issue 15, docs/energy_uncertainty.md §10);
                                                        # train it with coeffs.energy_noise: 0.001 of EvidentialEnergyForceLoss
        committee: {enabled: true, kind: message, num_members: 4, num_channels: 8, detach: true}
                                                        # opt-in in-model force committee (issue 26, docs/committee.md):
                                                        # train it with coeffs.committee of EvidentialEnergyForceLoss;
                                                        # its spread is the deployed U_epi (stored, validation-fitted scale)

``force_rms`` default: NequIP has no single "force scale" model argument, but its
standard configs set ``per_type_energy_scales`` to the training force RMS
(``${training_data_stats:forces_rms}`` or ``per_type_forces_rms``); when
``uq_head.force_rms`` is not given we use that (the RMS over types if it is a
list), else 1.0 eV/Å. Set it explicitly to be sure.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional

import torch
from nequip.data import AtomicDataDict
from nequip.model import NequIPGNNModel
from nequip.model.utils import model_builder
from nequip.nn import ForceStressOutput, GraphModel, SequentialGraphNetwork

from .block_committee import E2IPBlockCommitteeModule, E2IPMessageCommitteeModule
from .committee_level import E2IPCommitteeLevelModule
from .geometric import GEOMETRIC_MODULE_NAME, E2IPEdgeCommitteeModule, E2IPGeometricModule, geometric_options, uq_site
from .nn import (E2IPCommitteeModule, E2IPFeatureTap, E2IPEnergyNoiseModule, E2IPEnergyUncertaintyModule, E2IPHeadModule,
                 E2IPNoveltyModule, EIPHeadModule)

HEAD_KINDS = {"e2ip": E2IPHeadModule, "eip": EIPHeadModule}
HEAD_MODULE_NAME = "uq_head"
NOVELTY_MODULE_NAME = "uq_novelty"
ENERGY_MODULE_NAME = "uq_energy"
COMMITTEE_MODULE_NAME = "uq_committee"
COMMITTEE_LEVEL_NAME = "uq_committee_level"


def _default_force_rms(per_type_energy_scales) -> float:
    if per_type_energy_scales is None:
        return 1.0
    if isinstance(per_type_energy_scales, (int, float)):
        return float(per_type_energy_scales)
    if isinstance(per_type_energy_scales, dict):
        per_type_energy_scales = list(per_type_energy_scales.values())
    vals = [float(v) for v in per_type_energy_scales]
    return math.sqrt(sum(v * v for v in vals) / len(vals)) if vals else 1.0


def _check_uq_config(num_layers: int, l_max: int, kind: str, geometric=None) -> None:
    if kind not in HEAD_KINDS:
        raise ValueError(f"uq_head.kind must be one of {sorted(HEAD_KINDS)}, got {kind!r}")
    if num_layers < 2:
        raise ValueError(
            f"EvidentialNequIPGNNModel needs num_layers >= 2, got num_layers={num_layers}: NequIP's last "
            "convnet outputs scalars only, so the uncertainty head reads the input of the last convnet, "
            "which for num_layers=1 is the type embedding."
        )
    geometric_options(geometric, l_max < 1)  # l_max 0: the geometric l = 1 / l = 2 features (issue 28)


def backbone_neighbors(seq) -> Optional[float]:
    """n̄ of the backbone's edge-sum normalisation (its first ``AvgNumNeighborsNorm``, 1/√n̄ per type; mean n̄)."""
    for mod in seq.modules():
        if type(mod).__name__ == "AvgNumNeighborsNorm" and torch.is_tensor(getattr(mod, "norm_const", None)):
            return float(mod.norm_const.detach().double().pow(-2).mean())
    return None


def attach_uq_head(
    model: ForceStressOutput, uq_head: Dict[str, Any], per_type_energy_scales=None, num_species: int = 1,
    r_max: Optional[float] = None,
) -> ForceStressOutput:
    """Insert the head before the last convnet of a (raw, unwrapped) NequIP energy model; returns a new
    ``ForceStressOutput`` around the modified energy model (so its ``irreps_out`` include the head fields).
    Classes are matched by name and the wrapper is rebuilt with ``type(model)``, so a model loaded from a
    ``nequip-package`` file (its classes come from the package's own ``nequip``) works too. On a scalar backbone
    (or with ``uq_head.geometric``) :class:`~nequip_ext.geometric.E2IPGeometricModule` (``uq_geometric``, needs
    ``r_max``) goes first and the head reads its ``e2ip_geometric_features``. An Allegro energy model works too: see
    :func:`~nequip_ext.geometric.uq_site` for where the modules go."""
    cfg = dict(uq_head)
    kind = cfg.pop("kind", "e2ip")
    noise = dict(cfg.pop("energy_noise", None) or {})
    noise_enabled = bool(noise.pop("enabled", bool(noise)))
    committee = dict(cfg.pop("committee", None) or {})
    committee_enabled = bool(committee.pop("enabled", bool(committee)))
    geometric = cfg.pop("geometric", None)
    detach = bool(cfg.pop("detach_features", False))  # the head's loss does not reach the backbone (train only the UQ)
    if noise_enabled and kind != "e2ip":
        raise ValueError("uq_head.energy_noise needs uq_head.kind: e2ip (its local force block is the e2ip "
                         "head's aleatoric covariance)")
    if kind == "e2ip" and cfg.get("force_rms", None) is None:
        cfg["force_rms"] = _default_force_rms(per_type_energy_scales)
    cfg.setdefault("num_species", int(num_species))
    if not _is_energy_model(model):
        raise TypeError(f"expected ForceStressOutput(SequentialGraphNetwork), got {type(model).__name__}")
    seq = model.func
    site = uq_site(seq)
    before, field = site["before"], AtomicDataDict.NODE_FEATURES_KEY
    geo = geometric_options(geometric, site["scalar"])
    if geo is not None:
        if r_max is None:
            raise ValueError("the geometric features (uq_head.geometric, scalar backbones) need the model's r_max")
        n_bar = backbone_neighbors(seq)
        geo_mod = E2IPGeometricModule(irreps_in=seq._modules[before].irreps_in, r_max=float(r_max),
                                      avg_num_neighbors=10.0 if n_bar is None else n_bar, **site["geometric"], **geo)
        seq.insert(GEOMETRIC_MODULE_NAME, geo_mod, before=before)
        field = geo_mod.out_field
    head = HEAD_KINDS[kind](irreps_in=seq._modules[before].irreps_in, field=field, **cfg)
    seq.insert(HEAD_MODULE_NAME, head, before=before)
    for name in (GEOMETRIC_MODULE_NAME, HEAD_MODULE_NAME):
        if name in seq._modules:
            seq._modules[name].detach_input = detach
    if committee_enabled:  # issue 26 (opt-in): direct force members on the head's input features
        committee.setdefault("force_rms", float(cfg.get("force_rms") or _default_force_rms(per_type_energy_scales)))
        member_kind = committee.pop("kind", "node")
        level_form = str(committee.pop("level", "spread"))  # the deployed level (nequip_ext.committee_level)
        if level_form not in ("spread", "scaled"):
            raise ValueError(f"uq_head.committee.level must be spread or scaled, got {level_form!r}")
        detach_members = bool(committee.pop("detach", False))  # the members' loss trains only the members
        if member_kind not in ("node", "edge", "block", "message"):
            raise ValueError(f"uq_head.committee.kind must be node, edge, block or message, got {member_kind!r}")
        depth = committee.pop("extra_depth", None)  # also read the output of convnet number `depth` (0-based)
        depth_field = None
        if depth is not None:
            convnets = [n for n in seq._modules if n.startswith("layer") and n.endswith("_convnet")]
            if not 0 <= int(depth) < len(convnets) - 2:
                raise ValueError(f"uq_head.committee.extra_depth must index a convnet before the one the head reads "
                                 f"(0 .. {len(convnets) - 3}), got {depth}")
            tap = E2IPFeatureTap(irreps_in=seq._modules[convnets[int(depth)]].irreps_out)
            seq.insert(COMMITTEE_MODULE_NAME + "_tap", tap, after=convnets[int(depth)])
            depth_field = tap.out_field
        irreps = dict(seq._modules[before].irreps_in)
        if depth_field is not None:  # the modules between the tap and here were built without its field
            irreps[depth_field] = tap.irreps_out[depth_field]
        if member_kind == "block":  # members with their own interaction block (nequip_ext.block_committee)
            if depth is not None or field != AtomicDataDict.NODE_FEATURES_KEY:
                raise ValueError("uq_head.committee.kind: block reads the backbone's node features before the last "
                                 "convnet; it takes no extra_depth and needs an l >= 1 NequIP backbone")
            n_bar = backbone_neighbors(seq)
            module = E2IPBlockCommitteeModule(irreps_in=irreps, avg_num_neighbors=10.0 if n_bar is None else n_bar,
                                              **committee)
        elif member_kind == "message":  # the block idea batched (e2ip_plugins.message_committee)
            if r_max is None or depth is not None or field != AtomicDataDict.NODE_FEATURES_KEY:
                raise ValueError("uq_head.committee.kind: message reads the backbone's node features before the "
                                 "last convnet; it needs the model's r_max and takes no extra_depth")
            n_bar = backbone_neighbors(seq)
            module = E2IPMessageCommitteeModule(irreps_in=irreps, r_max=float(r_max),
                                                avg_num_neighbors=10.0 if n_bar is None else n_bar, **committee)
        elif member_kind == "edge":  # edge-based members (e2ip_plugins.edge_committee)
            if r_max is None or depth is not None:
                raise ValueError("uq_head.committee.kind: edge needs the model's r_max and takes no extra_depth")
            n_bar = backbone_neighbors(seq)
            module = E2IPEdgeCommitteeModule(irreps_in=irreps, r_max=float(r_max), field=field,
                                             avg_num_neighbors=10.0 if n_bar is None else n_bar, **committee)
        else:
            module = E2IPCommitteeModule(irreps_in=irreps, field=field, depth_field=depth_field, **committee)
        module.detach_input = detach_members
        seq.insert(COMMITTEE_MODULE_NAME, module, before=before)
    if getattr(head, "novelty_enabled", False):
        opts = {k: v for k, v in dict(cfg.get("novelty") or {}).items() if k != "enabled"}
        nov = E2IPNoveltyModule(irreps_in=seq._modules[site["novelty_after"]].irreps_out,
                                num_species=cfg["num_species"], head_invariants=head.invariants.num_features,
                                field=site["novelty_field"], **opts)
        seq.insert(NOVELTY_MODULE_NAME, nov, after=site["novelty_after"])
    if committee_enabled:  # the members' spread is the deployed U_epi, with a stored scale (nequip_ext.committee_level)
        seq.append(COMMITTEE_LEVEL_NAME, E2IPCommitteeLevelModule(irreps_in=seq.irreps_out,
                                                                  scale_head=level_form == "scaled"))
    # energy_uncertainty (issue 15): reads the final forces_covariance, so it goes last
    if noise_enabled:
        energy = E2IPEnergyNoiseModule(irreps_in=seq.irreps_out, field=site["noise_field"], **noise)
    else:
        energy = E2IPEnergyUncertaintyModule(irreps_in=seq.irreps_out)
    seq.append(ENERGY_MODULE_NAME, energy)
    return type(model)(seq, do_derivatives=model.do_derivatives)


def _is_energy_model(model) -> bool:
    """``ForceStressOutput(SequentialGraphNetwork)``, from this environment's ``nequip`` or a package's."""
    func = getattr(model, "func", None)
    return (type(model).__name__ == ForceStressOutput.__name__
            and type(func).__name__ == SequentialGraphNetwork.__name__ and hasattr(func, "insert"))


@model_builder
def EvidentialNequIPGNNModel(uq_head: Optional[Dict[str, Any]] = None, **kwargs) -> GraphModel:
    """NequIP GNN model with an evidential force-uncertainty head.

    Args:
        uq_head (dict): ``kind`` (``e2ip`` default, or ``eip``) plus head options:
            e2ip → :class:`e2ip_plugins.EvidentialHead` (``num_channels``, ``mlp_hidden``, ``force_rms``,
            ``nu_offset``, damping caps, ``novelty``); eip → :class:`e2ip_plugins.EIPHead` (``num_channels``,
            ``mlp_hidden``, ``eps``) and ``q``;
            ``detach_features`` (default false): the head (and geometric module) read their inputs detached in
            training, so their loss trains only the UQ modules (the Allegro config sets it);
            ``geometric``: the l = 1 / l = 2 features of :mod:`nequip_ext.geometric` (default: on for ``l_max: 0``,
            whose node features are scalars; ``true`` forces them on l ≥ 1 backbones).
        **kwargs: every :func:`nequip.model.NequIPGNNModel` argument.

    Raises:
        ValueError: ``num_layers < 2`` (the head's input would be the type embedding), an unknown
            ``uq_head.kind``, or ``uq_head.geometric: false`` with ``l_max: 0``.
    """
    uq_head = dict(uq_head or {})
    _check_uq_config(int(kwargs.get("num_layers", 4)), int(kwargs.get("l_max", 1)), uq_head.get("kind", "e2ip"),
                     uq_head.get("geometric", None))
    # nested inside our @model_builder, NequIPGNNModel returns the raw ForceStressOutput
    model = NequIPGNNModel(**kwargs)
    return attach_uq_head(model, uq_head, kwargs.get("per_type_energy_scales", None), len(kwargs["type_names"]),
                          r_max=kwargs.get("r_max", None))
