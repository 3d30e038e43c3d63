"""The UQ metrics in MACE's training output: a second line after each validation log (and W&B), the UQ
columns of the final TRAIN/VALID/TEST error tables and their results file (rules in :mod:`mace_ext.cli`)."""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional

from . import hooks

UQ_LOG_KEYS = (
    "forces_nll", "forces_spearman", "forces_auroc", "forces_coverage_50", "forces_coverage_90",
    "forces_miscal_area", "forces_ence", "forces_sharpness",
)


#: UQ columns of the final error tables: (metric key, column header, factor, format)
FINAL_TABLE_COLUMNS = (
    ("forces_nll", "forces_nll", 1.0, "{:8.4f}"),
    ("forces_spearman", "forces_spearman", 1.0, "{:8.4f}"),
    ("forces_auroc", "forces_auroc", 1.0, "{:8.4f}"),
    ("forces_miscal_area", "forces_miscal_area", 1.0, "{:8.4f}"),
    ("forces_coverage_90", "forces_coverage_90", 1.0, "{:8.4f}"),
    ("forces_sharpness", "forces_sharpness / meV / A", 1e3, "{:8.2f}"),
)


def log_valid_uq(eval_metrics: Dict[str, Any], epoch: Optional[int], valid_loader_name: str, use_wandb: bool) -> None:
    """Log the UQ metrics of one validation evaluation after MACE's line, and into MACE's W&B step."""
    uq = {k: eval_metrics[k] for k in UQ_LOG_KEYS if k in eval_metrics}
    if not uq:
        return
    phrase = "Initial" if epoch is None else f"Epoch {epoch}"
    logging.info(
        f"{phrase}: head: {valid_loader_name}, e2ip: NLL={uq.get('forces_nll', float('nan')):.4f}, "
        f"Spearman={uq.get('forces_spearman', float('nan')):.3f}, "
        f"AUROC={uq.get('forces_auroc', float('nan')):.3f}, "
        f"cov90={uq.get('forces_coverage_90', float('nan')):.3f}, "
        f"miscal={uq.get('forces_miscal_area', float('nan')):.3f}, "
        f"u={1e3 * uq.get('forces_sharpness', float('nan')):.2f} meV / A"
    )
    if use_wandb and epoch is not None:
        try:
            import wandb

            if wandb.run is not None:  # merged into MACE's next wandb.log for this epoch
                wandb.log({f"{valid_loader_name}_e2ip": {"epoch": epoch, **{f"valid_{k}": v for k, v in uq.items()}}},
                          commit=False)
        except Exception as exc:  # pylint: disable=broad-except
            logging.warning(f"e2ip: W&B logging of UQ metrics failed: {exc}")


def add_final_columns(table, metrics_by_name: Dict[str, Dict[str, Any]]) -> None:
    """Add the UQ columns (:data:`FINAL_TABLE_COLUMNS`) to a final error table whose sets have them."""
    names = [row[0] for row in table.rows]
    if table.field_names and any(metrics_by_name.get(n, {}).get("forces_nll") is not None for n in names):
        for key, header, factor, fmt in FINAL_TABLE_COLUMNS:
            column = []
            for n in names:
                value = metrics_by_name.get(n, {}).get(key)
                column.append(fmt.format(factor * value) if isinstance(value, float) else "-")
            table.add_column(header, column)


def write_final_results(args, stage: int, metrics_by_name: Dict[str, Dict[str, Any]]) -> None:
    """One JSON line per set in ``<results_dir>/<tag>_e2ip_final.txt``; with ``--wandb``, ``<set>_final_forces_*``."""
    import numpy as np  # pylint: disable=import-outside-toplevel

    get_tag = hooks.resolve(hooks.get_hook("mace.tools", "get_tag"))
    metrics_logger = hooks.resolve(hooks.get_hook("mace.tools", "MetricsLogger"))
    results_dir = getattr(args, "results_dir", None) or os.path.join(args.work_dir, "results")
    logger = metrics_logger(directory=results_dir, tag=get_tag(name=args.name, seed=args.seed) + "_e2ip_final")
    for name, metrics in metrics_by_name.items():
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, np.floating)) and k != "time"}
        logger.log({"mode": "final", "stage": stage, "set": name, **clean})
    if getattr(args, "wandb", False):
        try:
            import wandb  # pylint: disable=import-outside-toplevel

            if wandb.run is not None:
                wandb.log({f"{name}_final_{key}": m[key] for name, m in metrics_by_name.items()
                           for key, *_ in FINAL_TABLE_COLUMNS if isinstance(m.get(key), float)})
        except Exception as exc:  # pylint: disable=broad-except
            logging.warning(f"e2ip: W&B logging of the final UQ metrics failed: {exc}")
