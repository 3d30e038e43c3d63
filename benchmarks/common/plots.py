"""Benchmark figures. Per method and set: the core's reliability, error-vs-uncertainty and ROC plots
(:func:`e2ip_plugins.plots.write_uq_plots`, after recalibration). Per backbone: the reliability curves of
all methods overlaid per set (:func:`e2ip_plugins.plots.reliability_curve`), and the data-efficiency sweep.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List

import numpy as np

from .backends import NAMES, SCORED

COLORS = {"e2ip": "tab:red", "eip": "tab:blue", "ensemble": "tab:green", "ensemble_iso": "tab:olive", "plain": "tab:gray"}


def method_plots(all_cols: Dict[str, Dict[str, Any]], out_dir: Path, backbone: str) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from e2ip_plugins.plots import reliability_curve, write_uq_plots

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    sets = [s for s in next(iter(all_cols.values())) if s != "val"] if all_cols else []
    for method, cols in all_cols.items():
        for s in sets:
            if cols[s]["recal"] is None:
                continue
            written += list(write_uq_plots(cols[s]["recal"], out_dir, prefix=f"{method}_{s}_").values())
    if not sets:
        return written
    fig, axes = plt.subplots(1, len(sets), figsize=(4 * len(sets), 4), squeeze=False)
    for ax, s in zip(axes[0], sets):
        for method, cols in all_cols.items():
            if cols[s]["recal"] is None:
                continue
            p, f = reliability_curve(cols[s]["recal"]["pit"])
            ax.plot(p, f, color=COLORS.get(method), label=NAMES.get(method, method))
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ax.set(title=f"{backbone}: {s} (recalibrated)", xlabel="nominal central-region probability",
               ylabel="observed fraction")
        ax.legend()
    fig.tight_layout()
    path = out_dir / "reliability_all_methods.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def sweep_plot(results: Dict[str, Any], out_path: Path) -> Path:
    """Test MAE, test NLL (recal) and OOD AUROC against the training-set size, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = results["sweep"]
    sizes = sorted(int(n) for n in sweep)
    ood = results["data"]["ood_sets"]
    panels = [("test", "forces_mae", "test force MAE (eV/Å)", "raw"), ("test", "forces_nll", "test NLL (recal)", "recal")]
    panels += [(s, "forces_auroc", f"{s} AUROC", "raw") for s in ood]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.4), squeeze=False)
    for ax, (s, key, title, kind) in zip(axes[0], panels):
        for method in SCORED:
            ys = []
            for n in sizes:
                m = sweep[str(n)].get(method)
                ys.append(m["sets"][s][kind].get(key, np.nan) if m else np.nan)
            if np.all(np.isnan(ys)):
                continue
            ax.plot(sizes, ys, "o-", color=COLORS[method], label=NAMES[method])
        ax.set(xscale="log", xlabel="training frames", title=title)
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(n) for n in sizes])
    axes[0][0].legend()
    fig.suptitle(f"{results['backbone']}: data efficiency")
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
