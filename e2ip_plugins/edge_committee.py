"""A committee of direct, edge-based force heads (issue 26): members that can represent pairwise forces.

The node-wise members of :mod:`e2ip_plugins.force_committee` read one atom's features and fit the forces
2.5–4× worse than the conservative force γ (docs/committee.md), so their spread mixes their own error with
γ's. Here member k predicts the force on atom i as a sum over its neighbours, like a learned pair force
whose strength depends on both atoms' environments:

    a_ij^k = w2_k · SiLU(W1_k [h_i, h_j, B(r_ij)] + b1_k) + b2_k          one invariant per edge and member
    F_i^k  = σ_F / √n̄ · Σ_{j∈N(i)} a_ij^k f_cut(r_ij) r̂_ij                equivariant: F(R·x) = R F(x)

with h the backbone's invariant (0e) node features, B the Bessel basis and f_cut the polynomial envelope of
:mod:`e2ip_plugins.geometric_features` (C² at r_max), r_ij = r_j − r_i and n̄ the typical neighbour count.
Members have independent weights (stacked tensors, one seeded generator). Output (N, M, 3), read by
:func:`e2ip_plugins.force_committee.committee_covariance` and trained by
:func:`e2ip_plugins.force_committee.committee_loss` unchanged.
"""

from __future__ import annotations

import math

import torch

from .geometric_features import bessel_basis, polynomial_envelope


class EdgeForceCommittee(torch.nn.Module):
    """(node scalars (N, F), centre (E,), neighbour (E,), edge vectors r_j − r_i (E, 3)) → member forces (N, M, 3)."""

    def __init__(self, num_scalars: int, r_max: float, num_members: int = 8, mlp_hidden: int = 16,
                 num_basis: int = 8, avg_num_neighbors: float = 10.0, force_rms: float = 1.0, seed: int = 0,
                 num_channels: int = 0):  # num_channels: the node-wise committee's option, accepted and unused here
        super().__init__()
        if num_members < 2:
            raise ValueError(f"a committee needs num_members >= 2, got {num_members}")
        m, d, h = int(num_members), 2 * int(num_scalars) + int(num_basis), int(mlp_hidden)
        self.num_members, self.r_max, self.force_rms = m, float(r_max), float(force_rms)
        self.norm = 1.0 / math.sqrt(max(float(avg_num_neighbors), 1.0))
        g = torch.Generator().manual_seed(int(seed))
        self.w1 = torch.nn.Parameter(torch.randn(m, d, h, generator=g) / math.sqrt(d))
        self.b1 = torch.nn.Parameter(torch.zeros(m, h))
        self.w2 = torch.nn.Parameter(torch.randn(m, h, generator=g) / math.sqrt(h))
        self.b2 = torch.nn.Parameter(torch.zeros(m))
        self.register_buffer("freqs", math.pi * torch.arange(1, int(num_basis) + 1, dtype=torch.get_default_dtype()))

    def forward(self, node_scalars: torch.Tensor, center: torch.Tensor, neighbor: torch.Tensor,
                edge_vectors: torch.Tensor) -> torch.Tensor:
        r = torch.linalg.norm(edge_vectors, dim=-1)
        x = torch.cat([node_scalars[center], node_scalars[neighbor], bessel_basis(r, self.freqs.to(r.dtype), self.r_max)],
                      dim=-1)
        hid = torch.nn.functional.silu(torch.einsum("ed,mdh->emh", x, self.w1) + self.b1)
        a = torch.einsum("emh,mh->em", hid, self.w2) + self.b2  # (E, M)
        a = a * (polynomial_envelope(r, self.r_max) * self.norm / r.clamp_min(1e-9)).unsqueeze(-1)
        per_edge = a.unsqueeze(-1) * edge_vectors.unsqueeze(1)  # (E, M, 3): a·f_cut·r̂ (r̂ = vector / r)
        n = node_scalars.shape[0]
        out = torch.zeros(n, self.num_members, 3, dtype=node_scalars.dtype, device=node_scalars.device)
        return self.force_rms * out.index_add(0, center, per_edge)
