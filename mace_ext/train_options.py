"""The ``--e2ip_*`` options of ``mace_run_train_e2ip`` (table in :mod:`mace_ext.cli`): defaults, MACE's
parser extended with them, and the start-up check of the backbone the head must read."""

from __future__ import annotations

import argparse
import logging
from typing import Iterable, Optional

import e2ip_plugins  # noqa: F401  (allow-lists e3nn's constants before mace imports e3nn)
from e2ip_plugins._e3nn import o3

from . import hooks
from .errors import E2IPConfigError
from .outputs import HEAD_TYPES

DEFAULTS = dict(
    e2ip_head="e2ip", e2ip_weight=1.0, e2ip_reg=0.1, e2ip_detach_mean=False, e2ip_residual_metric="euclidean",
    e2ip_channels=16, e2ip_mlp=32, e2ip_quantile=0.5, e2ip_force_rms=None,
    e2ip_novelty=True, e2ip_novelty_mode="linear", e2ip_novelty_power=10.0, e2ip_novelty_quantile=0.99,
    e2ip_energy_noise=False, e2ip_energy_noise_weight=0.001, e2ip_energy_noise_hidden=16,
    e2ip_energy_noise_detach=True, e2ip_geometric=False,
    e2ip_committee=0, e2ip_committee_channels=8, e2ip_committee_weight=0.01, e2ip_committee_nll_weight=0.0,
    e2ip_committee_detach=True, e2ip_committee_level="scaled",
)


def _str2bool(value) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("yes", "true", "t", "y", "1"):
        return True
    if str(value).lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {value!r}")


class _Only:  # pylint: disable=too-few-public-methods
    """An argument group that adds only the options named in ``names`` (all when None)."""

    def __init__(self, group, names: Optional[Iterable[str]]):
        self.group, self.names = group, None if names is None else set(names)

    def add_argument(self, flag: str, **kwargs) -> None:
        if self.names is None or flag.lstrip("-") in self.names:
            self.group.add_argument(flag, **kwargs)


def add_e2ip_arguments(parser: argparse.ArgumentParser, only: Optional[Iterable[str]] = None) -> argparse.ArgumentParser:
    """Add the ``--e2ip_*`` options (only those named in ``only``, e.g. ``("e2ip_reg",)``, when given)."""
    group = _Only(parser.add_argument_group("e2ip evidential force uncertainty"), only)
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
    group.add_argument("--e2ip_geometric", type=_str2bool, nargs="?", const=True, default=DEFAULTS["e2ip_geometric"],
                       help="the head reads l = 1, 2 features built from the edges and the last product block's "
                            "scalars (issue 28, docs/scalar_backbones.md) instead of the backbone's l > 0 features; "
                            "always on for scalar-only backbones (--max_L 0)")
    group.add_argument("--e2ip_committee", type=int, default=DEFAULTS["e2ip_committee"],
                       help="M >= 2 adds the in-model force committee (issue 26, docs/committee.md; configs/mace/e2ip.yaml sets 4): M members "
                            "passing their own messages on the head's features; output e2ip_committee_forces")
    group.add_argument("--e2ip_committee_channels", type=int, default=DEFAULTS["e2ip_committee_channels"],
                       help="K scalar and K vector channels per committee member")
    group.add_argument("--e2ip_committee_weight", type=float, default=DEFAULTS["e2ip_committee_weight"],
                       help="weight of the members' loss (mean squared error / 3σ_F² per atom, plus the NLL term)")
    group.add_argument("--e2ip_committee_nll_weight", type=float, default=DEFAULTS["e2ip_committee_nll_weight"],
                       help="weight of the committee's 3×3 Gaussian NLL inside the members' loss (0: MSE alone)")
    group.add_argument("--e2ip_committee_detach", type=_str2bool, nargs="?", const=True,
                       default=DEFAULTS["e2ip_committee_detach"],
                       help="the members' loss trains only the members (their input is cut from the backbone)")
    group.add_argument("--e2ip_committee_level", choices=COMMITTEE_LEVELS, default=DEFAULTS["e2ip_committee_level"],
                       help="the deployed epistemic level with a committee: 'scaled' (default, chosen by the rule of "
                            "docs/committee.md): the head's U_epi times the members' local spread over its validation "
                            "mean; 'spread': c·(tr Ĉ/3)·I of the members alone")
    return parser


COMMITTEE_LEVELS = ("scaled", "spread")


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
    if args.e2ip_committee and (args.e2ip_committee < 2 or args.e2ip_committee_channels < 1
                                or args.e2ip_committee_weight <= 0 or args.e2ip_committee_nll_weight < 0):
        raise E2IPConfigError(
            f"--e2ip_committee needs M >= 2 members (got {args.e2ip_committee}), --e2ip_committee_channels >= 1 "
            f"(got {args.e2ip_committee_channels}), --e2ip_committee_weight > 0 (got {args.e2ip_committee_weight}) "
            f"and --e2ip_committee_nll_weight >= 0 (got {args.e2ip_committee_nll_weight}); --e2ip_committee 0 turns it off")
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
    irreps = _hidden_irreps(args)
    scalar = args.num_interactions < 2 or (irreps is not None and not any(ir.l > 0 for _, ir in irreps))
    if scalar and not args.e2ip_geometric:
        logging.info(
            f"e2ip: no product block will carry l > 0 features (hidden irreps '{irreps}', num_interactions "
            f"{args.num_interactions}; MACE makes the last block scalar-only): the head reads the geometric "
            "construction on the last block's scalars (issue 28, docs/scalar_backbones.md)"
        )
