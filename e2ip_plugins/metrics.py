"""UQ metrics (DESIGN §4), one implementation for both stacks.

State is a set of per-atom columns, so merging partial states (batches, DDP ranks)
is concatenation and gives exactly the one-shot value:

    err_abs  Σ_a |ΔF_ia|           err_sq   Σ_a ΔF_ia²         e   ‖ΔF_i‖
    u        sqrt(tr U_epi/3)      sigma    sqrt(tr U_tot/3)   nll −log p(y_i)
    pit      predictive mass inside the ellipsoid through y_i (d²/3 ~ F(3,ν′) or d² ~ χ²₃)

    forces_mae = Σ err_abs / 3N            forces_rmse = sqrt(Σ err_sq / 3N)
    forces_nll = mean nll                   forces_spearman = ρ_S(u, e)
    forces_auroc = ROC-AUC of u for e > 90th percentile of e (ties averaged)
    forces_coverage_p = mean[pit ≤ p]      forces_miscal_area = ∫₀¹ |F̂_pit(p) − p| dp (exact)
    forces_ence = mean_b |RMV_b − RMSE_b| / RMV_b over 10 equal-count bins of sigma,
                  RMV_b = sqrt(mean sigma²), RMSE_b = sqrt(mean e²/3)
    forces_sharpness = mean u               median_u = median u
    rmv_rmse = sqrt(mean sigma²) / forces_rmse          (predicted error level over the actual one)
    u_tail = P99.9(u) / P99.9(e/√3)                      (absurd magnitudes show as ≫ 1)
    frame_spearman, frame_auroc: per structure (optional column ``frame``: structure index of
        each atom), ρ_S(max u, max e) and ROC-AUC of max u for max e above the 90th percentile
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Tuple

import numpy as np
import torch
from scipy import stats

from .predictive import atom_uncertainty

COLUMNS = ("err_abs", "err_sq", "e", "u", "sigma", "nll", "pit")
FRAME = "frame"  # optional column: structure index of each atom (frame-level metrics)
TAIL_PERCENTILE = 99.9
AUROC_PERCENTILE = 90.0
ENCE_BINS = 10


def atom_columns(pred, y: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-atom metric columns for a predictive ``pred`` and reference forces y (N,3)."""
    with torch.no_grad():
        r = y - pred.mean
        return {
            "err_abs": r.abs().sum(-1),
            "err_sq": (r * r).sum(-1),
            "e": torch.linalg.vector_norm(r, dim=-1),
            "u": pred.uncertainty,
            "sigma": atom_uncertainty(pred.covariance),
            "nll": pred.nll(y),
            "pit": pred.pit(y),
        }


