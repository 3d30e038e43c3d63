"""Force-Jacobian LLPR candidate for the epistemic level (issue 12), post hoc on a MACE e²IP model.

    .venv-mace/bin/python -m benchmarks.probes.level_jacobian_llpr --model /tmp/bn/mace/runs/e2ip_s0/e2ip_s0.model \\
        --split-dir /tmp/bn/data --out /tmp/bn/level_jacobian_mace.json

Last-layer features φ_i: the inputs of the final linear map of every MACE readout (the ``0e`` channels
read by a linear readout, the hidden activations of the non-linear one), so E = Σ_i wᵀφ_i (up to
MACE's constant scale). Per structure Φ = Σ_i φ_i and G_j = ∂Φ/∂r_j (P×3, P backward passes). With
the training atoms' F = [G_j]:

    U_jac,j = G_jᵀ (FᵀF + ς²·tr(FᵀF)/P·I)⁻¹ G_j          (3×3, equivariant by construction)

The candidate predictive is the Gaussian N(γ, c·U_tot,head + α²·U_jac) with U_epi = c·U_epi,head +
α²·U_jac; (c, α²) by validation NLL for each ς² on a grid, best ς² by validation NLL. Cost: P
backward passes per structure (P = 32 on the quick profile), reported as seconds per structure next
to one forward+force pass.

``--shallow K`` adds a shallow last-layer ensemble on the shared backbone (the issue's third candidate),
built post hoc on the same frozen features: member k refits the last-layer weights on a bootstrap
resample b_k of the training structures,

    δ_k = −(Σ_{j∈b_k} G_j G_jᵀ + ς²·tr(FᵀF)/P·I)⁻¹ Σ_{j∈b_k} G_j (y_j − γ_j),   F_k,j = γ_j − G_jᵀ δ_k,

so its forces differ from the model's by a last-layer change. The predictive is N(mean_k F_k,j,
c·U_tot,head + α²·U_ens,j), U_ens,j the 3×3 sample covariance (ddof 1) of the members' forces;
(c, α²) by validation NLL per ς², ς² by validation NLL. At deployment it costs K backward passes (one
per member's energy), estimated here as the measured G time × K/P.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import minimize

from ..common.llpr_features import mace_jacobians
from .level_candidates import SETS, _cat, _columns_mace, print_sets


def jacobians(model, loader):
    """Per atom G_j (N, P, 3) over a loader (one structure per batch), and the time per structure."""
    gs, times = [], []
    for batch in loader:
        t0 = time.perf_counter()
        gs.append(mace_jacobians(model, [batch]))
        times.append(time.perf_counter() - t0)
    return torch.cat(gs), float(np.median(times))


def main(argv=None):
    from mace_ext.fit_novelty import _loader

    from e2ip_plugins import GaussianPredictive, StudentTPredictive
    from e2ip_plugins.level import fit_level
    from e2ip_plugins.metrics import UQMetricState

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--split-dir", required=True)
    ap.add_argument("--out", default=None)
    ap.add_argument("--shallow", type=int, default=0, help="members of a post hoc last-layer ensemble (0: off)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    files = {s: str(Path(args.split_dir) / f"{s}.xyz") for s in ("train",) + SETS}
    cols = {s: _cat(b) for s, b in _columns_mace(args.model, {s: files[s] for s in SETS}).items()}
    model = torch.load(args.model, map_location="cpu", weights_only=False).eval()
    jac, tpf = {}, {}
    for s, f in files.items():
        jac[s], tpf[s] = jacobians(model, _loader(f, model, 1))
    t_fwd = []
    for batch in _loader(files["test"], model, 1):
        t0 = time.perf_counter()
        model(batch.to_dict(), training=False, compute_force=True)
        t_fwd.append(time.perf_counter() - t0)
    g_train = jac["train"]  # (N, P, 3)
    ftf = torch.einsum("npa,nqa->pq", g_train, g_train)
    p_dim = ftf.shape[0]
    val = cols["val"]

    def head_pred(cs, c):
        return StudentTPredictive(mean=torch.zeros_like(cs["residual"]), nu=cs["nu"], kappa=cs["kappa"],
                                  sigma0=cs["sigma0"], sigma0_inv=cs["sigma0_inv"],
                                  sigma0_logdet=cs["sigma0_logdet"]).scaled(c)

    def u_jac(g, reg):
        inv = torch.linalg.inv(ftf + reg * torch.trace(ftf) / p_dim * torch.eye(p_dim, dtype=ftf.dtype))
        return torch.einsum("npa,pq,nqb->nab", g, inv, g)

    def gauss(cs, g, reg, c, a2):
        hp = head_pred(cs, 1.0)
        uj = u_jac(g, reg)
        return GaussianPredictive(mean=torch.zeros_like(cs["residual"]), cov_epistemic=c * hp.covariance_epistemic + a2 * uj,
                                  cov_aleatoric=c * hp.covariance_aleatoric)

    c_head = fit_level(val["nu"], val["kappa"], val["sigma0_inv"], val["sigma0_logdet"], val["residual"],
                       torch.zeros_like(val["ratio"]))[0]
    best = None
    for reg in (1e-8, 1e-6, 1e-4, 1e-2):
        uj_val = u_jac(jac["val"], reg)
        scale0 = float(torch.diagonal(head_pred(val, c_head).covariance, dim1=-2, dim2=-1).mean()
                       / torch.diagonal(uj_val, dim1=-2, dim2=-1).mean())

        def obj(x):
            return float(gauss(val, jac["val"], reg, math.exp(x[0]), scale0 * math.exp(x[1])).nll(val["residual"]).mean())

        res = minimize(obj, x0=[math.log(c_head), 0.0], method="Nelder-Mead", options={"xatol": 1e-4, "fatol": 1e-6})
        if best is None or res.fun < best[0]:
            best = (float(res.fun), reg, math.exp(res.x[0]), scale0 * math.exp(res.x[1]))
    nll, reg, c, a2 = best
    out = {"val_nll": nll, "reg": reg, "c": c, "alpha2": a2, "P": p_dim, "sets": {},
           "s_per_structure_jacobian": tpf["test"], "s_per_structure_forward_force": float(np.median(t_fwd))}
    print(f"jacobian LLPR: P={p_dim} reg={reg:g} c={c:.4g} alpha2={a2:.4g} val NLL {nll:.4f}; "
          f"{tpf['test'] * 1e3:.1f} ms/structure for G vs {out['s_per_structure_forward_force'] * 1e3:.1f} ms forward+forces")
    for s in SETS[1:]:
        cs = cols[s]
        out["sets"][s] = UQMetricState().update(gauss(cs, jac[s], reg, c, a2), cs["residual"], frame=cs["frame"]).compute()
    print_sets(out["sets"], header=True)
    if args.shallow:
        train = _cat(_columns_mace(args.model, {"train": files["train"]})["train"])
        out["shallow"] = shallow_ensemble(cols, jac, train, args.shallow, head_pred)
        out["shallow"]["s_per_structure_estimated"] = tpf["test"] * args.shallow / p_dim
        print_sets(out["shallow"]["sets"])
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))
    return out


def _sample_cov(d: torch.Tensor) -> torch.Tensor:
    """Per atom, the members' 3×3 sample covariance (ddof 1) of d (K, N, 3)."""
    dev = d - d.mean(0)
    return torch.einsum("kna,knb->nab", dev, dev) / (d.shape[0] - 1)


