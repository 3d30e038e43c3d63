"""Do the monitor's candidate frames have larger force errors than its accurate frames? (issue 13)

Two steps, because the model and the reference live in different environments:

1. ``run`` (the model's environment): ``e2ip-md``-equivalent Langevin runs at ``--temperature`` from the first
   frame of every isomer in the shipped test and unseen-molecule files, with ``trust_lo`` = the
   ``--quantile`` (0.9) of the per-structure max u over the shipped validation split (so "candidate" means
   "more uncertain than 90 % of validation structures"; chosen before looking at any MD frame) and no
   ``trust_hi``; trajectories in ``OUT/<tag>/trajectory.extxyz``::

       .venv-nequip/bin/python -m benchmarks.md_candidates_xtb run --model demo_out/run/best.ckpt --out xtb_out

2. ``label`` (an environment with ``tblite`` and ``ase``): GFN2-xTB forces for every written frame (the method
   of the shipped data, ``../shared/tools/make_xtb_data.py``), per-frame max and mean ‖ΔF_i‖ of the model's
   forces, grouped by the band the monitor assigned; ``OUT/xtb_report.json`` and a printed table::

       python -m benchmarks.md_candidates_xtb label --out xtb_out
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .common import REPO

DATA = REPO / "e2ip_plugins" / "data"  # the shipped demo files (the label step's environment may lack torch)


def starting_structures():
    import ase.io

    starts = []
    for name in ("iso7_test", "iso7_ood_mol"):
        seen = set()
        for atoms in ase.io.read(DATA / f"{name}.xyz", ":"):
            smi = atoms.info.get("smiles")
            if smi not in seen:
                seen.add(smi)
                starts.append((f"{name}_{len(seen) - 1}", smi, atoms))
    return starts


def cmd_run(args):
    import ase.io

    from e2ip_plugins.md.cli import langevin

    from e2ip_plugins.md import UncertaintyMonitor, find_adapter

    adapter = find_adapter(args.model)
    calc = adapter.open(args.model, device=args.device)
    val_max_u = []
    for atoms in ase.io.read(DATA / "iso7_val.xyz", ":"):
        atoms.calc = calc
        atoms.get_forces()
        val_max_u.append(float(np.max(calc.results["forces_uncertainty"])))
    trust_lo = float(np.quantile(val_max_u, args.quantile))
    print(f"trust_lo = {trust_lo:.4f} eV/A (quantile {args.quantile} of max u over {len(val_max_u)} val structures)")
    out = Path(args.out)
    runs = []
    for tag, smi, atoms0 in starting_structures():
        atoms = atoms0.copy()
        atoms.info = {"smiles": smi, "start": tag}
        dyn = langevin(atoms, calc, args.temperature, args.timestep, 0.01, args.seed)
        (out / tag).mkdir(parents=True, exist_ok=True)
        mon = UncertaintyMonitor(atoms, trust_lo, float("inf"), trajectory_path=out / tag / "trajectory.extxyz",
                                 candidates_path=out / tag / "candidates.extxyz", summary_path=out / tag / "summary.json")
        mon.attach(dyn, interval=args.interval)
        dyn.run(args.steps)
        mon.finish()
        runs.append({"tag": tag, "smiles": smi, "counts": mon.summary["counts"]})
        print(tag, smi, mon.summary["counts"], flush=True)
    meta = {"model": str(args.model), "temperature": args.temperature, "steps": args.steps, "timestep": args.timestep,
            "interval": args.interval, "seed": args.seed, "trust_lo": trust_lo, "quantile": args.quantile,
            "val_max_u_median": float(np.median(val_max_u)), "runs": runs}
    (out / "runs.json").write_text(json.dumps(meta, indent=2) + "\n")


def _spearman(x, y) -> float:
    """Spearman ρ (continuous values, no ties expected): Pearson correlation of the ranks."""
    rx = np.argsort(np.argsort(np.asarray(x))).astype(float)
    ry = np.argsort(np.argsort(np.asarray(y))).astype(float)
    return float(np.corrcoef(rx, ry)[0, 1])


def cmd_label(args):
    import ase.io
    from tblite.ase import TBLite

    out = Path(args.out)
    meta = json.loads((out / "runs.json").read_text())
    rows = []
    for run in meta["runs"]:
        for frame in ase.io.read(out / run["tag"] / "trajectory.extxyz", ":"):
            f_model = frame.get_forces()
            ref = frame.copy()
            ref.calc = TBLite(method="GFN2-xTB", verbosity=0)
            err = np.linalg.norm(ref.get_forces() - f_model, axis=1)
            rows.append({"tag": run["tag"], "step": int(frame.info["md_step"]), "band": frame.info["trust_band"],
                         "max_u": float(frame.info["forces_uncertainty_max"]), "max_err": float(err.max()),
                         "mean_err": float(err.mean())})
        print(run["tag"], "labelled", flush=True)
    report = {"meta": meta, "bands": {}}
    for band in ("accurate", "candidate"):
        sel = [r for r in rows if r["band"] == band]
        if sel:
            report["bands"][band] = {
                "frames": len(sel),
                "median_max_err": float(np.median([r["max_err"] for r in sel])),
                "median_mean_err": float(np.median([r["mean_err"] for r in sel])),
                "median_max_u": float(np.median([r["max_u"] for r in sel])),
            }
    report["spearman_max_u_vs_max_err"] = _spearman([r["max_u"] for r in rows], [r["max_err"] for r in rows])
    cand = np.array([r["max_err"] for r in rows if r["band"] == "candidate"])
    acc = np.array([r["max_err"] for r in rows if r["band"] == "accurate"])
    if len(cand) and len(acc):  # P(a candidate frame's max error > an accurate frame's), ties count half
        diff = cand[:, None] - acc[None, :]
        report["p_candidate_gt_accurate"] = float((diff > 0).mean() + 0.5 * (diff == 0).mean())
    report["frames"] = rows
    (out / "xtb_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"trust_lo {meta['trust_lo']:.4f} eV/A, {meta['temperature']:g} K, {len(rows)} frames")
    print("band        frames  median max|dF| (eV/A)  median mean|dF| (eV/A)  median max u (eV/A)")
    for band, b in report["bands"].items():
        print(f"{band:10s}  {b['frames']:6d}  {b['median_max_err']:21.4f}  {b['median_mean_err']:22.4f}  {b['median_max_u']:19.4f}")
    print(f"Spearman(max u, max |dF|) over frames: {report['spearman_max_u_vs_max_err']:.3f}")
    if "p_candidate_gt_accurate" in report:
        print(f"P(candidate max |dF| > accurate max |dF|): {report['p_candidate_gt_accurate']:.3f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", required=True)
    r.add_argument("--out", default="xtb_out")
    r.add_argument("--temperature", type=float, default=900.0)
    r.add_argument("--steps", type=int, default=400)
    r.add_argument("--timestep", type=float, default=0.5)
    r.add_argument("--interval", type=int, default=10)
    r.add_argument("--quantile", type=float, default=0.9)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="cpu")
    lab = sub.add_parser("label")
    lab.add_argument("--out", default="xtb_out")
    args = p.parse_args(argv)
    {"run": cmd_run, "label": cmd_label}[args.cmd](args)


if __name__ == "__main__":
    main()
