"""The geometric construction (issue 28) as a NequIP graph module: l = 1 / l = 2 node features for the e²IP head on
scalar backbones (NequIP ``l_max: 0``, Allegro; docs/scalar_backbones.md).

:class:`E2IPGeometricModule` reads invariant node features h_i and NequIP's edge vectors
r_ij = r_j − r_i (+ shift·cell), with i = ``edge_index[0]`` (centre) and j = ``edge_index[1]`` (neighbour), as
:func:`nequip.nn.with_edge_vectors_` builds them, runs :class:`e2ip_plugins.geometric_features.GeometricFeatures`

    v_i^k = Σ_j a_ij^k Y¹(r̂_ij)/√n̄,   t_i^k = Σ_j b_ij^k Y²(r̂_ij)/√n̄,   [a, b]_ij = MLP(h_i, h_j, B(r_ij))·f_cut(r_ij)

and writes [h_i, v_i, t_i] (irreps ``F×0e + K×1o + K×2e``) to ``e2ip_geometric_features``, which the head reads
(``field=``). For Allegro (per-edge scalar features x_ij) the node scalars are first made as
h_i = Σ_{j∈N(i)} x_ij / √n̄ (written to ``e2ip_node_scalars``): the same centre sum (over ``edge_index[0]``) that
Allegro's ``EdgewiseReduce`` applies to the per-edge energies, so h_i is the atom's share of the final edge
features, before the 1-output readout. TorchScript- and ``torch.export``-friendly (no branching on tensor values).

YAML (``uq_head`` of :func:`nequip_ext.EvidentialNequIPGNNModel`, :func:`nequip_ext.AttachedE2IPModel`,
:func:`nequip_ext.EvidentialAllegroModel`)::

    uq_head:
      geometric: true     # default: on when the backbone has no l > 0 features (l_max 0, Allegro), off otherwise
      # or {enabled: true, num_channels: 8, num_basis: 8, mlp_hidden: 32}
"""


import math
from typing import Any, Dict, Optional, Union

import torch
from e3nn import o3

from nequip.data import AtomicDataDict
from nequip.nn import GraphModuleMixin, with_edge_vectors_

from e2ip_plugins.edge_committee import EdgeForceCommittee
from e2ip_plugins.geometric_features import GeometricFeatures

from . import _keys as K

GEOMETRIC_MODULE_NAME = "uq_geometric"
GEOMETRIC_OPTIONS = ("num_channels", "num_basis", "mlp_hidden")


def geometric_options(value: Union[None, bool, Dict[str, Any]], scalar_backbone: bool) -> Optional[Dict[str, Any]]:
    """``uq_head.geometric`` → options of :class:`E2IPGeometricModule`, or ``None`` (the plain l > 0 head).

    ``None`` (not given): on exactly when ``scalar_backbone``; ``true`` / a dict: forced on (a dict may say
    ``enabled: false``); ``false`` on a scalar backbone is an error (the head would have no l > 0 features)."""
    if value is None:
        value = bool(scalar_backbone)
    opts = dict(value) if isinstance(value, dict) else {"enabled": bool(value)}
    enabled = bool(opts.pop("enabled", True))
    unknown = sorted(set(opts) - set(GEOMETRIC_OPTIONS))
    if unknown:
        raise ValueError(f"uq_head.geometric: unknown options {unknown}; known: enabled, "
                         f"{', '.join(GEOMETRIC_OPTIONS)}")
    if not enabled:
        if scalar_backbone:
            raise ValueError("uq_head.geometric: false on a scalar backbone (no l > 0 features): the e2ip head needs "
                             "the geometric l = 1 / l = 2 features there (issue 28); drop the option")
        return None
    return opts


def is_scalar(irreps) -> bool:
    """Every irrep is l = 0 (or there is none)."""
    return irreps is None or all(ir.l == 0 for _, ir in irreps)


