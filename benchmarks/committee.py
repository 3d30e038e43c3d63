"""The in-model committee against the shipped level and a 4-member ensemble (issue 26), and the rule that picks
the default (docs/committee.md, "The default rule", stated before this benchmark was first run).

    .venv-mace/bin/python   -m benchmarks.committee --backbone mace   --out bc
    .venv-nequip/bin/python -m benchmarks.committee --backbone nequip --out bc
    python -m benchmarks.committee --report --out bc          # report_committee.md (any environment)

Data and protocol are :mod:`benchmarks.scalar_backbones`' (quick profile: 250 train / 100 val / 100 test frames
split by time blocks, 100 frames of ood_mol, ood_hot, ood_chem, ood_1500K, one thread): plain seeds 0–3 (the
ensemble, (tr/3)·I and one validation scale), e²IP with the shipped level seeds 0–2, e²IP with the committee
(M = 4 message members, K = 32 channels, detached, MSE, weight 0.01; its scale c fitted on val by the CLI and
stored) seeds 0–2, all through the public CLIs and read as deployed. Frame figures (per-structure max u against
max ‖ΔF‖) get 95 % intervals from a block bootstrap stratified by trajectory (blocks of :data:`BLOCK`
consecutive frames resampled within each trajectory, :data:`REPS` replicates), and the mean within-trajectory
Spearman. The rule reads the ``val`` rows only; test and OOD rows are reported.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from .common import SHARED_DATA
from .committee_levels import combined, scaled, smoothing
from .scalar_backbones import run_variant

MEMBERS = {"num_members": 4, "num_channels": 32}
VARIANTS = {
    "mace": ("mace", {}, {"e2ip": [], "committee": ["--e2ip_committee", str(MEMBERS["num_members"]),
                                                     "--e2ip_committee_channels", str(MEMBERS["num_channels"]),
                                                     "--e2ip_committee_level", "spread"],
                          # candidate C as deployed (MACE's default level since it passed the rule)
                          "scaled": ["--e2ip_committee", str(MEMBERS["num_members"]),
                                     "--e2ip_committee_channels", str(MEMBERS["num_channels"])]}),
    "nequip": ("nequip", {}, {"e2ip": [], "committee": [
        "++training_module.model.uq_head.committee={enabled: true, kind: message, "
        f"num_members: {MEMBERS['num_members']}, num_channels: {MEMBERS['num_channels']}, detach: true}}",
        "++training_module.loss.coeffs.committee=0.01", "++training_module.loss.committee_nll_weight=0.0"],
        "energy10": ["training_module.loss.coeffs.total_energy=10.0"]}),
}
VARIANTS["mace"][2]["energy10"] = ["--energy_weight", "10.0"]  # fitted energies (docs/energy_uncertainty.md §10.4)
# the shipped MACE config's energy weight for every model, the ensemble's members included (benchmarks.committee_energy)
VARIANTS["mace_ew10"] = ("mace", {"energy_weight": 10.0}, {"e2ip": [], "scaled": VARIANTS["mace"][2]["scaled"]})
# ablation: M = 8 and 16 members of the shipped setting (K = 32, level C)
VARIANTS["mace_ew10_members"] = ("mace", {"energy_weight": 10.0}, {
    f"scaled_m{m}": ["--e2ip_committee", str(m), "--e2ip_committee_channels", str(MEMBERS["num_channels"])]
    for m in (8, 16)})
NAMES = {"plain": "plain", "e2ip": "e²IP, shipped level", "committee": "e²IP + committee (M 4, K 32)",
         "energy10": "e²IP, shipped level, energy weight 10",
         "scaled": "e²IP + committee, scaled-head level C (MACE default)",
         "ensemble": "4-member ensemble, (tr/3)·I, val scale"}
SETS = ("val", "test", "ood_mol", "ood_hot", "ood_chem", "ood_1500K")
BLOCK, REPS = 10, 1000
# the default rule (docs/committee.md): val only, means over seeds
RULE_MAE_RATIO, RULE_COV90, RULE_ENCE, RULE_RANK_SLACK = 1.03, (0.85, 0.95), 0.25, 0.02


def trajectories(path: Path) -> np.ndarray:
    """Trajectory label of each frame of an extxyz file (smiles, config_type, temperature)."""
    from ase.io import read

    keys = [(a.info.get("smiles"), a.info.get("config_type"), a.info.get("temperature")) for a in read(path, ":")]
    return np.unique([str(k) for k in keys], return_inverse=True)[1]


def frame_figures(umax: np.ndarray, emax: np.ndarray) -> Dict[str, float]:
    from e2ip_plugins.metrics import frame_metrics

    return frame_metrics(np.arange(len(umax)), umax, emax)


def bootstrap(umax: np.ndarray, emax: np.ndarray, traj: np.ndarray, seed: int = 0) -> Dict[str, Any]:
    """Point figures, their 95 % block-bootstrap intervals (module docstring) and the within-trajectory ρ."""
    from scipy import stats

    rng = np.random.default_rng(seed)
    blocks = [np.array_split(np.flatnonzero(traj == t), max(1, int(np.sum(traj == t)) // BLOCK))
              for t in np.unique(traj)]
    reps: Dict[str, List[float]] = {"frame_spearman": [], "frame_auroc": []}
    for _ in range(REPS):
        idx = np.concatenate([bl[j] for bl in blocks for j in rng.integers(0, len(bl), len(bl))])
        for k, v in frame_figures(umax[idx], emax[idx]).items():
            reps[k].append(v)
    out: Dict[str, Any] = frame_figures(umax, emax)
    for k, v in reps.items():
        out[k + "_ci"] = [float(np.nanpercentile(v, 2.5)), float(np.nanpercentile(v, 97.5))]
    within = [stats.spearmanr(umax[traj == t], emax[traj == t]).statistic for t in np.unique(traj)
              if np.sum(traj == t) > 2]
    out["within_traj_spearman"] = float(np.nanmean(within))
    return out


def frame_table(out: Path, backbone: str) -> Dict[str, Dict[str, Dict[str, Any]]]:
    """{method: {set: bootstrap figures (means over seeds of points and interval ends)}}."""
    dump = np.load(out / f"frames_committee_{backbone}.npz")
    traj = {s: trajectories(out / "data" / f"{s}.xyz") for s in SETS}
    runs: Dict[str, Dict[str, List[Dict[str, Any]]]] = {}
    for key in dump.files:
        method, seed, s, col = key.split("/")
        if col == "umax":
            b = bootstrap(dump[key], dump[f"{method}/{seed}/{s}/emax"], traj[s])
            runs.setdefault(method, {}).setdefault(s, []).append(b)
    return {m: {s: {k: np.mean([r[k] for r in rs], axis=0).tolist() for k in rs[0]} for s, rs in by.items()}
            for m, by in runs.items()}

def _mean(res: Dict[str, Any], method: str, s: str, key: str) -> float:
    return float(np.mean([r["deployed"][s][key] for r in res["methods"][method].values()]))


def rule(res: Dict[str, Any], cand: str = "committee") -> List[str]:
    """The default rule on the val rows: the candidate ``cand`` replaces the shipped level iff every line holds."""
    lines, ok = [], True
    ratio = _mean(res, cand, "val", "forces_mae") / _mean(res, "e2ip", "val", "forces_mae")
    checks = [(f"val force MAE, committee / shipped = {ratio:.3f} ≤ {RULE_MAE_RATIO}", ratio <= RULE_MAE_RATIO)]
    cov, ence = _mean(res, cand, "val", "forces_coverage_90"), _mean(res, cand, "val", "forces_ence")
    checks.append((f"val cov90 {cov:.3f} in {RULE_COV90}", RULE_COV90[0] <= cov <= RULE_COV90[1]))
    checks.append((f"val ENCE {ence:.3f} ≤ {RULE_ENCE}", ence <= RULE_ENCE))
    for key in ("forces_spearman", "frame_spearman", "frame_auroc"):
        c, e = _mean(res, cand, "val", key), _mean(res, "e2ip", "val", key)
        checks.append((f"val {key} {c:.3f} ≥ shipped {e:.3f} − {RULE_RANK_SLACK}", c >= e - RULE_RANK_SLACK))
    for text, passed in checks:
        ok &= passed
        lines.append(f"- {'pass' if passed else 'FAIL'}: {text}")
    lines.append(f"- **{cand + ' becomes the default' if ok else 'the shipped level stays the default'}**")
    return lines


def write_report(out: Path) -> str:
    from .common.scalar_report import COLS

    lines = ["# The in-model committee against the shipped level and a 4-member ensemble (issue 26)", "",
             "Command: `python -m benchmarks.committee --backbone {mace,nequip} --out <dir>` in the backbone's "
             "environment, then `python -m benchmarks.committee --report --out <dir>`.", "",
             "As deployed (stored levels; the ensemble with one validation scale); means ± sd over seeds. Frame ρ / "
             f"AUROC: per-structure max u against max ‖ΔF‖; [95 % interval]: block bootstrap within trajectories "
             f"({BLOCK}-frame blocks, {REPS} replicates; the mean over seeds of each run's interval ends); within-traj "
             "ρ: the mean Spearman inside each trajectory.", ""]
    for backbone in ("mace", "nequip", "mace_ew10"):
        path = out / f"results_committee_{backbone}.json"
        if not path.exists():
            continue
        res = json.loads(path.read_text())
        frames = frame_table(out, backbone)
        lines += [f"## {backbone}", "", f"Backbone: {json.dumps(res['settings'])}; seeds {res['seeds']}.", "",
                  "| method | set | " + " | ".join(c[1] for c in COLS[:-2]) + " | frame ρ [95 %] | frame AUROC [95 %] "
                  "| within-traj ρ |", "|---" * (len(COLS) + 3) + "|"]
        for m in NAMES:
            if m not in res["methods"]:
                continue
            for s in SETS:
                vals = [np.array([r["deployed"][s].get(k, np.nan) or np.nan for r in res["methods"][m].values()],
                                 dtype=float) * f for k, _, f in COLS[:-2]]
                cells = [f"{v.mean():.3g}" + (f" ± {v.std():.2g}" if len(v) > 1 else "") if np.isfinite(v).all()
                         else "—" for v in vals]
                fr = frames.get(m, {}).get(s)
                extra = ["—"] * 3 if fr is None else [
                    f"{fr['frame_spearman']:.2f} [{fr['frame_spearman_ci'][0]:.2f}, {fr['frame_spearman_ci'][1]:.2f}]",
                    f"{fr['frame_auroc']:.2f} [{fr['frame_auroc_ci'][0]:.2f}, {fr['frame_auroc_ci'][1]:.2f}]",
                    f"{fr['within_traj_spearman']:.2f}"]
                lines.append(f"| {NAMES[m]} | {s} | " + " | ".join(cells + extra) + " |")
        lines += ["", "Training CPU seconds per run: " + "; ".join(
            f"{NAMES.get(k, k)} {', '.join(f'{x:.0f}' for x in v)}" for k, v in res["train_cpu_s"].items()), "",
                  "### The default rule (val rows only)", ""] + rule(res, "committee" if "committee" in res["methods"]
                                                                    else "scaled") + [""]
        if (out / f"scaled_{backbone}.json").exists():
            from .committee_levels import summary

            lines += ["### Candidate C and its control A_g (`--scaled`; means over seeds)", "",
                      summary(out / f"scaled_{backbone}.json"), ""]
    text = "\n".join(lines)
    (out / "report_committee.md").write_text(text)
    return text


def main(argv: List[str] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", choices=sorted(VARIANTS))
    p.add_argument("--out", default="bench_committee")
    p.add_argument("--data-dir", default=str(SHARED_DATA))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--seed0", type=int, default=0, help="first training seed, offset from the profile's (fresh "
                   "seeds for a new candidate); the split is unchanged")
    p.add_argument("--heads", default=None, help="comma-separated e²IP methods to train (default: all of "
                   "VARIANTS[backbone])")
    p.add_argument("--report", action="store_true", help="write report_committee.md")
    p.add_argument("--combined", action="store_true", help="with --backbone: the diagnostic of :func:`combined` "
                   "on the trained committee runs (head U_epi + committee, two val scales)")
    p.add_argument("--scaled", action="store_true", help="with --backbone: candidate C of docs/committee.md on the "
                   "trained committee runs (the head's U_epi scaled by the committee's local spread ratio)")
    p.add_argument("--smoothing", action="store_true", help="with --backbone: C with other spread averages and "
                   "shapes (:func:`benchmarks.committee_levels.smoothing`)")
    args = p.parse_args(argv)
    if args.backbone and args.smoothing:
        print(smoothing(args))
    elif args.backbone and args.combined:
        print(combined(args))
    elif args.backbone and args.scaled:
        print(scaled(args))
    elif args.backbone:
        run_variant(argparse.Namespace(variant=args.backbone, out=args.out, data_dir=args.data_dir, seeds=args.seeds,
                                       epochs=None, lr=None, tail_check=False, frames_out=True, seed0=args.seed0,
                                       heads=args.heads.split(",") if args.heads else None), VARIANTS, "committee")
    if args.report:
        print(write_report(Path(args.out)))


if __name__ == "__main__":
    main()
