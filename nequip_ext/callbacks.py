"""Lightning callbacks for ``nequip-train`` (DESIGN §4).

:class:`UQPlotsCallback` turns the per-atom columns that :func:`nequip_ext.UQMetrics` already
accumulates for every test dataset into the three UQ plots of :mod:`e2ip_plugins.plots`
(reliability curve, log-log error-vs-uncertainty hexbin, ROC curve), written as PNG files and,
when the trainer has a :class:`~lightning.pytorch.loggers.WandbLogger`, logged to W&B as images
under ``test{idx}/reliability``, ``test{idx}/error_vs_uncertainty`` and ``test{idx}/roc``::

    trainer:
      callbacks:
        - _target_: nequip_ext.UQPlotsCallback
          out_dir: ${hydra:runtime.output_dir}/uq_plots

Where the atoms come from: the ``"cat"`` states of the first
:class:`~nequip_ext.train.UQScalarMetric` in each test ``MetricsManager`` (every UQ metric of
one manager sees the same atoms). Lightning runs callback ``on_test_epoch_end`` hooks before
the module's, i.e. before NequIP computes and resets those metrics, so the states are complete.
Under DDP they are gathered across ranks with torchmetrics' own state sync (a collective, run on
every rank); only global rank zero writes files and logs. The plots therefore show exactly the
atoms behind the logged ``test{idx}_epoch/forces_*`` numbers, identical for 1 or N processes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics.utilities import dim_zero_cat

from e2ip_plugins.metrics import COLUMNS

from .train import UQScalarMetric

PLOT_NAMES = ("reliability", "error_vs_uncertainty", "roc")


def find_uq_metric(metrics_manager) -> Optional[UQScalarMetric]:
    """The first :class:`UQScalarMetric` held by a NequIP ``MetricsManager`` (``None`` if it has none)."""
    for module in metrics_manager.modules():
        if isinstance(module, UQScalarMetric):
            return module
    return None


def gathered_columns(metric: UQScalarMetric) -> Dict[str, np.ndarray]:
    """Per-atom columns of a ``UQScalarMetric`` over all ranks (a collective under DDP: call on every rank).

    The local states are restored afterwards, so NequIP's own ``compute``/``reset`` are unaffected.
    """
    with metric.sync_context(should_sync=True, should_unsync=True):
        cols = {}
        for c in COLUMNS:
            state = getattr(metric, c)
            if isinstance(state, list) and len(state) == 0:
                cols[c] = np.zeros(0)
            else:
                cols[c] = dim_zero_cat(state).detach().to("cpu", torch.float64).numpy().copy()
    return cols


class UQPlotsCallback(Callback):
    """Write (and log to W&B) the UQ plots of every test dataset at the end of a ``test`` run.

    Args:
        out_dir: folder for ``test{idx}_{reliability,error_vs_uncertainty,roc}.png``; default
            ``<trainer.log_dir>/uq_plots`` (the CSV logger's version folder, the W&B logger's
            ``save_dir``, or the trainer's ``default_root_dir`` without a logger)
        log_wandb: log the images to every ``WandbLogger`` of the trainer (default ``True``)
        save_columns: also write the gathered per-atom columns (``err_abs, err_sq, e, u, sigma,
            nll, pit``; see :mod:`e2ip_plugins.metrics`) as ``test{idx}_columns.npz``
        dataset_names: optional titles for the plots, one per test dataset (file names and W&B
            keys always use ``test{idx}``)
    """

    def __init__(
        self,
        out_dir: Optional[str] = None,
        log_wandb: bool = True,
        save_columns: bool = True,
        dataset_names: Optional[List[str]] = None,
    ):
        super().__init__()
        self.out_dir = out_dir
        self.log_wandb = bool(log_wandb)
        self.save_columns = bool(save_columns)
        self.dataset_names = list(dataset_names) if dataset_names is not None else None
        # {"test0": {"reliability": Path, ...}, ...} of the last test run (rank zero only)
        self.written: Dict[str, Dict[str, Path]] = {}

    def _resolve_out_dir(self, trainer) -> Path:
        if self.out_dir is not None:
            return Path(self.out_dir)
        # trainer.log_dir broadcasts from rank zero: evaluated on every rank
        return Path(trainer.log_dir or trainer.default_root_dir) / "uq_plots"

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        test_metrics = getattr(pl_module, "test_metrics", None)
        if test_metrics is None:
            return
        out_dir = self._resolve_out_dir(trainer)
        self.written = {}
        for idx, manager in enumerate(test_metrics):
            metric = find_uq_metric(manager)
            if metric is None:
                rank_zero_warn(
                    f"UQPlotsCallback: test{idx} metrics hold no nequip_ext.UQScalarMetric (use "
                    "`test_metrics: {_target_: nequip_ext.UQMetrics}`); no UQ plots for this dataset."
                )
                continue
            cols = gathered_columns(metric)  # collective: every rank
            if not trainer.is_global_zero:
                continue
            tag = f"test{idx}"
            if len(cols["e"]) == 0:
                rank_zero_warn(f"UQPlotsCallback: no atoms seen for {tag}; no UQ plots.")
                continue
            self.written[tag] = self._write(cols, out_dir, tag, self._title(idx))
            if self.save_columns:
                np.savez(out_dir / f"{tag}_columns.npz", **cols)
            if self.log_wandb:
                self._log_wandb(trainer, tag, self.written[tag])

    def _title(self, idx: int) -> str:
        if self.dataset_names is not None and idx < len(self.dataset_names):
            return str(self.dataset_names[idx])
        return f"test{idx}"

    @staticmethod
    def _write(cols: Dict[str, np.ndarray], out_dir: Path, tag: str, title: str) -> Dict[str, Path]:
        import matplotlib.pyplot as plt

        from e2ip_plugins.plots import uq_figures

        out_dir.mkdir(parents=True, exist_ok=True)
        paths = {}
        for name, fig in uq_figures(cols, title=title).items():
            paths[name] = out_dir / f"{tag}_{name}.png"
            fig.savefig(paths[name], dpi=110)
            plt.close(fig)
        return paths

    @staticmethod
    def _log_wandb(trainer, tag: str, paths: Dict[str, Path]) -> None:
        try:
            from lightning.pytorch.loggers import WandbLogger
        except ImportError:  # pragma: no cover - lightning always ships the class
            return
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers:
            return
        import wandb

        for lg in loggers:
            payload = {f"{tag}/{name}": wandb.Image(str(p)) for name, p in paths.items()}
            payload["trainer/global_step"] = trainer.global_step
            lg.experiment.log(payload)