def shallow_ensemble(cols, jac, train, k: int, head_pred, seed: int = 0) -> dict:
    """The ``--shallow`` candidate (module docstring): bootstrap last-layer refits, fitted on train, (c, α²) on val."""
    from e2ip_plugins import GaussianPredictive
    from e2ip_plugins.metrics import UQMetricState

    g, res, frame = jac["train"], train["residual"], train["frame"]
    n_frames, p_dim = int(frame.max()) + 1, g.shape[1]
    ridge = torch.eye(p_dim, dtype=g.dtype) * (g * g).sum() / p_dim  # tr(FᵀF)/P·I
    rng = np.random.default_rng(seed)
    draws = [np.bincount(rng.integers(0, n_frames, n_frames), minlength=n_frames) for _ in range(k)]
    best = None
    for reg in (1e-8, 1e-6, 1e-4, 1e-2):
        deltas = []
        for counts in draws:
            w = torch.as_tensor(counts, dtype=g.dtype)[frame]  # bootstrap weight of each training atom
            a = torch.einsum("n,npa,nqa->pq", w, g, g) + reg * ridge
            deltas.append(-torch.linalg.solve(a, torch.einsum("n,npa,na->p", w, g, res)))
        delta = torch.stack(deltas)  # (K, P)

        def members(s, delta=delta):  # bound now: the loop rebinds delta
            return -torch.einsum("npa,kp->kna", jac[s], delta)  # force offsets from γ, (K, N, 3)

        def pred(s, c, a2, members=members):
            d = members(s)
            hp = head_pred(cols[s], 1.0)
            return GaussianPredictive(mean=d.mean(0), cov_epistemic=c * hp.covariance_epistemic + a2 * _sample_cov(d),
                                      cov_aleatoric=c * hp.covariance_aleatoric)

        val = cols["val"]  # α² starts where U_ens has the head's mean variance
        scale0 = float(torch.diagonal(head_pred(val, 1.0).covariance, dim1=-2, dim2=-1).mean()
                       / torch.diagonal(_sample_cov(members("val")), dim1=-2, dim2=-1).mean().clamp(min=1e-30))

        def obj(x):
            return float(pred("val", math.exp(x[0]), scale0 * math.exp(x[1])).nll(val["residual"]).mean())

        fit = min((minimize(obj, x0=[0.0, x1], method="Nelder-Mead", options={"xatol": 1e-4, "fatol": 1e-6})
                   for x1 in (-4.0, 0.0, 4.0)), key=lambda r: r.fun)
        if best is None or fit.fun < best[0]:
            best = (float(fit.fun), reg, math.exp(fit.x[0]), scale0 * math.exp(fit.x[1]), pred)
    nll, reg, c, a2, pred = best
    print(f"shallow last-layer ensemble: K={k} reg={reg:g} c={c:.4g} alpha2={a2:.4g} val NLL {nll:.4f}")
    sets = {s: UQMetricState().update(pred(s, c, a2), cols[s]["residual"], frame=cols[s]["frame"]).compute()
            for s in SETS[1:]}
    return {"K": k, "val_nll": nll, "reg": reg, "c": c, "alpha2": a2, "sets": sets}


if __name__ == "__main__":
    main()
