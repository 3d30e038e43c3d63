"""``mace_run_train_e2ip``: MACE's own training script with an evidential force-uncertainty head.

Accepts every ``mace_run_train`` flag and YAML key (same ``--config`` file), plus:

====================================  =====================================================
``--e2ip_head {e2ip,eip}``            head: equivariant NIW (default) or eIP baseline
``--e2ip_weight W``                   weight of the evidential loss term (default 1.0)
``--e2ip_reg λ``                      evidential regulariser weight (default 0.1)
``--e2ip_detach_mean``                stop the evidential loss' gradient into the forces
``--e2ip_residual_metric``            ``euclidean`` (r/σ_F, default) or ``sigma0``
``--e2ip_channels``, ``--e2ip_mlp``   head width (default 16, 32)
``--e2ip_quantile q``                 eIP quantile (default 0.5)
``--e2ip_force_rms σ_F``              override the force scale (default: from data)
``--e2ip_energy_noise``               add the energy-noise head (coherent energy uncertainty, issue 15)
``--e2ip_energy_noise_weight W``      weight of its coherent energy/force NLL term (default 0.001)
``--e2ip_energy_noise_hidden H``      hidden width of its MLP (default 16)
``--e2ip_energy_noise_detach B``      the head reads detached invariants: its term leaves the backbone alone (default True)
====================================  =====================================================

It then delegates to ``mace.cli.run_train.run(args)``, so MACE's data loading, EMA,
SWA/stage two, DDP, checkpoints, restarts, W&B and ``.model`` saving are MACE's.
For the duration of the run only (restored afterwards, also on error) it wraps the
names listed in :mod:`mace_ext.hooks`:

- ``configure_model``: the built MACE/ScaleShiftMACE gets the head
  (:func:`mace_ext.model.attach_e2ip_head`) before MACE builds the optimizer, EMA,
  SWA and DDP wrappers;
- ``get_loss_fn`` and ``get_swa``: the stage-one and stage-two losses become
  :class:`mace_ext.loss.E2IPLoss` (MACE's loss + ``e2ip_weight`` × mean per-atom
  evidential loss);
- ``get_params_options``: a parameter group ``e2ip_head`` (no weight decay, lr =
  ``--lr``) is added, and any trainable parameter missing from every group is an error;
- ``mace.tools.train.MACELoss``: evaluation also computes the UQ metrics
  (``forces_nll``, ``forces_spearman``, ...), which land in MACE's results file
  (``results/*_train.txt``, next to ``rmse_f``);
- ``mace.tools.train.valid_err_log``: the UQ metrics are logged on a second line after
  MACE's validation errors, and with ``--wandb`` into the same W&B step as MACE's
  ``<head>.valid_rmse_f``, under ``<head>_e2ip.valid_forces_*`` (a separate
  top-level key, so neither log overwrites the other).

- ``create_error_table`` (the final TRAIN/VALID/TEST tables after training, per
  stage): the table gets the UQ columns ``forces_nll``, ``forces_spearman``,
  ``forces_auroc``, ``forces_miscal_area``, ``forces_coverage_90`` and
  ``forces_sharpness`` (mean u, meV/Å) next to MACE's RMSE/MAE columns, computed in the
  same evaluation pass (``mace.tools.tables_utils.evaluate`` is wrapped to capture each
  set's metric dict). MACE writes no results file for these tables; e2ip writes one
  JSON line per set and stage (every MACE and UQ metric, full precision) to
  ``<results_dir>/<tag>_e2ip_final.txt``, and with ``--wandb`` logs
  ``<set>_final_forces_*`` next to MACE's ``<set>_final_rmse_f``;
- ``init_distributed`` and ``DDP`` (``--distributed --launcher torchrun --device cpu``):
  MACE 0.3.16 opens a process group only for cuda/xpu and passes
  ``device_ids=[local_rank]`` to DDP, which torch refuses for CPU modules; on CPU a gloo
  group is opened and ``device_ids`` dropped. σ_F is broadcast from rank 0 so every
  rank's loss uses the value DDP broadcasts into the model.

After MACE's run, ``<name>_compiled.model`` (and ``_stagetwo_compiled.model``; MACE
compiles with ``e3nn.util.jit.compile`` and silently skips the file on any error) is
checked: if it is missing, the compile is retried to log the reason as an error.

σ_F (the force scale of Σ₀ and the unit of the regulariser's residual): with MACE's
default ``--scaling rms_forces_scaling`` and one head, MACE's own RMS of the training
forces (``args.std``); otherwise the RMS of all force components in the training
set, computed once from the training dataset; 1.0 eV/Å if neither is available
(logged as a warning). ``--e2ip_force_rms`` overrides it.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

import e2ip_plugins  # noqa: F401  (allow-lists e3nn's constants before mace imports e3nn)
from e2ip_plugins._e3nn import o3

from . import hooks
from .model import HEAD_TYPES, E2IPConfigError, attach_e2ip_head, fit_novelty

DEFAULTS = dict(
    e2ip_head="e2ip", e2ip_weight=1.0, e2ip_reg=0.1, e2ip_detach_mean=False, e2ip_residual_metric="euclidean",
    e2ip_channels=16, e2ip_mlp=32, e2ip_quantile=0.5, e2ip_force_rms=None,
    e2ip_novelty=True, e2ip_novelty_mode="linear", e2ip_novelty_power=10.0, e2ip_novelty_quantile=0.99,
    e2ip_energy_noise=False, e2ip_energy_noise_weight=0.001, e2ip_energy_noise_hidden=16,
    e2ip_energy_noise_detach=True,
)

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


def _dist_world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _dist_rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _broadcast_float(value: float) -> float:
    """Rank 0's value on every rank (identity without a process group)."""
    if _dist_world() <= 1:
        return value
    dist = torch.distributed
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return float(t.item())


