"""Levels built after the fact on the trained committee runs of :mod:`benchmarks.committee` (diagnostics; nothing
here is deployed). All read the same per-atom columns of every set through the calculators: γ, y, the committee
level's U_ale, the head's own U_epi (its Student-t level, the members dropped) and the members' spread.

``combined``  N(γ, U_ale + a·U_epi,head + b·(tr Ĉ/3)·I), (a, b) fitted on the val NLL.
``scaled``    candidate C of docs/committee.md (stated before it was run):

    s_i = tr Ĉ_i / 3,   s̃_i = mean_{j ∈ N(i) ∪ {i}} s_j  (N(i): atoms within r_max),   r_i = s̃_i / s_ref
    U_tot,i = U_ale,i + c · r_i · U_epi,head,i,   s_ref = mean of s̃ over val atoms,   c by the val NLL

    and its control A_g (r ≡ 1). ``scaled_<backbone>.json``: per seed the constants and every set's metrics, and
    the default rule of :func:`benchmarks.committee.rule` for C and A_g against the shipped runs (val rows only).
``smoothing`` C with s̃ over two hops or the whole structure, and with U_ale's shape (after C failed NequIP's gate).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Dict

import numpy as np


def _columns(args) -> Dict[str, Any]:
    """{seed: {set: {y, g, ale, head, comm, s, frame}}} on the committee runs of ``args.out`` (float64 tensors)."""
    import torch
    from ase.neighborlist import neighbor_list

    from e2ip_plugins.committee_level import committee_variance, local_spread

    from .attach import _manifest
    from .common.backends import make_backend, to_float64
    from .common.evaluation import frame_index, read_sets
    from .common.profiles import get_profile

    torch.set_num_threads(1)
    out = Path(args.out).resolve()
    prof = get_profile("quick")
    settings = dict(prof["backbones"][args.backbone])
    manifest = _manifest(argparse.Namespace(data_dir=args.data_dir), prof, out)
    backend = make_backend(args.backbone, settings)
    sets = read_sets(manifest)
    frames = frame_index(sets)
    fk = manifest["data_keys"]["forces_key"]
    res: Dict[str, Any] = {}
    s0 = prof["seed"] + getattr(args, "seed0", 0)
    for seed in range(s0, s0 + args.seeds):
        info = json.loads((out / args.backbone / "runs" / f"committee_s{seed}" / "done.json").read_text())
        handle = backend.load("e2ip", [info["artifact"]], "cpu")
        calc = handle.calcs[0]
        cols: Dict[str, Dict[str, list]] = {}
        for name, atoms_list in sets.items():
            c = cols.setdefault(name, {k: [] for k in ("y", "g", "ale", "head", "comm", "s", "s2", "sf")})
            for at in atoms_list:
                g, pred = backend.predict(handle, at)
                members = next(v for k, v in calc.e2ip_evidence.items() if k.endswith("committee_forces"))
                s = committee_variance(torch.as_tensor(members, dtype=torch.float64).reshape(len(at), -1, 3))
                i, j = neighbor_list("ij", at, float(settings["r_max"]))  # the pairs within r_max: MACE's edges
                c["s"].append(local_spread(s, torch.as_tensor(i), torch.as_tensor(j)))
                c["s2"].append(local_spread(c["s"][-1], torch.as_tensor(i), torch.as_tensor(j)))  # two hops
                c["sf"].append(s.mean().expand(len(at)).clone())  # the structure's mean
                for k in [k for k in calc.e2ip_evidence if k.endswith("committee_forces")]:
                    calc.e2ip_evidence.pop(k)  # without the members: the head's own Student-t
                head = to_float64(calc.predictive())
                c["y"].append(torch.as_tensor(at.arrays[fk], dtype=torch.float64))
                c["g"].append(g)
                c["ale"].append(pred.covariance_aleatoric)
                c["head"].append(head.covariance_epistemic)
                c["comm"].append(pred.covariance_epistemic)
        res[seed] = {name: dict({k: torch.cat(v) for k, v in c.items()}, frame=frames[name]) for name, c in cols.items()}
    return res


def _metrics(pred_of, cat, consts) -> Dict[str, Any]:
    from e2ip_plugins.metrics import UQMetricState

    return {name: UQMetricState().update(pred_of(d, *consts), d["y"], frame=d["frame"]).compute()
            for name, d in cat.items()}


def combined(args) -> Path:
    """Diagnostic (added after the rule turned the committee down): ``combined_<backbone>.json``."""
    from scipy.optimize import minimize

    from e2ip_plugins.predictive import GaussianPredictive

    def pred_of(d, a, b):
        return GaussianPredictive(mean=d["g"], cov_epistemic=a * d["head"] + b * d["comm"], cov_aleatoric=d["ale"])

    res: Dict[str, Any] = {}
    for seed, cat in _columns(args).items():
        val = cat["val"]
        fit = minimize(lambda p: float(pred_of(val, math.exp(p[0]), math.exp(p[1])).nll(val["y"]).mean()),
                       x0=[0.0, 0.0], method="Nelder-Mead", options={"xatol": 1e-4, "fatol": 1e-7})
        a, b = (math.exp(x) for x in fit.x)
        res[f"seed{seed}"] = {"a": a, "b": b, "deployed": _metrics(pred_of, cat, (a, b))}
    path = Path(args.out).resolve() / f"combined_{args.backbone}.json"
    path.write_text(json.dumps(res, indent=1, default=float))
    return path


def scaled(args) -> Path:
    """Candidate C and its control A_g (module docstring), with the default rule's verdicts."""
    import torch

    from e2ip_plugins.committee_level import fit_epistemic_scale
    from e2ip_plugins.predictive import GaussianPredictive

    from .committee import rule

    def pred_of(d, c, s_ref):
        r = d["s"] / s_ref if s_ref else torch.ones_like(d["s"])
        return GaussianPredictive(mean=d["g"], cov_epistemic=c * r.reshape(-1, 1, 1) * d["head"], cov_aleatoric=d["ale"])

    out = Path(args.out).resolve()
    res: Dict[str, Any] = {"C": {}, "A_g": {}}
    for seed, cat in _columns(args).items():
        val = cat["val"]
        for cand, s_ref in (("C", float(val["s"].mean())), ("A_g", 0.0)):
            c = fit_epistemic_scale(val["g"], val["y"], val["ale"], pred_of(val, 1.0, s_ref).covariance_epistemic)
            res[cand][f"seed{seed}"] = {"c": c, "s_ref": s_ref, "deployed": _metrics(pred_of, cat, (c, s_ref))}
            res[cand][f"seed{seed}"]["ratio_mean"] = {n: float(d["s"].mean() / s_ref) if s_ref else 1.0
                                                      for n, d in cat.items()}
    shipped = json.loads((out / f"results_committee_{args.backbone}.json").read_text())
    for cand in ("C", "A_g"):
        both = {"methods": {"e2ip": shipped["methods"]["e2ip"], cand: res[cand]}}
        res[f"rule_{cand}"] = rule(both, cand)
    path = out / f"scaled_{args.backbone}.json"
    path.write_text(json.dumps(res, indent=1, default=float))
    return path


