"""The tables and the issue's targets of the benchmark report (:mod:`benchmarks.common.report`): accuracy and
UQ per method × set, the level (issue 12), OOD ratios, cost, the data-efficiency sweep, and each target
marked met / missed with its numbers. The targets are read against, never tuned for."""

from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .backends import METHODS, NAMES, SCORED

UQ_METHODS = SCORED[1:]  # the scored methods that have an uncertainty

# the targets (read against, never tuned for)
T_OVERHEAD = 1.10  # e²IP inference time ≤ 1.10 × plain at ≥ 1000 atoms
T_SPEEDUP = 3.5  # e²IP ≥ 3.5× faster than the 4-member ensemble
T_MAE = 1.05  # e²IP force MAE ≤ 1.05 × plain
T_COV = (0.85, 0.95)  # recalibrated 90 % coverage in-distribution
# issue 12: the level as deployed (e²IP: the stored validation-fitted calibration; others: recal on val)
T_RMV = (0.7, 1.5)
T_ENCE = 0.25
T_UTAIL = 3.0
T_MAE_LEVEL = 1.03
LEVEL_METRICS = ("forces_coverage_90", "rmv_rmse", "forces_ence", "u_tail", "forces_spearman", "forces_auroc",
                 "frame_spearman", "frame_auroc")


def level_kind(m: str) -> str:
    """e²IP models carry their validation-fitted calibration (read raw, as deployed); others are recalibrated."""
    return "raw" if m == "e2ip" else "recal"


def _f(x: Any, fmt: str = "{:.3f}", scale: float = 1.0) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return fmt.format(scale * x)