def _str2bool(value) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("yes", "true", "t", "y", "1"):
        return True
    if str(value).lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {value!r}")


def add_e2ip_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    group = parser.add_argument_group("e2ip evidential force uncertainty")
    group.add_argument("--e2ip_head", choices=HEAD_TYPES, default=DEFAULTS["e2ip_head"],
                       help="e2ip: equivariant NIW head (full 3x3 covariance); eip: per-component eIP baseline")
    group.add_argument("--e2ip_weight", type=float, default=DEFAULTS["e2ip_weight"],
                       help="weight of the mean per-atom evidential loss added to MACE's loss")
    group.add_argument("--e2ip_reg", type=float, default=DEFAULTS["e2ip_reg"],
                       help="evidential regulariser weight lambda")
    group.add_argument("--e2ip_detach_mean", type=_str2bool, nargs="?", const=True,
                       default=DEFAULTS["e2ip_detach_mean"],
                       help="stop the evidential loss' gradient into the forces (head learns the "
                            "uncertainty of a model trained by the usual loss)")
    group.add_argument("--e2ip_residual_metric", choices=("euclidean", "sigma0"),
                       default=DEFAULTS["e2ip_residual_metric"],
                       help="residual in the regulariser: |dF|/sigma_F (euclidean) or the Sigma0 metric")
    group.add_argument("--e2ip_channels", type=int, default=DEFAULTS["e2ip_channels"],
                       help="channels of the head's equivariant linear layer")
    group.add_argument("--e2ip_mlp", type=int, default=DEFAULTS["e2ip_mlp"], help="hidden width of the head's MLP")
    group.add_argument("--e2ip_quantile", type=float, default=DEFAULTS["e2ip_quantile"],
                       help="quantile q of the eip head")
    group.add_argument("--e2ip_force_rms", type=float, default=DEFAULTS["e2ip_force_rms"],
                       help="force scale sigma_F in eV/A (default: RMS of the training forces)")
    group.add_argument("--e2ip_novelty", type=_str2bool, nargs="?", const=True, default=DEFAULTS["e2ip_novelty"],
                       help="novelty-aware, calibrated epistemic level (e2ip head): 1/kappa <- 1/kappa + beta*s/s_ref "
                            "and Sigma0 <- c*Sigma0, s the per-element Mahalanobis distance of the node-feature "
                            "invariants to the training atoms; s_ref, beta and c are fitted on the train/valid sets "
                            "when the final checkpoints are loaded, before the .model files are saved")
    group.add_argument("--e2ip_novelty_mode", choices=("linear", "power"), default=DEFAULTS["e2ip_novelty_mode"],
                       help="evidence map: linear (default, U_epi linear in s/s_ref) or power (issue 6: "
                            "kappa * max(1, s/s_ref)^-p)")
    group.add_argument("--e2ip_novelty_power", type=float, default=DEFAULTS["e2ip_novelty_power"],
                       help="p of the power map (U_epi grows as (s/s_ref)^p beyond the reference)")
    group.add_argument("--e2ip_novelty_quantile", type=float, default=DEFAULTS["e2ip_novelty_quantile"],
                       help="s_ref = this quantile of s over the validation atoms of each element")
    group.add_argument("--e2ip_energy_noise", type=_str2bool, nargs="?", const=True,
                       default=DEFAULTS["e2ip_energy_noise"],
                       help="energy-noise head (e2ip head): per-atom length l_i and shared amplitude A = sum c_i, "
                            "trained by the coherent energy/force NLL; energy_uncertainty = "
                            "k*sqrt(A^2 + sum_i l_i^2 tr U_tot,i/3) (docs/energy_uncertainty.md)")
    group.add_argument("--e2ip_energy_noise_weight", type=float, default=DEFAULTS["e2ip_energy_noise_weight"],
                       help="weight of the coherent energy/force NLL term (per structure, / (1+3N)); default chosen "
                            "on validation MAE, docs/energy_uncertainty.md §10.3")
    group.add_argument("--e2ip_energy_noise_hidden", type=int, default=DEFAULTS["e2ip_energy_noise_hidden"],
                       help="hidden width of the energy-noise head's MLP")
    group.add_argument("--e2ip_energy_noise_detach", type=_str2bool, nargs="?", const=True,
                       default=DEFAULTS["e2ip_energy_noise_detach"],
                       help="the head reads detached invariants, so its loss term trains the head only and leaves "
                            "the backbone (force/energy MAE) untouched (default True; False trains through it)")
    return parser


