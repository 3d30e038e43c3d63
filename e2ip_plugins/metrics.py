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
    forces_sharpness = mean u
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional

import numpy as np
import torch
from scipy import stats

from .predictive import atom_uncertainty

COLUMNS = ("err_abs", "err_sq", "e", "u", "sigma", "nll", "pit")
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
        self.parts: Dict[str, list] = {c: [] for c in COLUMNS}

    def update(self, pred, y: torch.Tensor) -> "UQMetricState":
        return self.update_columns(atom_columns(pred, y))

    def update_columns(self, cols: Dict[str, torch.Tensor]) -> "UQMetricState":
        for c in COLUMNS:
            self.parts[c].append(cols[c].detach().to("cpu", torch.float64).reshape(-1))
        return self

    def merge(self, other: "UQMetricState") -> "UQMetricState":
        for c in COLUMNS:
            self.parts[c].extend(other.parts[c])
        return self

    def columns(self) -> Dict[str, np.ndarray]:
        return {c: (torch.cat(v).numpy() if v else np.zeros(0)) for c, v in self.parts.items()}

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
    return out


def uq_metrics(pred, y: torch.Tensor, state: Optional[UQMetricState] = None) -> Dict[str, float]:
    """One-shot metrics for a predictive over a whole set."""
    return (state or UQMetricState()).update(pred, y).compute()
