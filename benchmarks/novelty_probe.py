"""Issue 6 probe: which single-pass novelty score makes U_epi rise out of distribution?

Loads a trained e²IP NequIP checkpoint, runs it once over the train / val / test / OOD
files, records per-atom invariant features (scalars and per-channel norms of l > 0
channels) after every convnet, the head outputs (ν, κ, Σ₀) and the force errors, and
then compares candidate novelty scores fitted on the *training* atoms only:

- ``gauss_head``   per-species Gaussian Mahalanobis d² on the head-input invariants
- ``gauss_all``    the same on the invariants of every layer
- ``gmm_all``      per-species k-means mixture (shared diagonal covariance), min d²
- ``llpr_all``     last-layer prediction rigidity fᵀ(FᵀF/N + λI)⁻¹f on all-layer invariants
- ``knn_all``      distance to the k-th nearest training atom (standardised features)

Each score s is turned into evidence κ' = κ·exp(−τ·ŝ) ("exp") or κ' = κ/(1 + τ·ŝ) ("lin",
LLPR-like: U_epi grows linearly with the score), ŝ = max(0, s / median training s − 1)
per species, with τ and a global covariance scale c fitted on the validation split by
NLL — never on test or OOD data. Reported per candidate: mean-u ratio OOD/ID,
Spearman and AUROC of u vs ‖ΔF‖, 90 % coverage, NLL, and the fitted τ.

    python benchmarks/novelty_probe.py --ckpt run/best.ckpt
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Dict, List

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.stats import spearmanr

import ase.io

from e2ip_plugins.calibration import fit_covariance_scale
from e2ip_plugins.demo_data import demo_file
from e2ip_plugins.metrics import UQMetricState
from e2ip_plugins.predictive import StudentTPredictive

SETS = ("train", "val", "test", "ood_mol", "ood_hot")


def invariants(x: torch.Tensor, irreps) -> torch.Tensor:
    cols = []
    for mul_ir, sl in zip(irreps, irreps.slices()):
        blk = x[:, sl].reshape(x.shape[0], mul_ir.mul, mul_ir.ir.dim)
        cols.append(blk[..., 0] if mul_ir.ir.l == 0 else blk.norm(dim=-1))
    return torch.cat(cols, dim=1)


def run_model(ckpt: str, files: Dict[str, str], r_max: float, type_names: List[str]):
    from nequip.data import AtomicDataDict, compute_neighborlist_, from_ase
    from nequip.data.transforms import ChemicalSpeciesToAtomTypeMapper
    from nequip.model.saved_models.load_utils import load_saved_model

    from nequip.utils.global_state import set_global_state

    set_global_state(allow_tf32=False)
    model = load_saved_model(ckpt).eval()
    from e2ip_plugins.novelty import NoveltyEvidence

    for mod in model.modules():  # the head's own κ (unfitted factor = 1): the candidates apply theirs
        if isinstance(mod, NoveltyEvidence):
            mod.novelty_ref.zero_()
    mapper = ChemicalSpeciesToAtomTypeMapper(model_type_names=type_names)
    convs = [(n, m) for n, m in model.named_modules() if n.endswith("_convnet")]
    head = [m for n, m in model.named_modules() if n.endswith("uq_head")][0]
    captured = {}

    def hook(name, irreps):
        def fn(mod, inp, out):
            captured[name] = invariants(out[AtomicDataDict.NODE_FEATURES_KEY].detach().double(), irreps)
        return fn

    for n, m in convs:  # every convnet (2 layers: the novelty features of the model, head input + last output)
        m.register_forward_hook(hook(n, m.irreps_out[AtomicDataDict.NODE_FEATURES_KEY]))
    res = {}
    for key, path in files.items():
        frames = ase.io.read(path, ":")
        feats, heads, err, types = [], {k: [] for k in ("nu", "kappa", "sigma0", "sigma0_inv", "sigma0_logdet")}, [], []
        for i in range(0, len(frames), 10):
            batch = []
            for at in frames[i : i + 10]:
                d = from_ase(at)
                d = mapper(d)
                batch.append(compute_neighborlist_(d, r_max=r_max))
            data = AtomicDataDict.batched_from_list(batch)
            data = {k: (v.double() if torch.is_floating_point(v) else v) for k, v in data.items()}
            out = model(data)
            feats.append(torch.cat([captured[n] for n, _ in convs], dim=1))
            for k in heads:
                heads[k].append(out["e2ip_" + k].detach().double())
            ref = torch.as_tensor(np.concatenate([a.arrays["REF_forces"] for a in frames[i : i + 10]]))
            err.append((out["forces"].detach().double(), ref))
            types.append(data[AtomicDataDict.ATOM_TYPE_KEY])
        res[key] = dict(
            feat=torch.cat(feats),
            head={k: torch.cat(v) for k, v in heads.items()},
            forces=torch.cat([e[0] for e in err]),
            ref=torch.cat([e[1] for e in err]),
            types=torch.cat(types).long(),
        )
    return res


# ---------------------------------------------------------------- scores
def per_species(fit_fn, score_fn, train, others):
    out = {k: torch.zeros(len(v["types"]), dtype=torch.float64) for k, v in others.items()}
    for t in train["types"].unique():
        st = fit_fn(train["X"][train["types"] == t])
        for k, v in others.items():
            m = v["types"] == t
            out[k][m] = score_fn(st, v["X"][m])
    return out


def gauss_fit(X):
    mu = X.mean(0)
    C = torch.cov((X - mu).T) + 1e-6 * torch.eye(X.shape[1], dtype=X.dtype) * X.var(0).mean()
    return mu, torch.linalg.inv(C)


def gauss_score(st, X):
    mu, P = st
    r = X - mu
    return ((r @ P) * r).sum(1)


def llpr_fit(X, lam=1e-3):
    F = X
    C = F.T @ F / len(F)
    return torch.linalg.inv(C + lam * torch.trace(C) / C.shape[0] * torch.eye(C.shape[0], dtype=X.dtype))


def llpr_score(P, X):
    return ((X @ P) * X).sum(1)


def gmm_fit(X, k=8, iters=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    sd = X.std(0) + 1e-8
    Z = X / sd
    cent = Z[torch.randperm(len(Z), generator=g)[:k]].clone()
    for _ in range(iters):
        a = torch.cdist(Z, cent).argmin(1)
        for j in range(len(cent)):
            if (a == j).any():
                cent[j] = Z[a == j].mean(0)
    a = torch.cdist(Z, cent).argmin(1)
    var = ((Z - cent[a]) ** 2).mean(0) + 1e-6
    return sd, cent, var


def gmm_score(st, X):
    sd, cent, var = st
    Z = X / sd
    d2 = (((Z[:, None, :] - cent[None]) ** 2) / var).sum(-1)
    return d2.min(1).values


def knn_fit(X, kk=5):
    mu, sd = X.mean(0), X.std(0) + 1e-8
    return mu, sd, (X - mu) / sd, kk


def knn_score(st, X):
    mu, sd, Z, kk = st
    d = torch.cdist((X - mu) / sd, Z)
    return d.topk(kk + 1, largest=False).values[:, -1] ** 2


# ---------------------------------------------------------------- evaluation
def predictive(r, kappa_mult=None, c=1.0):
    h = r["head"]
    kappa = h["kappa"] if kappa_mult is None else h["kappa"] * kappa_mult
    p = StudentTPredictive(
        mean=r["forces"], nu=h["nu"], kappa=kappa, sigma0=h["sigma0"], sigma0_inv=h["sigma0_inv"],
        sigma0_logdet=h["sigma0_logdet"],
    )
    return p.scaled(c) if c != 1.0 else p


KAPPA_MAPS = {
    "exp": lambda tau, s: torch.exp(-tau * s),
    "lin": lambda tau, s: 1.0 / (1.0 + tau * s),
}


def fit_tau_c(r_val, s_val, kmap="exp"):
    f = KAPPA_MAPS[kmap]

    def obj(x):
        tau, logc = math.exp(x[0]), x[1]
        return float(predictive(r_val, f(tau, s_val), math.exp(logc)).nll(r_val["ref"]).mean())

    best = min(
        (minimize(obj, x0=[x0, 0.0], method="Nelder-Mead", options={"xatol": 1e-4, "fatol": 1e-6}) for x0 in (-4.0, -1.0, 1.0)),
        key=lambda o: o.fun,
    )
    return math.exp(best.x[0]), math.exp(best.x[1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--r-max", type=float, default=4.0)
    args = ap.parse_args(argv)
    torch.set_default_dtype(torch.float64)
    t0 = time.time()
    R = run_model(args.ckpt, {k: str(demo_file(k)) for k in SETS}, args.r_max, ["C", "H", "O"])
    print(f"forward passes: {time.time() - t0:.1f}s; feature dim {R['train']['feat'].shape[1]}")
    # head-input invariants = the last block of captured features (input of the last convnet)
    dims = R["train"]["feat"].shape[1]
    cands = {}
    for name, (fit, score, sl) in {
        "gauss_head": (gauss_fit, gauss_score, slice(dims // 2, dims)),
        "gauss_all": (gauss_fit, gauss_score, slice(0, dims)),
        "gmm_all": (gmm_fit, gmm_score, slice(0, dims)),
        "llpr_all": (llpr_fit, llpr_score, slice(0, dims)),
        "knn_all": (knn_fit, knn_score, slice(0, dims)),
    }.items():
        t1 = time.time()
        data = {k: {"X": v["feat"][:, sl], "types": v["types"]} for k, v in R.items()}
        raw = per_species(fit, score, data["train"], data)
        # normalise per species by the median training score
        norm = {}
        for k in raw:
            norm[k] = torch.zeros_like(raw[k])
        for t in R["train"]["types"].unique():
            med = raw["train"][R["train"]["types"] == t].median()
            for k in raw:
                m = R[k]["types"] == t
                norm[k][m] = (raw[k][m] / med - 1.0).clamp(min=0.0)
        cands[name] = (norm, time.time() - t1)

    rows = []
    base = {k: UQMetricState().update(predictive(R[k]), R[k]["ref"]).compute() for k in SETS[2:]}

    c0 = fit_covariance_scale(predictive(R["val"]), R["val"]["ref"])
    rows.append(("none (head only)", 0.0, c0, {k: UQMetricState().update(predictive(R[k], None, c0), R[k]["ref"]).compute() for k in SETS[2:]}, 0.0, {}))
    for name, (s, dt) in cands.items():
        for kmap, f in KAPPA_MAPS.items():
            tau, c = fit_tau_c(R["val"], s["val"], kmap)
            m = {k: UQMetricState().update(predictive(R[k], f(tau, s[k]), c), R[k]["ref"]).compute() for k in SETS[2:]}
            rows.append((f"{name}/{kmap}", tau, c, m, dt, {}))
    hdr = "| candidate | τ | c | u ID | u mol/ID | u hot/ID | ρ ID | ρ mol | ρ hot | AUROC ID | AUROC mol | AUROC hot | cov90 ID | cov90 mol | cov90 hot | NLL ID | NLL mol | NLL hot | fit s |"
    print(hdr)
    print("|" + "---|" * (hdr.count("|") - 1))
    for name, tau, c, m, dt, _ in rows:
        uid = m["test"]["forces_sharpness"]
        print(
            f"| {name} | {tau:.3g} | {c:.3g} | {uid:.3f} | {m['ood_mol']['forces_sharpness'] / uid:.2f} | {m['ood_hot']['forces_sharpness'] / uid:.2f} | "
            + " | ".join(f"{m[k]['forces_spearman']:.3f}" for k in SETS[2:]) + " | "
            + " | ".join(f"{m[k]['forces_auroc']:.3f}" for k in SETS[2:]) + " | "
            + " | ".join(f"{m[k]['forces_coverage_90']:.3f}" for k in SETS[2:]) + " | "
            + " | ".join(f"{m[k]['forces_nll']:.3f}" for k in SETS[2:]) + f" | {dt:.2f} |"
        )
    print("\nraw score ratio (mean s OOD / mean s ID test):")
    for name, (s, _) in cands.items():
        sp = {}
        for k in SETS[2:]:
            e = (R[k]["forces"] - R[k]["ref"]).norm(dim=1)
            sp[k] = spearmanr(s[k].numpy(), e.numpy())[0]
        print(
            f"  {name}: mol/ID {float(s['ood_mol'].mean() / s['test'].mean()):.2f}, hot/ID {float(s['ood_hot'].mean() / s['test'].mean()):.2f}; "
            f"frac>0 ID {float((s['test'] > 0).double().mean()):.2f}; spearman(s,e) "
            + ", ".join(f"{k} {v:.3f}" for k, v in sp.items())
        )
    print(f"base (uncalibrated) mean u: " + ", ".join(f"{k} {base[k]['forces_sharpness']:.3f}" for k in base))
    print(f"force MAE: " + ", ".join(f"{k} {base[k]['forces_mae']:.3f}" for k in base))


if __name__ == "__main__":
    main()
