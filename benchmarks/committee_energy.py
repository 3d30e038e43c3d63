"""``energy_uncertainty`` of the MACE models of :mod:`benchmarks.committee` next to a 4-member ensemble (issue 26,
energies): per set, Spearman(σ_E, |E − E_ref|) and the fraction of structures with |E − E_ref| ≤ 1.645 σ_E.

    .venv-mace/bin/python -m benchmarks.committee --backbone mace_ew10 --out bc8 --seed0 10   # energy weight 10
    .venv-mace/bin/python -m benchmarks.committee_energy --out bc8 --variant mace_ew10 --seed0 10 --methods e2ip scaled

Each e²IP model is read as deployed (its stored energy length, fitted on val by the CLI). The ensemble's σ_E is
sqrt(Var_k E_k) of the plain members (``energy_uncertainty_committee``) times one factor fitted on val by maximum
likelihood, k² = mean(r²/σ²) — the §9 recalibration of docs/energy_uncertainty.md. Writes ``energy_<backbone>.json``
and prints a table of means over seeds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List

import numpy as np

Z90 = 1.6448536269514722  # two-sided 90 % of a Gaussian


def figures(resid: np.ndarray, sigma: np.ndarray) -> Dict[str, float]:
    from scipy.stats import spearmanr

    return {"spearman": float(spearmanr(sigma, np.abs(resid))[0]),
            "coverage_90": float(np.mean(np.abs(resid) <= Z90 * sigma)),
            "mae": float(np.mean(np.abs(resid))), "median_sigma": float(np.median(sigma))}


def _energies(calc, frames, key: str, energy_key: str):
    r, s = [], []
    for at in frames:
        at.calc = calc
        e = at.get_potential_energy()
        r.append(e - float(at.info[energy_key]))
        s.append(float(calc.results[key]))
    return np.array(r), np.array(s)


def main(argv: List[str] = None) -> None:
    import torch

    from .attach import _manifest
    from .common.backends import make_backend
    from .common.evaluation import read_sets
    from .common.profiles import get_profile

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the --out directory of benchmarks.committee")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--variant", default="mace", help="the benchmarks.committee variant whose runs to read")
    p.add_argument("--seed0", type=int, default=0)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--methods", nargs="+", default=["e2ip", "committee"])
    p.add_argument("--sets", nargs="+", default=["val", "test", "ood_mol", "ood_hot"])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    from .common import SHARED_DATA

    out = Path(args.out).resolve()
    prof = get_profile("quick")
    manifest = _manifest(argparse.Namespace(data_dir=args.data_dir or str(SHARED_DATA)), prof, out)
    ekey = manifest["data_keys"]["energy_key"]
    backend = make_backend("mace", dict(prof["backbones"]["mace"]))
    sets = {k: v for k, v in read_sets(manifest).items() if k in args.sets}
    runs = out / args.variant / "runs"

    def artifact(name: str) -> str:
        return json.loads((runs / name / "done.json").read_text())["artifact"]

    s0 = prof["seed"] + args.seed0
    res: Dict[str, Dict[str, list]] = {}
    for m in args.methods:
        for seed in range(s0, s0 + args.seeds):
            calc = backend.load("e2ip", [artifact(f"{m}_s{seed}")], "cpu").calcs[0]
            for name, frames in sets.items():
                res.setdefault(m, {}).setdefault(name, []).append(
                    figures(*_energies(calc, frames, "energy_uncertainty", ekey)))
    calc = backend.load("ensemble", [artifact(f"plain_s{s0 + k}") for k in range(prof["ensemble_size"])], "cpu").calcs[0]
    cols = {name: _energies(calc, frames, "energy_uncertainty_committee", ekey) for name, frames in sets.items()}
    r, s = cols["val"]
    k = float(np.sqrt(np.mean((r / s) ** 2)))
    res["ensemble"] = {name: [dict(figures(r, k * s), val_factor=k)] for name, (r, s) in cols.items()}
    path = out / f"energy_{args.variant}.json"
    path.write_text(json.dumps(res, indent=1))
    print("| method | set | energy MAE (eV) | Spearman σ_E vs |r| | cov90 | median σ_E (eV) |\n|---|---|---|---|---|---|")
    for m, by in res.items():
        for name, rows in by.items():
            f = {key: np.mean([row[key] for row in rows]) for key in ("mae", "spearman", "coverage_90", "median_sigma")}
            print(f"| {m} | {name} | {f['mae']:.3f} | {f['spearman']:.2f} | {f['coverage_90']:.2f} | {f['median_sigma']:.3f} |")


if __name__ == "__main__":
    main()
