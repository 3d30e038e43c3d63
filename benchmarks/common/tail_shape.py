"""The predictive's tail shape (issue 28): refit a global shift of the NIW head's ν on validation data.

For a Student-t predictive (ν_i, κ_i, Σ₀,i) and one shift Δ ≥ 0 (ν_i → ν_i + Δ), the scale c(Δ) is the
validation-NLL optimum, as the stored calibration fits it; Δ* = argmin_Δ NLL_val(Δ, c(Δ)) on a fixed grid.
The table reports, for each Δ, c, the validation NLL and every set's cov90 / NLL. Validation data only
choose Δ*; the other sets are read, never fitted. Not deployed: a diagnostic of why the in-distribution
90 % coverage exceeds 0.95 when ν sits at its floor ν₀ = 5 (Student-t with 3 degrees of freedom).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Dict, Sequence

SHIFTS = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 50.0)


def _cov90(pred, y) -> float:
    import numpy as np

    return float(np.mean(pred.pit(y).numpy() <= 0.9))


def nu_shift_table(preds: Dict[str, Any], shifts: Sequence[float] = SHIFTS) -> Dict[str, Any]:
    """``preds``: {set: (y, mean, StudentTPredictive)} with a ``val`` set → {"rows": [...], "best": Δ*,
    "nu_quantiles": ν's 5/50/95 % on val}."""
    import numpy as np
    from scipy.optimize import minimize_scalar

    yv, _, pv = preds["val"]
    rows = []
    for d in shifts:
        shifted = dataclasses.replace(pv, nu=pv.nu + d)
        res = minimize_scalar(lambda lc: float(shifted.scaled(math.exp(lc)).nll(yv).mean()), bounds=(-8.0, 8.0),
                              method="bounded", options={"xatol": 1e-6})
        c = math.exp(float(res.x))
        row = {"shift": float(d), "c": c, "val_nll": float(res.fun), "sets": {}}
        for name, (y, _, pred) in preds.items():
            p = dataclasses.replace(pred, nu=pred.nu + d).scaled(c)
            row["sets"][name] = {"cov90": _cov90(p, y), "nll": float(p.nll(y).mean())}
        rows.append(row)
    best = min(rows, key=lambda r: r["val_nll"])["shift"]
    return {"rows": rows, "best": best, "nu_quantiles": np.percentile(pv.nu.numpy(), [5, 50, 95]).tolist()}


def markdown(tables: Dict[str, Dict[str, Any]]) -> str:
    """One table per run: Δ, c, val NLL, then cov90 / NLL per set; Δ* marked."""
    lines = []
    for run, t in tables.items():
        sets = list(t["rows"][0]["sets"])
        q = ", ".join(f"{x:.2f}" for x in t["nu_quantiles"])
        lines += [f"**{run}** (ν on val, 5/50/95 %: {q}; Δ* = {t['best']:g} by validation NLL)", "",
                  "| Δν | c | val NLL | " + " | ".join(f"{s} cov90 / NLL" for s in sets) + " |",
                  "|---" * (3 + len(sets)) + "|"]
        for r in t["rows"]:
            mark = " *" if r["shift"] == t["best"] else ""
            cells = " | ".join(f"{r['sets'][s]['cov90']:.3f} / {r['sets'][s]['nll']:.2f}" for s in sets)
            lines.append(f"| {r['shift']:g}{mark} | {r['c']:.3f} | {r['val_nll']:.3f} | {cells} |")
        lines.append("")
    return "\n".join(lines)
