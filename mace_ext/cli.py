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
``--e2ip_geometric``                  head reads l = 1, 2 features built from the edges (issue 28; automatic for ``--max_L 0``)
``--e2ip_committee M``                in-model force committee of M members (issue 26; 0 = off, the flag's default;
                                      configs/mace/e2ip.yaml sets 4)
``--e2ip_committee_channels K``       channels per member (default 8)
``--e2ip_committee_weight W``         weight of the members' loss (default 0.01)
``--e2ip_committee_nll_weight W``     the committee's 3×3 NLL inside it (default 0: members' MSE alone)
``--e2ip_committee_detach B``         the members' loss trains only the members (default True)
``--e2ip_committee_level L``          scaled (default: c·(local member spread / its val mean)·U_epi,head) | spread
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

Code: :mod:`mace_ext.train_options` (the options above, the start-up check), :mod:`mace_ext.train_run`
(the wrappers), :mod:`mace_ext.uq_reports` (UQ log lines, final-table columns, results file),
:mod:`mace_ext.force_scale` (σ_F).
"""

from __future__ import annotations

import sys
from typing import List, Optional

import e2ip_plugins  # noqa: F401  (allow-lists e3nn's constants before mace imports e3nn)

from . import hooks
from .errors import E2IPConfigError
from .force_scale import training_force_rms  # noqa: F401  (re-exported)
from .train_options import DEFAULTS, add_e2ip_arguments, build_parser, check_e2ip_args  # noqa: F401  (re-exported)
from .train_run import E2IPRun
from .uq_reports import FINAL_TABLE_COLUMNS, UQ_LOG_KEYS  # noqa: F401  (re-exported)


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
