"""UQ plots from metric columns (DESIGN §4): reliability curve, error-vs-uncertainty
hexbin (log-log) and ROC curve. Written as PNG (matplotlib, Agg backend) and returned
as figures so adapters can also log them to W&B (``wandb.Image(fig)``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Tuple

import numpy as np

from .metrics import AUROC_PERCENTILE, auroc


def reliability_curve(pit: np.ndarray, n: int = 101) -> Tuple[np.ndarray, np.ndarray]:
    """(p, F̂(p)): the fraction of atoms whose PIT value is ≤ p, on a grid of n levels."""
    p = np.linspace(0.0, 1.0, n)
    return p, np.searchsorted(np.sort(pit), p, side="right") / max(len(pit), 1)


def roc_points(scores: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every distinct threshold, from the highest score down."""
    labels = labels.astype(bool)
    order = np.argsort(-scores, kind="stable")
    s, lab = scores[order], labels[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # last index of each distinct score
    tp = np.cumsum(lab)[last]
    fp = (last + 1) - tp
    return np.r_[0.0, fp / max((~labels).sum(), 1)], np.r_[0.0, tp / max(labels.sum(), 1)]


def uq_figures(cols: Dict[str, np.ndarray], title: str = ""):
    """Return {'reliability': fig, 'error_vs_uncertainty': fig, 'roc': fig}."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs = {}
    fig, ax = plt.subplots(figsize=(4, 4))
    p, f = reliability_curve(cols["pit"])
    ax.plot(p, f, label="model")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="ideal")
    ax.set(xlabel="nominal central-region probability p", ylabel="observed fraction ≤ p", title=f"{title} reliability")
    ax.legend()
    figs["reliability"] = fig

    fig, ax = plt.subplots(figsize=(4.5, 4))
    u, e = np.maximum(cols["u"], 1e-12), np.maximum(cols["e"], 1e-12)
    hb = ax.hexbin(u, e, xscale="log", yscale="log", gridsize=40, mincnt=1, bins="log", cmap="viridis")
    fig.colorbar(hb, ax=ax, label="atoms")
    lo, hi = min(u.min(), e.min()), max(u.max(), e.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set(xlabel="uncertainty u (eV/Å)", ylabel="|ΔF| (eV/Å)", title=f"{title} error vs uncertainty")
    figs["error_vs_uncertainty"] = fig

    fig, ax = plt.subplots(figsize=(4, 4))
    labels = e > np.percentile(e, AUROC_PERCENTILE)
    fpr, tpr = roc_points(cols["u"], labels)
    ax.plot(fpr, tpr, label=f"AUROC {auroc(cols['u'], labels):.3f}")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{title} ROC (top 10% errors)")
    ax.legend()
    figs["roc"] = fig
    for fig in figs.values():
        fig.tight_layout()
    return figs


def write_uq_plots(cols: Dict[str, np.ndarray], out_dir, prefix: str = "") -> Dict[str, Path]:
    """Write the three plots as ``<out_dir>/<prefix><name>.png``; returns the paths."""
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, fig in uq_figures(cols, title=prefix.rstrip("_")).items():
        paths[name] = out_dir / f"{prefix}{name}.png"
        fig.savefig(paths[name], dpi=110)
        plt.close(fig)
    return paths
