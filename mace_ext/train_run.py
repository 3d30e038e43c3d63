"""One ``mace_run_train_e2ip`` run: :class:`E2IPRun` holds its settings and the wrappers it installs into MACE
for the run's duration (the list, and why each, is in :mod:`mace_ext.cli` and :mod:`mace_ext.hooks`)."""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from . import hooks
from .errors import E2IPConfigError
from .fit_novelty import fit_novelty
from .force_scale import broadcast_float, dist_world_size, training_force_rms
from .model import attach_e2ip_head
from .uq_reports import add_final_columns, log_valid_uq, write_final_results


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
            committee_weight=a.e2ip_committee_weight if a.e2ip_committee else 0.0,
            committee_nll_weight=a.e2ip_committee_nll_weight,
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
            if dist_world_size() > 1:  # MACE's rms_forces_scaling is computed on each rank's shard
                self.sigma_f = broadcast_float(self.sigma_f)
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
                geometric=bool(getattr(a, "e2ip_geometric", False)),
                committee={"num_members": a.e2ip_committee, "num_channels": a.e2ip_committee_channels,
                           "detach": a.e2ip_committee_detach, "level": a.e2ip_committee_level}
                if a.e2ip_committee else None,
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
            extra = [getattr(model, n, None) for n in ("e2ip_energy_noise", "e2ip_geometric", "e2ip_committee")]
            head_params = [p for m in (head, *extra) if m is not None for p in m.parameters() if id(p) not in seen]
            if head_params:
                groups.append({"name": "e2ip_head", "params": head_params, "weight_decay": 0.0, "lr": args.lr})
                seen.update(id(p) for p in head_params)
            missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
            if any(n.startswith(("e2ip_head.", "e2ip_energy_noise.", "e2ip_geometric.", "e2ip_committee."))
                   for n in missing):
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
            log_valid_uq(eval_metrics, epoch, valid_loader_name, getattr(self.args, "wandb", False))

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
        add_final_columns(table, metrics_by_name)
        if self.rank != 0 or not metrics_by_name:
            return table
        if any(n.startswith("train") for n in metrics_by_name) or self.final_tables == 0:
            self.final_tables += 1
        write_final_results(self.args, self.final_tables, metrics_by_name)
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
