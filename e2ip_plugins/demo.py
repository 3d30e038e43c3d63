"""Synthetic self-check of the e²IP core (no MLIP framework needed; runs in both environments).

``make demo`` runs the real NequIP job (:mod:`nequip_ext.demo`: ``nequip-train`` on the shipped
molecular data, then the UQ table); this module stays as the framework-free check of the core:

A fixed random "teacher" head defines a true, anisotropic, feature-dependent force-noise
covariance Σ_true(x); targets are y ~ N(0, Σ_true(x)) around a mean prediction γ = 0.
A fresh e²IP head is trained with the evidential loss on training atoms, recalibrated
on validation atoms, and evaluated on held-out test atoms. Prints a UQ table, checks
equivariance of the trained head under a random rotation, and writes plots::

    python -m e2ip_plugins.demo --out /tmp/synthetic
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from . import EvidentialHead, evidential_force_loss, evidential_predictive, fit_covariance_scale
from ._e3nn import o3
from .metrics import UQMetricState
from .plots import write_uq_plots

IRREPS = "8x0e+8x1o"


def _split(n, gen, teacher):
    x = torch.randn(n, o3.Irreps(IRREPS).dim, generator=gen)
    with torch.no_grad():
        cov = teacher(x)["sigma0"]
    y = torch.einsum("nij,nj->ni", torch.linalg.cholesky(cov), torch.randn(n, 3, generator=gen))
    return x, y


def _evaluate(head, x, y, scale=1.0):
    with torch.no_grad():
        pred = evidential_predictive(torch.zeros_like(y), head(x)).scaled(scale)
    state = UQMetricState().update(pred, y)
    return state.compute(), state.columns()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_out")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(a.seed)
    gen = torch.Generator().manual_seed(a.seed)

    teacher = EvidentialHead(IRREPS, force_rms=0.1, num_channels=8)
    torch.nn.init.normal_(teacher.mlp.net[-1].weight, std=0.6)
    (x_tr, y_tr), (x_va, y_va), (x_te, y_te) = (_split(n, gen, teacher) for n in (4000, 2000, 4000))
    sigma_f = float(y_tr.pow(2).mean().sqrt())

    head = EvidentialHead(IRREPS, force_rms=sigma_f, num_channels=8)
    before, _ = _evaluate(head, x_te, y_te)
    opt = torch.optim.Adam(head.parameters(), lr=5e-3)
    for step in range(a.steps):
        idx = torch.randint(0, len(x_tr), (512,), generator=gen)
        loss = evidential_force_loss(torch.zeros(512, 3), head(x_tr[idx]), y_tr[idx], sigma_f, reg_weight=0.01).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after, _ = _evaluate(head, x_te, y_te)
    with torch.no_grad():
        c = fit_covariance_scale(evidential_predictive(torch.zeros_like(y_va), head(x_va)), y_va)
    recal, cols = _evaluate(head, x_te, y_te, scale=c)

    R = o3.rand_matrix()
    with torch.no_grad():
        s = head(x_te[:100])["sigma0"]
        s_rot = head(x_te[:100] @ o3.Irreps(IRREPS).D_from_matrix(R).T)["sigma0"]
    equi = float((s_rot - R @ s @ R.T).norm() / s.norm())

    keys = ["forces_nll", "forces_coverage_50", "forces_coverage_90", "forces_miscal_area", "forces_spearman", "forces_auroc", "forces_sharpness"]
    rows = [("untrained head", before), ("trained (evidential loss)", after), (f"trained + recalibrated (c={c:.3f})", recal)]
    print(f"e2ip core demo: synthetic anisotropic force noise, {len(x_tr)} training atoms, {a.steps} steps, test set {len(x_te)} atoms")
    print(f"{'model':38s}" + "".join(f"{k.replace('forces_', ''):>14s}" for k in keys))
    for name, m in rows:
        print(f"{name:38s}" + "".join(f"{m[k]:14.4f}" for k in keys))
    print(f"equivariance of the trained head: ||Σ(Rx) - R Σ(x) Rᵀ|| / ||Σ|| = {equi:.1e}")
    paths = write_uq_plots(cols, Path(a.out), prefix="synthetic_test_")
    print("plots:", ", ".join(str(p) for p in paths.values()))
    return rows


if __name__ == "__main__":
    main()