def _get(d: Dict, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def _table(header: Sequence[str], rows: List[Sequence[str]]) -> List[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return out


def sets_of(r: Dict) -> List[str]:
    return ["test", *r["data"]["ood_sets"]]


# ============================================================================================ tables
def accuracy_table(r: Dict) -> List[str]:
    header = ["method", "set", "MAE (meV/Å)", "RMSE (meV/Å)", "NLL", "NLL recal", "Spearman", "AUROC",
              "miscal", "miscal recal", "cov90", "cov90 recal", "mean u (meV/Å)", "u / u_ID"]
    rows = []
    for m in SCORED:
        res = r["methods"].get(m)
        if not res:
            continue
        for s in sets_of(r):
            raw, cal = res["sets"][s]["raw"], res["sets"][s]["recal"]
            ratio = 1.0 if s == "test" else _get(res, "u_ratio_ood_id", s)
            rows.append([
                NAMES[m], s, _f(raw.get("forces_mae"), "{:.1f}", 1e3), _f(raw.get("forces_rmse"), "{:.1f}", 1e3),
                _f(raw.get("forces_nll")), _f(cal.get("forces_nll")), _f(raw.get("forces_spearman")),
                _f(raw.get("forces_auroc")), _f(raw.get("forces_miscal_area")), _f(cal.get("forces_miscal_area")),
                _f(raw.get("forces_coverage_90")), _f(cal.get("forces_coverage_90")),
                _f(raw.get("forces_sharpness"), "{:.1f}", 1e3), _f(ratio if m != "plain" else None, "{:.2f}"),
            ])
    return _table(header, rows)


def ood_table(r: Dict) -> List[str]:
    """Issue 6 columns: mean u on each OOD file / mean u in-distribution, coverage OOD (recal)."""
    ood = r["data"]["ood_sets"]
    header = ["method", "recal scale c (val)", "mean u ID (meV/Å)"]
    header += [f"mean u {s}" for s in ood] + [f"u {s} / u ID" for s in ood]
    header += ["cov90 ID recal"] + [f"cov90 {s} recal" for s in ood]
    rows = []
    for m in UQ_METHODS:
        res = r["methods"].get(m)
        if not res:
            continue
        row = [NAMES[m], _f(res.get("recal_scale"), "{:.3g}"), _f(res["mean_u"]["test"], "{:.1f}", 1e3)]
        row += [_f(res["mean_u"][s], "{:.1f}", 1e3) for s in ood]
        row += [_f(res["u_ratio_ood_id"][s], "{:.2f}") for s in ood]
        row += [_f(res["sets"]["test"]["recal"]["forces_coverage_90"])]
        row += [_f(res["sets"][s]["recal"]["forces_coverage_90"]) for s in ood]
        rows.append(row)
    return _table(header, rows)


def level_table(r: Dict) -> List[str]:
    """Issue 12: does the predicted level match the error, per atom and per structure, on every set?"""
    header = ["method", "set", "MAE (meV/Å)", "cov90", "RMV/RMSE", "ENCE", "u-tail", "Spearman", "AUROC",
              "frame Spearman", "frame AUROC", "mean u (meV/Å)", "median u (meV/Å)"]
    rows = []
    for m in UQ_METHODS:
        res = r["methods"].get(m)
        if not res:
            continue
        kind = level_kind(m)
        for st in sets_of(r):
            e = res["sets"][st][kind]
            rows.append([f"{NAMES[m]} ({'stored cal.' if kind == 'raw' else 'recal'})", st,
                         _f(e.get("forces_mae"), "{:.1f}", 1e3)]
                        + [_f(e.get(k), "{:.3g}" if k in ("rmv_rmse", "u_tail") else "{:.3f}") for k in LEVEL_METRICS]
                        + [_f(e.get("forces_sharpness"), "{:.1f}", 1e3), _f(e.get("median_u"), "{:.1f}", 1e3)])
    return _table(header, rows)


def level_targets(r: Dict) -> List[Tuple[str, Optional[bool], str]]:
    """The issue-12 must-shows for one backbone."""
    out: List[Tuple[str, Optional[bool], str]] = []
    M = r["methods"]
    for st in sets_of(r):
        e = _get(M, "e2ip", "sets", st, "raw", default={}) or {}
        cov, rmv, ence, tail = (e.get(k) for k in ("forces_coverage_90", "rmv_rmse", "forces_ence", "u_tail"))
        ok = None if None in (cov, rmv, ence, tail) else (T_COV[0] <= cov <= T_COV[1] and T_RMV[0] <= rmv <= T_RMV[1]
                                                         and ence <= T_ENCE and tail <= T_UTAIL)
        out.append((f"{st}: e²IP (stored calibration) cov90 in 0.85–0.95, RMV/RMSE in 0.7–1.5, ENCE ≤ 0.25, "
                    "u-tail ≤ 3", ok, f"cov90 {_f(cov)}, RMV/RMSE {_f(rmv)}, ENCE {_f(ence)}, u-tail {_f(tail)}"))
        keys = [("frame_spearman", "frame Spearman"), ("frame_auroc", "frame AUROC")]
        if st != "test":
            keys = [("forces_spearman", "Spearman"), ("forces_auroc", "AUROC")] + keys
        for key, name in keys:
            a = e.get(key)
            for ens in ("ensemble",):
                b = _get(M, ens, "sets", st, "recal", key)
                out.append((f"{st}: e²IP {name} ≥ 4-member ensemble's", None if a is None or b is None else a >= b,
                            f"e²IP {_f(a)} vs ensemble {_f(b)}"))
    mae_e = _get(M, "e2ip", "sets", "test", "raw", "forces_mae")
    mae_p = _get(M, "plain", "sets", "test", "raw", "forces_mae")
    rel = (mae_e / mae_p) if (mae_e and mae_p) else None
    out.append(("e²IP force MAE within 3 % of the plain backbone (ID test)", None if rel is None else rel <= T_MAE_LEVEL,
                f"ratio {_f(rel, '{:.3f}')}"))
    return out


def _mem(inf: Dict, m: str, n_atoms: int) -> Tuple[Optional[float], Optional[float]]:
    """(peak RSS, increment over the pre-model baseline) in MB during inference on n_atoms."""
    e = _get(inf, "memory", m, "infer", str(n_atoms))
    return (e["peak_mb"], e["increment_mb"]) if e else (None, None)


def cost_table(r: Dict) -> List[str]:
    inf = r["cost"]["inference"]
    tr = r["cost"]["training"]
    small, large = inf["timing"]["small"], inf["timing"]["large"]
    n_small, n_big = small["n_atoms"], large["n_atoms"]
    header = ["method", "train s/epoch (steps)", "ratio", "train s/epoch (+val)", "ratio", "train CPU s (whole CLI run)",
              "ratio", "train peak RSS (MB)",
              f"infer {n_small} atoms wall / CPU (ms)", "ratio wall / CPU",
              f"infer {n_big} atoms wall / CPU (ms)", "ratio wall / CPU",
              f"infer peak RSS {n_big} atoms (MB)", "Δ RSS over baseline (MB)", "ratio"]
    rows = []
    base_inc = _mem(inf, "plain", n_big)[1]

    def pair(t, key, m, fmt, scale=1.0):
        return f"{_f(t.get(key, {}).get(m), fmt, scale)} / {_f(t.get('cpu_' + key if key.startswith('ratio') else 'median_cpu_s', {}).get(m), fmt, scale)}"

    for m in METHODS:
        t = tr.get(m, {})
        peak, inc = _mem(inf, m, n_big)
        rows.append([
            NAMES[m] + (f" (×{t['members']})" if m == "ensemble" else ""),
            _f(t.get("step_s_per_epoch"), "{:.2f}"), _f(t.get("step_s_per_epoch_ratio"), "{:.2f}"),
            _f(t.get("epoch_s"), "{:.2f}"), _f(t.get("epoch_s_ratio"), "{:.2f}"),
            _f(t.get("cpu_s"), "{:.0f}"), _f(t.get("cpu_s_ratio"), "{:.2f}"), _f(t.get("peak_rss_mb"), "{:.0f}"),
            pair(small, "median_s", m, "{:.1f}", 1e3), pair(small, "ratio_to_plain", m, "{:.2f}"),
            pair(large, "median_s", m, "{:.1f}", 1e3), pair(large, "ratio_to_plain", m, "{:.2f}"),
            _f(peak, "{:.0f}"), _f(inc, "{:.0f}"), _f(inc / base_inc if inc and base_inc else None, "{:.2f}"),
        ])
    return _table(header, rows)


def sweep_table(r: Dict) -> List[str]:
    sweep = r.get("sweep") or {}
    ood = r["data"]["ood_sets"]
    header = ["train frames", "method", "test MAE (meV/Å)", "test NLL recal", "test cov90 recal"]
    header += [f"{s} {k}" for s in ood for k in ("Spearman", "AUROC", "NLL recal")]
    rows = []
    for n in sorted(sweep, key=int):
        for m in SCORED:
            res = sweep[n].get(m)
            if not res:
                continue
            t = res["sets"]["test"]
            row = [n, NAMES[m], _f(t["raw"].get("forces_mae"), "{:.1f}", 1e3), _f(t["recal"].get("forces_nll")),
                   _f(t["recal"].get("forces_coverage_90"))]
            for s in ood:
                row += [_f(res["sets"][s]["raw"].get("forces_spearman")), _f(res["sets"][s]["raw"].get("forces_auroc")),
                        _f(res["sets"][s]["recal"].get("forces_nll"))]
            rows.append(row)
    return _table(header, rows)


# =========================================================================================== targets
def targets(r: Dict) -> List[Tuple[str, Optional[bool], str]]:
    """(target, met?, numbers) for one backbone; met is None when it could not be evaluated."""
    out: List[Tuple[str, Optional[bool], str]] = []
    M = r["methods"]
    large = _get(r, "cost", "inference", "timing", "large", default={})
    n_big = large.get("n_atoms")
    # judged on CPU time (one thread per process: robust to other load on a shared machine); wall time shown too
    ratio = _get(large, "cpu_ratio_to_plain", "e2ip")
    wall = _get(large, "ratio_to_plain", "e2ip")
    out.append((f"e²IP inference overhead vs plain ≤ 10 % at ≥ 1000 atoms ({n_big} atoms)",
                None if ratio is None else ratio <= T_OVERHEAD,
                f"CPU-time ratio e²IP / plain = {_f(ratio, '{:.3f}')} (overhead "
                f"{_f(None if ratio is None else ratio - 1, '{:+.1%}')}); wall-time ratio {_f(wall, '{:.3f}')}"))
    te, tens = _get(large, "median_cpu_s", "e2ip"), _get(large, "median_cpu_s", "ensemble")
    we, wens = _get(large, "median_s", "e2ip"), _get(large, "median_s", "ensemble")
    k = _get(r, "cost", "training", "ensemble", "members")
    sp = (tens / te) if (te and tens) else None
    out.append((f"e²IP ≥ 3.5× faster than the {k}-member ensemble ({n_big} atoms)",
                None if sp is None else sp >= T_SPEEDUP,
                f"ensemble / e²IP CPU time = {_f(sp, '{:.2f}')}×; wall time "
                f"{_f(wens / we if we and wens else None, '{:.2f}')}×" + (" (target is for 4 members)" if k != 4 else "")))
    mae_e = _get(M, "e2ip", "sets", "test", "raw", "forces_mae")
    mae_p = _get(M, "plain", "sets", "test", "raw", "forces_mae")
    rel = (mae_e / mae_p) if (mae_e and mae_p) else None
    out.append(("e²IP force MAE within 5 % of the plain backbone (ID test)", None if rel is None else rel <= T_MAE,
                f"MAE e²IP {_f(mae_e, '{:.1f}', 1e3)} vs plain {_f(mae_p, '{:.1f}', 1e3)} meV/Å "
                f"(ratio {_f(rel, '{:.3f}')})"))
    for s in r["data"]["ood_sets"]:
        for key, name in (("forces_spearman", "Spearman"), ("forces_auroc", "AUROC")):
            a, b = _get(M, "e2ip", "sets", s, "raw", key), _get(M, "ensemble", "sets", s, "raw", key)
            out.append((f"{s}: e²IP {name} ≥ ensemble's", None if a is None or b is None else a >= b,
                        f"e²IP {_f(a)} vs ensemble {_f(b)}"))
        for kind, label in (("recal", "after recalibration"), ("raw", "before recalibration")):
            a = _get(M, "e2ip", "sets", s, kind, "forces_nll")
            b = _get(M, "ensemble", "sets", s, kind, "forces_nll")
            c = _get(M, "eip", "sets", s, kind, "forces_nll")
            ok = None if None in (a, b, c) else (a < b and a < c)
            out.append((f"{s}: e²IP NLL lower than ensemble's and eIP's ({label})", ok,
                        f"e²IP {_f(a)}, ensemble {_f(b)}, eIP {_f(c)}"))
            d = _get(M, "ensemble_iso", "sets", s, kind, "forces_nll")
            if d is not None:
                out.append((f"{s}: (diagnostic) e²IP NLL lower than the isotropic ensemble's ({label})",
                            None if a is None else a < d, f"e²IP {_f(a)}, ensemble (iso) {_f(d)}"))
    cov = _get(M, "e2ip", "sets", "test", "recal", "forces_coverage_90")
    out.append(("e²IP 90 % coverage in-distribution within ±5 points after recalibration",
                None if cov is None else T_COV[0] <= cov <= T_COV[1], f"coverage {_f(cov)} (raw "
                f"{_f(_get(M, 'e2ip', 'sets', 'test', 'raw', 'forces_coverage_90'))})"))
    return out


def verdict_table(first: str, items: List[Tuple[str, Optional[bool], str]]) -> List[str]:
    """(target, met?, numbers) rows as a markdown table; met None reads n/a."""
    rows = [[n, "**met**" if ok else ("n/a" if ok is None else "**missed**"), nums] for n, ok, nums in items]
    return _table([first, "result", "numbers"], rows)


def targets_md(r: Dict) -> List[str]:
    return verdict_table("target", targets(r))