def build_parser() -> argparse.ArgumentParser:
    """MACE's own ``mace_run_train`` parser plus the ``--e2ip_*`` options."""
    parser = hooks.resolve(hooks.get_hook("mace.tools", "build_default_arg_parser"))()
    parser.prog = "mace_run_train_e2ip"
    return add_e2ip_arguments(parser)


def _hidden_irreps(args) -> Optional[o3.Irreps]:
    if getattr(args, "num_channels", None) is not None and getattr(args, "max_L", None) is not None:
        return o3.Irreps((args.num_channels * o3.Irreps.spherical_harmonics(args.max_L)).sort().irreps.simplify())
    if getattr(args, "hidden_irreps", None) is not None:
        return o3.Irreps(args.hidden_irreps)
    if getattr(args, "max_L", None) is not None:
        return o3.Irreps.spherical_harmonics(args.max_L)
    return o3.Irreps("128x0e + 128x1o")  # MACE's default


def check_e2ip_args(args) -> None:
    """Fail at start-up (before any data is read) on a backbone the head cannot read."""
    for key, value in DEFAULTS.items():
        if not hasattr(args, key):
            setattr(args, key, value)
    if args.e2ip_head not in HEAD_TYPES:
        raise E2IPConfigError(f"--e2ip_head must be one of {HEAD_TYPES}, got {args.e2ip_head!r}")
    if args.e2ip_weight < 0 or args.e2ip_reg < 0:
        raise E2IPConfigError("--e2ip_weight and --e2ip_reg must be >= 0")
    if args.e2ip_energy_noise and args.e2ip_head != "e2ip":
        raise E2IPConfigError("--e2ip_energy_noise needs --e2ip_head e2ip (its local force block is the e2ip "
                              "head's aleatoric covariance)")
    if args.e2ip_energy_noise and not args.e2ip_energy_noise_weight > 0:
        raise E2IPConfigError(f"--e2ip_energy_noise_weight must be > 0, got {args.e2ip_energy_noise_weight}")
    if not 0.0 < args.e2ip_quantile < 1.0:
        raise E2IPConfigError(f"--e2ip_quantile must be in (0, 1), got {args.e2ip_quantile}")
    if args.e2ip_force_rms is not None and not args.e2ip_force_rms > 0:
        raise E2IPConfigError(f"--e2ip_force_rms must be > 0, got {args.e2ip_force_rms}")
    if getattr(args, "model", "MACE") not in ("MACE", "ScaleShiftMACE"):
        raise E2IPConfigError(
            f"mace_run_train_e2ip supports --model MACE or ScaleShiftMACE, got --model {args.model}"
        )
    if getattr(args, "foundation_model", None) is not None:
        return  # the foundation model fixes the backbone; attach_e2ip_head checks it
    if args.num_interactions < 2:
        raise E2IPConfigError(
            f"The e2ip head needs --num_interactions >= 2 (got {args.num_interactions}): MACE makes the last "
            "interaction's node features scalar-only (0e), and the head reads the last block that still "
            "carries l > 0 features to build an equivariant 3x3 covariance."
        )
    irreps = _hidden_irreps(args)
    if irreps is not None and not any(ir.l > 0 for _, ir in irreps):
        raise E2IPConfigError(
            f"The e2ip head needs hidden irreps with l > 0, got '{irreps}'. Use --max_L 1 or 2 "
            "(e.g. --num_channels 32 --max_L 1) or --hidden_irreps '32x0e + 32x1o'."
        )


