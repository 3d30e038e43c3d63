"""``report_scalar.md`` of ``benchmarks.scalar_backbones``: per variant, every method's force accuracy and
uncertainty metrics on every set as deployed (mean ± sd over seeds), and the MAE ratio to the plain backbone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from .attach_report import _cell, write_sections

NAMES = {"plain": "plain", "e2ip": "e²IP, l > 0 head", "e2ip_geometric": "e²IP, geometric construction",
         "ensemble": "4-member ensemble, (tr/3)·I, val scale"}
COLS = [("forces_mae", "MAE (meV/Å)", 1000.0), ("forces_coverage_90", "cov90", 1.0), ("rmv_rmse", "RMV/RMSE", 1.0),
        ("forces_ence", "ENCE", 1.0), ("u_tail", "u-tail", 1.0), ("forces_spearman", "atom ρ", 1.0),
        ("forces_auroc", "atom AUROC", 1.0), ("frame_spearman", "frame ρ", 1.0), ("frame_auroc", "frame AUROC", 1.0)]


def variant_section(res: Dict[str, Any]) -> List[str]:
    methods = res["methods"]
    sets = list(next(iter(methods["plain"].values()))["deployed"])
    lines = [f"## {res['variant']}", "", f"Backbone: {json.dumps(res['settings'])}; seeds {res['seeds']}.", "",
             "| method | set | " + " | ".join(c[1] for c in COLS) + " |", "|---" * (len(COLS) + 2) + "|"]
    for m in ("plain", "e2ip", "e2ip_geometric", "ensemble"):
        if m not in methods:
            continue
        runs = [r["deployed"] for r in methods[m].values()]
        for s in sets:
            cells = [_cell([r[s].get(k) for r in runs], sc) for k, _, sc in COLS]
            lines.append(f"| {NAMES[m]} | {s} | " + " | ".join(cells) + " |")
    lines += ["", "Force MAE of the e²IP model / the plain model of the same seed (test):", ""]
    for m in ("e2ip", "e2ip_geometric"):
        if m in methods:
            ratios = [methods[m][k]["deployed"]["test"]["forces_mae"] / methods["plain"][k]["deployed"]["test"]["forces_mae"]
                      for k in methods[m] if k in methods["plain"]]
            lines.append(f"- {NAMES[m]}: " + ", ".join(f"{r:.3f}" for r in ratios) + f" (mean {np.mean(ratios):.3f})")
    lines.append("")
    lines.append("Training CPU seconds per run: " + "; ".join(
        f"{NAMES[m]} {', '.join(f'{v:.0f}' for v in vals)}" for m, vals in res["train_cpu_s"].items()))
    return lines + [""]


def write_report(out: Path) -> Path:
    out = Path(out)
    header = ["# Scalar backbones: the geometric construction (issue 28)", "",
              "Command: `python -m benchmarks.scalar_backbones --variant {mace_l0,mace_l1_geometric,allegro} --out <dir>` "
              "in the backbone's environment, then `python -m benchmarks.scalar_backbones --report --out <dir>`.", "",
              "Per-atom force metrics as deployed (stored calibration; the ensemble with one validation scale). "
              "Frame ρ / AUROC: per-structure max u against max ‖ΔF‖. Mean ± sd over seeds.", ""]
    return write_sections(out, "report_scalar.md", header, sorted(out.glob("results_scalar_*.json")), variant_section)