SMOOTHING = {"C": ("s", "head", 0.0), "C_2hop": ("s2", "head", 0.0), "C_frame": ("sf", "head", 0.0),
             "C_ale": ("s", "ale", 0.0), "C_floor": ("s", "head", 1.0)}


def smoothing(args) -> Path:
    """Diagnostic (after C failed NequIP's atom-ranking gate): C with the spread averaged over two hops or the whole
    structure, with U_ale's shape instead of the head's U_epi, and with the ratio floored at 1 (max(1, s̃/s_ref): the
    head's level kept where the spread is below its val mean), each with s_ref its val mean and c by the val NLL.
    ``smoothing_<backbone>.json``: per seed every set's metrics."""
    from e2ip_plugins.committee_level import fit_epistemic_scale
    from e2ip_plugins.predictive import GaussianPredictive

    def pred_of(d, c, spread, shape, floor, s_ref):
        ratio = (d[spread] / s_ref).clamp(min=floor)
        return GaussianPredictive(mean=d["g"], cov_epistemic=c * ratio.reshape(-1, 1, 1) * d[shape], cov_aleatoric=d["ale"])

    res: Dict[str, Any] = {form: {} for form in SMOOTHING}
    for seed, cat in _columns(args).items():
        val = cat["val"]
        for form, (spread, shape, floor) in SMOOTHING.items():
            s_ref = float(val[spread].mean())
            c = fit_epistemic_scale(val["g"], val["y"], val["ale"],
                                    pred_of(val, 1.0, spread, shape, floor, s_ref).covariance_epistemic)
            res[form][f"seed{seed}"] = {"c": c, "s_ref": s_ref, "deployed": _metrics(
                lambda d, c_: pred_of(d, c_, spread, shape, floor, s_ref), cat, (c,))}
    path = Path(args.out).resolve() / f"smoothing_{args.backbone}.json"
    path.write_text(json.dumps(res, indent=1, default=float))
    return path


def summary(path: Path) -> str:
    """A markdown table of ``scaled_<backbone>.json``: means over seeds, per set."""
    res = json.loads(Path(path).read_text())
    keys = ("forces_coverage_90", "rmv_rmse", "forces_ence", "u_tail", "forces_spearman", "frame_spearman", "frame_auroc")
    lines = ["| level | set | cov90 | RMV/RMSE | ENCE | u-tail | atom ρ | frame ρ | frame AUROC | r̄ |", "|---" * 10 + "|"]
    for cand in [k for k in res if not k.startswith("rule_")]:
        runs = res[cand].values()
        for s in next(iter(runs))["deployed"]:
            vals = [np.mean([r["deployed"][s][k] for r in runs]) for k in keys]
            rbar = np.mean([r["ratio_mean"][s] if "ratio_mean" in r else np.nan for r in runs])
            lines.append(f"| {cand} | {s} | " + " | ".join(f"{v:.3f}" for v in vals)
                         + (f" | {rbar:.2f} |" if np.isfinite(rbar) else " | — |"))
    for cand in [k[5:] for k in res if k.startswith("rule_")]:
        lines += ["", f"Rule, {cand}:"] + res[f"rule_{cand}"]
    return "\n".join(lines)
