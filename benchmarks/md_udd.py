"""Plain Langevin MD vs uncertainty-driven dynamics (UDD) at equal temperature, steps and seeds (issue 13).

    python -m benchmarks.md_udd --model best.ckpt --structure e2ip_plugins/data/iso7_test.xyz \\
        --temperature 500 --steps 400 --seeds 0 1 2 3 --udd 1.0 0.2 --out md_udd_out

For every seed both runs start from the same structure and Maxwell–Boltzmann velocities and use the same
Langevin noise stream (``numpy.random.default_rng(seed)``). Every ``--interval`` steps it records the
structure's max u (the model's ``forces_uncertainty``, eV/Å) and the largest stretch r/r₀ of the starting
structure's bonds (pairs closer than 1.6 Å at the start). Reports, per seed and averaged: mean max-u over the
observed frames after step 0, and the largest bond stretch (> 1.5: a bond broke, the molecule came apart).
Writes ``report.json`` and ``report.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def run_one(calc, atoms0, temperature, steps, timestep, interval, seed, friction=0.01):
    from e2ip_plugins.md.cli import langevin

    atoms = atoms0.copy()
    dyn = langevin(atoms, calc, temperature, timestep, friction, seed)
    d0 = atoms0.get_all_distances()
    bonds = np.argwhere(np.triu(d0 < 1.6, k=1))
    rec = {"max_u": [], "stretch": [], "bias_energy": []}

    def observe():
        res = atoms.calc.results
        rec["max_u"].append(float(np.max(res["forces_uncertainty"])))
        d = atoms.get_all_distances()
        rec["stretch"].append(float(np.max(d[bonds[:, 0], bonds[:, 1]] / d0[bonds[:, 0], bonds[:, 1]])))
        rec["bias_energy"].append(float(res.get("udd_bias_energy", 0.0)))

    dyn.attach(observe, interval=interval)
    t0 = time.time()
    dyn.run(steps)
    return {
        "mean_max_u": float(np.mean(rec["max_u"][1:])),
        "median_max_u": float(np.median(rec["max_u"][1:])),
        "max_stretch": float(np.max(rec["stretch"])),
        "mean_bias_energy": float(np.mean(rec["bias_energy"][1:])),
        "wall_s": round(time.time() - t0, 1),
    }


def main(argv=None):
    import ase.io

    from e2ip_plugins.md import UDDCalculator, find_adapter

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--structure", default="e2ip_plugins/data/iso7_test.xyz")
    p.add_argument("--index", type=int, default=0)
    p.add_argument("--temperature", type=float, default=500.0)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--timestep", type=float, default=0.5)
    p.add_argument("--interval", type=int, default=5)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--udd", type=float, nargs=2, metavar=("A", "B"), default=[1.0, 0.2])
    p.add_argument("--udd-damping", type=float, nargs=2, metavar=("C", "D"), default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="md_udd_out")
    args = p.parse_args(argv)

    adapter = find_adapter(args.model)
    calc = adapter.open(args.model, device=args.device)
    udd = UDDCalculator(calc, args.udd[0], args.udd[1], damping=args.udd_damping,
                        variance_fn=adapter.variance_function(calc))
    atoms0 = ase.io.read(args.structure, index=args.index)
    rows = []
    for seed in args.seeds:
        plain = run_one(calc, atoms0, args.temperature, args.steps, args.timestep, args.interval, seed)
        biased = run_one(udd, atoms0, args.temperature, args.steps, args.timestep, args.interval, seed)
        rows.append({"seed": seed, "plain": plain, "udd": biased})
        print(f"seed {seed}: mean max-u plain {plain['mean_max_u']:.4f} / UDD {biased['mean_max_u']:.4f} eV/A; "
              f"max bond stretch plain {plain['max_stretch']:.3f} / UDD {biased['max_stretch']:.3f}; "
              f"wall {plain['wall_s']} / {biased['wall_s']} s", flush=True)
    mean = {k: float(np.mean([r[k]["mean_max_u"] for r in rows])) for k in ("plain", "udd")}
    wins = sum(r["udd"]["mean_max_u"] > r["plain"]["mean_max_u"] for r in rows)
    report = {"args": vars(args), "rows": rows, "mean_max_u": mean, "udd_higher_in": f"{wins}/{len(rows)} seeds"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"model `{args.model}`, start `{args.structure}`[{args.index}], {args.temperature:g} K, {args.steps} steps of "
        f"{args.timestep:g} fs, UDD A = {args.udd[0]:g} eV, B = {args.udd[1]:g} eV/Å"
        + (f", damping C = {args.udd_damping[0]:g}, D = {args.udd_damping[1]:g}" if args.udd_damping else ""),
        "",
        "| seed | mean max-u plain (eV/Å) | mean max-u UDD (eV/Å) | max bond stretch plain | max bond stretch UDD |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['plain']['mean_max_u']:.4f} | {r['udd']['mean_max_u']:.4f} | "
                     f"{r['plain']['max_stretch']:.3f} | {r['udd']['max_stretch']:.3f} |")
    lines.append(f"| mean | {mean['plain']:.4f} | {mean['udd']:.4f} | | |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"UDD mean max-u higher in {wins}/{len(rows)} seeds")


if __name__ == "__main__":
    main()
