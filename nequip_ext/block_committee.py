"""Committee members with their own interaction block (issue 26, opt-in ``uq_head.committee.kind: block``).

The node-wise and edge-based committees (docs/committee.md) read one set of shared features, and their spread
barely grows out of distribution. Here member k owns a whole (slim) NequIP interaction block on the features
before the last convnet, then a direct force readout:

    h_k,i = ConvNetLayer_k(h, edges)_i              K×0e + K×1o, its own radial MLP, TP weights, self-connection
    F_k,i = σ_F · W_k h_k,i|1o                     one 1o vector: F(R·x) = R F(x)

so members differ in how they pass messages, as the last layer of independently trained models would. The
committee math (sample covariance, loss) is :mod:`e2ip_plugins.force_committee`; this file is the NequIP
adapter that builds the members from NequIP's own ``ConvNetLayer``.

``kind: message`` (:class:`E2IPMessageCommitteeModule`) is the same idea batched: all M members in one slim
message-passing layer of the core (:class:`e2ip_plugins.message_committee.MessageCommittee`), read from the same
features and NequIP's edges (centre ``edge_index[0]``, r_j − r_i).
"""

from __future__ import annotations

from typing import Optional

import torch

from nequip.data import AtomicDataDict
from nequip.nn import ConvNetLayer, GraphModuleMixin

from e2ip_plugins._e3nn import o3
from e2ip_plugins.message_committee import MessageCommittee

from . import _keys as K
from .geometric import edge_committee_forward


class E2IPBlockCommitteeModule(GraphModuleMixin, torch.nn.Module):
    """M members, each a ``ConvNetLayer`` (K×0e + K×1o out) and a linear 1o readout scaled by σ_F; writes
    ``e2ip_committee_forces`` (N, 3M), irreps M×1o, like the node-wise committee.

    Args:
        irreps_in: irreps dict before the last convnet (node features, edge attrs/embedding, node attrs).
        avg_num_neighbors: n̄ of the members' edge-sum normalisation (the backbone's).
        num_members: M ≥ 2.  num_channels: K.  radial_mlp_width / radial_mlp_depth: each member's radial MLP.
        seed: members drawn from this seed (default: the model's generator).
        force_rms: σ_F (eV/Å). ``uq_head.committee.detach`` (any kind) sets ``detach_input``: members read the
        features cut from the graph in training, so their loss trains only the members.
    """

    detach_input: bool

    def __init__(self, irreps_in, avg_num_neighbors: float = 10.0, num_members: int = 4, num_channels: int = 8,
                 radial_mlp_width: int = 16, radial_mlp_depth: int = 1, force_rms: float = 1.0,
                 seed: Optional[int] = None):
        super().__init__()
        if int(num_members) < 2:
            raise ValueError(f"uq_head.committee.num_members must be >= 2, got {num_members}")
        self.detach_input = False
        self.num_members = int(num_members)
        self.force_rms = float(force_rms)
        nf = AtomicDataDict.NODE_FEATURES_KEY
        self._init_irreps(irreps_in=irreps_in, required_irreps_in=[nf],
                          irreps_out={K.E2IP_COMMITTEE_FORCES_KEY: f"{self.num_members}x1o"})
        hidden = o3.Irreps(f"{int(num_channels)}x0e+{int(num_channels)}x1o")
        self.members = torch.nn.ModuleList()
        self.readouts = torch.nn.ModuleList()
        with torch.random.fork_rng(enabled=seed is not None):  # a seed leaves the caller's generator untouched
            if seed is not None:
                torch.manual_seed(int(seed))
            self._build(hidden, avg_num_neighbors, radial_mlp_width, radial_mlp_depth)

    def _build(self, hidden, avg_num_neighbors, radial_mlp_width, radial_mlp_depth) -> None:
        """M members drawn one after another from the current generator (independent initialisations)."""
        nf = AtomicDataDict.NODE_FEATURES_KEY
        for _ in range(self.num_members):
            block = ConvNetLayer(
                irreps_in=self.irreps_in, feature_irreps_hidden=hidden,
                convolution_kwargs={"radial_mlp_depth": int(radial_mlp_depth),
                                    "radial_mlp_width": int(radial_mlp_width), "use_sc": True,
                                    "is_first_layer": False, "avg_num_neighbors": float(avg_num_neighbors),
                                    "type_names": None},
            )
            self.members.append(block)
            self.readouts.append(o3.Linear(block.irreps_out[nf], o3.Irreps("1x1o")))

    def forward(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        nf = AtomicDataDict.NODE_FEATURES_KEY
        inputs = dict(data)  # the blocks write node_features; the model's own stay untouched
        if self.training and self.detach_input:  # every trainable input: features, type embedding, edge terms
            for key in (nf, AtomicDataDict.NODE_ATTRS_KEY, AtomicDataDict.EDGE_EMBEDDING_KEY,
                        AtomicDataDict.EDGE_ATTRS_KEY):
                inputs[key] = data[key].detach()
        forces = []
        for block, readout in zip(self.members, self.readouts):
            member = block(dict(inputs))
            forces.append(self.force_rms * readout(member[nf]))
        f = torch.stack(forces, dim=1)  # (N, M, 3)
        data[K.E2IP_COMMITTEE_FORCES_KEY] = f.reshape(f.shape[0], -1)
        return data


class E2IPMessageCommitteeModule(GraphModuleMixin, torch.nn.Module):
    """M members batched in one :class:`~e2ip_plugins.message_committee.MessageCommittee` on the node features
    before the last convnet; writes ``e2ip_committee_forces`` (N, 3M), irreps M×1o. ``detach_input`` (set by
    ``uq_head.committee.detach``): in training the members read the features and edge vectors cut from the graph.

    Args:
        irreps_in: irreps dict before the last convnet. r_max: the model's cutoff. avg_num_neighbors: the backbone's n̄.
        **committee: ``num_members``, ``num_channels``, ``num_basis``, ``radial_hidden``, ``force_rms``, ``seed``.
    """

    detach_input: bool

    def __init__(self, irreps_in, r_max: float, avg_num_neighbors: float = 10.0, **committee):
        super().__init__()
        self.detach_input = False
        nf = AtomicDataDict.NODE_FEATURES_KEY
        members = int(committee.get("num_members", 4))
        self._init_irreps(irreps_in=irreps_in, required_irreps_in=[nf],
                          irreps_out={K.E2IP_COMMITTEE_FORCES_KEY: f"{members}x1o"})
        self.committee = MessageCommittee(self.irreps_in[nf], r_max, avg_num_neighbors=avg_num_neighbors, **committee)

    def forward(self, data: AtomicDataDict.Type) -> AtomicDataDict.Type:
        return edge_committee_forward(self.committee, data, data[AtomicDataDict.NODE_FEATURES_KEY],
                                      self.training and self.detach_input)
