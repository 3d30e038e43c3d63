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

The final error tables (``create_error_table``) stay MACE's (no UQ columns).

σ_F (the force scale of Σ₀ and the unit of the regulariser's residual): with MACE's
default ``--scaling rms_forces_scaling`` and one head, MACE's own RMS of the training
forces (``args.std``); otherwise the RMS of all force components in the training
set, computed once from the training dataset; 1.0 eV/Å if neither is available
(logged as a warning). ``--e2ip_force_rms`` overrides it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import sys
from typing import List, Optional

import e2ip_plugins  # noqa: F401  (allow-lists e3nn's constants before mace imports e3nn)
from e2ip_plugins._e3nn import o3

from . import hooks
from .model import HEAD_TYPES, E2IPConfigError, attach_e2ip_head

DEFAULTS = dict(
    e2ip_head="e2ip", e2ip_weight=1.0, e2ip_reg=0.1, e2ip_detach_mean=False, e2ip_residual_metric="euclidean",
    e2ip_channels=16, e2ip_mlp=32, e2ip_quantile=0.5, e2ip_force_rms=None,
)

UQ_LOG_KEYS = (
    "forces_nll", "forces_spearman", "forces_auroc", "forces_coverage_50", "forces_coverage_90",
    "forces_miscal_area", "forces_ence", "forces_sharpness",
)


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

    # --- wrappers -------------------------------------------------------------------
    def _make_loss(self, base):
        from .loss import E2IPLoss

        a = self.args
        loss = E2IPLoss(
            base, weight=a.e2ip_weight, reg_weight=a.e2ip_reg, sigma_f=self.sigma_f or 1.0,
            detach_mean=a.e2ip_detach_mean, residual_metric=a.e2ip_residual_metric, quantile=a.e2ip_quantile,
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
            for loss in self.losses:
                loss.sigma_f = self.sigma_f
            model = attach_e2ip_head(
                model, head=a.e2ip_head, force_rms=self.sigma_f, num_channels=a.e2ip_channels,
                mlp_hidden=a.e2ip_mlp, quantile=a.e2ip_quantile,
            )
            self.model = model
            return model, output_args

        return configure_model

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
            head_params = [p for p in head.parameters() if id(p) not in seen]
            if head_params:
                groups.append({"name": "e2ip_head", "params": head_params, "weight_decay": 0.0, "lr": args.lr})
                seen.update(id(p) for p in head_params)
            missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
            if any(n.startswith("e2ip_head.") for n in missing):
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

    @contextlib.contextmanager
    def installed(self):
        wrappers = [
            ("mace.cli.run_train", "get_loss_fn", self.wrap_get_loss_fn),
            ("mace.cli.run_train", "get_swa", self.wrap_get_swa),
            ("mace.cli.run_train", "configure_model", self.wrap_configure_model),
            ("mace.cli.run_train", "get_params_options", self.wrap_get_params_options),
            ("mace.tools.train", "MACELoss", self.wrap_maceloss),
            ("mace.tools.train", "valid_err_log", self.wrap_valid_err_log),
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
    with E2IPRun(args).installed():
        mace_run(args)


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
