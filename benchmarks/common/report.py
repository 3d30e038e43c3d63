"""``report.md`` from one or more ``results_<backbone>.json`` (and W&B, offline by default, with ``--wandb``).

    python -m benchmarks.common.report bench_out/results_mace.json bench_out/results_nequip.json --out bench_out

Per backbone: accuracy & UQ per method × test set (before / after the val-fitted recalibration), mean
uncertainty in- vs out-of-distribution, cost ratios to the plain backbone, the data-efficiency sweep,
and the issue's targets, each marked met / missed with its numbers (tables and targets:
:mod:`benchmarks.common.report_tables`). Provenance (command, versions, hardware, date) at the end.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .report_tables import (accuracy_table, cost_table, level_table, level_targets, ood_table, sweep_table,
                            targets_md, verdict_table)


def provenance_md(results: List[Dict], total_wall_s: Optional[float]) -> List[str]:
    r0 = results[0]
    lines = ["## Provenance", "", f"- command: `{r0['command']}`"]
    for r in results:
        lines.append(f"- {r['backbone']} part: `{r['part_command']}`")
    lines.append(f"- date: {r0['date']}")
    hw = r0["hardware"]
    lines.append(f"- hardware: CPU `{hw['cpu_model']}`, {hw['logical_cpus']} logical CPUs "
                 f"({hw['cpus_available']} available), {hw['memory_gib']} GiB RAM, GPU: {hw['gpu'] or 'none'}; "
                 f"{hw['platform']}")
    for r in results:
        h = r["hardware"]
        lines.append(f"- {r['backbone']}: load average (1/5/15 min) at start {h.get('loadavg_start')}, at end "
                     f"{h.get('loadavg_end')} (other processes shared the machine when the load exceeds the threads used)")
        lines.append(f"- {r['backbone']} versions: " + ", ".join(f"{k} {v}" for k, v in r["versions"].items()))
        w = r["wall"]
        lines.append(f"- {r['backbone']} wall time: {w['total_s'] / 60:.1f} min (training {w['training_s'] / 60:.1f}, "
                     f"evaluation {w['evaluation_s'] / 60:.1f}, cost {w['cost_s'] / 60:.1f}, sweep evaluation "
                     f"{w['sweep_eval_s'] / 60:.1f})")
    if total_wall_s is not None:
        lines.append(f"- total wall time (both backbones side by side, one thread each): {total_wall_s / 60:.1f} min")
    return lines


def backbone_md(r: Dict, out: Path) -> List[str]:
    bb = r["backbone"]
    s = r["settings"]
    d = r["data"]
    ps = r["profile_settings"]
    lines = [f"## {bb.upper()}", ""]
    lines.append(
        f"Backbone (identical for every method): {json.dumps({k: v for k, v in s.items()})}. "
        f"Training frames {d['frames']['train']}, val {d['frames']['val']}, test {d['frames']['test']}, "
        + ", ".join(f"{k} {d['frames'][k]}" for k in d["ood_sets"])
        + f". Deep ensemble: {ps['ensemble_size']} plain models (seeds {ps['seed']}…{ps['seed'] + ps['ensemble_size'] - 1};"
        f" member {ps['seed']} is the plain row). Threads per process: {ps['threads'] or 'default'}.")
    lines += ["", "### Accuracy and uncertainty (per atom; recal = one covariance scale fitted on val)", ""]
    lines += accuracy_table(r)
    lines += ["", "NLL: mean per-atom negative log predictive density of the force 3-vector (eV/Å units). "
              "u = sqrt(tr U_epi / 3). Spearman / AUROC (of u against ‖ΔF‖) are unchanged by the global "
              "recalibration. plain has no uncertainty. Predictives: e²IP multivariate Student-t, eIP per-component "
              "Student-t, ensemble Gaussian N(mean, 3×3 sample covariance of the members + 1e-8 I) "
              "(`e2ip_plugins.ensemble_predictive`); **ensemble (iso)** is a diagnostic variant of the same members "
              "with the covariance replaced by (tr/3)·I — same u, Spearman and AUROC — because a 3×3 sample "
              "covariance of K = 4 members (3 degrees of freedom) is often nearly singular and then dominates the "
              "full-covariance NLL and the reliability curve.", ""]
    lines += ["### Level: predicted error against actual error, per atom and per structure (issue 12)", ""]
    lines += level_table(r)
    lines += ["", "e²IP rows read the model as deployed: its covariances already carry the calibration [c, β] "
              "that training fitted on the validation split and stored in the model (no further scale). The "
              "ensembles are recalibrated by one global covariance scale fitted on the same validation split. "
              "cov90: fraction of atoms inside the central 90 % region of the predictive; RMV/RMSE: "
              "sqrt(mean tr U_tot/3) over the force-component RMSE; ENCE over 10 equal-count bins; u-tail: "
              "99.9th percentile of u over that of ‖ΔF‖/√3; frame metrics: per structure, max u against max ‖ΔF‖ "
              "(AUROC: structures whose max error is in the set's top 10 %).", ""]
    lines += verdict_table("issue-12 target", level_targets(r)) + [""]
    lines += ["### Mean uncertainty in- vs out-of-distribution (ID = test split)", ""]
    lines += ood_table(r)
    lines += ["", "### Cost (ratios to the plain backbone, same run)", ""]
    lines += cost_table(r)
    inf = r["cost"]["inference"]
    lines += ["", f"Inference: median of {inf['timing']['small']['repeats']} / {inf['timing']['large']['repeats']} "
              "interleaved calls of the ASE calculator (each round calls every method once) after warm-up, wall "
              "time (`time.perf_counter`) and CPU time of the process (`time.process_time`; with one thread it is "
              "the compute time even when other jobs share the CPU — the targets are judged on it), "
              f"device {inf['device']}, {inf['threads'] or 'default'} thread(s); the large structure is a "
              "non-periodic cluster of test molecules on a 10 Å grid. Training s/epoch (steps): optimizer-step time "
              "per epoch from the CLI's own records (MACE results file `opt` times; NequIP Lightning SimpleProfiler "
              "`run_training_batch`); (+val) adds validation (MACE `eval` times; Lightning `run_training_epoch`). "
              "Train CPU s: user + system CPU time of the whole CLI process (imports, data, training, final "
              "evaluation, saving), from `os.wait4`. The ensemble's training numbers are the sum over its members. Training peak RSS: "
              "`os.wait4` ru_maxrss of the CLI process. "
              + (f"Inference peak RSS: {inf['memory_method']}." if inf.get("memory_method") else
                 "Inference peak memory: not measured in this profile.")]
    lines += ["", "### Data-efficiency sweep", ""]
    if r.get("sweep"):
        lines += sweep_table(r)
        lines += ["", f"![sweep]({bb}/plots/sweep.png)"]
    else:
        lines.append("Not run for this backbone in this profile.")
    lines += ["", "### Targets (read against, not tuned for)", ""]
    lines += targets_md(r)
    lines += ["", "### Plots", "",
              f"![reliability]({bb}/plots/reliability_all_methods.png)", "",
              f"Per method and set (recalibrated): `{bb}/plots/<method>_<set>_{{reliability,error_vs_uncertainty,roc}}.png`."]
    return lines


def write_report(paths: Sequence[Path], out: Path, wandb_enabled: bool = False, total_wall_s: Optional[float] = None,
                 failed: Sequence[str] = ()) -> Path:
    from .plots import sweep_plot

    out = Path(out)
    results = [json.loads(Path(p).read_text()) for p in paths]
    for r in results:
        if r.get("sweep"):
            sweep_plot(r, out / r["backbone"] / "plots" / "sweep.png")
    r0 = results[0]
    lines = [f"# e2ip benchmark — profile `{r0['profile']}`", "",
             f"Command: `{r0['command']}`  ", f"Date: {r0['date']}  ",
             f"Hardware: {r0['hardware']['cpu_model']}, {r0['hardware']['cpus_available']} CPUs, "
             f"GPU {r0['hardware']['gpu'] or 'none'}", ""]
    d = r0["data"]
    lines.append(
        f"Data: `{d['id_file']}` split by time blocks within each trajectory ({d['split']['n_blocks']} blocks per "
        f"trajectory, {d['split']['n_val']} val / {d['split']['n_test']} test, {d['split']['gap']} frames dropped at "
        f"every block edge, seed {d['split']['seed']}; closest train–test frames {d['min_time_gap_frames']['train-test']} "
        f"frames apart), subsampled to the profile's budget; OOD: "
        + ", ".join(f"`{Path(p).name}` ({d['frames'][k]} frames)" for k, p in d["ood_files"].items())
        + ". Split files are in `data/`. Nothing is fitted on test or OOD data (recalibration uses val).")
    if failed:
        lines += ["", f"**Parts that failed and are missing here: {', '.join(failed)}.**"]
    for r in results:
        lines += [""] + backbone_md(r, out)
    lines += [""] + provenance_md(results, total_wall_s)
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    if wandb_enabled:
        log_wandb(results, out)
    return path


def log_wandb(results: List[Dict], out: Path) -> None:
    """One W&B run (WANDB_MODE defaults to offline) with every metric, the tables and the PNG plots."""
    import os

    import wandb

    os.environ.setdefault("WANDB_MODE", "offline")
    r0 = results[0]
    run = wandb.init(project=os.environ.get("WANDB_PROJECT", "e2ip-bench"), dir=str(out),
                     name=f"bench-{r0['profile']}-{'-'.join(r['backbone'] for r in results)}",
                     config={r["backbone"]: {"settings": r["settings"], "profile": r["profile_settings"],
                                             "versions": r["versions"]} for r in results})
    summary = {}
    for r in results:
        bb = r["backbone"]
        cols = ["method", "set", "kind", "forces_mae", "forces_rmse", "forces_nll", "forces_spearman", "forces_auroc",
                "forces_miscal_area", "forces_coverage_90", "forces_sharpness"]
        table = wandb.Table(columns=cols)
        for m, res in r["methods"].items():
            for s, e in res["sets"].items():
                for kind in ("raw", "recal"):
                    table.add_data(m, s, kind, *[e[kind].get(c) for c in cols[3:]])
                    for c in cols[3:]:
                        if e[kind].get(c) is not None:
                            summary[f"{bb}/{m}/{s}/{kind}/{c}"] = e[kind][c]
        for label, t in r["cost"]["inference"]["timing"].items():
            for m, v in t["ratio_to_plain"].items():
                summary[f"{bb}/cost/infer_{label}_ratio/{m}"] = v
        for m, t in r["cost"]["training"].items():
            summary[f"{bb}/cost/train_epoch_ratio/{m}"] = t.get("epoch_s_ratio")
        images = {f"{bb}/{p.stem}": wandb.Image(str(p)) for p in sorted((out / bb / "plots").glob("*.png"))}
        run.log({f"{bb}/metrics": table, **images})
    run.summary.update({k: v for k, v in summary.items() if v is not None})
    run.finish()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.common.report")
    p.add_argument("results", nargs="+")
    p.add_argument("--out", default=None)
    p.add_argument("--wandb", action="store_true")
    a = p.parse_args(argv)
    out = Path(a.out) if a.out else Path(a.results[0]).parent
    print(write_report([Path(x) for x in a.results], out, wandb_enabled=a.wandb))


if __name__ == "__main__":
    main()