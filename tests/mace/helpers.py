"""Tiny MACE backbones and molecules for the MACE adapter tests (CPU, seconds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import e2ip_plugins  # noqa: F401  (allow-lists e3nn's constants before mace imports e3nn)
from e2ip_plugins._e3nn import o3
from mace import modules

REPO = Path(__file__).resolve().parents[2]
DATA = REPO / "e2ip_plugins" / "data"
Z = [1, 6, 8]


def tiny_mace(max_L: int = 1, num_interactions: int = 2, channels: int = 8, scale_shift: bool = True, r_max: float = 4.0,
              z=tuple(Z)):
    hidden = o3.Irreps((channels * o3.Irreps.spherical_harmonics(max_L)).sort().irreps.simplify())
    cfg = dict(
        r_max=r_max,
        num_bessel=4,
        num_polynomial_cutoff=5,
        max_ell=2,
        interaction_cls=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        interaction_cls_first=modules.interaction_classes["RealAgnosticResidualInteractionBlock"],
        num_interactions=num_interactions,
        num_elements=len(z),
        hidden_irreps=hidden,
        MLP_irreps=o3.Irreps("4x0e"),
        atomic_energies=np.zeros(len(z)),
        avg_num_neighbors=8.0,
        atomic_numbers=list(z),
        correlation=2,
        gate=torch.nn.functional.silu,
    )
    if scale_shift:
        return modules.ScaleShiftMACE(atomic_inter_scale=1.0, atomic_inter_shift=0.0, **cfg)
    return modules.MACE(**cfg)


def random_rotation(seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=g, dtype=dtype))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def first_molecule():
    import ase.io

    return ase.io.read(DATA / "iso7_test.xyz", index=0)
