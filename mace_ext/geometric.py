"""The geometric construction (issue 28, :mod:`e2ip_plugins.geometric_features`) on a MACE backbone.

A MACE model whose product blocks are all scalar (``--max_L 0``, MACE-MP "small") has no l > 0 feature
for the e²IP head to build Σ₀ from, so the head reads

    [h_i, v_i, t_i] = GeometricFeatures(h, centre, neighbour, r_j − r_i (+ shift)),

h the scalars (0e channels) of the *last* product block's output — the features MACE's last readout sees,
which have passed every interaction — and v_i (K×1o), t_i (K×2e) sums of Y¹(r̂_ij), Y²(r̂_ij) over the
neighbours with learned invariant weights (docs/scalar_backbones.md). Also available on l > 0 backbones
(``geometric=True``, ``--e2ip_geometric``) to compare with the default head.

MACE's edges: ``vectors = positions[receiver] − positions[sender] + shifts`` with ``(sender, receiver) =
edge_index`` (ASE's ``ijS`` convention: i = sender, j = receiver, D = r_j − r_i + S·cell), and messages are
summed at the receiver. The features are summed at the same atom: centre = receiver, neighbour = sender,
and r_neighbour − r_centre = −vectors = positions[sender] − positions[receiver] − shifts
(:func:`edge_geometry`; checked against ASE neighbour lists on a small periodic cell in
tests/mace/test_scalar_backbone.py).
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch

from e2ip_plugins._e3nn import o3
from e2ip_plugins.geometric_features import GeometricFeatures


class NoGeometricFeatures(torch.nn.Module):
    """Placeholder when the head reads l > 0 node features (one TorchScript-compilable forward); never called."""

    def forward(self, node_scalars: torch.Tensor, center: torch.Tensor, neighbor: torch.Tensor,
                edge_vectors: torch.Tensor) -> torch.Tensor:
        return node_scalars


def edge_geometry(data: Dict[str, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(centre, neighbour, r_neighbour − r_centre + periodic image) of MACE's edges (module docstring)."""
    sender, receiver = data["edge_index"][0], data["edge_index"][1]
    positions = data["positions"]
    return receiver, sender, positions[sender] - positions[receiver] - data["shifts"]


def last_block_scalars(model: torch.nn.Module) -> Tuple[int, int, int, int]:
    """(block index, number of scalars F, start, stop) of the 0e channels of the last product block inside
    MACE's ``node_feats`` (the concatenation of every block's output)."""
    irreps_list = [o3.Irreps(str(p.linear.irreps_out)) for p in model.products]
    idx = len(irreps_list) - 1
    offset = sum(irreps.dim for irreps in irreps_list[:idx])
    for mul, ir in irreps_list[idx]:
        if ir.l == 0 and ir.p == 1:
            return idx, mul, offset, offset + mul
        offset += mul * ir.dim
    raise ValueError(f"the last MACE product block outputs {irreps_list[idx]}, without scalars (0e)")


def avg_num_neighbors(model: torch.nn.Module) -> float:
    """MACE's normalisation n̄ (stored on its interaction blocks; 10 when absent)."""
    for block in model.interactions:
        value = getattr(block, "avg_num_neighbors", None)
        if value is not None:
            return float(value)
    return 10.0


def build_geometric(model: torch.nn.Module, num_channels: int = 8, mlp_hidden: int = 32
                    ) -> Tuple[GeometricFeatures, int, int, int]:
    """(GeometricFeatures on the last block's scalars, block index, start, stop); r_max and n̄ from the model."""
    idx, num_scalars, start, stop = last_block_scalars(model)
    module = GeometricFeatures(num_scalars, float(model.r_max), num_channels=num_channels, mlp_hidden=mlp_hidden,
                               avg_num_neighbors=avg_num_neighbors(model))
    return module, idx, start, stop
