"""Candidates for the deployed epistemic level (issue 12), compared post hoc on one trained e²IP model.

    .venv-mace/bin/python -m benchmarks.probes.level_candidates --model /tmp/bn/mace/runs/e2ip_s0/e2ip_s0.model \\
        --split-dir /tmp/bn/data --out /tmp/bn/level_mace.json
    .venv-nequip/bin/python -m benchmarks.probes.level_candidates --model /tmp/bn/nequip/runs/e2ip_s0/best.ckpt \\
        --split-dir /tmp/bn/data --out /tmp/bn/level_nequip.json

One forward pass per set (val, test, ood_mol, ood_hot) with the stored calibration at identity gives,
per atom, the head's evidence (ν, κ, Σ₀), the novelty ratio r and the force residual. Each candidate
is then a map of those columns whose constants are fitted on **val only** (:func:`fit_level`):

- ``head``: the head alone, one global scale c;
- ``linear`` (the default): 1/κ ← 1/κ + β·min(r, 100), (c, β) by validation NLL (LLPR-style);
- ``power``: κ ← κ·max(1, min(r, 100))^(−10) (issue 6), then c;
- ``linear+dof``: the linear map plus a fitted tail, ν ← 4 + a·(ν − 4): (c, β, a) by validation NLL
  (Nelder–Mead in log space from the linear fit, a = 1). The head's ν sits at its floor 5 (Student-t
  df 3) on the dev models; a > 1 lightens the tails.

The test and OOD files are only evaluated. ``--extra-val FILE`` appends FILE's frames (for example warm
frames of the training molecules from :mod:`benchmarks.probes.warm_frames`) to the validation set that every
fit reads, to see what a validation set containing a shift would choose.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Dict

import torch

SETS = ("val", "test", "ood_mol", "ood_hot")
RATIO_CAP = 100.0
KEYS = ("forces_mae", "forces_coverage_90", "rmv_rmse", "forces_ence", "u_tail", "forces_spearman",
        "forces_auroc", "frame_spearman", "frame_auroc", "forces_sharpness", "median_u")


def print_sets(metrics_per_set: Dict[str, dict], header: bool = False) -> None:
    """One row of ``KEYS`` per evaluated set (test, ood_mol, ood_hot)."""
    if header:
        print(f"{'set':12s} " + " ".join(f"{k.replace('forces_', ''):>10s}" for k in KEYS))
    for s in SETS[1:]:
        m = metrics_per_set[s]
        print(f"  {s:10s} " + " ".join(f"{m.get(k, float('nan')):10.4f}" for k in KEYS))


def _columns_mace(model_path: str, files: Dict[str, str]):
    from mace_ext.fit_novelty import _loader
    from mace_ext.model import level_columns

    model = torch.load(model_path, map_location="cpu", weights_only=False).eval()
    torch.set_default_dtype(next(model.parameters()).dtype)  # MACE's loaders build tensors in the default dtype
    mod = model.e2ip_novelty
    mod.novelty_calib.copy_(torch.tensor([1.0, 0.0]))
    mod.linear = True
    return {s: list(level_columns(model, [_loader(f, model, 16)], torch.device("cpu"))) for s, f in files.items()}


def _columns_nequip(ckpt: str, files: Dict[str, str]):
    from nequip.model.saved_models.load_utils import load_saved_model
    from nequip.nn.graph_model import R_MAX_KEY, TYPE_NAMES_KEY
    from nequip.utils.global_state import set_global_state

    from nequip_ext.novelty import _xyz_batches, level_columns, novelty_head

    set_global_state(allow_tf32=False)
    model = load_saved_model(ckpt).eval()
    mod = novelty_head(model).novelty
    mod.novelty_calib.copy_(torch.tensor([1.0, 0.0]).to(mod.novelty_calib))
    mod.linear = True
    r_max = float(model.metadata[R_MAX_KEY])
    types = str(model.metadata[TYPE_NAMES_KEY]).split(" ")
    return {s: list(level_columns(model, _xyz_batches(f, model, r_max, types))) for s, f in files.items()}


def _cat(batches):
    out, offset = {}, 0
    frames = []
    for b in batches:
        frames.append(b["frame"].long() + offset)
        offset += int(b["frame"].max()) + 1
    for k in batches[0]:
        out[k] = torch.cat([b[k].detach().to(torch.float64) for b in batches])
    out["frame"] = torch.cat(frames)
    return out


def evaluate(cols: Dict[str, Dict[str, torch.Tensor]]) -> Dict[str, dict]:
    from e2ip_plugins import StudentTPredictive
    from e2ip_plugins.level import fit_level
    from e2ip_plugins.metrics import UQMetricState

    val = cols["val"]
    results = {}
    for name in ("head", "linear", "power", "linear+dof"):
        t0 = time.perf_counter()
        if name == "linear+dof":
            results[name] = _fit_dof(cols, results["linear"])
            results[name]["fit_s"] = time.perf_counter() - t0
            continue
        if name == "power":
            ratio = torch.zeros_like(val["ratio"])
            kap = lambda c: c["kappa"] * c["ratio"].clamp(min=1.0, max=RATIO_CAP).pow(-10.0)  # noqa: E731
        else:
            ratio = val["ratio"] if name == "linear" else torch.zeros_like(val["ratio"])
            kap = None
        kv = kap(val) if kap else val["kappa"]
        c, beta, info = fit_level(val["nu"], kv, val["sigma0_inv"], val["sigma0_logdet"], val["residual"], ratio,
                                  "linear" if name == "linear" else "power", ratio_cap=RATIO_CAP)
        res = {"c": c, "beta": beta, "val_nll": info["nll"], "fit_s": time.perf_counter() - t0, "sets": {}}
        for s, cs in cols.items():
            if kap:
                k = kap(cs)
            else:
                k = _kappa_linear(cs, beta)
            pred = StudentTPredictive(mean=torch.zeros_like(cs["residual"]), nu=cs["nu"], kappa=k, sigma0=cs["sigma0"],
                                      sigma0_inv=cs["sigma0_inv"], sigma0_logdet=cs["sigma0_logdet"]).scaled(c)
            res["sets"][s] = UQMetricState().update(pred, cs["residual"], frame=cs["frame"]).compute()
        results[name] = res
    return results


def _kappa_linear(cs, beta: float) -> torch.Tensor:
    """κ_eff of the linear map: 1/κ_eff = 1/κ + β·min(r, cap)."""
    return cs["kappa"] / (1.0 + beta * cs["kappa"] * cs["ratio"].clamp(max=RATIO_CAP))


def _dof_predictive(cs, c: float, beta: float, a: float, gamma: float = 0.0):
    """The linear map with a fitted tail, ν ← 4 + a·(ν − 4)/(1 + γ·min(r, cap)) (γ = 0: ``linear+dof``)."""
    from e2ip_plugins import StudentTPredictive

    tail = a / (1.0 + gamma * cs["ratio"].clamp(max=RATIO_CAP))
    return StudentTPredictive(mean=torch.zeros_like(cs["residual"]), nu=4.0 + tail * (cs["nu"] - 4.0),
                              kappa=_kappa_linear(cs, beta),
                              sigma0=cs["sigma0"], sigma0_inv=cs["sigma0_inv"],
                              sigma0_logdet=cs["sigma0_logdet"]).scaled(c)


def _fit_dof(cols, linear: dict) -> dict:
    """``linear+dof``: (c, β, a) minimising the validation NLL, started at the linear fit with a = 1."""
    import math

    import numpy as np
    from scipy.optimize import minimize

    from e2ip_plugins.metrics import UQMetricState

    val = cols["val"]

    def nll(x):
        return float(_dof_predictive(val, *np.exp(x)).nll(val["residual"]).mean())

    x0 = [math.log(linear["c"]), math.log(max(linear["beta"], 1e-8)), 0.0]
    opt = minimize(nll, x0, method="Nelder-Mead", options={"xatol": 1e-4, "fatol": 1e-8, "maxiter": 4000})
    c, beta, a = (float(v) for v in np.exp(opt.x))
    sets = {s: UQMetricState().update(_dof_predictive(cs, c, beta, a), cs["residual"], frame=cs["frame"]).compute()
            for s, cs in cols.items()}
    return {"c": c, "beta": beta, "a": a, "val_nll": float(opt.fun), "sets": sets}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="MACE .model or NequIP .ckpt of an e2ip model")
    ap.add_argument("--split-dir", required=True, help="folder with val.xyz, test.xyz, ood_mol.xyz, ood_hot.xyz")
    ap.add_argument("--out", default=None, help="JSON file for the results")
    ap.add_argument("--extra-val", default=None, help="extxyz frames appended to the validation set of every fit")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    files = {s: str(Path(args.split_dir) / f"{s}.xyz") for s in SETS}
    if args.extra_val:
        files["extra"] = args.extra_val
    raw = _columns_mace(args.model, files) if args.model.endswith(".model") else _columns_nequip(args.model, files)
    if args.extra_val:
        raw["val"] += raw.pop("extra")
    cols = {s: _cat(b) for s, b in raw.items()}
    results = evaluate(cols)
    for i, (name, res) in enumerate(results.items()):
        extra = f" a={res['a']:.4g}" if "a" in res else ""
        print(f"{name}: c={res['c']:.4g} beta={res['beta']:.4g}{extra} val NLL {res['val_nll']:.4f}")
        print_sets(res["sets"], header=i == 0)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