def _single_float(value) -> Optional[float]:
    try:
        import numpy as np

        arr = np.asarray(value, dtype=float).reshape(-1)
    except Exception:  # pylint: disable=broad-except
        return None
    if arr.size == 0 or not np.all(np.isfinite(arr)) or not np.allclose(arr, arr[0]) or arr[0] <= 0:
        return None
    return float(arr[0])


def training_force_rms(args, train_loader) -> float:
    """σ_F: see the module docstring."""
    if args.e2ip_force_rms is not None:
        return float(args.e2ip_force_rms)
    if getattr(args, "scaling", None) == "rms_forces_scaling":
        value = _single_float(getattr(args, "std", None))
        if value is not None:
            logging.info(f"e2ip: sigma_F = RMS of the training forces (MACE's rms_forces_scaling) = {value:.4g} eV/A")
            return value
    try:
        total, count = 0.0, 0
        for item in train_loader.dataset:
            f = item["forces"] if not hasattr(item, "forces") else item.forces
            if f is None:
                continue
            total += float((f.double() ** 2).sum())
            count += f.numel()
        if count > 0 and total > 0:
            value = math.sqrt(total / count)
            logging.info(f"e2ip: sigma_F = RMS of the training forces = {value:.4g} eV/A")
            return value
    except Exception as exc:  # pylint: disable=broad-except
        logging.warning(f"e2ip: could not compute the training force RMS ({exc})")
    logging.warning("e2ip: no training forces found; using sigma_F = 1.0 eV/A")
    return 1.0