def uq_site(seq) -> Dict[str, Any]:
    """Where the UQ modules go in a backbone's ``SequentialGraphNetwork`` (module names, fields), and whether its
    features are scalars. NequIP: head (and ``uq_geometric``) before the last convnet, reading its input
    ``node_features``; novelty after it, on its output. Allegro (modules ``allegro``, ``edge_readout``,
    ``edge_eng_sum``): ``uq_geometric`` + head before ``edge_readout``, h_i from the final ``edge_features``;
    novelty after ``edge_eng_sum``, on the un-scaled per-atom energy (the NequIP analogue: the readout's input is
    already the head's); the energy-noise head reads h_i."""
    names = list(seq._modules)
    if "allegro" in names and "edge_readout" in names and "edge_eng_sum" in names:
        return dict(before="edge_readout", novelty_after="edge_eng_sum",
                    novelty_field=AtomicDataDict.PER_ATOM_ENERGY_KEY, noise_field=K.E2IP_NODE_SCALARS_KEY,
                    geometric={"edge_field": AtomicDataDict.EDGE_FEATURES_KEY}, scalar=True)
    convnets = [n for n in names if n.startswith("layer") and n.endswith("_convnet")]
    if len(convnets) < 2:
        raise ValueError(f"the uncertainty head needs at least 2 convnet layers (NequIP) or an Allegro model, found "
                         f"convnets {convnets} in {names}")
    last = convnets[-1]
    nf = AtomicDataDict.NODE_FEATURES_KEY
    return dict(before=last, novelty_after=last, novelty_field=nf, noise_field=nf, geometric={"field": nf},
                scalar=is_scalar(seq._modules[last].irreps_in.get(nf)))


def scalar_columns(irreps, field: str, reader: str):
    """Indices of the 0e channels of ``irreps`` (an l ≥ 1 backbone: its scalars; 0o would flip under inversion)."""
    cols = [i for (_, ir), sl in zip(irreps, irreps.slices()) if ir == o3.Irrep("0e")
            for i in range(sl.start, sl.stop)]
    if not cols:
        raise ValueError(f"{reader} reads invariant (0e) features, but {field} has irreps {irreps}")
    return cols