class UQMetricState:
    """Accumulates per-atom columns; ``merge`` concatenates; ``compute`` gives the metric dict."""

    def __init__(self):
        self.parts: Dict[str, list] = {c: [] for c in COLUMNS + (FRAME,)}

    def update(self, pred, y: torch.Tensor, frame: Optional[torch.Tensor] = None) -> "UQMetricState":
        """``frame`` (N,): structure index of each atom, unique over the whole state (frame-level metrics)."""
        cols = atom_columns(pred, y)
        if frame is not None:
            cols[FRAME] = torch.as_tensor(frame)
        return self.update_columns(cols)

    def update_columns(self, cols: Dict[str, torch.Tensor]) -> "UQMetricState":
        for c in COLUMNS:
            self.parts[c].append(cols[c].detach().to("cpu", torch.float64).reshape(-1))
        if FRAME in cols:
            self.parts[FRAME].append(torch.as_tensor(cols[FRAME]).detach().to("cpu", torch.float64).reshape(-1))
        return self

    def merge(self, other: "UQMetricState") -> "UQMetricState":
        for c in COLUMNS + (FRAME,):
            self.parts[c].extend(other.parts[c])
        return self

    def columns(self) -> Dict[str, np.ndarray]:
        cols = {c: (torch.cat(v).numpy() if v else np.zeros(0)) for c, v in self.parts.items()}
        if len(cols[FRAME]) != len(cols["e"]):  # frame indices missing for some atoms: no frame metrics
            del cols[FRAME]
        return cols

    def compute(self) -> Dict[str, float]:
        return compute_metrics(self.columns())


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann–Whitney ROC-AUC with average ranks for ties; NaN if one class is empty."""
    labels = labels.astype(bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def miscalibration_area(pit: np.ndarray) -> float:
    """∫₀¹ |F̂(p) − p| dp for the empirical CDF F̂ of the PIT values, computed exactly."""
    x = np.sort(np.clip(pit, 0.0, 1.0))
    n = len(x)
    if n == 0:
        return float("nan")
    edges = np.concatenate([[0.0], x, [1.0]])
    levels = np.arange(n + 1) / n  # F̂ on [edges[k], edges[k+1])
    a, b = edges[:-1], edges[1:]

    # ∫_a^b |c − p| dp = G(b) − G(a), with G(p) = ∫_0^p |c − s| ds
    def g(p, c):
        lo = np.minimum(p, c)
        return (c * lo - lo * lo / 2) + np.where(p > c, (p * p - c * c) / 2 - c * (p - c), 0.0)

    return float(np.sum(g(b, levels) - g(a, levels)))


def ence(sigma: np.ndarray, e: np.ndarray, bins: int = ENCE_BINS) -> float:
    """Expected normalised calibration error over equal-count bins of sigma."""
    order = np.argsort(sigma, kind="stable")
    vals = []
    for idx in np.array_split(order, bins):
        if len(idx) == 0:
            continue
        rmv = np.sqrt(np.mean(sigma[idx] ** 2))
        rmse = np.sqrt(np.mean(e[idx] ** 2 / 3.0))
        vals.append(abs(rmv - rmse) / rmv)
    return float(np.mean(vals)) if vals else float("nan")


def compute_metrics(cols: Dict[str, np.ndarray], coverages: Iterable[int] = (50, 90)) -> Dict[str, float]:
    n = len(cols["e"])
    if n == 0:
        return {}
    e, u = cols["e"], cols["u"]
    out = {
        "forces_mae": float(cols["err_abs"].sum() / (3 * n)),
        "forces_rmse": float(np.sqrt(cols["err_sq"].sum() / (3 * n))),
        "forces_nll": float(np.mean(cols["nll"])),
        "forces_spearman": float(stats.spearmanr(u, e).statistic) if n > 2 else float("nan"),
        "forces_auroc": auroc(u, e > np.percentile(e, AUROC_PERCENTILE)),
    }
    for p in coverages:
        out[f"forces_coverage_{p}"] = float(np.mean(cols["pit"] <= p / 100.0))
    out["forces_miscal_area"] = miscalibration_area(cols["pit"])
    out["forces_ence"] = ence(cols["sigma"], e)
    out["forces_sharpness"] = float(np.mean(u))
    out["median_u"] = float(np.median(u))
    out["rmv_rmse"] = float(np.sqrt(np.mean(cols["sigma"] ** 2))) / out["forces_rmse"] if out["forces_rmse"] > 0 else float("nan")
    tail_e = np.percentile(e / np.sqrt(3.0), TAIL_PERCENTILE)
    out["u_tail"] = float(np.percentile(u, TAIL_PERCENTILE) / tail_e) if tail_e > 0 else float("nan")
    if FRAME in cols and len(cols[FRAME]) == n:
        out.update(frame_metrics(cols[FRAME], u, e))
    return out


def frame_maxima(frame: np.ndarray, u: np.ndarray, e: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(max u, max e) per structure, structures in the sorted order of their labels in ``frame`` (per atom)."""
    _, idx = np.unique(np.asarray(frame), return_inverse=True)
    k = int(idx.max()) + 1
    umax = np.full(k, -np.inf)
    emax = np.full(k, -np.inf)
    np.maximum.at(umax, idx, np.asarray(u, dtype=np.float64).reshape(-1))
    np.maximum.at(emax, idx, np.asarray(e, dtype=np.float64).reshape(-1))
    return umax, emax


def frame_metrics(frame: np.ndarray, u: np.ndarray, e: np.ndarray) -> Dict[str, float]:
    """Per-structure max u against max e: Spearman ρ and ROC-AUC for max e above its 90th percentile."""
    umax, emax = frame_maxima(frame, u, e)
    k = len(umax)
    return {
        "frame_spearman": float(stats.spearmanr(umax, emax).statistic) if k > 2 else float("nan"),
        "frame_auroc": auroc(umax, emax > np.percentile(emax, AUROC_PERCENTILE)),
    }


def uq_metrics(pred, y: torch.Tensor, state: Optional[UQMetricState] = None) -> Dict[str, float]:
    """One-shot metrics for a predictive over a whole set."""
    return (state or UQMetricState()).update(pred, y).compute()
