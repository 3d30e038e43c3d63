"""Committee members that pass their own messages, batched in one module (issue 26, ``kind: message``).

The fifth measurement (docs/committee.md) found that members which own an interaction block — not only a readout
— grow their spread with the error out of distribution about as an ensemble does; but M separate NequIP
``ConvNetLayer`` members cost 36 % of an inference call. Here the M members are one slim equivariant
message-passing layer whose weights carry a member axis, so all members run in the same few batched kernels
(cost O(E·M·K), no Python loop over members) and the layer is framework-agnostic (NequIP and MACE adapters).

Member k, with K scalar and K vector channels, on backbone node features h (any irreps; its 0e and 1o parts are
read), edges i ← j with r_ij = r_j − r_i, r̂ = r_ij/|r_ij|, B the Bessel basis and f_cut the C² envelope of
:mod:`e2ip_plugins.geometric_features`:

    (s_k, v_k)_j   = Linear_k(h_j)                                  K×0e, K×1o (one e3nn Linear, M·K outputs)
    w_k(r)         = f_cut(r) · MLP_k(B(r))                         4K invariant path weights per edge
    m^s_k,i        = 1/√n̄ Σ_j  w¹ s_j + w² (v_j · r̂)                 0e ⊗ 0e → 0e,  1o ⊗ 1o → 0e
    m^v_k,i        = 1/√n̄ Σ_j  w³ s_j r̂ + w⁴ v_j                    0e ⊗ 1o → 1o,  1o ⊗ 0e → 1o
    g_k,i          = σ(A_k m^s + A'_k s_i)                          K gates (invariant)
    u_k,i          = g ⊙ (B_k m^v + B'_k v_i)                       K vectors: equivariant
    F_k,i          = σ_F · R_k u_k,i / √K                           one 1o force per member: F(R·x) = R F(x)

All member weights are stacked (M, ·, ·) tensors drawn from one seeded generator (independent initialisations);
no weight mixes members. Output (N, M, 3) is read by :func:`e2ip_plugins.force_committee.committee_covariance` and
trained by :func:`e2ip_plugins.force_committee.committee_loss` unchanged.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from ._e3nn import o3
from .geometric_features import bessel_basis, polynomial_envelope


class MessageCommittee(torch.nn.Module):
    """(node features (N, irreps_in.dim), centre (E,), neighbour (E,), edge vectors r_j − r_i (E, 3)) →
    member forces (N, M, 3).

    Args:
        irreps_in: backbone node-feature irreps (0e and 1o parts are used; scalars alone work too).
        r_max: cutoff (Å) of the radial basis and envelope. avg_num_neighbors: n̄ of the edge sum.
        num_members: M ≥ 2. num_channels: K. num_basis / radial_hidden: the members' radial MLP.
        force_rms: σ_F (eV/Å). seed: generator seed of the members' initialisation (None: drawn from torch's
            global generator).
    """

    def __init__(self, irreps_in, r_max: float, num_members: int = 4, num_channels: int = 8, num_basis: int = 8,
                 radial_hidden: int = 16, avg_num_neighbors: float = 10.0, force_rms: float = 1.0, seed: Optional[int] = None):
        super().__init__()
        if int(num_members) < 2:
            raise ValueError(f"a committee needs num_members >= 2, got {num_members}")
        if int(num_channels) < 1:
            raise ValueError(f"the committee needs num_channels >= 1, got {num_channels}")
        irreps_in = o3.Irreps(irreps_in)
        m, k, nb, h = int(num_members), int(num_channels), int(num_basis), int(radial_hidden)
        self.num_members, self.k, self.r_max, self.force_rms = m, k, float(r_max), float(force_rms)
        self.norm = 1.0 / math.sqrt(max(float(avg_num_neighbors), 1.0))
        self.has_vectors = any(ir == o3.Irrep("1o") for _, ir in irreps_in)
        out = f"{m * k}x0e+{m * k}x1o" if self.has_vectors else f"{m * k}x0e"
        self.linear = o3.Linear(irreps_in, o3.Irreps(out))  # M·K outputs per irrep: M independent input maps
        if seed is None:  # no seed: the caller's generator draws one (seeded runs differ, reproducibly)
            seed = int(torch.randint(0, 2**31 - 1, ()).item())
        g = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            for w in self.linear.parameters():
                w.copy_(torch.randn(w.shape, generator=g))  # e3nn's own init, N(0, 1) with path normalisation

        def draw(*shape, fan_in):
            return torch.nn.Parameter(torch.randn(*shape, generator=g) / math.sqrt(fan_in))

        self.radial1 = draw(m, nb, h, fan_in=nb)
        self.radial2 = draw(m, h, 4 * k, fan_in=h)
        self.gate_msg, self.gate_self = draw(m, k, k, fan_in=2 * k), draw(m, k, k, fan_in=2 * k)
        self.gate_bias = torch.nn.Parameter(torch.zeros(m, k))
        self.vec_msg, self.vec_self = draw(m, k, k, fan_in=2 * k), draw(m, k, k, fan_in=2 * k)
        self.readout = draw(m, k, fan_in=1)
        self.register_buffer("freqs", math.pi * torch.arange(1, nb + 1, dtype=torch.get_default_dtype()))

    def forward(self, features: torch.Tensor, center: torch.Tensor, neighbor: torch.Tensor,
                edge_vectors: torch.Tensor) -> torch.Tensor:
        # layout: channels (member-major, M·K) last and contiguous, the Cartesian axis before them, so every
        # per-edge product broadcasts over one contiguous axis of length M·K
        n, m, k = features.shape[0], self.num_members, self.k
        mk = m * k
        x = self.linear(features)
        s = x[:, :mk]
        if self.has_vectors:
            v = x[:, mk:].reshape(n, mk, 3).transpose(1, 2).contiguous()  # (N, 3, M·K)
        else:
            v = torch.zeros(n, 3, mk, dtype=x.dtype, device=x.device)
        r = torch.linalg.norm(edge_vectors, dim=-1)
        rhat = (edge_vectors / r.clamp_min(1e-9).unsqueeze(-1)).unsqueeze(-1)  # (E, 3, 1)
        basis = bessel_basis(r, self.freqs.to(r.dtype), self.r_max)
        hid = torch.nn.functional.silu(torch.einsum("eb,mbh->emh", basis, self.radial1))
        w = torch.einsum("emh,mhqk->eqmk", hid, self.radial2.reshape(m, -1, 4, k)).reshape(-1, 4, mk)
        w = w * (polynomial_envelope(r, self.r_max) * self.norm).reshape(-1, 1, 1)  # (E, 4, M·K)
        sj, vj = s[neighbor], v[neighbor]
        msg_s = w[:, 0] * sj + w[:, 1] * (vj * rhat).sum(1)
        msg_v = rhat * (w[:, 2] * sj).unsqueeze(1) + w[:, 3].unsqueeze(1) * vj
        agg_s = torch.zeros_like(s).index_add(0, center, msg_s).reshape(n, m, k)
        agg_v = torch.zeros_like(v).index_add(0, center, msg_v).reshape(n, 3, m, k)
        gate = torch.sigmoid(torch.einsum("nmk,mkj->nmj", agg_s, self.gate_msg)
                             + torch.einsum("nmk,mkj->nmj", s.reshape(n, m, k), self.gate_self) + self.gate_bias)
        u = gate.unsqueeze(1) * (torch.einsum("namk,mkj->namj", agg_v, self.vec_msg)
                                 + torch.einsum("namk,mkj->namj", v.reshape(n, 3, m, k), self.vec_self))
        return self.force_rms * torch.einsum("namk,mk->nma", u, self.readout) / math.sqrt(k)
