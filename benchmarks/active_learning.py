"""Active-learning benchmark (issue 14): e²IP vs a K-member committee vs random selection.

    .venv-mace/bin/python -m benchmarks.active_learning --out al_bench              # run + report (report.md)
    # DP-GEN's band [trust_lo, 3 trust_lo), uniform within it: the example configs' choice (report_dpgen_band.md)
    .venv-mace/bin/python -m benchmarks.active_learning --out al_dpgen --band-order random --trust-hi-factor 3
    .venv-mace/bin/python -m benchmarks.active_learning --out al_bench --report-only
    # the select.order: diverse variant on a pool of 200 frames per iteration (report_diverse.md)
    .venv-mace/bin/python -m benchmarks.active_learning --out al_div --band-order diverse --steps 200 --interval 10
    # every selector's budget spread round-robin over the MD starts (report_stratified.md)
    .venv-mace/bin/python -m benchmarks.active_learning --out al_strat --stratify start --selectors e2ip random

Data (``benchmarks.common.data.write_splits`` on ``../shared/data``, split seed 0): the initial labelled set is
``--initial`` frames of the in-distribution training pool, validation ``--n-val`` frames of its
validation pool, held-out sets ``--n-held-out`` (50) frames of the test split and of each
out-of-distribution file (strided). MD starts: the first training frame of every in-distribution isomer. Labels: GFN2-xTB
(``tblite``), the method of the shipped data. Every loop gets the same budgets, band rule, MD settings
and seeds; the committee's members are plain MACE models of the same backbone (``mace_run_train``).
Band rule (chosen before any run, from validation data only): trust_lo = median max u of the
validation structures under the current model(s), trust_hi = ``--trust-hi-factor`` (10) × trust_lo.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from .common import REPO, SHARED_DATA

SELECTORS = ("e2ip", "committee", "random")
E2IP_KEYS = {"e2ip_head": "e2ip", "e2ip_weight": 1.0, "e2ip_reg": 0.1, "e2ip_novelty": True,
             "e2ip_novelty_mode": "linear", "e2ip_novelty_quantile": 0.99}


def prepare(args, out: Path) -> dict:
    import ase.io

    from .common.data import SplitSpec, write_splits

    data_dir = Path(args.data_dir)
    man = write_splits(str(data_dir / "iso7_dev_id.xyz"), {"ood_mol": str(data_dir / "iso7_dev_ood_mol.xyz"),
                                                            "ood_hot": str(data_dir / "iso7_dev_ood_hot.xyz")},
                       out / "data", SplitSpec(seed=0), n_train=250, n_val=args.n_val, n_test=args.n_held_out,
                       n_ood=args.n_held_out,
                       sweep_sizes=[args.initial])
    seen, starts = set(), []
    for a in ase.io.read(man["files"]["train"], ":"):
        if a.info.get("smiles") not in seen:
            seen.add(a.info.get("smiles"))
            starts.append(a)
    ase.io.write(out / "data" / "starts.xyz", starts)
    base = yaml.safe_load((REPO / "benchmarks" / "configs" / "mace.yaml").read_text())
    base.update(max_num_epochs=args.epochs, default_dtype="float32")
    (out / "configs").mkdir(parents=True, exist_ok=True)
    (out / "configs" / "mace_plain.yaml").write_text(yaml.safe_dump(base))
    keys = dict(E2IP_KEYS)
    if args.e2ip_committee:  # the shipped MACE config's committee and its scaled-head level (docs/committee.md)
        keys.update(e2ip_committee=args.e2ip_committee, e2ip_committee_channels=32, e2ip_committee_level="scaled")
    (out / "configs" / "mace_e2ip.yaml").write_text(yaml.safe_dump({**base, **keys}))
    return man


def al_config(args, out: Path, man: dict, selector: str, seed: int) -> Path:
    cfg = {
        "framework": "mace", "seed": seed, "iterations": args.iterations,
        "data": {"initial": man["sweep_files"][args.initial], "valid": man["files"]["val"],
                 "held_out": {k: man["files"][k] for k in ("test", "ood_mol", "ood_hot")}},
        "train": {"config": str(out / "configs" / "mace_e2ip.yaml"), "args": []},
        "selector": selector,
        "committee": {"size": args.committee_size, "config": str(out / "configs" / "mace_plain.yaml")},
        "explore": {"structures": str(out / "data" / "starts.xyz"), "temperatures": args.temperatures,
                    "steps": args.steps, "interval": args.interval, "timestep": 0.5},
        "select": {"budget": args.budget, "trust_lo": {"quantile": 0.5}, "trust_hi": {"factor": args.trust_hi_factor},
                   "min_distance": 0.02, "order": args.band_order, "stratify": args.stratify},
        "label": {"calculator": "tblite.ase:TBLite", "kwargs": {"method": "GFN2-xTB", "verbosity": 0}},
    }
    path = out / "al_configs" / f"{selector}_s{seed}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_all(args, out: Path, man: dict) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    exe = str(Path(sys.executable).parent / "e2ip-active-learning")
    # the committee loops take longest: start them first
    jobs = sorted([(sel, seed) for seed in args.seeds for sel in args.selectors], key=lambda j: (j[0] != "committee", j[1]))
    running = []
    while jobs or running:
        while jobs and len(running) < args.jobs:
            sel, seed = jobs.pop(0)
            cfg = al_config(args, out, man, sel, seed)
            log = open(out / f"log_{sel}_s{seed}.txt", "a")
            running.append((sel, seed, subprocess.Popen([exe, "--config", str(cfg), "--workdir", str(out / f"{sel}_s{seed}")],
                                                         stdout=log, stderr=subprocess.STDOUT, env=env), time.time()))
            print(f"started {sel} seed {seed}", flush=True)
        time.sleep(2)
        for item in list(running):
            sel, seed, proc, t0 = item
            if proc.poll() is not None:
                running.remove(item)
                print(f"finished {sel} seed {seed}: exit {proc.returncode} after {time.time() - t0:.0f} s", flush=True)


def report(args, out: Path) -> str:
    rows = {}
    for sel in args.selectors:
        for seed in args.seeds:
            for k in range(args.iterations + 1):
                p = out / f"{sel}_s{seed}" / f"iter_{k}" / "report.json"
                if p.is_file():
                    rows.setdefault((sel, k), []).append(json.loads(p.read_text()))
    sets = ("test", "ood_mol", "ood_hot")
    lines = [f"# Active-learning benchmark (MACE, {len(args.seeds)} seeds: {args.seeds})", "",
             f"Initial {args.initial} frames, {args.iterations} iterations × {args.budget} labels, committee of "
             f"{args.committee_size} plain models, MD {args.steps} steps × {len(args.temperatures)} temperatures "
             f"{args.temperatures} K from 5 isomers (a frame every {args.interval} steps: a pool of "
             f"{5 * len(args.temperatures) * (args.steps // args.interval)} frames per iteration), e2ip/committee "
             f"`select.order: {args.band_order}`, `select.stratify: {args.stratify}` (every selector), band "
             f"trust_lo = median validation max u, trust_hi = {args.trust_hi_factor:g} × trust_lo (MD stops there), "
             "GFN2-xTB labels. Force MAE (eV/Å) of the loop's model "
             "(committee: member 0) on held-out sets, mean ± std over seeds; CPU seconds per iteration (mean over seeds).", "",
             "| iteration | selector | train frames | " + " | ".join(f"{s} MAE" for s in sets) +
             " | CPU s train | explore | select | label | CPU s total |",
             "|---|---|---|" + "---|" * len(sets) + "---|---|---|---|---|"]
    summary = {}
    for k in range(args.iterations + 1):
        for sel in args.selectors:
            reps = rows.get((sel, k))
            if not reps:
                continue
            maes = {s: [r["held_out"][s]["model"]["forces_mae"] for r in reps] for s in sets}
            cpu = {st: float(np.mean([r["cpu_s"][st] for r in reps])) for st in ("train", "explore", "select", "label")}
            summary[f"{sel}/{k}"] = {"mae": {s: float(np.mean(v)) for s, v in maes.items()}, "cpu": cpu,
                                     "seeds": len(reps), "train_frames": reps[0]["train_frames"]}
            cells = " | ".join(f"{np.mean(v):.4f} ± {np.std(v):.4f}" for v in maes.values())
            lines.append(f"| {k} | {sel} | {reps[0]['train_frames']} | {cells} | {cpu['train']:.0f} | {cpu['explore']:.0f} | "
                         f"{cpu['select']:.0f} | {cpu['label']:.0f} | {sum(cpu.values()):.0f} |")
    lines += ["", "Targets: e²IP held-out MAE within 5 % of the committee's at every iteration, at ≤ 1/3 of its CPU time; "
              "both below random.", "", "| iteration | set | e²IP / committee MAE | e²IP / random | committee / random |",
              "|---|---|---|---|---|"]
    for k in range(args.iterations + 1):
        e, c, r = (summary.get(f"{s}/{k}") for s in ("e2ip", "committee", "random"))
        for s in sets:
            def ratio(a, b):
                return f"{a['mae'][s] / b['mae'][s]:.3f}" if a and b else "—"
            lines.append(f"| {k} | {s} | {ratio(e, c)} | {ratio(e, r)} | {ratio(c, r)} |")
    tot = {sel: sum(sum(v["cpu"].values()) for key, v in summary.items() if key.startswith(sel + "/")) for sel in args.selectors}
    if tot.get("committee"):
        lines += ["", "Total CPU s (mean over seeds): " + ", ".join(f"{s} {v:.0f}" for s, v in tot.items()) +
                  f"; e²IP / committee = {tot.get('e2ip', float('nan')) / tot['committee']:.3f}"]
    text = "\n".join(lines) + "\n"
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(json.dumps({"args": vars(args), "summary": summary, "cpu_total": tot}, indent=2))
    return text


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="al_bench")
    p.add_argument("--data-dir", default=str(SHARED_DATA))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--selectors", nargs="+", default=list(SELECTORS), choices=SELECTORS)
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--budget", type=int, default=50)
    p.add_argument("--initial", type=int, default=50)
    p.add_argument("--n-val", type=int, default=50)
    p.add_argument("--n-held-out", type=int, default=50, help="frames of the test split and of each OOD file")
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--committee-size", type=int, default=4)
    p.add_argument("--temperatures", type=float, nargs="+", default=[500.0, 1000.0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--interval", type=int, default=10)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--band-order", default="uncertainty", choices=("uncertainty", "random", "diverse"),
                   help="select.order of the e2ip/committee loops: decreasing max u, DP-GEN's uniform draw in the band, "
                        "or greedy max u x distance to the labelled frames")
    p.add_argument("--trust-hi-factor", type=float, default=10.0,
                   help="trust_hi = this x trust_lo (MD stops there, frames above are dropped); DP-GEN's usual 3")
    p.add_argument("--stratify", default="none", choices=("none", "start", "run"),
                   help="select.stratify of every loop, random included (report_stratified.md: start)")
    p.add_argument("--e2ip-committee", type=int, default=0, metavar="M",
                   help="the e2ip loop's model carries the in-model committee of M members (K = 32, level scaled), as "
                        "configs/mace/e2ip.yaml ships it; 0: the head's level alone")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not args.report_only:
        man = prepare(args, out)
        run_all(args, out, man)
    print(report(args, out))


if __name__ == "__main__":
    main()