class E2IPGeometricModule(GraphModuleMixin, torch.nn.Module):
    """l = 1 / l = 2 node features from the geometry, weighted by learned invariants (module docstring).

    Args:
        irreps_in: irreps dict of the preceding module
        r_max: cutoff of the weights' envelope (the model's ``r_max``)
        field: node features to read (``node_features``; their 0e channels), used when ``edge_field`` is not given
        edge_field: per-edge invariant features to sum onto the centre atoms instead (Allegro: ``edge_features``)
        out_field: where [h, v, t] is written (``e2ip_geometric_features``)
        avg_num_neighbors: n̄ of the 1/√n̄ normalisations
        num_channels, num_basis, mlp_hidden: K, Bessel basis size and MLP width of ``GeometricFeatures``
    """

    from_edges: bool
    select: bool
    detach_input: bool

    def __init__(self, irreps_in, r_max: float, field: str = AtomicDataDict.NODE_FEATURES_KEY,
                 edge_field: Optional[str] = None, out_field: str = K.E2IP_GEOMETRIC_FEATURES_KEY,
                 avg_num_neighbors: float = 10.0, num_channels: int = 8, num_basis: int = 8, mlp_hidden: int = 32):
        super().__init__()
        self.from_edges = edge_field is not None
        self.field = edge_field if edge_field is not None else field
        self.out_field = out_field
        self.detach_input = False
        self.node_norm = 1.0 / math.sqrt(max(float(avg_num_neighbors), 1.0))
        if irreps_in.get(self.field, None) is None:
            raise ValueError(f"E2IPGeometricModule reads {self.field!r}, which the preceding modules do not provide")
        irreps = o3.Irreps(irreps_in[self.field])
        cols = scalar_columns(irreps, self.field, type(self).__name__)
        self.select = len(cols) != irreps.dim
        self.register_buffer("scalar_columns", torch.tensor(cols, dtype=torch.long), persistent=False)
        self.geometric = GeometricFeatures(len(cols), r_max, num_channels=num_channels, num_basis=num_basis,
                                           mlp_hidden=mlp_hidden, avg_num_neighbors=avg_num_neighbors)
        out = {self.out_field: self.geometric.irreps_out}
        if self.from_edges:
            out[K.E2IP_NODE_SCALARS_KEY] = f"{len(cols)}x0e"
        self._init_irreps(irreps_in=irreps_in, required_irreps_in=[self.field], irreps_out=out)

    def forward(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        data = with_edge_vectors_(data, with_lengths=False)
        detach = self.training and self.detach_input
        edge_index = data[AtomicDataDict.EDGE_INDEX_KEY]
        vectors = data[AtomicDataDict.EDGE_VECTORS_KEY]
        x = data[self.field]
        if self.select:
            x = x.index_select(1, self.scalar_columns)
        if detach:  # frozen backbone (nequip_ext.attach): the head's loss does not reach it
            x = x.detach()
            vectors = vectors.detach()
        if self.from_edges:
            n = AtomicDataDict.num_nodes(data)
            h = torch.zeros(n, x.shape[1], dtype=x.dtype, device=x.device).index_add(0, edge_index[0], x)
            h = h * self.node_norm
            data[K.E2IP_NODE_SCALARS_KEY] = h
        else:
            h = x
        # NequIP keeps the geometry in float64 and the features in the model dtype: the weights are features
        data[self.out_field] = self.geometric(h, edge_index[0], edge_index[1], vectors.to(h.dtype))
        return data


class E2IPEdgeCommitteeModule(GraphModuleMixin, torch.nn.Module):
    """Edge-based force committee (:class:`e2ip_plugins.edge_committee.EdgeForceCommittee`, issue 26, opt-in via
    ``uq_head.committee.kind: edge``) on the 0e channels of ``field`` and NequIP's edges (centre
    ``edge_index[0]``, r_j − r_i); writes ``e2ip_committee_forces`` (N, 3M), irreps M×1o, like the node-wise one."""

    detach_input: bool

    def __init__(self, irreps_in, r_max: float, field: str = AtomicDataDict.NODE_FEATURES_KEY,
                 avg_num_neighbors: float = 10.0, **committee):
        super().__init__()
        self.field = field
        self.detach_input = False
        irreps = o3.Irreps(irreps_in[field])
        cols = scalar_columns(irreps, field, type(self).__name__)
        self.register_buffer("scalar_columns", torch.tensor(cols, dtype=torch.long), persistent=False)
        members = int(committee.get("num_members", 8))
        self.committee = EdgeForceCommittee(len(cols), r_max, avg_num_neighbors=avg_num_neighbors, **committee)
        self._init_irreps(irreps_in=irreps_in, required_irreps_in=[field],
                          irreps_out={K.E2IP_COMMITTEE_FORCES_KEY: f"{members}x1o"})

    def forward(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        return edge_committee_forward(self.committee, data, data[self.field].index_select(1, self.scalar_columns),
                                      self.training and self.detach_input)


def edge_committee_forward(committee: torch.nn.Module, data: AtomicDataDict.Type, h: torch.Tensor,
                           detach: bool) -> AtomicDataDict.Type:
    """Run a core committee ``(h, centre, neighbour, r_j − r_i) → (N, M, 3)`` on NequIP's edges; write
    ``e2ip_committee_forces`` (N, 3M). ``detach``: the members read h and the edge vectors cut from the graph."""
    data = with_edge_vectors_(data, with_lengths=False)
    edge_index = data[AtomicDataDict.EDGE_INDEX_KEY]
    vectors = data[AtomicDataDict.EDGE_VECTORS_KEY]
    if detach:
        h, vectors = h.detach(), vectors.detach()
    f = committee(h, edge_index[0], edge_index[1], vectors.to(h.dtype))
    data[K.E2IP_COMMITTEE_FORCES_KEY] = f.reshape(f.shape[0], -1)
    return data
