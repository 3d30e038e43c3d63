"""Equivariant l = 1 and l = 2 atom features built from the geometry, for backbones whose features are
scalars (Allegro, MACE ``max_L 0``, NequIP ``l_max 0``; issue 28).

The e²IP head (:class:`e2ip_plugins.EvidentialHead`) builds Σ₀ from l > 0 features. A scalar backbone has
none, so they are made from the edges of the atom's neighbourhood, with weights that are learned
invariant functions of the backbone's scalar features and of the distance:

    [a_ij, b_ij] = MLP([h_i, h_j, B(r_ij)]) · f_cut(r_ij)          (2K invariants per edge)
    v_i^k = Σ_{j∈N(i)} a_ij^k Y¹(r̂_ij) / √n̄,    t_i^k = Σ_{j∈N(i)} b_ij^k Y²(r̂_ij) / √n̄

with r_ij = r_j − r_i (+ periodic shift), B a Bessel radial basis, f_cut the polynomial envelope (p = 6)
that takes the weights smoothly to zero at r_max, and n̄ a typical number of neighbours. The output
[h_i, v_i, t_i] has irreps ``F×0e + K×1o + K×2e`` and feeds the head unchanged: Σ₀ is then SPD and
rotates as R Σ₀ Rᵀ by construction (Y¹ and Y² rotate, the weights do not). Pure torch ops
(``index_add_``), TorchScript- and ``torch.export``-friendly.
"""

from __future__ import annotations

import math

import torch

from ._e3nn import o3


def bessel_basis(r: torch.Tensor, freqs: torch.Tensor, r_max: float) -> torch.Tensor:
    """sqrt(2/r_max)·sin(f_n r/r_max)/r for the frequencies f_n = nπ, (E, num_basis)."""
    x = (r / r_max).unsqueeze(-1)
    return math.sqrt(2.0 / r_max) * torch.sin(freqs * x) / r.unsqueeze(-1).clamp_min(1e-9)


def polynomial_envelope(r: torch.Tensor, r_max: float) -> torch.Tensor:
    """1 − 28x⁶ + 48x⁷ − 21x⁸ for x = r/r_max < 1, else 0: value and first two derivatives vanish at r_max."""
    x = r / r_max
    f = 1.0 - 28.0 * x.pow(6) + 48.0 * x.pow(7) - 21.0 * x.pow(8)
    return torch.where(x < 1.0, f, torch.zeros_like(f))


class GeometricFeatures(torch.nn.Module):
    """(node scalars (N, F), centre (E,), neighbour (E,), edge vectors r_j − r_i (E, 3)) → (N, F + 3K + 5K)."""

    def __init__(self, num_scalars: int, r_max: float, num_channels: int = 8, num_basis: int = 8,
                 mlp_hidden: int = 32, avg_num_neighbors: float = 10.0):
        super().__init__()
        self.num_scalars = int(num_scalars)
        self.num_channels = int(num_channels)
        self.num_basis = int(num_basis)
        self.r_max = float(r_max)
        self.norm = 1.0 / math.sqrt(max(float(avg_num_neighbors), 1.0))
        k = self.num_channels
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(2 * self.num_scalars + self.num_basis, mlp_hidden), torch.nn.SiLU(),
            torch.nn.Linear(mlp_hidden, mlp_hidden), torch.nn.SiLU(),
            torch.nn.Linear(mlp_hidden, 2 * k),
        )
        self.register_buffer("freqs", math.pi * torch.arange(1, self.num_basis + 1, dtype=torch.get_default_dtype()))
        self.irreps_out = str(o3.Irreps(f"{self.num_scalars}x0e+{k}x1o+{k}x2e"))
        self.sh = o3.SphericalHarmonics(o3.Irreps("1o+2e"), normalize=True, normalization="component")

    def radial(self, r: torch.Tensor) -> torch.Tensor:
        """Bessel basis sqrt(2/r_max)·sin(nπ r/r_max)/r, (E, num_basis)."""
        return bessel_basis(r, self.freqs, self.r_max)

    def envelope(self, r: torch.Tensor) -> torch.Tensor:
        """Polynomial cutoff (p = 6): 1 − 28x⁶ + 48x⁷ − 21x⁸ for x = r/r_max < 1, else 0 (C² at r_max)."""
        return polynomial_envelope(r, self.r_max)

    def forward(self, node_scalars: torch.Tensor, center: torch.Tensor, neighbor: torch.Tensor,
                edge_vectors: torch.Tensor) -> torch.Tensor:
        n = node_scalars.shape[0]
        k = self.num_channels
        r = torch.linalg.norm(edge_vectors, dim=-1)
        # first layer W·[h_i, h_j, B] + b = (W_i h)_i + (W_j h)_j + W_B B + b: the node blocks are applied per atom,
        # then gathered, so the per-edge work is the radial block and the hidden layers (same parameters)
        first = self.mlp[0]
        f = self.num_scalars
        w_i, w_j, w_b = first.weight[:, :f], first.weight[:, f:2 * f], first.weight[:, 2 * f:]
        x = (torch.nn.functional.linear(node_scalars, w_i)[center]
             + torch.nn.functional.linear(node_scalars, w_j)[neighbor]
             + torch.nn.functional.linear(self.radial(r), w_b, first.bias))
        w = self.mlp[4](self.mlp[3](self.mlp[2](self.mlp[1](x))))
        w = w * (self.envelope(r) * self.norm).unsqueeze(-1)  # (E, 2K)
        sh = self.sh(edge_vectors)  # (E, 3 + 5): Y¹, Y² of r̂_ij
        y1, y2 = sh[:, :3], sh[:, 3:]
        v = (w[:, :k].unsqueeze(-1) * y1.unsqueeze(1)).reshape(-1, 3 * k)  # (E, K*3): K×1o, mul-major
        t = (w[:, k:].unsqueeze(-1) * y2.unsqueeze(1)).reshape(-1, 5 * k)  # (E, K*5): K×2e
        out = torch.zeros(n, 8 * k, dtype=node_scalars.dtype, device=node_scalars.device)
        out = out.index_add(0, center, torch.cat([v, t], dim=-1))
        return torch.cat([node_scalars, out], dim=-1)
