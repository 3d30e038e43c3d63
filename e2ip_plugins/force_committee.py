"""A committee of direct force heads on shared node features (DESIGN §2.6, issue 26; first increment).

M member heads read the same node features h_i (irreps with at least one ``1o``) and each predicts a
force directly, with no backward pass. Member k (independent weights, independent initialisation):

    (s_k, v_k)  = Linear_k(h_i)                       K×0e scalars, K×1o vectors
    g_k         = MLP_k([s_k, ‖v_k‖²])                K invariant weights
    F_k,i       = σ_F · Σ_j g_k,j v_k,j / √K          one 1o vector: equivariant, F(R·x) = R F(x)

The committee's spread is the epistemic covariance (3×3 sample covariance, unbiased):

    F̄_i = mean_k F_k,i,    C_i = 1/(M−1) Σ_k (F_k,i − F̄_i)(F_k,i − F̄_i)ᵀ

Training loss per atom (:func:`committee_loss`), y the reference force:

    L_i = mean_k ‖F_k,i − y_i‖² / (3σ_F²)                          every member fits (keeps them accurate)
        + w · NLL_N(y_i; F̄_i, C_i + δ²σ_F² I)                      the committee's 3×3 Gaussian NLL
                                                                    (apax ``nll_3x3``; δ a small floor)

Deployed, U_epi,i = c · C_i with one global c fitted on validation data.
"""

from __future__ import annotations

import math
from typing import Tuple

import torch

from ._e3nn import o3
from .ensemble import ensemble_predictive


def committee_covariance(member_forces: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """member_forces (N, M, 3), M ≥ 2 → (mean (N, 3), unbiased sample covariance (N, 3, 3)); the ensemble
    math of :func:`e2ip_plugins.ensemble.ensemble_predictive`."""
    pred = ensemble_predictive(member_forces.transpose(0, 1), jitter=0.0)
    return pred.mean, pred.cov_epistemic


def committee_loss(member_forces: torch.Tensor, y: torch.Tensor, force_rms: float, nll_weight: float = 1.0,
                   floor: float = 1e-2) -> torch.Tensor:
    """Per-atom loss (N,) of the module docstring: members' mean squared error in units of σ_F², plus
    ``nll_weight`` × the committee's Gaussian NLL with covariance C + (floor·σ_F)² I."""
    sq = ((member_forces - y.unsqueeze(1)) ** 2).sum(-1).mean(-1) / (3.0 * force_rms ** 2)
    nll = ensemble_predictive(member_forces.transpose(0, 1), jitter=(floor * force_rms) ** 2).nll(y)
    return sq + nll_weight * nll


class ForceCommittee(torch.nn.Module):
    """M direct, equivariant force heads (module docstring): features (N, irreps_in.dim) → (N, M, 3).

    Args:
        irreps_in: node-feature irreps; must contain ``1o``.
        num_members: M ≥ 2.
        num_channels: K scalars and K vectors per member.
        mlp_hidden: width of each member's invariant MLP.
        force_rms: σ_F (eV/Å), the output scale.
        seed: members are initialised from this seed, one generator draw after another (independent).
    """

    def __init__(self, irreps_in, num_members: int = 8, num_channels: int = 8, mlp_hidden: int = 16,
                 force_rms: float = 1.0, seed: int = 0):
        super().__init__()
        irreps_in = o3.Irreps(irreps_in)
        if not any(ir == o3.Irrep("1o") for _, ir in irreps_in):
            raise ValueError(f"the force committee needs 1o node features, got irreps '{irreps_in}'")
        if num_members < 2:
            raise ValueError(f"a committee needs num_members >= 2, got {num_members}")
        m, k = int(num_members), int(num_channels)
        self.num_members, self.k, self.force_rms = m, k, float(force_rms)
        # one e3nn Linear with M·K outputs per irrep is M independent linear maps (no output mixes members)
        self.linear = o3.Linear(irreps_in, o3.Irreps(f"{m * k}x0e+{m * k}x1o"))
        g = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            for w in self.linear.parameters():
                w.copy_(torch.randn(w.shape, generator=g))  # e3nn's own init is N(0, 1) with path normalisation
        self.w1 = torch.nn.Parameter(torch.randn(m, 2 * k, mlp_hidden, generator=g) / math.sqrt(2 * k))
        self.b1 = torch.nn.Parameter(torch.zeros(m, mlp_hidden))
        self.w2 = torch.nn.Parameter(torch.randn(m, mlp_hidden, k, generator=g) / math.sqrt(mlp_hidden))
        self.b2 = torch.nn.Parameter(torch.ones(m, k))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        n = features.shape[0]
        m, k = self.num_members, self.k
        h = self.linear(features)
        s = h[:, : m * k].reshape(n, m, k)
        v = h[:, m * k:].reshape(n, m, k, 3)
        inv = torch.cat([s, (v * v).sum(-1)], dim=-1)  # (N, M, 2K)
        hid = torch.nn.functional.silu(torch.einsum("nmi,mih->nmh", inv, self.w1) + self.b1)
        gates = torch.einsum("nmh,mhk->nmk", hid, self.w2) + self.b2
        return self.force_rms * torch.einsum("nmk,nmka->nma", gates, v) / math.sqrt(k)
