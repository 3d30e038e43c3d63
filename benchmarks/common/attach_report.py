"""``report.md`` of ``benchmarks.attach``: per backbone, every method's metrics on every set as deployed
(mean ± sd over seeds), the head-fit cost against the backbone's training, and the unchanged-predictions check."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

NAMES = {"attach": "e²IP frozen-attach", "e2ip": "e²IP end-to-end", "llpr": "LLPR (post hoc)",
         "ensemble": "4-member ensemble, (tr/3)·I, val scale"}
COLS = [("forces_rmse", "RMSE (meV/Å)", 1000.0), ("forces_coverage_90", "cov90", 1.0), ("rmv_rmse", "RMV/RMSE", 1.0),
        ("forces_ence", "ENCE", 1.0), ("forces_nll", "NLL", 1.0), ("u_tail", "u-tail", 1.0),
        ("forces_spearman", "atom ρ", 1.0), ("forces_auroc", "atom AUROC", 1.0),
        ("frame_spearman", "frame ρ", 1.0), ("frame_auroc", "frame AUROC", 1.0)]


def _cell(vals: List[float], scale: float) -> str:
    v = np.asarray([x for x in vals if x is not None], dtype=float) * scale
    if v.size == 0:
        return "—"
    fmt = "{:.1f}" if scale != 1.0 else "{:.3g}"
    return fmt.format(v.mean()) + (f" ± {fmt.format(v.std(ddof=1))}" if v.size > 1 else "")


def backbone_section(res: Dict[str, Any]) -> List[str]:
    sets = list(next(iter(res["methods"]["attach"].values()))["deployed"])
    lines = [f"## {res['backbone']}", "",
             f"Backbone: {json.dumps(res['settings'])}; frames {json.dumps(res['frames'])}; seeds {res['seeds']}.", "",
             "| method | set | " + " | ".join(c[1] for c in COLS) + " |", "|---" * (len(COLS) + 2) + "|"]
    for m in ("attach", "e2ip", "llpr", "ensemble"):
        if m not in res["methods"]:
            continue
        runs = [r["deployed"] for r in res["methods"][m].values()]
        for s in sets:
            cells = [_cell([r[s][k] for r in runs], sc) for k, _, sc in COLS]
            lines.append(f"| {NAMES[m]} | {s} | " + " | ".join(cells) + " |")
    lines += ["", "Fit cost against the plain backbone's training of the same seed (whole-process CPU seconds, one "
              "thread, imports and start-up included; NequIP also per epoch from Lightning's profiler):", "",
              "| seed | plain training CPU s | attach CPU s | attach / plain | plain epochs × s/epoch | attach epochs × "
              "s/epoch | LLPR fit CPU s | LLPR / plain |", "|---|---|---|---|---|---|---|---|"]
    for seed, c in res["cost"].items():
        pe = f"{c['plain_epochs']} × {c['plain_epoch_s']:.2f}" if c.get("plain_epoch_s") else "—"
        ae = f"{c['attach_epochs']} × {c['attach_epoch_s']:.2f}" if c.get("attach_epoch_s") else "—"
        lines.append(f"| {seed} | {c['plain_train_cpu_s']:.0f} | {c['attach_cpu_s']:.0f} | {c['attach_over_plain']:.3f} "
                     f"| {pe} | {ae} | {c['llpr_fit_cpu_s']:.0f} | {c['llpr_over_plain']:.3f} |")
    lines += ["", "Predictions unchanged by the attach (test set, eager):", "",
              "| seed | dtype | frames | max abs ΔE (eV) | max abs ΔF (eV/Å) |", "|---|---|---|---|---|"]
    for seed, u in res["unchanged"].items():
        lines.append(f"| {seed} | {u.get('dtype', '')} | {u['frames']} | {u['max_abs_dE']:.3g} | {u['max_abs_dF']:.3g} |")
    return lines + [""]


def write_sections(out: Path, name: str, header: List[str], paths, section) -> Path:
    """``out/name``: the ``header`` lines, then ``section(results)`` of each results JSON in ``paths``."""
    lines = list(header)
    for path in paths:
        lines += section(json.loads(Path(path).read_text()))
    report = Path(out) / name
    report.write_text("\n".join(lines))
    return report


def write_report(out: Path) -> Path:
    out = Path(out)
    header = ["# Uncertainty for an existing model: frozen-attach e²IP vs end-to-end vs LLPR vs ensemble", "",
              "Command: `python -m benchmarks.attach --backbone {mace,nequip} --out <dir>` in each environment, then "
              "`python -m benchmarks.attach --report --out <dir>`.", "",
              "Metrics per atom (forces) as deployed: the stored calibration for e²IP, α² and ς² fitted on val for the "
              "LLPR, one covariance scale fitted on val for the ensemble. Mean ± sd over seeds. Frame ρ / AUROC: "
              "per-structure max u against max ‖ΔF‖.", ""]
    paths = [out / f"results_{b}.json" for b in ("mace", "nequip") if (out / f"results_{b}.json").is_file()]
    return write_sections(out, "report.md", header, paths, backbone_section)