class E2IPRun:
    """Holds one run's settings and the wrappers installed into MACE for its duration."""

    def __init__(self, args):
        self.args = args
        self.losses: List = []
        self.sigma_f: Optional[float] = None
        self.model = None
        self.train_loader = None
        self.valid_loaders = None  # set when MACE's training loop starts: fit_novelty runs after it
        self.rank = 0
        self.final_tables = 0
        self.started = time.time()

    # --- wrappers -------------------------------------------------------------------
    def _make_loss(self, base):
        from .loss import E2IPLoss

        a = self.args
        loss = E2IPLoss(
            base, weight=a.e2ip_weight, reg_weight=a.e2ip_reg, sigma_f=self.sigma_f or 1.0,
            detach_mean=a.e2ip_detach_mean, residual_metric=a.e2ip_residual_metric, quantile=a.e2ip_quantile,
            energy_noise_weight=a.e2ip_energy_noise_weight if a.e2ip_energy_noise else 0.0,
        )
        self.losses.append(loss)
        return loss

    def wrap_get_loss_fn(self, original):
        def get_loss_fn(*args, **kwargs):
            return self._make_loss(original(*args, **kwargs))

        return get_loss_fn

    def wrap_get_swa(self, original):
        def get_swa(*args, **kwargs):
            swa, swas = original(*args, **kwargs)
            if swa is not None:
                swa.loss_fn = self._make_loss(swa.loss_fn)
                logging.info(f"e2ip: stage-two loss: {swa.loss_fn}")
            return swa, swas

        return get_swa

    def wrap_configure_model(self, original):
        def configure_model(args, train_loader, *rest, **kwargs):
            model, output_args = original(args, train_loader, *rest, **kwargs)
            a = self.args
            self.sigma_f = training_force_rms(a, train_loader)
            if _dist_world() > 1:  # MACE's rms_forces_scaling is computed on each rank's shard
                self.sigma_f = _broadcast_float(self.sigma_f)
                logging.info(f"e2ip: sigma_F = {self.sigma_f:.4g} eV/A (rank 0's value, broadcast)")
            for loss in self.losses:
                loss.sigma_f = self.sigma_f
            model = attach_e2ip_head(
                model, head=a.e2ip_head, force_rms=self.sigma_f, num_channels=a.e2ip_channels,
                mlp_hidden=a.e2ip_mlp, quantile=a.e2ip_quantile,
                novelty={"enabled": a.e2ip_novelty, "mode": a.e2ip_novelty_mode, "power": a.e2ip_novelty_power,
                         "quantile": a.e2ip_novelty_quantile},
                energy_noise={"enabled": a.e2ip_energy_noise, "hidden": a.e2ip_energy_noise_hidden,
                              "detach_features": a.e2ip_energy_noise_detach}
                if a.e2ip_energy_noise else None,
            )
            self.model = model
            self.train_loader = train_loader
            return model, output_args

        return configure_model

    def wrap_train(self, original):
        def train(*args, **kwargs):
            self.valid_loaders = kwargs.get("valid_loaders")
            return original(*args, **kwargs)

        return train

    def wrap_checkpoint_handler(self, original):
        run = self

        class CheckpointHandler(original):  # pylint: disable=too-few-public-methods
            """MACE's handler; after training, loading the final checkpoint also fits the novelty buffers."""

            def load_latest(self, state, *args, **kwargs):
                epoch = super().load_latest(state, *args, **kwargs)
                if epoch is not None and run.valid_loaders is not None and run.train_loader is not None:
                    fit_novelty(state.model, run.train_loader, list(run.valid_loaders.values()))
                return epoch

        return CheckpointHandler

    def wrap_get_params_options(self, original):
        def get_params_options(args, model, *rest, **kwargs):
            options = original(args, model, *rest, **kwargs)
            groups = options["params"]
            for g in groups:  # MACE passes generators; materialise them once
                g["params"] = list(g["params"])
            head = getattr(model, "e2ip_head", None)
            if head is None:
                raise E2IPConfigError("e2ip: the model reaching the optimizer has no e2ip head")
            seen = {id(p) for g in groups for p in g["params"]}
            extra = getattr(model, "e2ip_energy_noise", None)
            head_params = [p for m in (head, extra) if m is not None for p in m.parameters() if id(p) not in seen]
            if head_params:
                groups.append({"name": "e2ip_head", "params": head_params, "weight_decay": 0.0, "lr": args.lr})
                seen.update(id(p) for p in head_params)
            missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
            if any(n.startswith(("e2ip_head.", "e2ip_energy_noise.")) for n in missing):
                raise E2IPConfigError(f"e2ip: head parameters missing from the optimizer: {missing}")
            if missing:
                logging.warning(f"e2ip: trainable parameters in no optimizer group (MACE's choice): {missing}")
            logging.info(f"e2ip: optimizer group 'e2ip_head' with {sum(p.numel() for p in head_params)} parameters")
            return options

        return get_params_options

    def wrap_maceloss(self, original):
        from .loss import E2IPMACELoss

        quantile = self.args.e2ip_quantile

        class _Metric(E2IPMACELoss):
            def __init__(self, loss_fn):
                super().__init__(loss_fn=loss_fn, quantile=quantile)

        _Metric.__name__ = "E2IPMACELoss"
        assert issubclass(_Metric, original)
        return _Metric

    def wrap_valid_err_log(self, original):
        def valid_err_log(valid_loss, eval_metrics, logger, log_errors, epoch=None, valid_loader_name="Default"):
            original(valid_loss, eval_metrics, logger, log_errors, epoch, valid_loader_name)
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
            if getattr(self.args, "wandb", False) and epoch is not None:
                try:
                    import wandb

                    if wandb.run is not None:  # merged into MACE's next wandb.log for this epoch
                        wandb.log({f"{valid_loader_name}_e2ip": {"epoch": epoch, **{f"valid_{k}": v for k, v in uq.items()}}},
                                  commit=False)
                except Exception as exc:  # pylint: disable=broad-except
                    logging.warning(f"e2ip: W&B logging of UQ metrics failed: {exc}")

        return valid_err_log

    def wrap_init_distributed(self, original):
        def init_distributed(args):
            rank, local_rank, world_size = original(args)
            dist = torch.distributed
            if args.distributed and world_size > 1 and not dist.is_initialized() and str(args.device) == "cpu":
                dist.init_process_group(backend="gloo", init_method="env://", rank=rank, world_size=world_size)
            self.rank = rank
            return rank, local_rank, world_size

        return init_distributed

    def wrap_ddp(self, original):
        class DDP(original):  # a subclass, so isinstance(..., DistributedDataParallel) still holds
            def __init__(self, module, device_ids=None, *args, **kwargs):
                if device_ids is not None and all(p.device.type == "cpu" for p in module.parameters()):
                    device_ids = None  # torch: device_ids only for single-device GPU modules
                super().__init__(module, device_ids, *args, **kwargs)

        return DDP

    def _final_results(self, table, metrics_by_name: Dict[str, Dict[str, Any]]):
        """Add the UQ columns to a final error table; W&B and results-file lines (rank 0)."""
        names = [row[0] for row in table.rows]
        if table.field_names and any(metrics_by_name.get(n, {}).get("forces_nll") is not None for n in names):
            for key, header, factor, fmt in FINAL_TABLE_COLUMNS:
                column = []
                for n in names:
                    value = metrics_by_name.get(n, {}).get(key)
                    column.append(fmt.format(factor * value) if isinstance(value, float) else "-")
                table.add_column(header, column)
        if self.rank != 0 or not metrics_by_name:
            return table
        if any(n.startswith("train") for n in metrics_by_name) or self.final_tables == 0:
            self.final_tables += 1
        import numpy as np  # pylint: disable=import-outside-toplevel

        get_tag = hooks.resolve(hooks.get_hook("mace.tools", "get_tag"))
        metrics_logger = hooks.resolve(hooks.get_hook("mace.tools", "MetricsLogger"))
        a = self.args
        results_dir = getattr(a, "results_dir", None) or os.path.join(a.work_dir, "results")
        logger = metrics_logger(directory=results_dir, tag=get_tag(name=a.name, seed=a.seed) + "_e2ip_final")
        for name, metrics in metrics_by_name.items():
            clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, np.floating)) and k != "time"}
            logger.log({"mode": "final", "stage": self.final_tables, "set": name, **clean})
        if getattr(a, "wandb", False):
            try:
                import wandb  # pylint: disable=import-outside-toplevel

                if wandb.run is not None:
                    wandb.log({f"{name}_final_{key}": m[key] for name, m in metrics_by_name.items()
                               for key, *_ in FINAL_TABLE_COLUMNS if isinstance(m.get(key), float)})
            except Exception as exc:  # pylint: disable=broad-except
                logging.warning(f"e2ip: W&B logging of the final UQ metrics failed: {exc}")
        return table

    def wrap_create_error_table(self, original):
        def create_error_table(table_type, all_data_loaders, model, loss_fn, output_args, log_wandb, device,
                               distributed=False, skip_heads=None):
            by_loader = {id(loader): name for name, loader in all_data_loaders.items()}
            captured: Dict[str, Dict[str, Any]] = {}

            def wrap_evaluate(evaluate):
                def capture(*args, **kwargs):
                    loss, metrics = evaluate(*args, **kwargs)
                    loader = kwargs.get("data_loader", args[2] if len(args) > 2 else None)
                    captured[by_loader.get(id(loader), f"set{len(captured)}")] = dict(metrics)
                    return loss, metrics

                return capture

            original_evaluate = hooks.resolve(hooks.get_hook("mace.tools.tables_utils", "evaluate"))
            with hooks.patched("mace.tools.tables_utils", "evaluate", wrap_evaluate(original_evaluate)):
                table = original(table_type, all_data_loaders, model, loss_fn, output_args, log_wandb, device,
                                 distributed=distributed, skip_heads=skip_heads)
            return self._final_results(table, captured)

        return create_error_table

    def check_compiled_models(self) -> None:
        """Report (rank 0) a ``<name>[_stagetwo].model`` written without its ``_compiled.model``."""
        a = self.args
        if self.rank != 0 or getattr(a, "model_dir", None) is None:
            return
        for suffix in ("", "_stagetwo"):
            eager = Path(a.model_dir) / f"{a.name}{suffix}.model"
            compiled = Path(a.model_dir) / f"{a.name}{suffix}_compiled.model"
            if not eager.exists() or eager.stat().st_mtime < self.started:
                continue
            if compiled.exists() and compiled.stat().st_mtime >= self.started:
                logging.info(f"e2ip: TorchScript model with the covariance outputs: {compiled}")
                continue
            try:
                from e3nn.util import jit  # pylint: disable=import-outside-toplevel

                jit.compile(copy.deepcopy(torch.load(eager, map_location="cpu", weights_only=False)))
                reason = "compiling it now succeeds; the failure was in MACE's export step"
            except Exception as exc:  # pylint: disable=broad-except
                reason = f"{type(exc).__name__}: {exc}"
            logging.error(
                f"e2ip: MACE did not write {compiled} (it skips the TorchScript export silently on any error). "
                f"Reason: {reason}. The eager model {eager} is complete."
            )

    @contextlib.contextmanager
    def installed(self):
        wrappers = [
            ("mace.cli.run_train", "get_loss_fn", self.wrap_get_loss_fn),
            ("mace.cli.run_train", "get_swa", self.wrap_get_swa),
            ("mace.cli.run_train", "configure_model", self.wrap_configure_model),
            ("mace.cli.run_train", "get_params_options", self.wrap_get_params_options),
            ("mace.tools.train", "MACELoss", self.wrap_maceloss),
            ("mace.tools.train", "valid_err_log", self.wrap_valid_err_log),
            ("mace.cli.run_train", "create_error_table", self.wrap_create_error_table),
            ("mace.cli.run_train", "init_distributed", self.wrap_init_distributed),
            ("mace.cli.run_train", "DDP", self.wrap_ddp),
            ("mace.tools", "train", self.wrap_train),
            ("mace.tools", "CheckpointHandler", self.wrap_checkpoint_handler),
        ]
        with contextlib.ExitStack() as stack:
            for module, attr, make in wrappers:
                original = hooks.resolve(hooks.get_hook(module, attr))
                stack.enter_context(hooks.patched(module, attr, make(original)))
            yield self


def run(args) -> None:
    """Train with MACE's ``run(args)`` and the e2ip wrappers installed (see module docstring)."""
    hooks.verify_hooks()
    check_e2ip_args(args)
    mace_run = hooks.resolve(hooks.get_hook("mace.cli.run_train", "run"))
    e2ip_run = E2IPRun(args)
    with e2ip_run.installed():
        mace_run(args)
    e2ip_run.check_compiled_models()


def main(argv: Optional[List[str]] = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        hooks.verify_hooks()
        check_e2ip_args(args)
    except (E2IPConfigError, hooks.MACEHookError) as exc:
        parser.error(str(exc))
    run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
